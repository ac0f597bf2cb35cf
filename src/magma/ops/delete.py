"""delete: remove a layer's chunks for mips mip..mip+num_mips inside bounds.

Bounds must lie on the chunk grid: deleting the chunks that merely touch the
box would remove data the user asked to keep. The info file is left as is
(like Igneous), so the scales can be rebuilt in place.
"""
from __future__ import annotations

import numpy as np
from cloudvolume import Bbox

from .. import layers, storage
from ..errors import MagmaError
from ..plan import Grid, StepPlan, make_stage
from .common import open_volume


def reads(p):
    return []


def writes(p):
    return [p["layer"]]


def creates(p):
    return []


def plan(ctx, name: str, p: dict) -> StepPlan:
    where = f"steps.{name}"
    lname, mip = p["layer"], p["mip"]
    info = ctx.infos[lname]
    layers.check_mip(lname, info, mip, key=f"{where}.mip")
    meta = layers.meta(info)
    # mips above what exists now may be added by later steps; the task clamps at run
    # time (like Igneous), so the plan does not change once they exist
    top = mip + p["num_mips"]
    existing_top = min(len(info["scales"]) - 1, top)
    box = layers.user_bounds(where, lname, info, p["bounds"], p["bounds_mip"], mip)
    whole = meta.bounds(mip)
    sharded = [m for m in range(mip, existing_top + 1) if "sharding" in info["scales"][m]]
    if sharded and box != whole:
        raise MagmaError(f"{where}.bounds: mips {sharded} are sharded; only the whole mip can be deleted")
    # chunk alignment at every mip touched, seen from `mip`
    for m in range(mip, existing_top + 1):
        ratio = (meta.downsample_ratio(m) / meta.downsample_ratio(mip)).astype(int)
        layers.check_aligned(where, box, whole, meta.chunk_size(m) * ratio, f"the chunk size of mip {m} seen from mip {mip}")
    if p["shape"] is not None:
        shape = list(p["shape"])
    else:
        shape = meta.chunk_size(mip).tolist()
        shape[0] *= 2 ** p["num_mips"]
        shape[1] *= 2 ** p["num_mips"]
    step = StepPlan(name, "delete", p, writes=[lname])
    stage = make_stage(f"mip{mip}-{top}", Grid.of(box, shape),
                       {"layer": lname, "mip": mip, "top": top, "origin": box.minpt.tolist()}, ctx.step_exec)
    step.stages.append(stage)
    step.notes.append(f"{stage.name}: {stage.grid.n} tasks of {stage.grid.shape} -> {stage.jobs} jobs")
    return step


def run_task(params: dict, box: Bbox, paths: dict) -> dict:
    vol = open_volume(paths[params["layer"]], params["mip"])
    mip = params["mip"]
    deleted = 0
    for m in range(mip, min(params["top"], len(vol.meta.available_mips) - 1) + 1):
        if vol.image.is_sharded(m):
            if box.minpt.tolist() != params["origin"]:
                continue  # the whole sharded mip goes once, with the first task
            cf = storage.files(vol.meta.join(vol.meta.cloudpath, vol.meta.key(m)))
            names = list(cf.list())
            cf.delete(names)
            deleted += len(names)
            continue
        sub = vol.bbox_to_mip(box, mip, m)
        sub = sub.round_to_chunk_size(vol.meta.chunk_size(m), offset=vol.meta.bounds(m).minpt)
        sub = Bbox.clamp(sub, vol.meta.bounds(m))
        if sub.volume() == 0:
            continue
        vol.mip = m
        vol.delete(sub)
        deleted += int(np.prod(np.ceil(sub.size3() / vol.meta.chunk_size(m))))
    return {"chunks_deleted": deleted}
