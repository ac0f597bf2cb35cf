"""Marker files: the small JSON a job writes last, after all of its data is stored."""
from __future__ import annotations

import json
import os
import tempfile


def write_marker(path: str, data: dict) -> None:
    """Write atomically (temp file + rename): a marker is either absent or complete."""
    if os.path.exists(path) and not os.path.isfile(path):
        # a rename would replace it: never let a marker path clobber a device or a folder
        raise ValueError(f"marker path {path} exists and is not a regular file")
    folder = os.path.dirname(path) or "."
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=".json")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def read_marker(path: str) -> dict:
    with open(path) as f:
        return json.load(f)
