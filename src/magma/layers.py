"""Layer info files: reading them, predicting them, and the checks made on them.

Planning works on info dicts, not on storage, so a layer that an earlier step
will create (a transfer destination, the demo layers) can be planned before it
exists. Scale arithmetic is delegated to CloudVolume's metadata class so new
scales come out exactly as CloudVolume (and therefore Igneous) writes them.
"""
from __future__ import annotations

import copy
import json

import numpy as np
from cloudvolume import Bbox, Vec
from cloudvolume.datasource.precomputed.metadata import PrecomputedMetadata

from .errors import MagmaError
from . import storage

# encoding -> (allowed dtypes, allowed layer types); None = any
ENCODINGS = {
    "raw": (None, None),
    "compressed_segmentation": ({"uint32", "uint64"}, {"segmentation"}),
    "compresso": ({"uint8", "uint16", "uint32", "uint64"}, {"segmentation"}),
    "crackle": ({"uint8", "uint16", "uint32", "uint64", "int8", "int16", "int32", "int64"}, {"segmentation"}),
    "jpeg": ({"uint8"}, {"image"}),
    # uint16 png: pyspng-seunglab 1.1.3 (CloudVolume's codec) fails to encode 16-bit single-channel chunks
    "png": ({"uint8"}, {"image"}),
}


def meta(info: dict) -> PrecomputedMetadata:
    """CloudVolume's metadata object over an in-memory info (no I/O)."""
    m = PrecomputedMetadata.__new__(PrecomputedMetadata)
    m.info = info
    return m


def read_info(name: str, path: str) -> dict:
    """The info file of layer `name`, or a MagmaError saying where it was looked for."""
    try:
        raw = storage.files(path).get("info")
    except Exception as exc:  # unreachable storage, missing bucket, bad credentials
        raise MagmaError(f"layer '{name}': cannot read {path}/info: {storage.describe_error(path, exc)}") from exc
    if raw is None:
        raise MagmaError(
            f"layer '{name}': no info file at {path}/info. Point layers.{name} at an existing"
            " Precomputed layer, or let a step create it (transfer dest, demo)."
        )
    try:
        info = json.loads(raw)
    except ValueError as exc:
        raise MagmaError(f"layer '{name}': {path}/info is not valid JSON ({exc})") from exc
    check_info(name, info)
    return info


def check_info(name: str, info: dict) -> None:
    missing = [k for k in ("type", "data_type", "num_channels", "scales") if k not in info]
    if missing:
        raise MagmaError(f"layer '{name}': info is missing {', '.join(missing)}")
    if not info["scales"]:
        raise MagmaError(f"layer '{name}': info has no scales")
    try:
        dtype = np.dtype(info["data_type"])
    except TypeError:
        raise MagmaError(f"layer '{name}': info data_type {info['data_type']!r} is not a data type") from None
    if info["type"] == "segmentation" and dtype.kind not in "ui":
        raise MagmaError(
            f"layer '{name}': a segmentation holds integer labels, but its info says data_type"
            f" {info['data_type']}; store it as uint32/uint64, or declare it type 'image'"
        )
    for i, scale in enumerate(info["scales"]):
        need = [k for k in ("key", "resolution", "size", "voxel_offset", "chunk_sizes", "encoding") if k not in scale]
        if need:
            raise MagmaError(f"layer '{name}': info scale {i} is missing {', '.join(need)}")


def check_mip(name: str, info: dict, mip: int, key: str = "mip") -> None:
    n = len(info["scales"])
    if not 0 <= mip < n:
        raise MagmaError(f"{key}: layer '{name}' has mips 0..{n - 1}; mip {mip} does not exist")


def check_encoding(where: str, name: str, info: dict, encoding: str | None) -> None:
    if encoding is None:
        return
    if encoding not in ENCODINGS:
        raise MagmaError(f"{where}.encoding: unknown encoding '{encoding}'; use one of {sorted(ENCODINGS)}")
    dtypes, types = ENCODINGS[encoding]
    if types is not None and info["type"] not in types:
        raise MagmaError(
            f"{where}.encoding: '{encoding}' needs a {'/'.join(sorted(types))} layer, but layer '{name}'"
            f" is of type '{info['type']}'"
        )
    if dtypes is not None and info["data_type"] not in dtypes:
        raise MagmaError(
            f"{where}.encoding: '{encoding}' cannot store {info['data_type']} (layer '{name}');"
            f" it takes {', '.join(sorted(dtypes))}"
        )
    if encoding == "png" and info["num_channels"] != 1:
        # CloudVolume 12.15's png codec scrambles multi-channel chunks (a 3-channel round trip differs)
        raise MagmaError(f"{where}.encoding: png stores 1 channel here, layer '{name}' has {info['num_channels']}")
    if encoding == "jpeg" and info["num_channels"] not in (1, 3):
        raise MagmaError(f"{where}.encoding: jpeg needs 1 or 3 channels, layer '{name}' has {info['num_channels']}")


def volume_bounds(info: dict, mip: int) -> Bbox:
    return meta(info).bounds(mip)


def user_bounds(where: str, name: str, info: dict, bounds, bounds_mip: int, mip: int) -> Bbox:
    """Config bounds ([[x0,y0,z0],[x1,y1,z1]] at `bounds_mip`) as a Bbox at `mip`, checked."""
    whole = volume_bounds(info, mip)
    if bounds is None:
        return whole
    check_mip(name, info, bounds_mip, key=f"{where}.bounds_mip")
    box = Bbox(bounds[0], bounds[1], dtype=int)
    if np.any(box.size3() <= 0):
        raise MagmaError(f"{where}.bounds: {bounds} is empty (max must exceed min on every axis)")
    outer = volume_bounds(info, bounds_mip)
    if not (np.all(box.minpt >= outer.minpt) and np.all(box.maxpt <= outer.maxpt)):
        raise MagmaError(
            f"{where}.bounds: {bounds} (mip {bounds_mip}) lies outside layer '{name}', whose bounds at"
            f" mip {bounds_mip} are {outer.minpt.tolist()}..{outer.maxpt.tolist()}"
        )
    return meta(info).bbox_to_mip(box, bounds_mip, mip) if bounds_mip != mip else box


def on_grid(box: Bbox, whole: Bbox, grid) -> bool:
    """Whether `box` lies on a grid of `grid` voxels anchored at the volume's offset. A side
    that touches the volume's far edge counts as on it: the edge chunk is partial anyway."""
    grid = Vec(*grid)
    lo_ok = (box.minpt - whole.minpt) % grid == 0
    hi_ok = ((box.maxpt - whole.minpt) % grid == 0) | (box.maxpt == whole.maxpt)
    return bool(np.all(lo_ok) and np.all(hi_ok))


def check_aligned(where: str, box: Bbox, whole: Bbox, grid, what: str) -> None:
    """Require `box` to lie on a grid of `grid` voxels anchored at the volume's offset (on_grid)."""
    grid = Vec(*grid)
    if not on_grid(box, whole, grid):
        lo = whole.minpt + ((box.minpt - whole.minpt) // grid) * grid
        hi = Vec(*np.minimum(whole.minpt + -(-(box.maxpt - whole.minpt) // grid) * grid, whole.maxpt))
        raise MagmaError(
            f"{where}.bounds: {box.minpt.tolist()}..{box.maxpt.tolist()} is not aligned to {what}"
            f" {grid.tolist()}; the nearest aligned box is {lo.tolist()}..{hi.tolist()}"
        )


# What jobs add to an info after planning (roi's tissue boxes). Plans leave these keys out, so
# planning again after they were written gives the same plan; setup jobs carry them over.
RESULT_KEYS = ("rois",)


def without_results(info: dict) -> dict:
    out = copy.deepcopy(info)
    for scale in out["scales"]:
        for key in RESULT_KEYS:
            scale.pop(key, None)
    return out


def with_results(info: dict, stored: dict | None) -> dict:
    """`info` with the result keys of the stored info's scales of the same key, and the
    stored data type: no step changes an existing layer's type (plans that would are
    refused), except ccl, which narrows its output's once it knows the labels."""
    if not stored:
        return info
    old = {s.get("key"): s for s in stored.get("scales", [])}
    out = copy.deepcopy(info)
    out["data_type"] = stored.get("data_type", out["data_type"])
    for scale in out["scales"]:
        for key in RESULT_KEYS:
            if key in old.get(scale["key"], {}) and key not in scale:
                scale[key] = old[scale["key"]][key]
    return out


def add_scales(info: dict, resolutions, encoding=None, chunk_size=None) -> dict:
    """A copy of `info` with scales of these resolutions set (added, or replaced in place)."""
    out = copy.deepcopy(info)
    m = meta(out)
    for res in resolutions:
        res = [int(r) if float(r).is_integer() else float(r) for r in res]
        existing = [i for i, s in enumerate(out["scales"]) if list(s["resolution"]) == list(res)]
        if existing:
            del out["scales"][existing[0]]
        m.add_resolution(res, encoding=encoding, chunk_size=chunk_size)
        # keep the scales ordered by resolution (add_resolution appends)
        out["scales"].sort(key=lambda s: tuple(s["resolution"][::-1]))
    return out


def same_geometry(a: dict, b: dict, mip: int) -> list[str]:
    """Which of dtype/type/channels/resolution/size/offset differ between two infos at `mip`."""
    diffs = [k for k in ("data_type", "type", "num_channels") if a.get(k) != b.get(k)]
    if len(a["scales"]) <= mip or len(b["scales"]) <= mip:
        return diffs + ["scales"]
    for k in ("resolution", "size", "voxel_offset"):
        if list(a["scales"][mip][k]) != list(b["scales"][mip][k]):
            diffs.append(f"scales[{mip}].{k}")
    return diffs
