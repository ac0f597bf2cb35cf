"""Keep freed memory in a job process instead of handing it back to the kernel.

glibc gives every allocation above 32 MiB its own mmap and unmaps it when freed,
so each task's arrays (a 512^3 uint64 block is 1 GiB) page-fault in afresh: in a
ccl job a third of the wall time went to the kernel zeroing pages. A job is a
short-lived process sized for its largest task, so reusing its heap costs no
memory it would not have used anyway. (The same as MALLOC_MMAP_MAX_=0 and
MALLOC_TRIM_THRESHOLD_ in the environment, but set from inside, so that it holds
for forked jobs, cluster jobs and pods alike.)
"""
from __future__ import annotations

import ctypes
import os

M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
_done = False


def keep_freed_memory() -> bool:
    """Serve large arrays from a heap that is not trimmed; False where libc is not glibc."""
    global _done
    if _done:
        return True
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # not glibc (musl, macOS): leave the allocator alone
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    _done = bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, 2**31 - 1))
    # and for processes a kernel starts afresh (a spawned worker pool, as kimimaro's
    # parallel mode uses): without this, their page faults made a 2-process skeleton
    # forge cost 1.6x the CPU of one process
    os.environ.setdefault("MALLOC_MMAP_MAX_", "0")
    os.environ.setdefault("MALLOC_TRIM_THRESHOLD_", str(2**31 - 1))
    return _done
