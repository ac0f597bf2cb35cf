"""A loopback HTTP proxy in front of the moto S3 server that fails chosen requests, so tests
see what a real object store does now and then: 503 SlowDown answers and dropped connections.

    proxy = FlakyProxy(s3.url, fail_first=2, match="/8_8_40/").start()
    env["AWS_ENDPOINT_URL_S3"] = proxy.url
    ...
    proxy.counts   # (method, path) -> requests seen
    proxy.stop()

Each distinct (method, path) whose path contains `match` fails its first `fail_first` requests
(alternately a 503 and a closed connection); a path containing `always` fails every time.
"""
from __future__ import annotations

import http.client
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

SLOWDOWN = (b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code>'
            b"<Message>Please reduce your request rate.</Message></Error>")


class FlakyProxy:
    def __init__(self, upstream: str, fail_first: int = 0, match: str = "", always: str | None = None):
        self.upstream = urlsplit(upstream)
        self.fail_first, self.match, self.always = fail_first, match, always
        self.counts: Counter = Counter()
        self.failed: Counter = Counter()
        self.lock = threading.Lock()
        self.server: ThreadingHTTPServer | None = None
        self.url: str | None = None

    def start(self) -> "FlakyProxy":
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def _handle(self):
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                key = (self.command, self.path.split("?", 1)[0])
                with proxy.lock:
                    proxy.counts[key] += 1
                    n = proxy.counts[key]
                fail = (proxy.always and proxy.always in key[1]) or (
                    proxy.match and proxy.match in key[1] and n <= proxy.fail_first)
                if fail:
                    with proxy.lock:
                        proxy.failed[key] += 1
                    if n % 2 == 0:  # a dropped connection
                        self.close_connection = True
                        self.connection.close()
                        return
                    self.send_response(503)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(SLOWDOWN)))
                    self.end_headers()
                    self.wfile.write(SLOWDOWN if self.command != "HEAD" else b"")
                    return
                conn = http.client.HTTPConnection(proxy.upstream.hostname, proxy.upstream.port, timeout=60)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("connection",)}
                conn.request(self.command, self.path, body=body, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                self.send_response(resp.status, resp.reason)
                head = self.command == "HEAD"
                for k, v in resp.getheaders():
                    if k.lower() not in ("transfer-encoding", "connection") and (head or k.lower() != "content-length"):
                        self.send_header(k, v)
                if not head:
                    self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
                conn.close()

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
