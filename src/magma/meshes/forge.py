"""Forge: one block of labels -> one zmesh mesh per label, in nm, in layer coordinates.

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

from .. import cores
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


def mesh_labels(labels: np.ndarray, resolution, simplification: bool, max_error: float,
                fill_holes: int = 0) -> dict:
    """label -> zmesh.Mesh with vertices in nm, voxel i at i * resolution (block origin 0)."""
    if not np.any(labels):
        return {}
    small, mapping = fastremap.renumber(labels, in_place=False)  # smaller dtype: faster mesher
    original = {v: k for k, v in mapping.items()}
    blocks = list(fill(small, fill_holes)) if fill_holes else [small]
    out = {}
    for block in blocks:
        mesher = zmesh.Mesher(tuple(float(r) for r in resolution))
        mesher.mesh(np.asfortranarray(block))
        for i, m in _simplified(mesher, block, 100 if simplification else 0, max_error):
            label = int(original[int(i)])
            out[label] = zmesh.Mesh.concatenate(out[label], m, id=label) if label in out else m
            out[label].segid = label
        mesher.clear()
    return out


# Labels simplified in one fork: about a second of work, so forking costs ~1% (see _simplified).
BATCH_VOXELS = 1 << 19


def _simplified(mesher, block: np.ndarray, reduction_factor: int, max_error: float) -> list:
    """[(id, mesh)] for every id the mesher found, in its order.

    zmesh's simplifier keeps hash tables from one `get` to the next, and their order
    decides ties between equal-cost edge collapses: the same label comes out with other
    faces depending on what was simplified before it (up to 1.6x the faces). So labels are
    simplified in batches fixed by the block alone (consecutive ids up to BATCH_VOXELS
    voxels), each batch in a fresh fork: the output never depends on cores or timing, and
    batches run side by side when the job has spare cores (simplification is nearly all
    of a task's time)."""
    ids = [int(i) for i in mesher.ids()]

    def get(i):
        m = mesher.get(i, reduction_factor=reduction_factor, max_error=max_error, voxel_centered=True)
        return m.vertices, m.faces, m.normals

    if reduction_factor == 0:  # no simplifier involved
        return [(i, zmesh.Mesh(*get(i), id=i)) for i in ids]
    uniq, counts = fastremap.unique(block, return_counts=True)
    size = dict(zip(uniq.tolist(), counts.tolist()))
    batches, current, held = [], [], 0  # (voxels, ids)
    for i in sorted(ids):
        current.append(i)
        held += size.get(i, 0)
        if held >= BATCH_VOXELS:
            batches.append((held, current))
            current, held = [], 0
    if current:
        batches.append((held, current))
    batches = [b for _, b in sorted(batches, key=lambda hb: -hb[0])]  # biggest first: even shares
    done = {}
    for result in cores.fork_each(lambda batch: [(i, get(i)) for i in batch], batches):
        done.update(result)
    return [(i, zmesh.Mesh(*done[i], id=i)) for i in ids]
