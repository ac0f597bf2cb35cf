"""Mesh kernels (plain functions, no Snakemake): forge a block into per-label meshes,
build multi-LOD Draco meshes, and the sharding arithmetic. magma.ops.mesh plans and
runs them."""

import fastremap
import numpy as np


def bounds(points: np.ndarray) -> tuple:
    """(lowest, highest) of each column of an (N, 3) array, as Python numbers: one pass per
    column (numpy reduces a C-order (N, 3) array along axis 0 ~15x slower, and full-resolution
    meshes have millions of vertices)."""
    lo_hi = [fastremap.minmax(points[:, a]) for a in range(points.shape[1])]
    return [lo for lo, _ in lo_hi], [hi for _, hi in lo_hi]
