"""A new layer computed block by block from another one (contrast, quantize, remap, reorder).

The destination info is the source's, cut at `mip` and changed where the op
says (dtype, chunk size, encoding); each task computes one block, writes it and
the mips it can build from it with downsample's kernel, like transfer does.
"""
from __future__ import annotations

import copy

import numpy as np
from cloudvolume import Bbox

from .. import layers
from ..design import mips_for_shape, shape_from_memory_target
from ..errors import MagmaError
from .downsample import _set_encoding, new_scales, write_mips

FACTOR = (2, 2, 1)


def dest_info(src: dict, mip: int, *, data_type=None, layer_type=None, num_channels=None,
              chunk_size=None, encoding=None, encoding_level=None) -> dict:
    """The source's info cut at `mip`, unsharded, without meshes or skeletons, with these changes."""
    info = copy.deepcopy(src)
    info["scales"] = info["scales"][: mip + 1]
    for key in ("mesh", "meshing", "skeletons"):
        info.pop(key, None)
    for key, value in (("data_type", data_type), ("type", layer_type), ("num_channels", num_channels)):
        if value is not None:
            info[key] = value
    for scale in info["scales"]:
        scale.pop("sharding", None)
        scale.pop("rois", None)
        if chunk_size is not None:
            scale["chunk_sizes"] = [list(chunk_size)]
        if info["type"] != "segmentation" and scale["encoding"] in ("compressed_segmentation", "compresso", "crackle"):
            scale["encoding"] = "raw"  # a new image cannot keep a label codec
    _set_encoding(info, range(mip + 1), encoding, encoding_level)
    return info


def task_shape(where: str, shape, info: dict, mip: int, box: Bbox, memory: float, read_width: int) -> list:
    """The configured task shape, or one from the memory target (as transfer's); checked
    to be a whole number of destination chunks (or to span the region) so tasks never
    share a chunk."""
    chunk = layers.meta(info).chunk_size(mip).tolist()
    if shape is None:
        try:
            shape = list(shape_from_memory_target(read_width, chunk, FACTOR, memory, 5))
        except ValueError as exc:
            raise MagmaError(f"{where}.memory_target: {exc}") from exc
    bad = [int(s) for s, c, b in zip(shape, chunk, box.size3()) if s % c and s < b]
    if bad:
        raise MagmaError(f"{where}.shape: {list(shape)} is not a multiple of the destination chunk size {chunk}")
    return [int(s) for s in shape]


def add_mips(where: str, info: dict, box: Bbox, mip: int, shape, encoding=None, level=None) -> tuple[dict, int]:
    """`info` with the mips a task of `shape` can build above `mip`, and how many that is.

    Only as many mips as keep every task's downsampled box on the new mips' chunk grid.
    """
    m = layers.meta(info)
    chunk, size = m.chunk_size(mip), m.volume_size(mip)
    k = mips_for_shape(shape, FACTOR, chunk.tolist(), size.tolist())
    f = np.asarray(FACTOR)
    while k and any(s % (c * fk) and s < b for s, c, fk, b in zip(shape, chunk, f**k, box.size3())):
        k -= 1
    layers.check_aligned(where, box, m.bounds(mip), (chunk * f**k).tolist(),
                         "the destination chunk size" + (f" of mip {mip + k} seen from mip {mip}" if k else ""))
    if k:
        info = new_scales(info, mip, k, FACTOR, encoding, None, True, level)
    return info, k


def check_existing(where: str, ctx, dest: str, info: dict, mip: int) -> None:
    existing = ctx.infos.get(dest)
    if existing is not None:
        diffs = layers.same_geometry(existing, info, mip)
        if diffs:
            raise MagmaError(
                f"{where}.dest: layer '{dest}' already exists with a different {', '.join(diffs)};"
                " delete it or choose another dest"
            )


def write_block(dest, image: np.ndarray, box: Bbox, mip: int, k: int, method: str) -> int:
    """Write `image` at `box` and the k mips above it; returns voxels written."""
    dest.mip = mip
    dest[box] = image
    written = int(np.prod(image.shape[:3]))
    if k:
        written += write_mips(dest, image, box, mip, k, method, FACTOR, False)
    return written
