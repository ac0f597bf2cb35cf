"""skeleton_transfer: copy a layer's skeletons to another layer (Igneous `skeleton xfer`), as stored,
or with `sharded: true` repacked from unsharded files into shards. See magma.object_dirs.
"""
from __future__ import annotations

from .. import object_dirs
from ..object_dirs import cleanup_task, copy_task, shards_task, spec_task  # noqa: F401  (stage tasks)

run_task = copy_task  # the first stage's task


def reads(p):
    return [p["src"]]


def writes(p):
    return [p["dest"]]


def creates(p):
    return []


def plan(ctx, name: str, p: dict):
    return object_dirs.plan_transfer("skeleton", "skeleton_transfer", ctx, name, p, p["shard_tasks"])
