"""remap: relabel a segmentation by a mapping file (an agglomeration) into a new layer,
with fastremap, plus the mips its tasks can build (mode pooling).

The mapping is a JSON object {"old": new, ...} (or a JSON list of [old, new] pairs)
or a .npy array of shape (N, 2) of integer [old, new] rows; it is read and checked
at plan time and its checksum is part of the plan, so editing it re-runs the step.
"""
from __future__ import annotations

import functools
import hashlib
import io
import json
import logging
import os

import compressed_segmentation as cseg
import fastremap
import numpy as np
from cloudfiles import CloudFiles
from cloudvolume import Bbox

from .. import chunk_files, cseg_tables, layers, storage
from ..errors import MagmaError
from ..plan import Grid, StepPlan, make_stage
from . import _derived
from .downsample import Pyramid, chunkwise, write_mips, write_pyramid
from .common import check_new_layer, compress_arg, dtype_width, file_compression, open_volume

log = logging.getLogger("magma")
INTEGER_TYPES = ("uint8", "uint16", "uint32", "uint64", "int8", "int16", "int32", "int64")


# ---- the mapping file ---------------------------------------------------------
def read_bytes(path: str) -> bytes:
    """A local path or any CloudFiles URL (file://, s3://, gs://, https://)."""
    if "://" not in path:
        with open(path, "rb") as f:
            return f.read()
    folder, name = path.rsplit("/", 1)
    data = storage.files(folder).get(name)
    if data is None:
        raise FileNotFoundError(path)
    return data


def _as_int(value, what):
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ValueError(f"{what} {value!r} is not an integer label")
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"{what} {value!r} is not an integer label") from None


def parse_mapping(data: bytes, name: str) -> tuple[np.ndarray, np.ndarray]:
    """(old labels, new labels) as uint64 arrays; ValueError says what is wrong."""
    if name.endswith(".npy"):
        arr = np.load(io.BytesIO(data), allow_pickle=False)
        if not np.issubdtype(arr.dtype, np.integer):
            raise ValueError(f"holds {arr.dtype} values; labels must be integers")
        if arr.ndim != 2 or arr.shape[1] != 2:
            raise ValueError(f"has shape {list(arr.shape)}; it must be (N, 2): one [old, new] row per label")
        if arr.size and arr.min() < 0:
            raise ValueError(f"holds the negative label {int(arr.min())}")
        old, new = arr[:, 0].astype(np.uint64), arr[:, 1].astype(np.uint64)
    elif name.endswith(".json"):
        doc = json.loads(data)
        pairs = doc.items() if isinstance(doc, dict) else doc
        if not isinstance(doc, (dict, list)) or any(not isinstance(p, (list, tuple)) or len(p) != 2 for p in pairs):
            raise ValueError('must be an object {"old": new, ...} or a list of [old, new] pairs')
        rows = [(_as_int(a, "label"), _as_int(b, "new label")) for a, b in pairs]
        neg = [v for row in rows for v in row if v < 0]
        if neg:
            raise ValueError(f"holds the negative label {neg[0]}")
        old = np.array([a for a, _ in rows], dtype=np.uint64)
        new = np.array([b for _, b in rows], dtype=np.uint64)
    else:
        raise ValueError("must be a .json or .npy file")
    uniq, counts = np.unique(old, return_counts=True)
    if np.any(counts > 1):
        raise ValueError(f"maps label {int(uniq[counts > 1][0])} more than once")
    return old, new


@functools.lru_cache(maxsize=2)
def _table(path: str, digest: str) -> dict:
    data = read_bytes(path)
    if hashlib.sha256(data).hexdigest() != digest:
        raise MagmaError(f"remap: {path} changed after the run was planned; run snakemake again to re-plan")
    old, new = parse_mapping(data, path)
    return dict(zip(old.tolist(), new.tolist()))


# ---- planning ---------------------------------------------------------------
def _load(where: str, path: str):
    if "://" not in path:
        path = os.path.abspath(path)  # jobs may run elsewhere than the planner's directory
    try:
        data = read_bytes(path)
    except Exception as exc:  # missing file, permissions, unreachable bucket
        raise MagmaError(f"{where}.mapping_file: cannot read {path}: {exc}") from exc
    try:
        old, new = parse_mapping(data, path)
    except ValueError as exc:
        raise MagmaError(f"{where}.mapping_file: {path} {exc}") from exc
    return path, hashlib.sha256(data).hexdigest(), old, new


def plan(ctx, name: str, p: dict) -> StepPlan:
    where = f"steps.{name}"
    check_new_layer(where, ctx, p)
    src, mip = ctx.infos[p["src"]], p["mip"]
    layers.check_mip(p["src"], src, mip, key=f"{where}.mip")
    if src["data_type"] not in INTEGER_TYPES:
        raise MagmaError(f"{where}.src: remap relabels integer labels; layer '{p['src']}' is {src['data_type']}")
    path, digest, old, new = _load(where, p["mapping_file"])
    dtype = p["data_type"] or src["data_type"]
    top = np.iinfo(dtype).max
    if new.size and int(new.max()) > top:
        raise MagmaError(f"{where}.data_type: the mapping's label {int(new.max())} does not fit in {dtype};"
                         " set data_type: uint64")
    if p["preserve_missing_labels"] and np.iinfo(src["data_type"]).max > top:
        raise MagmaError(f"{where}.data_type: {dtype} is narrower than the source's {src['data_type']}, whose"
                         " unmapped labels are kept (preserve_missing_labels)")
    probe = dict(src, data_type=dtype)
    layers.check_encoding(where, p["dest"], probe, p["encoding"])
    info = _derived.dest_info(src, mip, data_type=dtype, encoding=p["encoding"], encoding_level=p["encoding_level"])
    box = layers.user_bounds(where, p["src"], src, p["bounds"], p["bounds_mip"], mip)
    memory = p["memory_target"] or ctx.execution["memory_target"]
    width = max(dtype_width(src), np.dtype(dtype).itemsize)
    shape = _derived.task_shape(where, p["shape"], info, mip, box, memory, width)
    info, k = _derived.add_mips(where, info, box, mip, shape, p["encoding"], p["encoding_level"])
    _derived.check_existing(where, ctx, p["dest"], info, mip)
    params = {"src": p["src"], "dest": p["dest"], "mip": mip, "num_mips": k, "fill_missing": p["fill_missing"],
              "compress": file_compression(p["compress"], info["scales"][mip]["encoding"]),
              "mapping_file": path, "mapping_sha256": digest, "data_type": dtype,
              "preserve_missing_labels": p["preserve_missing_labels"],
              "tables": tables_only(src, info, mip, box, shape)}
    step = StepPlan(name, "remap", p, writes=[p["dest"]], sources=[p["src"]])
    # the block, its relabeled copy, its mips, and the mapping as a dict (~100 B a pair)
    task_bytes = float(np.prod(shape)) * width * 3 + 100.0 * old.size
    stage = make_stage(f"mip{mip}" + (f"-{mip + k}" if k else ""), Grid.of(box, shape), params, ctx.step_exec,
                       task_bytes)
    step.stages.append(stage)
    step.notes.append(f"{stage.name}: {stage.grid.n} tasks of {stage.grid.shape} -> {stage.jobs} jobs"
                      f" ({old.size} labels mapped)")
    step.infos[p["dest"]] = info
    ctx.infos[p["dest"]] = info
    step.checks = [(p["src"], mip, box, p["fill_missing"])]
    return step


# ---- execution --------------------------------------------------------------
def relabel(image: np.ndarray, table: dict, dtype, preserve_missing_labels: bool = True) -> np.ndarray:
    image = np.asarray(image, dtype=dtype, order="F")
    return fastremap.remap(image, table, preserve_missing_labels=preserve_missing_labels, in_place=True)


def tables_only(src: dict, dest: dict, mip: int, box: Bbox, shape) -> bool:
    """Whether tasks can relabel the source's compressed_segmentation chunks in their
    lookup tables (cseg_tables) instead of decoding and re-encoding every voxel: the same
    codec, block size, chunk grid and label width on both sides, and tasks of whole chunks."""
    a, b = src["scales"][mip], dest["scales"][mip]
    if a["encoding"] != "compressed_segmentation" or b["encoding"] != a["encoding"] or "sharding" in a:
        return False
    if src["data_type"] != dest["data_type"] or np.dtype(src["data_type"]) not in cseg_tables.WIDTH:
        return False
    if any(a.get(key) != b.get(key) for key in ("chunk_sizes", "voxel_offset", "size",
                                                "compressed_segmentation_block_size")):
        return False
    meta = layers.meta(src)
    return chunk_files.whole_chunks(meta, mip, box) and bool(np.all(np.asarray(shape) % meta.chunk_size(mip) == 0))


def _relabel_chunks(params: dict, box: Bbox, paths: dict, table: dict, mips: int) -> list:
    """Write the task's chunks relabeled in their lookup tables (see tables_only). With
    `mips`, also decode each relabeled chunk and downsample it alone (chunks are whole
    pooling windows), returning the task's mip images: no task-sized array is made."""
    from cloudvolume.datasource.precomputed.common import content_type, should_compress

    mip = params["mip"]
    meta = open_volume(paths[params["src"]], mip).meta
    keys, boxes = zip(*chunk_files.chunks_in(meta, mip, box))
    block = meta.compressed_segmentation_block_size(mip)
    dtype = np.dtype(params["data_type"])
    keep = params["preserve_missing_labels"]
    pyr = Pyramid(box, mips, _derived.FACTOR, dtype, 1, "mode")
    files = []
    got_all = chunk_files.fetch(storage.files(paths[params["src"]]), list(keys))
    for key, chunk_box, got in zip(keys, boxes, got_all):
        shape = tuple(chunk_box.size3()) + (int(meta.num_channels),)
        if not chunk_files.present(got, key, paths[params["src"]], params["fill_missing"]):
            got["content"] = cseg.compress(np.zeros(shape, dtype=dtype, order="F"), block_size=block, order="F")
        data = cseg_tables.relabel_chunk(got["content"], shape, block, dtype,
                                         lambda v: fastremap.remap(v, table, preserve_missing_labels=keep,
                                                                   in_place=True))
        files.append((key, data))
        if mips:
            pyr.add(cseg.decompress(data, shape, dtype, block_size=block, order="F"), chunk_box)
    storage.files(paths[params["dest"]]).puts(
        files, content_type=content_type("compressed_segmentation"),
        compress=should_compress("compressed_segmentation", compress_arg(params["compress"]), None))
    return pyr.images


def run_task(params: dict, box: Bbox, paths: dict) -> dict:
    mip, k = params["mip"], params["num_mips"]
    table = _table(params["mapping_file"], params["mapping_sha256"])
    tables = params.get("tables", False)
    voxels = int(np.prod(box.size3()))
    dest = open_volume(paths[params["dest"]], mip, compress=compress_arg(params["compress"]))
    try:
        if tables:
            by_chunk = k if chunkwise(dest.meta, mip, box, k, _derived.FACTOR, "mode") else 0
            try:
                mips = _relabel_chunks(params, box, paths, table, by_chunk)  # writes only if every chunk relabels
            except cseg_tables.Unsupported as exc:
                log.warning(f"remap: {box.to_filename()}: {exc}; decoding the voxels instead")
                tables = False
            else:
                if by_chunk == k:
                    written = voxels + write_pyramid(dest, mips, box, mip, _derived.FACTOR)
                    return {"voxels_read": voxels, "voxels_written": written}
        src = open_volume(paths[params["src"]], mip, fill_missing=params["fill_missing"])
        image = src.download(box, mip=mip)[..., 0]
        out = relabel(image, table, params["data_type"], params["preserve_missing_labels"])
    except KeyError as exc:
        raise MagmaError(f"remap: label {exc.args[0]} in {box.minpt.tolist()}..{box.maxpt.tolist()} is not in"
                         f" {params['mapping_file']} (preserve_missing_labels is false)") from None
    if tables:  # mip written above: the mips from the relabeled voxels
        written = voxels + write_mips(dest, out, box, mip, k, "mode", _derived.FACTOR, False)
    else:
        written = _derived.write_block(dest, out, box, mip, k, "mode")
    return {"voxels_read": voxels, "voxels_written": written}
