"""One label's merged mesh -> Neuroglancer multi-resolution mesh (manifest + Draco fragments).

Model space is voxels at the mesh mip (the info's `transform` scales to nm). LOD 0 is
the merged mesh; LOD i is LOD i-1 simplified by zmesh's fast quadric simplifier to
about faces0 / 2**i (zmesh.simplify_fqmr, not pyfqmr: it takes zmesh meshes as they
are and halved five 7-8k-face meshes in 29 ms against pyfqmr's 46 ms; pyfqmr kept
the area 0.3-1% closer, well inside what a coarser LOD may lose). LOD i is cut into an octree level of cells chunk_shape * 2**i
(zmesh.chunk_mesh), cells in Z-curve order, each Draco-encoded with integer
positions on the full [0, 2**bits - 1] lattice of its cell so decoding is exact.
Before cutting LOD i, it is first cut along LOD i-1's cell planes: a coarse cell
then ends exactly where its finer children do, which Neuroglancer needs to swap
LODs without cracks.
"""
from __future__ import annotations

import DracoPy
import numpy as np
import zmesh
from cloudvolume.datasource.precomputed.mesh.multilod import (
    MultiLevelPrecomputedMeshManifest,
    to_stored_model_space,
)


def weld(parts: list, resolution, label: int, distinct: bool = False, seams=None) -> zmesh.Mesh:
    """Join a label's forge fragments into one mesh, merging the vertices neighbouring
    tasks share on their seams. Those lie on the half-voxel lattice, so rounding to
    1/16 voxel merges them even when float sums differ in the last bit (one sort;
    zmesh's merge_close_vertices took 50x longer).

    `distinct`: each part's own vertices are distinct (zmesh's meshes are), so a label
    one task meshed whole needs no welding. `seams` (with `distinct`): per axis, the
    coordinates (nm) of the planes where tasks meet; only vertices on them can be
    shared, so only those are sorted (a few percent of a label's vertices), and the
    others keep their order."""
    if distinct and len(parts) == 1:
        return zmesh.Mesh(parts[0].vertices, parts[0].faces, None, id=label)
    mesh = zmesh.Mesh.concatenate(*parts, id=label)
    if len(mesh.faces) == 0:
        return mesh
    quantum = float(min(resolution)) / 16
    v = mesh.vertices
    if distinct and seams is not None:
        # each candidate goes to the first vertex of its group, in the parts' order
        candidates = np.flatnonzero(_on_planes(v, seams, quantum / 2))
        first, inverse = _groups(v[candidates], quantum)
        target = np.arange(len(v))
        target[candidates] = candidates[first][inverse]
        keep = target == np.arange(len(v))
        faces = (np.cumsum(keep) - 1)[target][mesh.faces]
        vertices = v[keep]
    else:
        first, inverse = _groups(v, quantum)
        faces = inverse.reshape(-1)[mesh.faces]
        vertices = v[first]
    faces = faces[(faces[:, 0] != faces[:, 1]) & (faces[:, 1] != faces[:, 2]) & (faces[:, 0] != faces[:, 2])]
    return zmesh.Mesh(vertices, faces.astype(np.uint32), None, id=label)


def _groups(v: np.ndarray, quantum: float) -> tuple:
    """(first, inverse) of np.unique over vertex positions rounded to `quantum`."""
    if len(v) == 0:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    key = np.round(v / quantum).astype(np.int64)
    key -= key.min(axis=0)
    span = key.max(axis=0) + 1
    if float(np.prod(span.astype(float))) < 2.0**62:
        _, first, inverse = np.unique((key[:, 0] * span[1] + key[:, 1]) * span[2] + key[:, 2],
                                      return_index=True, return_inverse=True)
    else:  # a huge extent: unique rows instead of one packed integer
        _, first, inverse = np.unique(key, axis=0, return_index=True, return_inverse=True)
    return first, inverse.reshape(-1)


def _on_planes(v: np.ndarray, planes, tolerance: float) -> np.ndarray:
    """Which vertices lie within `tolerance` of one of the axis-aligned `planes` (per axis)."""
    out = np.zeros(len(v), dtype=bool)
    for axis, at in enumerate(planes):
        at = np.sort(np.asarray(at, dtype=np.float64))
        if len(at) == 0:
            continue
        x = v[:, axis].astype(np.float64)
        i = np.clip(np.searchsorted(at, x), 1, len(at)) - 1  # the plane at or below, else the first
        near = np.minimum(np.abs(x - at[i]), np.abs(x - at[np.minimum(i + 1, len(at) - 1)]))
        out |= near <= tolerance
    return out


def lod_count(extent, min_chunk_size, nlod: int) -> int:
    """How many LODs (>= 1): nlod more than LOD 0, capped by how often the mesh's
    extent halves while staying above min_chunk_size."""
    ratio = np.asarray(extent, dtype=float) / np.asarray(min_chunk_size, dtype=float)
    halvings = int(np.floor(np.log2(np.min(ratio)))) if np.all(ratio > 0) else 0
    return 1 + min(max(halvings, 0), int(nlod))


def simplify_lods(mesh: zmesh.Mesh, n: int) -> list:
    lods = [mesh]
    faces0 = len(mesh.faces)
    for i in range(1, n):
        target = max(4, faces0 // 2**i)
        lods.append(zmesh.simplify_fqmr(lods[-1], target_count=target, aggressiveness=7.0,
                                        preserve_border=False))
    return lods


def zorder_keys(cells: np.ndarray) -> np.ndarray:
    """Morton codes of integer cell positions (x in the lowest bit), Neuroglancer's order."""
    cells = cells.astype(np.uint64)
    code = np.zeros(len(cells), dtype=np.uint64)
    for bit in range(21):
        for axis in range(3):
            code |= ((cells[:, axis] >> np.uint64(bit)) & np.uint64(1)) << np.uint64(3 * bit + axis)
    return code


def _cut(mesh: zmesh.Mesh, cell, origin) -> zmesh.Mesh:
    """`mesh` with every triangle that crosses a plane of the grid split along it."""
    pieces = zmesh.chunk_mesh(mesh, tuple(float(c) for c in cell), tuple(float(o) for o in origin))
    return zmesh.Mesh.concatenate(*pieces.values(), id=mesh.segid)


def cells(mesh: zmesh.Mesh, cell, origin) -> dict:
    """(i, j, k) -> the part of `mesh` inside that grid cell.

    Triangles are cut along the grid by zmesh, then placed by their centroid: zmesh's own
    placement puts a triangle with two vertices on a plane into the cell past that plane,
    and clamping it into that cell would open holes."""
    cut = _cut(mesh, cell, origin)
    v, f = cut.vertices, cut.faces
    if len(f) == 0:
        return {}
    where = np.floor((v[f].mean(axis=1) - origin) / cell).astype(np.int64)
    where = np.maximum(where, 0)
    keys = where[:, 0] | (where[:, 1] << 21) | (where[:, 2] << 42)
    order = np.argsort(keys, kind="stable")
    bounds = np.flatnonzero(np.diff(keys[order])) + 1
    out = {}
    for group in np.split(order, bounds):
        used, local = np.unique(f[group], return_inverse=True)
        out[tuple(int(x) for x in where[group[0]])] = zmesh.Mesh(v[used], local.reshape(-1, 3).astype(np.uint32), None)
    return out


def encode(label: int, mesh: zmesh.Mesh, resolution, nlod: int, min_chunk_size, vertex_quantization_bits: int,
           draco_compression_level: int):
    """(manifest bytes, fragment bytes) for `mesh` (vertices in nm), or None when it is empty."""
    if mesh is None or len(mesh.faces) == 0:
        return None
    vox = zmesh.Mesh(mesh.vertices / np.asarray(resolution, dtype=np.float32), mesh.faces, None, id=label)
    lo, hi = vox.vertices.min(axis=0), vox.vertices.max(axis=0)
    n = lod_count(hi - lo, min_chunk_size, nlod)
    lods = simplify_lods(vox, n)
    # every LOD inside the grid; +1 so no vertex sits on the far edge of the last cell
    lo = np.floor(np.min([m.vertices.min(axis=0) for m in lods], axis=0))
    hi = np.ceil(np.max([m.vertices.max(axis=0) for m in lods], axis=0)) + 1
    chunk = np.ceil((hi - lo) / 2 ** (n - 1)).astype(np.float32)
    origin = lo.astype(np.float32)

    bits = int(vertex_quantization_bits)
    top = 2**bits - 1
    positions, pieces = [], []
    for i, m in enumerate(lods):
        if i > 0:  # seams of LOD i follow the cells of LOD i-1
            m = _cut(m, chunk * 2 ** (i - 1), origin)
        parts = cells(m, chunk * 2**i, origin)
        keys = sorted(parts, key=lambda c: int(zorder_keys(np.array([c]))[0]))
        positions.append(np.array(keys, dtype=np.uint32).reshape(-1, 3))
        pieces.append([parts[k] for k in keys])

    manifest = MultiLevelPrecomputedMeshManifest(
        segment_id=label, chunk_shape=chunk, grid_origin=origin, num_lods=n,
        lod_scales=[2**i for i in range(n)], vertex_offsets=[[0, 0, 0]] * n,
        num_fragments_per_lod=[len(p) for p in positions], fragment_positions=positions, fragment_offsets=[],
    )
    blobs = []
    for i, frags in enumerate(pieces):
        for j, frag in enumerate(frags):
            stored = to_stored_model_space(frag.vertices, manifest, lod=i, vertex_quantization_bits=bits, frag=j)
            blob = DracoPy.encode(stored, frag.faces, quantization_bits=bits, compression_level=draco_compression_level,
                                  quantization_range=top, quantization_origin=(0, 0, 0))
            manifest.fragment_offsets.append(len(blob))
            blobs.append(blob)
    return manifest.to_binary(), b"".join(blobs)
