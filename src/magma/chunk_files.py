"""The chunk files behind a box of a Precomputed scale: their names, their decoded
voxels one chunk at a time, and one channel of a raw-encoded layer without decoding
the others.

A raw chunk holds its voxels in x, y, z, channel order (Fortran), so channel 0 is
the first third of a 3-channel affinity chunk. Inflating a gzip stream can stop
there: quantize reads a third of what CloudVolume would decode.
"""
from __future__ import annotations

import zlib

import numpy as np
from cloudfiles import CloudFiles
from cloudfiles.compression import decompress
from cloudvolume import Bbox
from cloudvolume.chunks import decode
from cloudvolume.lib import xyzrange

from . import layers, storage
from .errors import MagmaError


def chunks_in(meta, mip: int, box: Bbox) -> list[tuple[str, Bbox]]:
    """(file key, chunk box clipped to the volume) of every chunk `box` touches."""
    chunk, offset = meta.chunk_size(mip), meta.voxel_offset(mip)
    end = meta.bounds(mip).maxpt
    minpt, maxpt = (np.asarray(v).astype(np.int64) for v in (box.minpt, box.maxpt))  # clamped boxes turn float
    start = offset + (minpt - offset) // chunk * chunk
    out = []
    for lo in xyzrange(start, maxpt, chunk):
        cbox = Bbox(lo, np.minimum(lo + chunk, end))
        out.append((f"{meta.key(mip)}/{cbox.to_filename()}", cbox))  # CloudFiles keys use "/"
    return out


def whole_chunks(meta, mip: int, box: Bbox) -> bool:
    """Whether `box` is made of whole chunks (a side on the volume's far edge counts)."""
    return layers.on_grid(box, meta.bounds(mip), meta.chunk_size(mip))


def fetch(cf: CloudFiles, requests: list, raw: bool = False) -> list[dict]:
    """cf.get of many files (keys, or {"path", "start", "end"} ranges), in the order asked:
    CloudFiles returns them as its threads finish, which on object storage is any order."""
    got = {r["path"]: r for r in cf.get(requests, raw=raw)}
    return [got[r["path"] if isinstance(r, dict) else r] for r in requests]


def present(got: dict, key: str, path: str, fill_missing: bool) -> bool:
    """Whether a fetched chunk is there; a missing one is an error naming it unless
    fill_missing (then the caller fills it), and a read that failed always is."""
    if got["content"] is not None:
        return True
    if got["error"] is not None or not fill_missing:
        raise MagmaError(f"chunk {key} of {path} is missing ({got['error'] or 'no such file'});"
                         " set fill_missing: true to read it as 0")
    return False


def read_chunks(path: str, meta, mip: int, box: Bbox, fill_missing: bool = False, background=0):
    """(chunk box, decoded x, y, z, c voxels) of each chunk `box` touches, decoded one at a
    time (the codec is CloudVolume's); a missing chunk is an error naming it, or
    `background` with fill_missing."""
    chunks = chunks_in(meta, mip, box)
    files = fetch(storage.files(path), [key for key, _ in chunks])
    dtype = np.dtype(meta.data_type)
    for i, ((key, cbox), got) in enumerate(zip(chunks, files)):
        files[i] = None  # each compressed chunk is freed once decoded
        shape = tuple(cbox.size3()) + (int(meta.num_channels),)
        if not present(got, key, path, fill_missing):
            yield cbox, np.full(shape, background, dtype=dtype, order="F")
            continue
        yield cbox, decode(got["content"], meta.encoding(mip), shape, dtype,
                           meta.compressed_segmentation_block_size(mip), background_color=background)


def _prefix(got: dict, nbytes: int) -> bytes:
    """The first `nbytes` of a stored file's decompressed content (fewer when `got` holds
    only the start of a compressed file and it runs out)."""
    data, method = got["content"], (got.get("compress") or "").lower()
    if method in ("", "none"):
        return data[:nbytes]
    if method == "gzip":
        return zlib.decompressobj(31).decompress(data, nbytes)  # stops once it has nbytes
    return decompress(data, method)[:nbytes]


def prefix_budget(nbytes: int) -> int:
    """Stored bytes that always hold the first `nbytes` of content: deflate expands
    incompressible data by a few bytes per 64 KiB block, and the gzip header is short."""
    return nbytes + nbytes // 100 + 4096


def read_channel(path: str, meta, mip: int, box: Bbox, channel: int = 0, fill_missing: bool = False,
                 convert=None, out_dtype=None) -> np.ndarray:
    """Channel `channel` of `box` (x, y, z; Fortran order) from a raw-encoded scale; with
    `convert`, convert(block) of each chunk's part instead (an array of `out_dtype`, which
    must map 0 to 0), so no array of the stored type as big as the box is made."""
    if meta.encoding(mip) != "raw":
        raise ValueError(f"read_channel reads raw chunks, not {meta.encoding(mip)}")
    dtype = np.dtype(meta.data_type).newbyteorder("<")
    out = np.zeros(tuple(box.size3()), dtype=out_dtype or dtype.newbyteorder("="), order="F")
    chunks = chunks_in(meta, mip, box)
    cf = storage.files(path)
    sizes = [int(np.prod(cbox.size3())) * dtype.itemsize for _, cbox in chunks]
    # only the start of each file: up to the channel wanted (a third of a 3-channel chunk)
    files = fetch(cf, [{"path": key, "start": 0, "end": prefix_budget(n * (channel + 1))}
                       for (key, _), n in zip(chunks, sizes)], raw=True)
    for (key, cbox), got, per_channel in zip(chunks, files, sizes):
        if not present(got, key, path, fill_missing):
            continue  # zeros
        size = tuple(cbox.size3())
        data = _prefix(got, per_channel * (channel + 1))
        if len(data) < per_channel * (channel + 1):  # a codec that expands more: read it whole
            data = _prefix(fetch(cf, [key], raw=True)[0], per_channel * (channel + 1))
        data = data[per_channel * channel:]
        if len(data) != per_channel:
            raise MagmaError(f"chunk {key} of {path} holds {len(data)} bytes of channel {channel};"
                             f" a {size} chunk needs {per_channel}")
        block = np.frombuffer(data, dtype=dtype).reshape(size, order="F")
        part = Bbox.intersection(cbox, box)
        src = tuple(slice(a, b) for a, b in zip(part.minpt - cbox.minpt, part.maxpt - cbox.minpt))
        dst = tuple(slice(a, b) for a, b in zip(part.minpt - box.minpt, part.maxpt - box.minpt))
        out[dst] = block[src] if convert is None else convert(block[src])
    return out
