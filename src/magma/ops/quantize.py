"""quantize: the first channel of a float layer (affinities, probabilities in 0..1) as a
uint8 image in a new layer, with its pyramid. Igneous: `create_quantize_tasks` / QuantizeTask.
"""
from __future__ import annotations

import numpy as np
from cloudvolume import Bbox

from .. import chunk_files, layers
from ..errors import MagmaError
from ..plan import Grid, StepPlan, make_stage
from . import _derived
from .common import check_new_layer, compress_arg, dtype_width, file_compression, open_volume


def quantize(image: np.ndarray) -> np.ndarray:
    """0..1 -> 0..255, truncating like Igneous; values outside 0..1 saturate."""
    return np.clip(image * np.float32(255.0), 0, 255).astype(np.uint8)


def plan(ctx, name: str, p: dict) -> StepPlan:
    where = f"steps.{name}"
    check_new_layer(where, ctx, p)
    src, mip = ctx.infos[p["src"]], p["mip"]
    layers.check_mip(p["src"], src, mip, key=f"{where}.mip")
    if src["data_type"] not in ("float32", "float64"):
        raise MagmaError(f"{where}.src: quantize reads a float32/float64 layer (values 0..1); layer"
                         f" '{p['src']}' is {src['data_type']}")
    layers.check_encoding(where, p["dest"], {"type": "image", "data_type": "uint8", "num_channels": 1},
                          p["encoding"])
    info = _derived.dest_info(src, mip, data_type="uint8", layer_type="image", num_channels=1,
                              chunk_size=p["chunk_size"], encoding=p["encoding"], encoding_level=p["encoding_level"])
    box = layers.user_bounds(where, p["src"], src, p["bounds"], p["bounds_mip"], mip)
    memory = p["memory_target"] or ctx.execution["memory_target"]
    width = dtype_width(src) * int(src["num_channels"])  # every channel is read
    shape = _derived.task_shape(where, p["shape"], info, mip, box, memory, width)
    info, k = _derived.add_mips(where, info, box, mip, shape, p["encoding"], p["encoding_level"])
    _derived.check_existing(where, ctx, p["dest"], info, mip)
    params = {"src": p["src"], "dest": p["dest"], "mip": mip, "num_mips": k, "fill_missing": p["fill_missing"],
              "compress": file_compression(p["compress"], info["scales"][mip]["encoding"])}
    step = StepPlan(name, "quantize", p, writes=[p["dest"]], sources=[p["src"]])
    stage = make_stage(f"mip{mip}" + (f"-{mip + k}" if k else ""), Grid.of(box, shape), params, ctx.step_exec,
                       float(np.prod(shape)) * (width * 2 + 1) * 4 / 3)
    step.stages.append(stage)
    step.notes.append(f"{stage.name}: {stage.grid.n} tasks of {stage.grid.shape} -> {stage.jobs} jobs")
    step.infos[p["dest"]] = info
    ctx.infos[p["dest"]] = info
    step.checks = [(p["src"], mip, box, p["fill_missing"])]
    return step


def run_task(params: dict, box: Bbox, paths: dict) -> dict:
    mip = params["mip"]
    src = open_volume(paths[params["src"]], mip, fill_missing=params["fill_missing"])
    dest = open_volume(paths[params["dest"]], mip, compress=compress_arg(params["compress"]))
    meta = src.meta
    if meta.encoding(mip) == "raw" and meta.num_channels > 1 and not meta.sharding(mip):
        # the first channel (x affinity) only, as Igneous uses, without inflating the others
        image = chunk_files.read_channel(paths[params["src"]], meta, mip, box, 0, params["fill_missing"],
                                         convert=quantize, out_dtype=np.uint8)
    else:
        image = quantize(src.download(box, mip=mip)[..., 0])
    written = _derived.write_block(dest, image, box, mip, params["num_mips"], "avg")
    return {"voxels_read": int(image.size), "voxels_written": written}
