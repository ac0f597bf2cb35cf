"""create: a new Precomputed layer from local image files (TIFF stack or multi-page
TIFF, .npy, HDF5, NIfTI, NRRD).

Tasks are z-slabs one chunk deep (as wide in x and y as `memory_target` allows),
each reading only its box from the files and writing whole chunks, so a stack of
any length plans and runs like any other step. Planning reads headers only (the
first slice of a stack); the setup job checks every slice before the info file
is written. A downsample step on `dest` later in the config builds the pyramid
in the same run.
"""
from __future__ import annotations

import numpy as np
from cloudvolume import Bbox, CloudVolume

from .. import image_files, layers
from ..errors import MagmaError
from ..plan import Grid, StepPlan, make_stage
from .common import compress_arg, file_compression, open_volume
from .downsample import _set_encoding

# data types Neuroglancer reads from a Precomputed layer, per layer type
DTYPES = {
    "image": ("uint8", "int8", "uint16", "int16", "uint32", "int32", "uint64", "float32"),
    "segmentation": ("uint8", "uint16", "uint32", "uint64"),
}


def reads(p):
    return []  # src is files, not a layer


def writes(p):
    return [p["dest"]]


def creates(p):
    return [p["dest"]]


def check_dtype(where: str, desc: dict, layer_type: str) -> str:
    dtype = "uint8" if desc["dtype"] == "bool" else desc["dtype"]  # masks are stored as 0/1 bytes
    if dtype not in DTYPES[layer_type]:
        hint = " (convert to float32)" if dtype == "float64" else ""
        raise MagmaError(
            f"{where}.layer_type: {desc.get('file', desc.get('first'))} holds {dtype} data, which a {layer_type}"
            f" layer cannot store{hint}; {layer_type} layers take {', '.join(DTYPES[layer_type])}"
        )
    return dtype


def task_shape(p: dict, size, chunk, bytes_per_voxel: int, memory: float, where: str) -> list:
    """Chunk-aligned slabs one chunk deep, halving x or y until a task fits `memory`."""
    chunk = np.asarray(chunk)
    if p["shape"] is not None:
        shape = np.asarray(p["shape"])
        if np.any(shape % chunk):
            raise MagmaError(f"{where}.shape: {list(shape)} is not a multiple of chunk_size {chunk.tolist()}")
        return shape.tolist()
    shape = -(-np.asarray(size) // chunk) * chunk
    shape[2] = chunk[2]
    # the slab, the block read from the files and a page of a TIFF at a time
    while 2.0 * bytes_per_voxel * np.prod(shape) > memory and (shape[0] > chunk[0] or shape[1] > chunk[1]):
        axis = 0 if shape[0] // chunk[0] >= shape[1] // chunk[1] else 1
        shape[axis] = max(chunk[axis], -(-shape[axis] // chunk[axis] // 2) * chunk[axis])
    return shape.tolist()


def plan(ctx, name: str, p: dict) -> StepPlan:
    where = f"steps.{name}"
    desc = image_files.describe(p, where)
    dtype = check_dtype(where, desc, p["layer_type"])
    resolution = p["resolution"] or desc["resolution"] or [1, 1, 1]
    if p["resolution"] is None and desc["resolution"] is not None and min(resolution) <= 0:
        raise MagmaError(f"{where}.resolution: {desc['file']} gives voxel size {resolution}; set resolution")
    resolution = [int(r) if float(r).is_integer() else float(r) for r in resolution]
    info = CloudVolume.create_new_info(
        num_channels=desc["channels"], layer_type=p["layer_type"], data_type=dtype, encoding=p["encoding"],
        resolution=resolution, voxel_offset=list(p["voxel_offset"]), volume_size=desc["shape"],
        chunk_size=list(p["chunk_size"]),
    )
    layers.check_encoding(where, p["dest"], info, p["encoding"])
    _set_encoding(info, [0], p["encoding"], p["encoding_level"])

    existing = ctx.infos.get(p["dest"])
    if existing is not None:
        diffs = layers.same_geometry(existing, info, 0)
        if diffs:
            raise MagmaError(
                f"{where}.dest: layer '{p['dest']}' already exists with a different {', '.join(diffs)};"
                " delete it or choose another dest"
            )

    memory = p["memory_target"] or ctx.execution["memory_target"]
    width = np.dtype(dtype).itemsize * desc["channels"]
    # a TIFF page is read whole (then cropped to the task), so a task also holds one full page
    page = width * desc["shape"][0] * desc["shape"][1] if desc["format"] == "tiff" else 0
    shape = task_shape(p, desc["shape"], p["chunk_size"], width, max(memory - page, 1.0), where)
    box = Bbox(p["voxel_offset"], np.asarray(p["voxel_offset"]) + desc["shape"])
    params = {"dest": p["dest"], "source": desc, "offset": list(p["voxel_offset"]),
              "compress": file_compression(p["compress"], p["encoding"])}
    stage = make_stage("ingest", Grid.of(box, shape), params, ctx.step_exec, 2.0 * width * float(np.prod(shape)))
    stage.task_bytes += page

    step = StepPlan(name, "create", p, writes=[p["dest"]], infos={p["dest"]: info}, preflight={"source": desc})
    step.stages.append(stage)
    step.notes.append(f"ingest {desc['format']} {desc['src']}: {desc['shape']} {dtype} x{desc['channels']}"
                      f" -> {stage.grid.n} tasks of {shape} in {stage.jobs} jobs")
    ctx.infos[p["dest"]] = info
    return step


def preflight(step: str, params: dict) -> None:
    """Setup job: every slice of a stack is checked before the info file is written."""
    image_files.check_all(params["source"], f"steps.{step}")


def run_task(params: dict, box: Bbox, paths: dict) -> dict:
    dest = open_volume(paths[params["dest"]], 0, compress=compress_arg(params["compress"]))
    box = Bbox.clamp(box, dest.meta.bounds(0))
    offset = np.asarray(params["offset"])
    block = image_files.read(params["source"], box.minpt - offset, box.maxpt - offset)
    if block.dtype == bool:
        block = block.astype(np.uint8)
    dest[box] = block
    return {"voxels_written": int(np.prod(block.shape[:3]))}
