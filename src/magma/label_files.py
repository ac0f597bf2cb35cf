"""Splitting a mesh or skeleton directory into tasks without listing it at plan time.

Unsharded directories hold one or more files per label, named from the label
(`123`, `123:0`, `123.index`, `123:0:<fragment>`). A task takes the names that
begin with one decimal prefix: every prefix of 1..`magnitude` digits (like
Igneous's `--magnitude`), where a prefix shorter than `magnitude` keeps only
names whose next character is not a digit, so each name falls to exactly one
task; one last task takes the names that do not begin with a digit (`info`,
shard files named in hex, work directories). Listing by prefix is what object
stores do cheaply, so no task lists the whole directory except the last, which
keeps only what it needs.

Sharded directories are split by shard number: task i takes the shards whose
number is i modulo the task count.
"""
from __future__ import annotations

import itertools
import re

from cloudfiles import CloudFiles

LABEL = re.compile(r"^\d+$")


def prefixes(magnitude: int) -> list:
    """Task i's prefix; the last is "" (names not starting with a digit)."""
    out = []
    for k in range(1, magnitude + 1):
        out += ["".join(d) for d in itertools.product("0123456789", repeat=k)]
    return out + [""]


def task_count(magnitude: int) -> int:
    return sum(10 ** k for k in range(1, magnitude + 1)) + 1


def names(cf: CloudFiles, prefix: str, magnitude: int, recursive: bool = False) -> list:
    """The names that fall to the task with this prefix (top level of `cf`, or every file below it)."""
    if prefix == "":
        return [n for n in cf.list(flat=not recursive) if not n[:1].isdigit()]
    listed = cf.list(prefix=prefix, flat=not recursive)
    if len(prefix) == magnitude:
        return list(listed)
    return [n for n in listed if len(n) == len(prefix) or not n[len(prefix)].isdigit()]


def label_names(cf: CloudFiles, prefix: str, magnitude: int) -> list:
    """The labels with a file named exactly by their number (skeletons, legacy mesh manifests
    are `<label>:0`) among a task's names."""
    return sorted(int(n) for n in names(cf, prefix, magnitude) if LABEL.match(n))


def shard_names(shard_bits: int, task: int, tasks: int) -> list:
    """File names of the shards that fall to task `task` (numbers in hex, as the spec names them)."""
    width = -(-int(shard_bits) // 4)
    return [f"{n:0{width}x}.shard" for n in range(task, 2 ** int(shard_bits), tasks)]
