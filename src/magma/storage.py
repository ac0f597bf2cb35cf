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

from cloudfiles import CloudFiles
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


# ---- retries and file names -----------------------------------------------------------------
# cloud-files retries every failed S3/GCS/HTTP call 7 times with random waits of up to a minute,
# whatever the error, and an error it finally raises does not say which object it was about.
# magma's jobs (and its planner) replace that policy: transient errors (connection trouble,
# timeouts, 5xx, throttling) are retried with exponential backoff; errors that no retry can fix
# (no such bucket, access denied, bad credentials) fail at once. Either way the error carries the
# object's address (`exc.magma_path`), which the job puts in its message.
PERSISTENT_CODES = {
    "NoSuchBucket", "AccessDenied", "AllAccessDisabled", "InvalidAccessKeyId", "SignatureDoesNotMatch",
    "ExpiredToken", "InvalidToken", "InvalidBucketName", "AuthorizationHeaderMalformed", "InvalidRequest",
    "MethodNotAllowed", "NotImplemented", "403", "404", "400", "401",
}
PERSISTENT_TYPES = ("NoCredentialsError", "PartialCredentialsError", "ParamValidationError", "NotFound",
                    "Forbidden", "Unauthorized", "BadRequest", "AuthorizationError", "UnsupportedProtocolError")
RETRY = {"attempts": 6, "first_wait": 0.5, "max_wait": 30.0}


def transient(exc: BaseException) -> bool:
    """Whether another attempt may succeed (unknown errors are given the benefit of the doubt)."""
    code = _code(exc)
    if code in PERSISTENT_CODES or type(exc).__name__ in PERSISTENT_TYPES:
        return False
    return not isinstance(exc, (KeyError, TypeError, ValueError, PermissionError, FileNotFoundError))


def _address(iface, file_path) -> str:
    p = iface._path
    name = file_path if isinstance(file_path, str) else "(several objects)"
    name = name or ""
    if p.protocol == "file":
        return f"file://{iface.get_path_to_file(name)}"
    return f"{p.protocol}://{p.bucket}/{iface.get_path_to_file(name)}"


def _named(fn, retried: bool):
    import functools

    import tenacity

    inner = fn.__wrapped__ if retried else fn  # under cloud-files' own tenacity decorator

    @functools.wraps(inner)
    def call(self, *args, **kw):
        try:
            if not retried:
                return inner(self, *args, **kw)
            policy = tenacity.Retrying(  # read RETRY now: install() may have changed it
                reraise=True,
                retry=tenacity.retry_if_exception(transient),
                stop=tenacity.stop_after_attempt(RETRY["attempts"]),
                wait=tenacity.wait_random_exponential(RETRY["first_wait"], RETRY["max_wait"]),
            )
            return policy(inner, self, *args, **kw)
        except Exception as exc:
            if not hasattr(exc, "magma_path"):
                name = args[0] if args else next((kw[k] for k in ("file_path", "prefix", "path") if k in kw), "")
                exc.magma_path = _address(self, name)
            raise

    call.magma_wrapped = True
    return call


def install(attempts: int | None = None, first_wait: float | None = None) -> None:
    """Apply magma's retry policy and error addresses to cloud-files' storage interfaces."""
    from cloudfiles import interfaces
    from cloudvolume.datasource.precomputed.image import rx

    if attempts is not None:
        RETRY["attempts"] = max(1, int(attempts))
    if first_wait is not None:
        RETRY["first_wait"] = float(first_wait)
    for cls in (interfaces.S3Interface, interfaces.GoogleCloudStorageInterface, interfaces.HttpInterface,
                interfaces.FileInterface):
        for name in ("put_file", "get_file", "head", "size", "delete_file", "delete_files", "exists", "list_files"):
            fn = cls.__dict__.get(name)
            if fn is None or getattr(fn, "magma_wrapped", False):
                continue
            setattr(cls, name, _named(fn, hasattr(fn, "retry_with")))
    if not getattr(rx.download_chunk, "magma_wrapped", False):
        rx.download_chunk = _chunk_named(rx.download_chunk)


def _chunk_named(download_chunk):
    """CloudVolume decodes a chunk after cloud-files read it; a damaged chunk (truncated gzip,
    bad codec stream) fails there without a name. This puts the chunk's address on the error."""
    import functools

    @functools.wraps(download_chunk)
    def call(meta, cache, lru, lru_encoding, cloudpath, mip, filename, *args, **kw):
        try:
            return download_chunk(meta, cache, lru, lru_encoding, cloudpath, mip, filename, *args, **kw)
        except Exception as exc:
            if not hasattr(exc, "magma_path") and type(exc).__name__ != "EmptyVolumeException":
                exc.magma_path = f"{cloudpath.rstrip('/')}/{filename}"
            raise

    call.magma_wrapped = True
    return call


def damaged(exc: BaseException) -> bool:
    """A stored object that was read but cannot be decoded (truncated gzip, bad codec stream)."""
    import gzip
    import zlib

    name = type(exc).__name__
    return (isinstance(exc, (EOFError, zlib.error, gzip.BadGzipFile))
            or any(w in name for w in ("Decod", "Decompress", "Deflate")))


def failure_message(where: str, exc: BaseException) -> str:
    """What failed, on which object, and whether it was retried."""
    reason = describe_error(where, exc)
    if damaged(exc):
        return (f"{where} is damaged and cannot be decoded ({reason}). Rebuild it from its source,"
                " or delete it and set fill_missing: true to read it as background.")
    if not where.startswith("file://") and transient(exc):
        return f"{where}: still failing after {RETRY['attempts']} attempts: {reason}"
    return f"{where}: {reason}"


class LocalFiles(CloudFiles):
    """CloudFiles that reads several local files one by one in the calling thread (cloud-files
    takes its single-threaded path for one file)."""

    def get(self, paths, *args, **kw):
        if isinstance(paths, (str, dict)):
            return super().get(paths, *args, **kw)
        parts = [super(LocalFiles, self).get([p], *args, **kw) for p in paths]
        if kw.get("return_dict"):
            return {k: v for part in parts for k, v in part.items()}
        return [item for part in parts for item in part]


def files(path: str, **kw) -> CloudFiles:
    """CloudFiles for `path`. On file:// it reads and writes in the calling thread: cloud-files
    runs a local many-file call on a thread pool (a get always on one thread) and checks every
    0.1 s whether it is done, so each such call waited a tenth of a second for disk work of a
    few milliseconds (1.6 s of a mesh merge). Object stores keep the pool, which hides their
    latency."""
    if path.startswith("file://") or "://" not in path:
        return LocalFiles(path, **{"num_threads": 0, **kw})
    return CloudFiles(path, **kw)
