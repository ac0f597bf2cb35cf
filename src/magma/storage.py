"""Cloud storage: what magma adds to CloudVolume's I/O is a message that says what to check.

CloudVolume and cloud-files do every read and write of `s3://`, `gs://`, `http(s)://` and
`file://` layers. Where they get endpoints and credentials from (see docs/kubernetes.md):

- `s3://bucket/path`: credentials from `$CLOUD_VOLUME_DIR/secrets/aws-secret.json`
  (default `~/.cloudvolume/secrets/`; `<bucket>-aws-secret.json` for one bucket), else from
  `AWS_ACCESS_KEY_ID` + `AWS_SECRET_ACCESS_KEY` + `AWS_SESSION_TOKEN` (cloud-files 6 reads
  the environment only when all three are set; the token may be empty). An S3-compatible
  server other than AWS (MinIO, Ceph, moto) is selected with boto3's `AWS_ENDPOINT_URL_S3`
  (or `AWS_ENDPOINT_URL`).
- `gs://bucket/path`: `google-secret.json` in the same secrets folder, else Google's default
  credentials.

Credentials never appear in a message made here: only error codes, bucket names and endpoints.
"""
from __future__ import annotations

import os

from cloudfiles.paths import extract


def s3_endpoint() -> str:
    """The S3 endpoint a plain `s3://` path goes to in this process, for messages."""
    for var in ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"):
        if os.environ.get(var):
            return f"{os.environ[var]} (from {var})"
    return "AWS S3 (set AWS_ENDPOINT_URL_S3 for another S3-compatible server)"


def _bucket(path: str) -> str | None:
    try:
        return extract(path).bucket
    except Exception:  # an unparsable path is reported by the caller's own message
        return None


def _code(exc: BaseException) -> str | None:
    """The service's error code of a botocore/google error, if any."""
    response = getattr(exc, "response", None)
    if isinstance(response, dict):
        return response.get("Error", {}).get("Code")
    code = getattr(exc, "code", None)
    return str(code) if code is not None else None


def describe_error(path: str, exc: BaseException) -> str:
    """A one-line reason for a failed read of `path`, with what to check."""
    protocol = path.split("://", 1)[0] if "://" in path else "file"
    bucket = _bucket(path)
    name = type(exc).__name__
    code = _code(exc)
    if protocol == "s3":
        where = f"S3 endpoint {s3_endpoint()}"
        if isinstance(exc, KeyError) and exc.args == ("AWS_SESSION_TOKEN",):
            return ("AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY are set but AWS_SESSION_TOKEN is not;"
                    " cloud-files reads credentials from the environment only with all three (an empty"
                    " AWS_SESSION_TOKEN is fine), or put them in $CLOUD_VOLUME_DIR/secrets/aws-secret.json")
        if code in ("NoSuchBucket",):
            return f"bucket '{bucket}' does not exist on the {where}; check the bucket name in the path"
        if code in ("AccessDenied", "403", "InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken"):
            return (f"access to bucket '{bucket}' was refused ({code}) by the {where}; check the credentials"
                    " (aws-secret.json in $CLOUD_VOLUME_DIR/secrets, or AWS_* variables)")
        if name in ("EndpointConnectionError", "ConnectTimeoutError", "ConnectionClosedError"):
            return f"cannot connect to the {where} ({exc})"
        if name in ("NoCredentialsError", "PartialCredentialsError"):
            return (f"no usable AWS credentials ({exc}); put them in $CLOUD_VOLUME_DIR/secrets/aws-secret.json"
                    " or set AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY and AWS_SESSION_TOKEN")
    if protocol == "gs" and code in ("404",) and "bucket" in str(exc).lower():
        return f"bucket '{bucket}' does not exist on Google Cloud Storage ({exc})"
    return f"{name}: {exc}" if code is None else f"{name} ({code}): {exc}"
