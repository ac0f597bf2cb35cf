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

from .shards import mapkey


def close_dataset_edges(labels: np.ndarray, lo, hi, whole_lo, whole_hi):
    """Pad `labels` (covering [lo, hi)) with one background voxel on every side that
    lies on the dataset boundary [whole_lo, whole_hi). Returns (labels, low-side pad)."""
    before = [1 if lo[i] == whole_lo[i] else 0 for i in range(3)]
    after = [1 if hi[i] == whole_hi[i] else 0 for i in range(3)]
    if not any(before) and not any(after):
        return labels, np.zeros(3, dtype=np.int64)
    padded = np.pad(labels, list(zip(before, after)), mode="constant", constant_values=0)
    return np.asfortranarray(padded), np.asarray(before, dtype=np.int64)


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


def mesh_labels(labels: np.ndarray, resolution, fill_holes: int = 0, map_fn=map, finish=None) -> dict:
    """label -> exact marching-cubes zmesh.Mesh, vertices in nm, voxel i at (i + 1/2) * resolution
    (block origin 0), or what `finish(mesh)` makes of it. Not simplified: the merge simplifies
    each label whole (meshes/simplify.py).

    Marching cubes over the block is quick; turning each label's triangles into a mesh (and
    `finish`ing it) is most of the work, so it runs in label batches through
    `map_fn(fn, batches)` (forks that share the meshers when the job has spare cores).
    Each label's mesh is the same however it runs."""
    if not np.any(labels):
        return {}
    small, mapping = fastremap.renumber(labels, in_place=False)  # smaller dtype: faster mesher
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
            mesh = parts[0] if len(parts) == 1 else zmesh.Mesh.concatenate(*parts, id=label)
            mesh.segid = label
            out.append((label, finish(mesh) if finish else mesh))
        return out

    result = {}
    for done in map_fn(get, [ids[k:k + size] for k in range(0, len(ids), size)]):
        result.update(done)
    for m, _ in meshers:
        m.clear()
    return result
