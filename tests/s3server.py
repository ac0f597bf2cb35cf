"""An S3-compatible server for the tests: moto in server mode, a real HTTP server process on loopback.

    server = S3Server(tmp_path).start()      # raises S3ServerError (with moto's output) if it cannot start
    server.create_bucket("magma-test")
    env = server.env()                        # what a snakemake subprocess needs to reach it
    ...
    server.stop()

How magma (CloudVolume / cloud-files) is pointed at it, with environment variables only:

- `AWS_ENDPOINT_URL_S3`: boto3's own setting for the S3 endpoint. cloud-files passes no endpoint
  for a plain `s3://bucket/path`, so boto3 takes this one, and layer paths stay `s3://...`.
- `CLOUD_VOLUME_DIR`: where cloud-files looks for `secrets/aws-secret.json`. It points into the
  test's temporary directory, and so do `HOME` and `CLOUD_FILES_DIR`: nothing is read from or
  written to the real home directory, and no AWS_* credential from the caller's environment is
  passed on.

moto accepts any credentials; the test ones are random, so a test can check they are never printed.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import boto3


class S3ServerError(RuntimeError):
    pass


class S3Server:
    def __init__(self, root: Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.proc: subprocess.Popen | None = None
        self.url: str | None = None
        self.log = self.root / "moto.log"
        # recognisable but random, so that a leak into a log can be searched for
        self.access_key = "AKIAMAGMA" + secrets.token_hex(6).upper()
        self.secret_key = "magma-secret-" + secrets.token_urlsafe(24)
        self.home = self.root / "home"
        self.cloudvolume_dir = self.home / ".cloudvolume"
        self.cloudfiles_dir = self.home / ".cloudfiles"

    # ---- process ---------------------------------------------------------------------------
    def start(self, timeout: float = 30.0) -> "S3Server":
        """Start `python -m moto.server` on 127.0.0.1 and a free port the OS picks (-p 0)."""
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        with open(self.log, "wb") as out:
            try:
                self.proc = subprocess.Popen(
                    [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", "0"],
                    stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True,
                )
            except OSError as exc:
                raise S3ServerError(f"cannot start moto server: {exc}") from exc
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise S3ServerError(f"moto server exited with {self.proc.returncode}:\n{self._log_tail()}")
            m = re.search(r"Running on (http://127\.0\.0\.1:\d+)", self.log.read_text(errors="replace"))
            if m and self._answers(m.group(1)):
                self.url = m.group(1)
                break
            time.sleep(0.1)
        else:
            self.stop()
            raise S3ServerError(f"moto server did not answer within {timeout:.0f} s:\n{self._log_tail()}")
        self._write_secrets()
        return self

    @staticmethod
    def _answers(url: str) -> bool:
        try:
            with urllib.request.urlopen(f"{url}/moto-api/", timeout=2) as r:
                return r.status < 500
        except OSError:
            return False

    def _log_tail(self) -> str:
        try:
            return self.log.read_text(errors="replace")[-3000:]
        except OSError:
            return "(no output)"

    def stop(self) -> None:
        """Stop the server this object started (by its pid; never by name)."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)

    # ---- buckets and clients ----------------------------------------------------------------
    def client(self):
        return boto3.client("s3", endpoint_url=self.url, aws_access_key_id=self.access_key,
                            aws_secret_access_key=self.secret_key, region_name="us-east-1")

    def create_bucket(self, name: str) -> str:
        self.client().create_bucket(Bucket=name)
        return f"s3://{name}"

    def keys(self, bucket: str, prefix: str = "") -> list[str]:
        out = []
        for page in self.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            out += [o["Key"] for o in page.get("Contents", [])]
        return out

    # ---- what a magma process needs ---------------------------------------------------------
    def _write_secrets(self) -> None:
        folder = self.cloudvolume_dir / "secrets"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / "aws-secret.json"
        path.write_text(json.dumps({"AWS_ACCESS_KEY_ID": self.access_key, "AWS_SECRET_ACCESS_KEY": self.secret_key}))
        path.chmod(0o600)

    def env(self, base: dict | None = None) -> dict:
        """Environment for a subprocess (snakemake, magma) that reads and writes `s3://` on this server."""
        env = {k: v for k, v in (os.environ if base is None else base).items()
               if not k.startswith(("AWS_", "CLOUD_VOLUME", "CLOUD_FILES", "SNAKEMAKE_STORAGE_S3"))}
        env.update(
            HOME=str(self.home),
            CLOUD_VOLUME_DIR=str(self.cloudvolume_dir),
            CLOUD_FILES_DIR=str(self.cloudfiles_dir),
            AWS_ENDPOINT_URL_S3=self.url,
            PATH=f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}",
        )
        return env

    def secrets_dict(self) -> dict:
        """Credentials to pass to CloudVolume/CloudFiles in the test process itself (`secrets=`)."""
        return {"AWS_ACCESS_KEY_ID": self.access_key, "AWS_SECRET_ACCESS_KEY": self.secret_key}

    @contextlib.contextmanager
    def in_process(self):
        """Let CloudVolume in the test process itself reach this server: the endpoint through
        AWS_ENDPOINT_URL_S3 (boto3 reads it whenever a client is made); pass `secrets=secrets_dict()`
        for the credentials. (A path with the endpoint in it, `s3://http://host/bucket`, works for
        cloud-files but CloudVolume rejects it.)"""
        old = os.environ.get("AWS_ENDPOINT_URL_S3")
        os.environ["AWS_ENDPOINT_URL_S3"] = self.url
        try:
            yield self
        finally:
            if old is None:
                os.environ.pop("AWS_ENDPOINT_URL_S3", None)
            else:
                os.environ["AWS_ENDPOINT_URL_S3"] = old


def running_server(folder, buckets=()):
    """Start a server for a test module (fail, never skip, when it cannot start); yields it."""
    import pytest

    server = S3Server(folder)
    try:
        server.start()
    except S3ServerError as exc:
        pytest.fail(f"the S3 test server (moto) could not start: {exc}")
    try:
        for bucket in buckets:
            server.create_bucket(bucket)
        yield server
    finally:
        server.stop()
