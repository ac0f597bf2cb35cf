"""Pieces every op shares: the planning context and opening volumes for a task."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from cloudvolume import CloudVolume
from cloudvolume.datasource.precomputed.common import cdn_cache_control

from ..errors import MagmaError

# CloudVolume 12.15 hands `cdn_cache` to the storage as is when it writes a shard (chunked writes
# translate it first); boto3 rejects the default `True` ("CacheControl must be a string"), so a
# sharded write to s3:// fails. Passing the translated header keeps chunked writes as they were.
CACHE_CONTROL = cdn_cache_control(True)


@dataclass
class Context:
    paths: dict  # layer name -> cloud path
    infos: dict  # layer name -> info dict as it will be when the step runs
    execution: dict
    step_exec: dict = field(default_factory=dict)  # execution merged with this step's overrides


def open_volume(path: str, mip: int, **kw) -> CloudVolume:
    """A CloudVolume for one task: quiet, single-threaded (the job parallelizes tasks)."""
    kw.setdefault("cdn_cache", CACHE_CONTROL)
    return CloudVolume(path, mip=mip, progress=False, parallel=1, **kw)


def file_compression(compress, encoding: str):
    """The step's `compress`, except that image codecs are never gzipped a second
    time (as the Igneous CLI does for jpeg and png)."""
    return "none" if encoding in ("jpeg", "png") else compress


def compress_arg(compress):
    """Config `compress` -> CloudVolume's: None keeps CloudVolume's default, 'none' disables."""
    if compress == "none":
        return False
    return compress


def dtype_width(info: dict) -> int:
    return np.dtype(info["data_type"]).itemsize


def check_new_layer(where: str, ctx, p: dict) -> None:
    """An op that writes a new layer (dest) from src: never onto src itself."""
    if ctx.paths[p["src"]].rstrip("/") == ctx.paths[p["dest"]].rstrip("/"):
        raise MagmaError(f"{where}: src and dest are the same path ({ctx.paths[p['src']]}); dest must be a new layer")
