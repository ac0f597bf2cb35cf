"""skeleton_export: a layer's skeletons as SWC files, one `<label>.swc` per label, for
NEURON, navis and the other tools that read SWC.

Coordinates are physical (nanometres, the layer's transform applied) and each node
carries the skeleton's `radius` attribute; the files are CloudVolume's own SWC writer
(`Skeleton.to_swc`). Tasks split the labels by decimal prefix (unsharded skeletons)
or by shard number (sharded), decided when the task runs, so a skeleton step earlier
in the same run may still be choosing its sharding when this step is planned.
"""
from __future__ import annotations

import posixpath

from cloudvolume import Bbox

from .. import label_files, storage
from ..errors import MagmaError
from ..plan import Grid, StepPlan, make_stage
from .common import open_volume

IDS_PER_TASK = 1000


def reads(p):
    return [p["layer"]]


def writes(p):
    return []  # writes files outside any layer


def creates(p):
    return []


def dest_path(dest: str) -> str:
    return dest if "://" in dest else "file://" + posixpath.abspath(dest)


def plan(ctx, name: str, p: dict) -> StepPlan:
    where = f"steps.{name}"
    info = ctx.infos[p["layer"]]
    if not info.get("skeletons"):
        raise MagmaError(f"{where}.layer: layer '{p['layer']}' has no skeletons (its info names no `skeletons`"
                         " directory); run a skeleton step on it first")
    params = {"layer": p["layer"], "dest": dest_path(p["dest"]), "magnitude": p["magnitude"],
              "object_ids": p["object_ids"]}
    if p["object_ids"]:
        n = -(-len(p["object_ids"]) // IDS_PER_TASK)
    else:
        n = label_files.task_count(p["magnitude"])
    step = StepPlan(name, "skeleton_export", p, sources=[p["layer"]])
    stage = make_stage("swc", Grid.indices(n), params, ctx.step_exec)
    step.stages.append(stage)
    step.notes.append(f"swc: {n} tasks -> {stage.jobs} jobs into {params['dest']}")
    return step


def labels_of_task(vol, params: dict, task: int) -> list:
    """The labels task `task` exports."""
    if params["object_ids"]:
        return params["object_ids"][task * IDS_PER_TASK:(task + 1) * IDS_PER_TASK]
    src = vol.skeleton
    cf = storage.files(vol.meta.join(vol.cloudpath, src.meta.skeleton_path))
    tasks = label_files.task_count(params["magnitude"])
    if src.meta.is_sharded():
        labels = []
        for name in label_files.shard_names(src.reader.spec.shard_bits, task, tasks):
            if cf.exists(name):  # a shard no label hashed to is never written
                labels += [int(x) for x in src.reader.list_labels(name, path=src.meta.skeleton_path)]
        return sorted(labels)
    return label_files.label_names(cf, label_files.prefixes(params["magnitude"])[task], params["magnitude"])


def run_task(params: dict, box: Bbox, paths: dict) -> dict:
    vol = open_volume(paths[params["layer"]], 0)
    if not vol.info.get("skeletons"):
        raise MagmaError(f"layer '{params['layer']}' has no skeletons")
    labels = labels_of_task(vol, params, int(box.minpt.x))
    if not labels:
        return {"skeletons": 0}
    try:
        skeletons = vol.skeleton.get(labels)
    except Exception as exc:  # a missing label raises from deep inside CloudVolume
        raise MagmaError(f"skeleton_export: cannot read skeletons of layer '{params['layer']}': {exc}") from exc
    storage.files(params["dest"]).puts(
        ((f"{s.id}.swc", s.to_swc().encode("utf-8")) for s in skeletons),
        content_type="text/plain", compress=None,
    )
    return {"skeletons": len(skeletons), "vertices": int(sum(len(s.vertices) for s in skeletons))}
