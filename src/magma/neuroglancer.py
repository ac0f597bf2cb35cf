"""Neuroglancer links for produced layers, and `magma serve`: a static file server
that Neuroglancer can read local (file://) layers from.

Neuroglancer runs in the browser, so a local layer must be served over HTTP with
CORS headers. CloudVolume stores compressed objects on local disk as `<name>.gz`
(or `.br`, `.zstd`) while clients ask for `<name>`; the server answers such a
request with the stored file and the matching Content-Encoding, which the
browser undoes. Sharded layers are read by byte range, so Range is supported.
"""
from __future__ import annotations

import json
import os
import re
import urllib.parse
from http import HTTPStatus
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

NEUROGLANCER = "https://neuroglancer-demo.appspot.com/"
DEFAULT_PORT = 8080
ENCODINGS = ((".gz", "gzip"), (".br", "br"), (".zstd", "zstd"))


def local_dir(path: str) -> str | None:
    """The directory of a file:// layer, else None."""
    if not path.startswith("file://"):
        return None
    return os.path.abspath(path[len("file://"):])


def source_url(path: str, port: int = DEFAULT_PORT, name: str | None = None) -> str | None:
    """The Neuroglancer `precomputed://` source of a layer path; local layers point at `magma serve`."""
    if path.startswith("file://"):
        return f"precomputed://http://localhost:{port}/{name}"
    if re.match(r"^(gs|s3|https?)://", path):
        return f"precomputed://{path.rstrip('/')}"
    return None  # mem:// and the like cannot be viewed from a browser


def state(layers: list, infos: dict | None = None) -> dict:
    """A Neuroglancer state with one layer per (name, source, layer type).

    `infos` (name -> info dict) lets the state start at the centre of the first
    layer, in its mip-0 voxel units; without it Neuroglancer picks a view itself.
    """
    st = {"layers": [{"type": "segmentation" if t == "segmentation" else "image", "source": src, "name": name}
                     for name, src, t in layers],
          "layout": "4panel"}
    infos = infos or {}
    first = next((infos[n] for n, _, _ in layers if n in infos), None)
    if first is not None:
        scale = first["scales"][0]
        res = [float(r) * 1e-9 for r in scale["resolution"]]
        st["dimensions"] = {ax: [r, "m"] for ax, r in zip("xyz", res)}
        st["position"] = [o + s / 2 for o, s in zip(scale["voxel_offset"], scale["size"])]
    return st


def url(st: dict, base: str = NEUROGLANCER) -> str:
    return base + "#!" + urllib.parse.quote(json.dumps(st, separators=(",", ":")), safe="")


def layer_links(paths: dict, types: dict, infos: dict | None = None, port: int = DEFAULT_PORT) -> list:
    """(name, source, link) per layer that a browser can reach; local ones via `magma serve`."""
    out = []
    for name, path in paths.items():
        src = source_url(path, port, name)
        if src is not None:
            one = {name: infos[name]} if infos and name in infos else None
            out.append((name, src, url(state([(name, src, types.get(name, "image"))], one))))
    return out


# ---- the server ----------------------------------------------------------------
class LayerHandler(SimpleHTTPRequestHandler):
    """Serves `roots` (url prefix -> directory) read-only, with CORS, stored
    compression as Content-Encoding, and single byte ranges."""

    roots: dict = {}

    def log_message(self, fmt, *args):  # one short line per request
        print(f"{self.address_string()} {fmt % args}")

    def end_headers(self):
        self.send_header("Access-Control-Allow-Origin", "*")
        self.send_header("Access-Control-Allow-Headers", "Range")
        self.send_header("Access-Control-Expose-Headers", "Content-Range, Content-Length, Content-Encoding")
        super().end_headers()

    def do_OPTIONS(self):
        self.send_response(HTTPStatus.NO_CONTENT)
        self.end_headers()

    def _resolve(self) -> tuple:
        """(file path, content encoding) for the request, or (None, None)."""
        rel = urllib.parse.unquote(urllib.parse.urlsplit(self.path).path).lstrip("/")
        prefix, _, rest = rel.partition("/")
        root = self.roots.get(prefix)
        if root is None:
            return None, None
        full = os.path.realpath(os.path.join(root, rest))
        if full != root and not full.startswith(root + os.sep):
            return None, None
        if os.path.isfile(full):
            return full, None
        for ext, enc in ENCODINGS:
            if os.path.isfile(full + ext):
                return full + ext, enc
        return None, None

    def do_HEAD(self):
        self._send(body=False)

    def do_GET(self):
        self._send(body=True)

    def _send(self, body: bool):
        path, encoding = self._resolve()
        if path is None:
            self.send_error(HTTPStatus.NOT_FOUND)
            return
        size = os.path.getsize(path)
        start, end = 0, size - 1
        rng = self.headers.get("Range")
        m = re.fullmatch(r"bytes=(\d*)-(\d*)", rng.strip()) if rng else None
        if m and (m.group(1) or m.group(2)):
            if m.group(1):
                start = int(m.group(1))
                end = min(int(m.group(2)), size - 1) if m.group(2) else size - 1
            else:  # suffix range: the last n bytes
                start = max(0, size - int(m.group(2)))
            if start > end:
                self.send_response(HTTPStatus.REQUESTED_RANGE_NOT_SATISFIABLE)
                self.send_header("Content-Range", f"bytes */{size}")
                self.end_headers()
                return
            self.send_response(HTTPStatus.PARTIAL_CONTENT)
            self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        else:
            self.send_response(HTTPStatus.OK)
        name = path[: -len(next(e for e, c in ENCODINGS if c == encoding))] if encoding else path
        self.send_header("Content-Type", "application/json" if name.endswith("info") else "application/octet-stream")
        if encoding:
            self.send_header("Content-Encoding", encoding)
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Content-Length", str(end - start + 1))
        self.end_headers()
        if body:
            with open(path, "rb") as f:
                f.seek(start)
                self.wfile.write(f.read(end - start + 1))


def make_server(roots: dict, host: str = "127.0.0.1", port: int = DEFAULT_PORT) -> ThreadingHTTPServer:
    """A server for `roots` (layer name -> local directory); call serve_forever() on it."""
    handler = type("Handler", (LayerHandler,), {"roots": {k: os.path.realpath(v) for k, v in roots.items()}})
    return ThreadingHTTPServer((host, port), handler)


def summary(names: list, paths: dict, infos: dict, configfile: str | None = None,
            port: int = DEFAULT_PORT, serve_hint: bool = True) -> str:
    """What the end of a run prints: a Neuroglancer link per layer, one for all of
    them, and how to serve the local ones."""
    chosen = {n: paths[n] for n in names}
    types = {n: infos[n]["type"] for n in names if n in infos}
    links = layer_links(chosen, types, infos, port)
    if not links:
        return ""
    lines = ["Neuroglancer (one link per layer, then all of them):"]
    lines += [f"  {name:<16} {link}" for name, _, link in links]
    together = state([(n, s, types.get(n, "image")) for n, s, _ in links], infos)
    lines.append(f"  {'(all)':<16} {url(together)}")
    if serve_hint and any(local_dir(paths[n]) for n, _, _ in links):
        cfg = f" --configfile {configfile}" if configfile else ""
        lines.append(f"  local layers open once served with CORS:  magma serve{cfg}  (port {port})")
    return "\n".join(lines)
