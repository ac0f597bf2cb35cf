"""Simplify a label's merged mesh as zmesh simplifies a label it meshed whole.

Forge tasks mesh without simplifying: a simplifier keeps the open edges of a block's
mesh, so meshes simplified per task keep every marching-cubes vertex along the task
seams (4-5x the faces of the whole-array mesh on 32^3 tasks, 1-3% more area). The
merge welds a label's exact fragments into the whole-array marching-cubes mesh and
simplifies that once, with zmesh's own quadric simplifier and error measure.

zmesh's `Mesher.get` simplifies on the half-voxel lattice scaled by the resolution,
i.e. in units of half a nanometre, with `max_error` in those units. `Mesher.simplify`
runs the same simplifier on a mesh given to it, on the lattice 2 * vertex: given
vertices in nm and a unit resolution, that is the same space. It floor-divides
`max_error` by |resolution| (sqrt 3 for a unit one), which the caller undoes, and it
holds coordinates up to 2**20, so a label more than 2**19 nm wide is scaled down by
a power of two (the lattice then snaps to a fraction of a nm), and a fractional
`max_error` is met on a lattice refined by a power of two.
"""
from __future__ import annotations

import math

import numpy as np
import zmesh

from . import bounds

REDUCTION_FACTOR = 100  # Igneous's and zmesh's target: 1% of the faces, unless max_error stops it
LIMIT = 2**20  # the simplifier's coordinate range


def simplify(mesh: zmesh.Mesh, max_error: float) -> zmesh.Mesh:
    """`mesh` (vertices in nm on the marching-cubes lattice) simplified to within `max_error` nm units
    as zmesh.Mesher.get(label, reduction_factor=100, max_error=max_error) would."""
    if len(mesh.faces) == 0:
        return mesh
    v = np.asarray(mesh.vertices, dtype=np.float64)
    low, high = bounds(v)
    lo = np.asarray(low)  # a lattice point: subtracting it keeps the lattice and the range small
    extent = float((np.asarray(high) - lo).max())
    scale = 1.0
    while 2 * extent * scale > LIMIT:
        scale /= 2
    # the threshold is whole units of the lattice: refine the lattice for a fractional one
    while not float(max_error * scale).is_integer() and scale < 16 and 4 * extent * scale <= LIMIT:
        scale *= 2
    local = zmesh.Mesh(((v - lo) * scale).astype(np.float32), np.asarray(mesh.faces, dtype=np.uint32), None)
    threshold = round(max_error * scale)
    out = zmesh.Mesher((1, 1, 1)).simplify(local, reduction_factor=REDUCTION_FACTOR,
                                           max_error=threshold * math.sqrt(3) + 1e-3)
    vertices = (out.vertices.astype(np.float64) / scale + lo).astype(np.float32)
    return zmesh.Mesh(vertices, out.faces.astype(np.uint32), None, id=mesh.segid)
