"""Relabel a compressed_segmentation chunk without decoding it.

A compressed_segmentation chunk stores, per 8x8x8 (or other) block, bit-packed
indices into a lookup table of label values. Relabeling only changes label
values, so rewriting the lookup tables gives exactly the chunk an encoder would
write for the relabeled voxels, up to tables that now hold a value twice (which
decoders read the same). That skips decoding and re-encoding every voxel.

Layout (neuroglancer's spec): one uint32 word per channel giving where that
channel starts; per channel, two header words per block ([table offset: 24 bits |
bits per index: 8 bits], [index offset]), offsets in words from the channel's
start; then index words and tables. Every word that is neither a header nor part
of a block's index data belongs to a table; uint64 labels take two words (low,
high) per entry, uint32 labels one.
"""
from __future__ import annotations

import numpy as np

WIDTH = {np.dtype(np.uint32): 1, np.dtype(np.uint64): 2}


class Unsupported(ValueError):
    """The chunk is not something this relabels safely; decode and re-encode instead."""


def table_words(words: np.ndarray, shape, block_size) -> np.ndarray:
    """Boolean mask over `words` (uint32) marking the lookup-table words."""
    sx, sy, sz, channels = (list(shape) + [1])[:4]
    grid = [-(-int(s) // int(b)) for s, b in zip((sx, sy, sz), block_size)]
    blocks = grid[0] * grid[1] * grid[2]
    voxels = int(np.prod(block_size))
    n = len(words)
    if n < channels:
        raise Unsupported("shorter than its channel offsets")
    cover = np.zeros(n + 1, dtype=np.int32)  # +1 at each non-table range's start, -1 past its end
    cover[0] += 1
    cover[channels] -= 1
    table_starts = []
    for start in words[:channels].astype(np.int64).tolist():
        heads_end = start + 2 * blocks
        if heads_end > n:
            raise Unsupported("block headers run past the chunk's end")
        heads = words[start:heads_end].reshape(-1, 2).astype(np.int64)
        bits = heads[:, 0] >> 24
        data = start + heads[:, 1]
        length = (bits * voxels + 31) // 32
        tables = start + (heads[:, 0] & 0xFFFFFF)
        if np.any(data + length > n) or np.any(tables >= n) or np.any(bits > 32):
            raise Unsupported("a block points past the chunk's end")
        cover[start] += 1
        cover[heads_end] -= 1
        np.add.at(cover, data, 1)
        np.add.at(cover, data + length, -1)
        table_starts.append(tables)
    mask = np.cumsum(cover[:-1]) == 0
    if not np.all(mask[np.concatenate(table_starts)]):
        raise Unsupported("a lookup table overlaps index data")
    return mask


def relabel_chunk(data: bytes, shape, block_size, dtype, relabel) -> bytes:
    """The chunk `data` (compressed_segmentation of `dtype`, chunk `shape` x, y, z[, c])
    with every label value v replaced by relabel(values array) -> new values array."""
    dtype = np.dtype(dtype)
    if dtype not in WIDTH or len(data) % 4:
        raise Unsupported(f"{dtype} chunk of {len(data)} bytes")
    words = np.frombuffer(data, dtype="<u4").copy()
    mask = table_words(words, shape, block_size)
    width = WIDTH[dtype]
    if width == 2:
        # each table is whole (low, high) pairs: every run of table words has even length
        edges = np.flatnonzero(np.diff(np.concatenate([[False], mask, [False]]).astype(np.int8)))
        if np.any((edges[1::2] - edges[::2]) % 2):
            raise Unsupported("a lookup table of odd length")
    values = words[mask].view("<u8" if width == 2 else "<u4")
    new = np.asarray(relabel(values), dtype=values.dtype)
    words[mask] = new.view("<u4")
    return words.tobytes()
