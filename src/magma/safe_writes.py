"""All-or-nothing writes to `file://` layers.

cloud-files 6 stores a local object by opening its final name and writing into it, so a
job killed mid-write leaves a truncated chunk that CloudVolume later reads (or fails to
decompress) as if it were data. magma's jobs replace `FileInterface.put_file` with a write
to a hidden temporary file next to the target followed by `os.replace`, which is atomic on
POSIX file systems: a reader sees the old object, or no object, or the whole new one.

The temporary name is fixed per target (`.<name>.part`): the re-run of a killed job writes
the same objects again, so it overwrites and renames whatever temporary file the killed job
left. The leading dot keeps it out of every name CloudVolume or a prefix listing looks for.
Object stores need none of this: a PUT is atomic there.
"""
from __future__ import annotations

import os
import re
import shutil

from cloudfiles.interfaces import FileInterface

_ORIGINAL = FileInterface.put_file


def temp_name(path: str) -> str:
    folder, name = os.path.split(path)
    return os.path.join(folder, f".{name}.part")


def _put_file(self, file_path, content, content_type, compress, cache_control=None, storage_class=None):
    path = self.get_path_to_file(file_path)
    lock_path = path
    ext = self.get_extension(compress)
    if os.path.splitext(path)[1] != ext:  # the same name cloud-files would choose
        path += ext
    if content and isinstance(content, str) and content_type and re.search("json|te?xt", content_type):
        content = content.encode("utf-8")

    def write():
        tmp = temp_name(path)
        try:
            f = open(tmp, "wb")
        except FileNotFoundError:
            os.makedirs(os.path.dirname(tmp), exist_ok=True)
            f = open(tmp, "wb")
        try:
            with f:
                if hasattr(content, "read"):
                    shutil.copyfileobj(content, f)
                else:
                    f.write(content)
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise

    return self.io_with_lock(write, lock_path, exclusive=True)


def install() -> None:
    """Make every file:// write of this process (and of processes forked from it) atomic."""
    FileInterface.put_file = _put_file


def uninstall() -> None:
    FileInterface.put_file = _ORIGINAL
