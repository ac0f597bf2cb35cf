"""transfer: copy a layer into a new one, rechunked, translated, re-encoded, with downsamples.

Mirrors Igneous's create_transfer_tasks/TransferTask: the destination info is
the source's (scales truncated to `mip`), with the new chunk size, encoding and
voxel offset; each task writes its block at `mip` and the mips it can build
from it. Sharded output writes one shard per task and no downsamples.
"""
from __future__ import annotations

import copy

import numpy as np
from cloudvolume import Bbox, Vec
from cloudvolume.datasource.precomputed.sharding import (
    compute_shard_params_for_image,
    image_shard_shape_from_spec,
)

from .. import layers
from ..design import memory_for_shape, mips_for_shape, shape_from_memory_target
from ..errors import MagmaError
from ..plan import Grid, StepPlan, make_stage
from .common import check_new_layer, compress_arg, dtype_width, file_compression, open_volume
from .downsample import _set_encoding, new_scales, resolve_method, write_mips


def reads(p):
    return [p["src"]]


def writes(p):
    return [p["dest"]]


def creates(p):
    return [p["dest"]]


def dest_info(src: dict, p: dict, chunk_size) -> dict:
    info = copy.deepcopy(src)
    mip = p["mip"]
    if p["truncate_scales"]:
        info["scales"] = info["scales"][: mip + 1]
    if p["clean_info"]:
        for key in ("mesh", "meshing", "skeletons"):
            info.pop(key, None)
    if p["dest_voxel_offset"] is not None:
        m = layers.meta(info)
        for i in range(mip + 1):
            ratio = np.asarray(m.resolution(0), dtype=float) / np.asarray(m.resolution(i), dtype=float)
            info["scales"][i]["voxel_offset"] = [int(v) for v in np.asarray(p["dest_voxel_offset"]) * ratio]
    _set_encoding(info, [mip], p["encoding"], p["encoding_level"])
    info["scales"][mip]["chunk_sizes"] = [list(chunk_size)]
    info["scales"][mip].pop("sharding", None)
    return info


def plan(ctx, name: str, p: dict) -> StepPlan:
    where = f"steps.{name}"
    check_new_layer(where, ctx, p)
    src = ctx.infos[p["src"]]
    mip = p["mip"]
    layers.check_mip(p["src"], src, mip, key=f"{where}.mip")
    layers.check_encoding(where, p["src"], src, p["encoding"])
    chunk = p["chunk_size"] or src["scales"][mip]["chunk_sizes"][0]
    info = dest_info(src, p, chunk)
    meta = layers.meta(info)

    smeta = layers.meta(src)
    if p["translate"] is None:
        translate = meta.voxel_offset(mip) - smeta.voxel_offset(mip)
    else:
        translate = Vec(*p["translate"]) // smeta.downsample_ratio(mip)
    if np.any(meta.voxel_offset(mip) < 0):
        raise MagmaError(f"{where}.dest_voxel_offset: the destination would start at {meta.voxel_offset(mip).tolist()}; negative coordinates are not allowed")

    factor = (1, 1, 1) if p["skip_downsamples"] else tuple(p["factor"])
    width, channels = dtype_width(src), int(src["num_channels"])
    memory = p["memory_target"] or ctx.execution["memory_target"]
    params = {"src": p["src"], "dest": p["dest"], "mip": mip, "translate": [int(t) for t in translate],
              "fill_missing": p["fill_missing"], "factor": list(factor),
              "compress": file_compression(p["compress"], info["scales"][mip]["encoding"]),
              "method": resolve_method(p["downsample_method"], src["type"]), "sparse": p["sparse"],
              "delete_black_uploads": p["delete_black_uploads"], "background_color": p["background_color"]}
    box = layers.user_bounds(where, p["dest"], info, p["bounds"], p["bounds_mip"], mip)
    step = StepPlan(name, "transfer", p, writes=[p["dest"]], sources=[p["src"]])

    if p["sharded"]:
        if box != meta.bounds(mip):
            raise MagmaError(f"{where}.bounds: sharded output covers whole shards; drop `bounds` or set sharded: false")
        spec = compute_shard_params_for_image(
            dataset_size=meta.volume_size(mip), chunk_size=meta.chunk_size(mip), encoding=meta.encoding(mip),
            dtype=info["data_type"], uncompressed_shard_bytesize=int(memory),
        )
        info["scales"][mip]["sharding"] = spec.to_dict()
        shape = image_shard_shape_from_spec(info["scales"][mip]["sharding"], meta.volume_size(mip), meta.chunk_size(mip))
        k = 0
        # shard files are read by byte range: never compress them whole (data_encoding
        # in the spec compresses each chunk inside instead)
        stage = make_stage(f"mip{mip}-sharded", Grid.of(box, shape),
                           dict(params, num_mips=0, sharded=True, compress="none"),
                           ctx.step_exec, width * channels * float(np.prod(shape)) * 2)
    else:
        if p["shape"] is not None:
            shape = list(p["shape"])
        else:
            try:
                shape = list(shape_from_memory_target(width * channels, chunk, factor, memory, p["max_mips"]))
            except ValueError as exc:
                raise MagmaError(f"{where}.memory_target: {exc}; raise it or set `shape`") from None
        if factor[2] == 1:
            shape[2] = int(chunk[2] * max(round(shape[2] / chunk[2]), 1))
        k = 0 if p["skip_downsamples"] else mips_for_shape(shape, factor, chunk, meta.volume_size(mip))
        unit = [c * f ** k for c, f in zip(chunk, factor)]
        layers.check_aligned(where, box, meta.bounds(mip), unit,
                             "the destination chunk size" + (f" of mip {mip + k} seen from mip {mip}" if k else ""))
        if k:
            info = new_scales(info, mip, k, factor, p["encoding"], None, p["preserve_chunk_size"], p["encoding_level"])
        stage = make_stage(f"mip{mip}" + (f"-{mip + k}" if k else ""), Grid.of(box, shape),
                           dict(params, num_mips=k), ctx.step_exec, memory_for_shape(width, shape, factor, channels))

    existing = ctx.infos.get(p["dest"])
    if existing is not None:
        diffs = layers.same_geometry(existing, info, mip)
        if diffs:
            raise MagmaError(
                f"{where}.dest: layer '{p['dest']}' already exists with a different {', '.join(diffs)};"
                " delete it or choose another dest"
            )
    step.stages.append(stage)
    step.notes.append(f"{stage.name}: {stage.grid.n} tasks of {stage.grid.shape} -> {stage.jobs} jobs")
    step.infos[p["dest"]] = info
    ctx.infos[p["dest"]] = info
    read = Bbox.clamp(box - translate, smeta.bounds(mip))
    if read.volume() == 0 and not p["fill_missing"]:
        raise MagmaError(
            f"{where}.translate: {translate.tolist()} moves all of '{p['src']}' ({smeta.bounds(mip).minpt.tolist()}.."
            f"{smeta.bounds(mip).maxpt.tolist()}) outside the destination box {box.minpt.tolist()}..{box.maxpt.tolist()};"
            " the copy would be empty. Set dest_voxel_offset with it, or check the sign"
        )
    step.checks = [(p["src"], mip, read, p["fill_missing"])] if read.volume() > 0 else []
    return step


def run_task(params: dict, box: Bbox, paths: dict) -> dict:
    mip, k = params["mip"], params["num_mips"]
    src = open_volume(paths[params["src"]], mip, fill_missing=params["fill_missing"], bounded=False)
    dest = open_volume(paths[params["dest"]], mip, fill_missing=params["fill_missing"],
                       compress=compress_arg(params["compress"]),
                       delete_black_uploads=params["delete_black_uploads"],
                       background_color=params["background_color"])
    box = Bbox.clamp(box, dest.meta.bounds(mip))
    image = src.download(box - Vec(*params["translate"]), mip=mip)
    dest.mip = mip
    dest[box] = image
    written = int(np.prod(image.shape[:3]))
    if k:
        written += write_mips(dest, image, box, mip, k, params["method"], params["factor"], params["sparse"])
    return {"voxels_read": int(np.prod(image.shape[:3])), "voxels_written": written}
