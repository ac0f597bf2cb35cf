"""reorder: a copy of a layer with its z-slices moved, from a mapping JSON {"z": new_z, ...}.

Slices not named stay where they are. The mapping must permute the slices: a slice
moved onto another that is not moved away, two slices moved onto one z, or a z left
empty is rejected at plan time, naming the slices. Igneous: `igneous image reorder`
(which never moves a slice at HEAD: its task ignores the mapping). Like Igneous the
destination is chunked one slice deep by default and no mips are built; a downsample
step on `dest` adds them.
"""
from __future__ import annotations

import json
import os

import numpy as np
from cloudvolume import Bbox

from .. import layers
from ..errors import MagmaError
from ..plan import Grid, StepPlan, make_stage
from . import _derived
from .common import check_new_layer, compress_arg, dtype_width, file_compression, open_volume
from .remap import read_bytes


def parse_moves(data: bytes) -> dict:
    doc = json.loads(data)
    if not isinstance(doc, dict):
        raise ValueError('must be a JSON object {"z": new_z, ...}')
    moves = {}
    for key, value in doc.items():
        try:
            z = int(key)
        except ValueError:
            raise ValueError(f"key {key!r} is not a z index") from None
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"slice {key} moves to {value!r}, which is not a z index")
        moves[z] = value
    return moves


def source_of(moves: dict, z0: int, z1: int) -> np.ndarray:
    """For each destination z in z0..z1-1, the source slice it receives; ValueError
    naming the slices when `moves` does not permute them."""
    outside = sorted({z for z in moves if not z0 <= z < z1} | {v for v in moves.values() if not z0 <= v < z1})
    if outside:
        raise ValueError(f"z {', '.join(map(str, outside[:10]))} outside the layer's slices {z0}..{z1 - 1}")
    target = np.arange(z0, z1)
    for z, new in moves.items():
        target[z - z0] = new
    problems = []
    for dest in np.nonzero(np.bincount(target - z0, minlength=z1 - z0) > 1)[0] + z0:
        srcs = (np.nonzero(target == dest)[0] + z0).tolist()
        movers = [s for s in srcs if s in moves]
        stay = [s for s in srcs if s not in moves]
        if len(movers) > 1:
            problems.append(f"slices {', '.join(map(str, movers))} all move to z={dest}")
        if stay:
            problems.append(f"slice {stay[0]} would be overwritten by slice {movers[0]} moved onto z={dest}"
                            f" (move slice {stay[0]} too)")
    empty = sorted(set(range(z0, z1)) - set(target.tolist()))
    if empty:
        problems.append(f"z={', '.join(map(str, empty[:10]))} would receive no slice")
    if problems:
        raise ValueError("does not permute the slices: " + "; ".join(problems))
    out = np.empty(z1 - z0, dtype=np.int64)
    out[target - z0] = np.arange(z0, z1)
    return out


def plan(ctx, name: str, p: dict) -> StepPlan:
    where = f"steps.{name}"
    check_new_layer(where, ctx, p)
    src, mip = ctx.infos[p["src"]], p["mip"]
    layers.check_mip(p["src"], src, mip, key=f"{where}.mip")
    layers.check_encoding(where, p["src"], src, p["encoding"])
    path = p["mapping_file"] if "://" in p["mapping_file"] else os.path.abspath(p["mapping_file"])
    whole = layers.meta(src).bounds(mip)
    try:
        order = source_of(parse_moves(read_bytes(path)), int(whole.minpt[2]), int(whole.maxpt[2]))
    except OSError as exc:
        raise MagmaError(f"{where}.mapping_file: cannot read {path}: {exc}") from exc
    except ValueError as exc:
        raise MagmaError(f"{where}.mapping_file: {path} {exc}") from exc
    info = _derived.dest_info(src, mip, chunk_size=p["chunk_size"], encoding=p["encoding"],
                              encoding_level=p["encoding_level"])
    shape = _derived.task_shape(where, p["shape"], info, mip, whole, 0, 0)
    _derived.check_existing(where, ctx, p["dest"], info, mip)
    z0 = int(whole.minpt[2])
    moved = {str(z0 + i): int(s) for i, s in enumerate(order) if s != z0 + i}
    params = {"src": p["src"], "dest": p["dest"], "mip": mip, "fill_missing": p["fill_missing"],
              "compress": file_compression(p["compress"], info["scales"][mip]["encoding"]),
              "delete_black_uploads": p["delete_black_uploads"], "background_color": p["background_color"],
              "moved": moved}
    step = StepPlan(name, "reorder", p, writes=[p["dest"]], sources=[p["src"]])
    width = dtype_width(src) * int(src["num_channels"])
    stage = make_stage(f"mip{mip}", Grid.of(whole, shape), params, ctx.step_exec, float(np.prod(shape)) * width * 2)
    step.stages.append(stage)
    step.notes.append(f"{stage.name}: {stage.grid.n} tasks of {stage.grid.shape} -> {stage.jobs} jobs"
                      f" ({len(moved)} slices move)")
    step.infos[p["dest"]] = info
    ctx.infos[p["dest"]] = info
    step.checks = [(p["src"], mip, whole, p["fill_missing"])]
    return step


def runs(zs):
    """Consecutive runs in a list of ints: [(first index, first value, length)]."""
    out, start = [], 0
    for i in range(1, len(zs) + 1):
        if i == len(zs) or zs[i] != zs[i - 1] + 1:
            out.append((start, zs[start], i - start))
            start = i
    return out


def run_task(params: dict, box: Bbox, paths: dict) -> dict:
    mip = params["mip"]
    src = open_volume(paths[params["src"]], mip, fill_missing=params["fill_missing"])
    dest = open_volume(paths[params["dest"]], mip, compress=compress_arg(params["compress"]),
                       delete_black_uploads=params["delete_black_uploads"],
                       background_color=params["background_color"])
    zs = [int(params["moved"].get(str(z), z)) for z in range(int(box.minpt[2]), int(box.maxpt[2]))]
    out = np.empty(tuple(box.size3()) + (src.num_channels,), dtype=src.dtype, order="F")
    for at, z, n in runs(zs):  # read each run of consecutive source slices once
        out[:, :, at: at + n] = src.download(Bbox((box.minpt[0], box.minpt[1], z), (box.maxpt[0], box.maxpt[1], z + n)),
                                             mip=mip)
    dest[box] = out
    return {"voxels_read": int(np.prod(out.shape[:3])), "voxels_written": int(np.prod(out.shape[:3]))}
