"""mesh_delete: remove a layer's mesh files (Igneous `mesh rm`), or with `clean: true` only
what a forge leaves behind once its merge has run (Igneous `mesh clean`). The layer's
info keeps its `mesh` entry, as with Igneous. See magma.object_dirs.
"""
from __future__ import annotations

from .. import object_dirs
from ..object_dirs import delete_task as run_task  # noqa: F401  (the op's task)


def plan(ctx, name: str, p: dict):
    return object_dirs.plan_delete("mesh", "mesh_delete", ctx, name, p)
