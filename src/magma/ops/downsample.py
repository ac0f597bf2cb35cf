"""downsample: add mips to a layer (tinybrain average / COUNTLESS mode / min / max / striding).

Each task reads a block at `mip` and builds k mips from it in memory, like
Igneous's DownsampleTask. When more mips are asked for than one task can hold
in `memory_target`, further passes run from the top mip of the previous pass
(Igneous leaves that to the user). Sharded output builds one mip per pass, one
task per shard.
"""
from __future__ import annotations

import numpy as np
import tinybrain
from cloudvolume import Bbox, Vec
from cloudvolume.datasource.precomputed.sharding import (
    compute_shard_params_for_image,
    image_shard_shape_from_spec,
)

from .. import chunk_files, layers
from ..design import memory_for_shape, mips_for_shape, num_mips_from_memory_target
from ..errors import MagmaError
from ..plan import Grid, StepPlan, make_stage
from .common import compress_arg, dtype_width, file_compression, open_volume


# ---- kernel -----------------------------------------------------------------
def resolve_method(method: str, layer_type: str) -> str:
    if method == "auto":
        return "avg" if layer_type == "image" else "mode" if layer_type == "segmentation" else "striding"
    return method


def pyramid(image: np.ndarray, method: str, factor, num_mips: int, sparse: bool = False) -> list:
    """`num_mips` successive downsamples of `image` (x, y, z[, c]) with tinybrain.

    tinybrain's results on odd-sized edges are not defined (they depend on memory
    layout and on what lies past the block), so a block whose size is not a
    multiple of factor^num_mips is first padded by repeating its edge voxels and
    the outputs are cropped to ceil(size / factor^i). Blocks of even size go to
    tinybrain untouched, so interior results are exactly tinybrain's (and Igneous's).
    """
    if num_mips <= 0:
        return []
    factor = tuple(int(f) for f in factor)
    shape = image.shape
    mult = [f**num_mips for f in factor] + [1] * (image.ndim - 3)
    pad = [(0, (-s) % m) for s, m in zip(shape, mult)]
    if any(p for _, p in pad):
        image = np.pad(image, pad, mode="edge")
    image = np.require(image, requirements=["F", "W"])  # tinybrain writes through its views
    outs = _tinybrain(image, method, factor, num_mips, sparse)
    crops = []
    for i, out in enumerate(outs, start=1):
        size = [-(-s // f**i) for s, f in zip(shape[:3], factor)]
        crops.append(out[: size[0], : size[1], : size[2]])
    return crops


def _tinybrain(image, method, factor, num_mips, sparse):
    if method == "avg":
        return tinybrain.downsample_with_averaging(image, factor, num_mips=num_mips, sparse=sparse)
    if method == "mode":
        return tinybrain.downsample_segmentation(image, factor, num_mips=num_mips, sparse=sparse)
    if method == "min":
        # tinybrain has max pooling only: ~x (integers) and -x (floats) reverse the order
        flip = np.negative if image.dtype.kind == "f" else np.invert
        return [flip(m) for m in tinybrain.downsample_with_max_pooling(flip(image), factor, num_mips=num_mips)]
    if method == "max":
        return tinybrain.downsample_with_max_pooling(image, factor, num_mips=num_mips)
    if method == "striding":
        return tinybrain.downsample_with_striding(image, factor, num_mips=num_mips)
    raise ValueError(f"unknown downsample method {method!r}")


def write_pyramid(vol, images: list, box: Bbox, mip: int, factor) -> int:
    """Write the mips `images` of `box` (at mip `mip`) into vol; returns voxels written."""
    written = 0
    for i, img in enumerate(images, start=1):
        lo = box.minpt // (np.asarray(factor) ** i)
        vol.mip = mip + i
        vol[Bbox(lo, lo + Vec(*img.shape[:3]))] = img
        written += int(np.prod(img.shape[:3]))
    return written


def write_mips(vol, image, box: Bbox, mip: int, k: int, method: str, factor, sparse: bool) -> int:
    """Downsample `image` (which sits at `box`, mip `mip`) k times into vol; returns voxels written."""
    return write_pyramid(vol, pyramid(image, method, factor, k, sparse), box, mip, factor)


def chunkwise(meta, mip: int, box: Bbox, k: int, factor, method: str) -> bool:
    """Whether the k mips of `box` can be made chunk by chunk: box is whole chunks (or
    ends at the volume's edge) and every chunk is whole pooling windows, so each output
    voxel comes from one chunk and equals the whole block's (pyramid pads the same edge).
    Only where it pays: mode pooling and wide voxels (uint64 labels: 0.45x the time)."""
    if k <= 0 or meta.sharding(mip):
        return False
    if method != "mode" and np.dtype(meta.data_type).itemsize < 4:
        return False  # averaging bytes streams through memory fast enough: no gain measured
    windows = np.all(meta.chunk_size(mip) % (np.asarray(factor) ** k) == 0)
    return bool(windows) and chunk_files.whole_chunks(meta, mip, box)


class Pyramid:
    """The k mips of `box`, filled in chunk by chunk (see chunkwise): a chunk's pyramid
    fits in cache where the whole block's streams through memory, and no block-sized
    array is made."""

    def __init__(self, box: Bbox, k: int, factor, dtype, channels: int, method: str, sparse: bool = False):
        self.box, self.k, self.factor, self.method, self.sparse = box, k, factor, method, sparse
        self.scales = [np.asarray(factor) ** i for i in range(1, k + 1)]
        self.images = [np.zeros(tuple(-(-box.size3() // f)) + (channels,), dtype=dtype, order="F")
                       for f in self.scales]

    def add(self, image: np.ndarray, chunk: Bbox) -> None:
        at = chunk.minpt - self.box.minpt
        for f, img, out in zip(self.scales, pyramid(image, self.method, self.factor, self.k, self.sparse),
                               self.images):
            lo = at // f
            out[lo[0]:lo[0] + img.shape[0], lo[1]:lo[1] + img.shape[1], lo[2]:lo[2] + img.shape[2]] = img


# ---- planning ---------------------------------------------------------------
# reads, writes, creates: the defaults (ops/__init__.py): reads and writes `layer`


def _set_encoding(info: dict, mips, encoding, level) -> None:
    for m in mips:
        scale = info["scales"][m]
        if encoding is not None:
            scale["encoding"] = encoding
            if encoding == "compressed_segmentation":
                scale.setdefault("compressed_segmentation_block_size", [8, 8, 8])
        if level is not None:
            key = {"jpeg": "jpeg_quality", "png": "png_level"}.get(scale["encoding"])
            if key:
                scale[key] = int(level)


def new_scales(info, mip, k, factor, encoding, chunk_size, preserve_chunk_size, level=None) -> dict:
    """`info` with mips mip+1..mip+k set, each `factor` coarser than the one below."""
    res = np.asarray(info["scales"][mip]["resolution"], dtype=np.float64)
    resolutions = [(res * np.asarray(factor) ** i).tolist() for i in range(1, k + 1)]
    out = layers.add_scales(info, resolutions, encoding=encoding, chunk_size=chunk_size)
    chunk = chunk_size or (out["scales"][mip]["chunk_sizes"][0] if preserve_chunk_size else None)
    for m in range(mip + 1, mip + k + 1):
        if chunk is not None:
            out["scales"][m]["chunk_sizes"] = [list(chunk)]
        out["scales"][m].pop("sharding", None)
    _set_encoding(out, range(mip + 1, mip + k + 1), encoding, level)
    return out


def plan(ctx, name: str, p: dict) -> StepPlan:
    where = f"steps.{name}"
    lname = p["layer"]
    info = ctx.infos[lname]
    layers.check_mip(lname, info, p["mip"], key=f"{where}.mip")
    layers.check_encoding(where, lname, info, p["encoding"])
    layers.check_mip(lname, info, p["bounds_mip"], key=f"{where}.bounds_mip")
    method = resolve_method(p["method"], info["type"])
    factor = tuple(p["factor"])
    memory = p["memory_target"] or ctx.execution["memory_target"]
    width, channels = dtype_width(info), int(info["num_channels"])
    meta = layers.meta(info)
    params = {"layer": lname, "method": method, "factor": list(factor), "sparse": p["sparse"],
              "fill_missing": p["fill_missing"],
              "compress": file_compression(p["compress"], p["encoding"] or info["scales"][p["mip"]]["encoding"]),
              "delete_black_uploads": p["delete_black_uploads"], "background_color": p["background_color"]}
    step = StepPlan(name, "downsample", p, writes=[lname], sources=[lname])

    box = layers.user_bounds(where, lname, info, p["bounds"], p["bounds_mip"], p["mip"])
    whole = meta.bounds(p["mip"])
    if p["sharded"] and box != whole:
        raise MagmaError(f"{where}.bounds: sharded output covers whole shards; drop `bounds` or set sharded: false")

    remaining = p["num_mips"] if p["num_mips"] is not None else (1 if p["sharded"] else None)
    cur = p["mip"]
    cur_info = info
    while remaining is None or remaining > 0:
        vsize = layers.meta(cur_info).volume_size(cur)
        if p["sharded"]:
            stage, cur_info, box = _sharded_pass(ctx, cur_info, cur, factor, p, params, memory, width, channels)
            k = 1
        else:
            base_chunk = p["chunk_size"] or layers.meta(cur_info).chunk_size(cur).tolist()
            viable = num_mips_from_memory_target(memory, width, base_chunk, channels, factor)
            want = viable if remaining is None else min(remaining, viable)
            shape = [int(c * f ** viable) for c, f in zip(base_chunk, factor)]
            probe = new_scales(cur_info, cur, 1, factor, p["encoding"], p["chunk_size"], p["preserve_chunk_size"])
            new_chunk = layers.meta(probe).chunk_size(cur + 1).tolist()
            k = min(want, mips_for_shape(shape, factor, new_chunk, vsize))
            if k == 0:
                break
            grid_unit = [c * f ** k for c, f in zip(new_chunk, factor)]
            layers.check_aligned(where, box, layers.meta(cur_info).bounds(cur), grid_unit,
                                 f"the chunk size of mip {cur + k} seen from mip {cur}")
            cur_info = new_scales(cur_info, cur, k, factor, p["encoding"], p["chunk_size"],
                                  p["preserve_chunk_size"], p["encoding_level"])
            task_bytes = memory_for_shape(width, shape, factor, channels)
            stage = make_stage(f"mip{cur}-{cur + k}", Grid.of(box, shape),
                               dict(params, mip=cur, num_mips=k), ctx.step_exec, task_bytes)
            box = Bbox(box.minpt // Vec(*factor) ** k, -(-box.maxpt // Vec(*factor) ** k))
            box = Bbox.clamp(box, layers.meta(cur_info).bounds(cur + k))
        step.stages.append(stage)
        step.notes.append(f"{stage.name}: {stage.grid.n} tasks of {stage.grid.shape} -> {stage.jobs} jobs")
        cur += k
        if remaining is None:
            break
        remaining -= k
    if not step.stages:
        size = meta.volume_size(p["mip"]).tolist()
        raise MagmaError(
            f"{where}: layer '{lname}' at mip {p['mip']} ({size} voxels) is already too small to add a mip"
            f" with chunk size {meta.chunk_size(p['mip']).tolist()}"
        )
    step.infos[lname] = cur_info
    ctx.infos[lname] = cur_info
    step.checks = [(lname, p["mip"], _read_box(step.stages[0], info, p), p["fill_missing"])]
    return step


def _read_box(stage, info, p):
    g = stage.grid
    if p["sharded"]:  # grid is at the new mip; what is read sits one factor below
        f = Vec(*p["factor"])
        box = Bbox(Vec(*g.minpt) * f, Vec(*g.maxpt) * f)
        return Bbox.clamp(box, layers.meta(info).bounds(p["mip"]))
    return g.bounds


def _sharded_pass(ctx, info, cur, factor, p, params, memory, width, channels):
    """One mip as shards: the grid is the new mip's shard grid (one task = one shard)."""
    out = new_scales(info, cur, 1, factor, p["encoding"], p["chunk_size"], p["preserve_chunk_size"],
                     p["encoding_level"])
    m = layers.meta(out)
    nxt = cur + 1
    spec = compute_shard_params_for_image(
        dataset_size=m.volume_size(nxt), chunk_size=m.chunk_size(nxt), encoding=m.encoding(nxt),
        dtype=out["data_type"], uncompressed_shard_bytesize=int(memory / (np.prod(factor) + 1)),
    )
    out["scales"][nxt]["sharding"] = spec.to_dict()
    shard = image_shard_shape_from_spec(out["scales"][nxt]["sharding"], m.volume_size(nxt), m.chunk_size(nxt))
    task_bytes = width * channels * float(np.prod(shard)) * (np.prod(factor) + 1)
    stage = make_stage(f"mip{cur}-{nxt}-sharded", Grid.of(m.bounds(nxt), shard),
                       dict(params, mip=cur, num_mips=1, sharded=True, compress="none"), ctx.step_exec, task_bytes)
    return stage, out, m.bounds(nxt)


# ---- execution --------------------------------------------------------------
def run_task(params: dict, box: Bbox, paths: dict) -> dict:
    path = paths[params["layer"]]
    mip, k, factor = params["mip"], params["num_mips"], params["factor"]
    vol = open_volume(path, mip, fill_missing=params["fill_missing"], bounded=False,
                      compress=compress_arg(params["compress"]),
                      delete_black_uploads=params["delete_black_uploads"],
                      background_color=params["background_color"])
    if params.get("sharded"):
        # box is a shard at mip+1; read the block below it
        f = Vec(*factor)
        src = Bbox.clamp(Bbox(box.minpt * f, box.maxpt * f), vol.meta.bounds(mip))
        image = vol.download(src, mip=mip)
        written = write_mips(vol, image, src, mip, 1, params["method"], factor, params["sparse"])
        return {"voxels_read": int(np.prod(image.shape[:3])), "voxels_written": written}
    if chunkwise(vol.meta, mip, box, k, factor, params["method"]):
        pyr = Pyramid(box, k, factor, vol.dtype, vol.num_channels, params["method"], params["sparse"])
        for chunk, image in chunk_files.read_chunks(path, vol.meta, mip, box, params["fill_missing"],
                                                    params["background_color"]):
            pyr.add(image, chunk)
        written = write_pyramid(vol, pyr.images, box, mip, factor)
        return {"voxels_read": int(np.prod(box.size3())), "voxels_written": written}
    image = vol.download(box, mip=mip)
    written = write_mips(vol, image, box, mip, k, params["method"], factor, params["sparse"])
    return {"voxels_read": int(np.prod(image.shape[:3])), "voxels_written": written}
