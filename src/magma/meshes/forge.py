"""Forge: one block of labels -> one exact zmesh mesh per label, in nm, in layer coordinates.

The block a task reads overlaps its high-side neighbours by one voxel, so two
neighbouring tasks run marching cubes over the same voxel plane and their surfaces
meet exactly there. Sides that touch the dataset boundary are padded with
background so objects come out closed (closed_dataset_edges).
"""
from __future__ import annotations

import fastmorph
import fastremap
import numpy as np
import zmesh

from .multilod import weld
from .shards import mapkey


def dataset_edges(lo, hi, whole_lo, whole_hi) -> tuple:
    """(before, after): one voxel of padding on every side of the block [lo, hi) that lies
    on the dataset boundary [whole_lo, whole_hi), so objects there come out closed."""
    before = np.asarray([1 if lo[i] == whole_lo[i] else 0 for i in range(3)], dtype=np.int64)
    after = np.asarray([1 if hi[i] == whole_hi[i] else 0 for i in range(3)], dtype=np.int64)
    return before, after


def pad(labels: np.ndarray, before, after) -> np.ndarray:
    """`labels` with `before`/`after` background voxels on each side, Fortran order (the
    mesher's), in one copy (np.pad and a reorder made two: ~1 s on a 448^3 uint64 block)."""
    if not np.any(before) and not np.any(after):
        return np.asfortranarray(labels)
    out = np.zeros(np.asarray(labels.shape) + before + after, dtype=labels.dtype, order="F")
    out[tuple(slice(b, b + n) for b, n in zip(before, labels.shape))] = labels
    return out


def keep_labels(labels: np.ndarray, dust_threshold=None, global_counts=None, object_ids=None,
                exclude_object_ids=()) -> np.ndarray:
    """Zero what is not to be meshed: dust (in this block, or globally when `global_counts`,
    a label -> voxel count lookup, is given), ids outside `object_ids`, `exclude_object_ids`."""
    if dust_threshold:
        if global_counts is None:
            ids, counts = fastremap.unique(labels, return_counts=True)
            dust = [int(i) for i, c in zip(ids, counts) if c < dust_threshold and i != 0]
            if dust:
                labels = fastremap.mask(labels, dust, in_place=True)
        else:
            keep = [int(i) for i in fastremap.unique(labels)
                    if i != 0 and _count(global_counts, int(i)) >= dust_threshold]
            labels = fastremap.mask_except(labels, keep, in_place=True)
    if object_ids:
        labels = fastremap.mask_except(labels, [int(i) for i in object_ids], in_place=True)
    if exclude_object_ids:
        labels = fastremap.mask(labels, [int(i) for i in exclude_object_ids], in_place=True)
    return labels


def _count(counts, label: int) -> int:
    try:
        return int(counts[mapkey(label)])
    except KeyError:
        return 0


def fill(labels: np.ndarray, level: int):
    """Igneous's fill_holes levels on a block: 1 fills enclosed holes, 2 also closes holes
    cut by the block's sides in 2D, 3 also dilates labels into background first.
    Returns the filled labels and the hole fillings (meshed separately, then joined)."""
    if level >= 3:
        labels = fastmorph.dilate(labels, mode=fastmorph.Mode.multilabel, background_only=True, parallel=1)
    filled, holes = fastmorph.fill_holes_v2(labels, fix_borders=level >= 2, parallel=1)
    return filled, holes


# label batches a block's meshes are extracted in: enough that a core which frees up part-way
# through a big task still finds batches to take
GET_BATCHES = 8


def mesh_labels(labels: np.ndarray, resolution, fill_holes: int = 0, map_fn=map, finish=None,
                edges=None, consume: bool = False) -> dict:
    """label -> exact marching-cubes zmesh.Mesh, vertices in nm, voxel i at (i + 1/2) * resolution
    (block origin 0), or what `finish(mesh)` makes of it. Not simplified: the merge simplifies
    each label whole (meshes/simplify.py). `edges` = (before, after): background padding for
    the dataset's edges (`dataset_edges`), added after renumbering, where it is cheap; voxel i
    of `labels` is then voxel i + before of the padded block. `consume`: `labels` may be
    overwritten (renumbered in place: a 448^3 uint64 copy is 0.2 s in a warm process and
    1.7 s of page faults in a fresh one, and it comes before any fork can help).

    Marching cubes over the block is quick; turning each label's triangles into a mesh (and
    `finish`ing it) is most of the work, so it runs in label batches through
    `map_fn(fn, batches)` (forks that share the meshers when the job has spare cores).
    Each label's mesh is the same however it runs."""
    if not np.any(labels):
        return {}
    small, mapping = fastremap.renumber(labels, in_place=consume)  # smaller dtype: faster mesher
    if edges is not None:
        small = pad(small, *edges)
    original = {v: k for k, v in mapping.items()}
    meshers = []
    for block in (fill(small, fill_holes) if fill_holes else [small]):  # the labels, then filled holes
        mesher = zmesh.Mesher(tuple(float(r) for r in resolution))
        mesher.mesh(np.asfortranarray(block))
        meshers.append((mesher, {int(i) for i in mesher.ids()}))
    ids = sorted(set().union(*(has for _, has in meshers)))
    size = max(1, -(-len(ids) // GET_BATCHES))

    def get(batch):
        out = []
        for i in batch:
            label = int(original[i])
            parts = [m.get(i, reduction_factor=0, voxel_centered=True) for m, has in meshers if i in has]
            # a label and the holes filled in it touch: weld them, so a fragment's vertices are distinct
            mesh = parts[0] if len(parts) == 1 else weld(parts, resolution, label)
            mesh.segid = label
            out.append((label, finish(mesh) if finish else mesh))
        return out

    result = {}
    for done in map_fn(get, [ids[k:k + size] for k in range(0, len(ids), size)]):
        result.update(done)
    for m, _ in meshers:
        m.clear()
    return result
