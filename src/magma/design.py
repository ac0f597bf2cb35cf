"""Task-shape and memory calculators (Igneous's `design ds-shape` / `ds-memory`).

Plain functions on numbers so the planner, the CLI and the tests share them.
The formulas follow Igneous 4.37 so a lab moving over gets the same task
shapes and the same number of mips for the same memory target.
"""
from __future__ import annotations

import math
from functools import reduce
from operator import mul

import numpy as np

MEMORY_TARGET = int(3.5e9)  # Igneous CLI default, bytes per task


def prod(values) -> int:
    return int(reduce(mul, (int(v) for v in values), 1))


def stack_factor(factor) -> float:
    """Memory of an image plus all its downsamples, relative to the image.

    A geometric series: 1 + 1/f + 1/f^2 + ... = f / (f - 1) for f = prod(factor).
    """
    f = prod(factor)
    return 1.0 if f == 1 else f / (f - 1)


def memory_for_shape(data_width: int, shape, factor=(2, 2, 1), num_channels: int = 1) -> float:
    """Bytes needed to hold a task of `shape` and every downsample made from it."""
    return data_width * num_channels * prod(shape) * stack_factor(factor)


def num_mips_from_memory_target(memory_target, data_width, chunk_size, num_channels, factor) -> int:
    """How many mips one task can build inside `memory_target` bytes (at least 1)."""
    voxels = memory_target / data_width / num_channels
    chunks = (voxels // prod(chunk_size)) / stack_factor(factor)
    dims = math.log2(prod(factor)) if prod(factor) > 1 else 1.0
    side = chunks ** (1.0 / dims) if chunks > 0 else 0
    if side <= 0:
        return 1
    mips = math.log2(side)
    # absorb floating point error (e.g. 2.9999999 -> 3)
    if math.ceil(mips) - mips <= 0.01:
        mips = math.ceil(mips)
    return max(1, int(mips))


def shape_from_memory_target(data_width, chunk_size, factor, memory_target, max_mips=math.inf):
    """Task shape that gives the most downsamples within `memory_target` bytes.

    Solves data_width * stack_factor * prod(chunk * factor^n) <= memory for n,
    per axis that is downsampled; axes with factor 1 keep one chunk.
    Used by transfer (Igneous `downsample_shape_from_memory_target`).
    """
    cx, cy, cz = (int(c) for c in chunk_size)
    factor = tuple(int(f) for f in factor)
    if memory_target <= 0:
        raise ValueError(f"memory_target must be > 0, got {memory_target}")
    if cx * cy * cz <= 0:
        raise ValueError(f"chunk size must be positive, got {chunk_size}")

    def grow(n, c):
        k = int(math.log2((c ** (2 * n)) / c))
        return c * 2 ** int(min(k, max_mips))

    if factor == (1, 1, 1):
        n = int(math.sqrt(memory_target / data_width / cx / cy / cz))
        out = (n * cx, int(n * cx / cy) * cy, cz)
    elif factor == (2, 2, 1):
        if cx * cy == 1:
            side = 2 ** int(math.log2(math.sqrt(memory_target / cz)))
            out = (side, side, cz)
        else:
            n = math.log(3 / 4 * memory_target / data_width / cz) / 2 / math.log(cx * cy)
            out = (grow(n, cx), grow(n, cy), cz)
    elif factor == (2, 2, 2):
        if cx * cy * cz == 1:
            side = 2 ** int(math.log2(round(memory_target ** (1 / 3), 5)))
            out = (side, side, side)
        else:
            n = math.log(7 / 8 * memory_target / data_width) / 2 / math.log(cx * cy * cz)
            out = (grow(n, cx), grow(n, cy), grow(n, cz))
    else:
        raise ValueError(f"factor must be (1,1,1), (2,2,1) or (2,2,2), got {factor}")
    out = tuple(int(v) for v in out)
    if any(o < c for o, c in zip(out, (cx, cy, cz))):
        raise ValueError(
            f"memory_target {memory_target:.3g} B is too small for one chunk {list(chunk_size)}"
            f" (shape would be {list(out)})"
        )
    return out


def mips_for_shape(shape, factor, chunk_size, volume_size) -> int:
    """Number of mips a task of `shape` can produce (Igneous `compute_factors`).

    Limited by how often the task's extent (clipped to the volume) halves before
    it drops below one chunk along each downsampled axis; one extra, partial mip
    is allowed when the whole volume is smaller than a chunk there.
    """
    shape = np.minimum(np.asarray(volume_size, dtype=np.float64), np.asarray(shape, dtype=np.float64))
    axes = [i for i, f in enumerate(factor) if f != 1]
    if not axes:
        return 0
    grid = np.array([shape[i] / chunk_size[i] for i in axes], dtype=np.float32)
    fac = np.array([factor[i] for i in axes], dtype=np.float32)
    eps = 0.0001
    n = float(np.min(np.log(grid) / np.log(fac) + eps))
    if n < eps:
        return 0
    dsvol = np.array([volume_size[i] / factor[i] ** int(np.ceil(n)) for i in axes])
    chunk = np.array([chunk_size[i] for i in axes])
    whole, fract = int(n), n - int(n)
    if np.all(dsvol < chunk) and fract > 0.05:
        whole += 1
    return whole


def format_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB", "PB"):
        if abs(n) < 1000 or unit == "PB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000.0
    return f"{n:.1f} PB"
