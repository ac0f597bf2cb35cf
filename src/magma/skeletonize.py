"""Skeleton kernels: kimimaro TEASAR on one block, fusing fragments, label buckets, shard sizing.

Plain functions (arrays and skeletons in, skeletons and numbers out) that the
`skeleton` op runs per task and tests call on a whole array.
"""
from __future__ import annotations

import math

import fastmorph
import fastremap
import kimimaro
import numpy as np
import shardcomputer
from cloudvolume import Skeleton

RADIUS = {"id": "radius", "data_type": "float32", "num_components": 1}
CROSS_SECTION = {"id": "cross_sectional_area", "data_type": "float32", "num_components": 1}


def vertex_attributes(cross_sectional_area: bool) -> list:
    """The attributes every stored skeleton carries (float32 only, as Neuroglancer expects)."""
    return [RADIUS, CROSS_SECTION] if cross_sectional_area else [RADIUS]


def mask_labels(labels: np.ndarray, object_ids=None, mask_ids=None) -> np.ndarray:
    """Zero `mask_ids`, then everything except `object_ids` (either may be None)."""
    if mask_ids:
        labels = fastremap.mask(labels, list(mask_ids), in_place=True)
    if object_ids:
        labels = fastremap.mask_except(labels, list(object_ids), in_place=True)
    return labels


def _with_holes_filled(labels: np.ndarray, fill_holes: int, anisotropy, fn) -> dict:
    """Run `fn` (labels -> {label: value}) on `labels` with holes filled the way the
    Igneous `fill_holes` levels define: 1 fill, 2 also close the block's sides,
    3 also dilate into background first, 4+ also lower fastmorph's merge threshold by 1% per level.
    Filled holes that fastmorph returns as their own labels are processed separately and
    handed back as a second dict."""
    if fill_holes <= 0:
        return fn(labels), {}
    if fill_holes >= 3:
        labels = fastmorph.dilate(labels, mode=fastmorph.Mode.multilabel, background_only=True, parallel=1)
    threshold = 1.0 if fill_holes <= 3 else 1.0 - 0.01 * (fill_holes - 3)
    filled, holes = fastmorph.fill_holes_v2(labels, fix_borders=fill_holes >= 2, merge_threshold=threshold,
                                            anisotropy=tuple(anisotropy), parallel=1, return_crackle=True)
    return fn(filled.numpy()), fn(holes.numpy())


PARALLEL_MIN_VOXELS = 64**3  # smaller blocks trace alone: splitting would not pay


def label_sets(labels: np.ndarray, n: int) -> list:
    """Split the labels of a block into `n` lists of about equal voxel counts (largest first,
    each to the lightest list): tracing time grows with an object's volume."""
    ids, counts = fastremap.unique(labels, return_counts=True)
    order = np.argsort(-counts, kind="stable")
    sets, load = [[] for _ in range(n)], [0] * n
    for i in order:
        if ids[i] == 0:
            continue
        k = load.index(min(load))
        sets[k].append(int(ids[i]))
        load[k] += int(counts[i])
    return [s for s in sets if s]


def forge(labels: np.ndarray, anisotropy, teasar_params: dict, dust_threshold: int = 1000,
          fix_branching: bool = True, fix_borders: bool = True, fix_avocados: bool = False,
          fill_holes: int = 0, parallel: int = 1, map_fn=map) -> dict:
    """kimimaro skeletons {label: Skeleton} of `labels` (x, y, z); kimimaro puts the centre
    of voxel i at i * anisotropy nm, so the caller shifts vertices into layer coordinates.

    `parallel` > 1 splits the labels into that many sets and traces each set with
    `map_fn(trace, sets)` (a process per set): kimimaro traces every label on its own, and
    masking the other labels to background leaves each label's distance field unchanged,
    so the skeletons are the same. Each set repeats the block-wide steps (copy,
    components, distance field: ~5% of tracing), far less than kimimaro's own parallel
    mode loses to uneven pieces. Avocados pair two labels, so they trace together."""
    teasar = {k: v for k, v in teasar_params.items() if v is not None}

    def trace(arr, object_ids=None):
        return kimimaro.skeletonize(arr, teasar, anisotropy=tuple(anisotropy), dust_threshold=dust_threshold,
                                    progress=False, fix_branching=fix_branching, fix_borders=fix_borders,
                                    fix_avocados=fix_avocados, fill_holes=False, object_ids=object_ids,
                                    parallel=1)

    def run(arr):
        if parallel <= 1 or fix_avocados or arr.size < PARALLEL_MIN_VOXELS:
            return trace(arr)
        sets = label_sets(arr, parallel)
        if len(sets) <= 1:
            return trace(arr)
        out = {}
        for part in map_fn(lambda ids: trace(arr, ids), sets):
            out.update(part)
        return out

    skels, holes = _with_holes_filled(labels, fill_holes, anisotropy, run)
    for label, hole in holes.items():
        skels[label] = Skeleton.simple_merge([skels[label], hole]) if label in skels else hole
    return skels


def cross_sections(labels: np.ndarray, skeletons: dict, anisotropy, shift_voxels, smoothing_window: int,
                   fill_holes: int = 0) -> dict:
    """Add `cross_sectional_area` to `skeletons` (vertices in nm relative to a block that sits
    `shift_voxels` inside `labels`, which is grown so planes are not clipped at the block edge)."""
    if not skeletons:
        return skeletons
    shift = np.asarray(shift_voxels, dtype=np.float32) * np.asarray(anisotropy, dtype=np.float32)
    for skel in skeletons.values():
        skel.vertices += shift

    def run(arr):
        return kimimaro.cross_sectional_area(arr, skeletons, anisotropy=np.asarray(anisotropy, dtype=np.float32),
                                            smoothing_window=smoothing_window, progress=False, in_place=True,
                                            fill_holes=False, multipass=True)

    out, _ = _with_holes_filled(labels, fill_holes, anisotropy, run)
    for skel in out.values():
        skel.vertices -= shift
    return out


def keep_attributes(skel: Skeleton, attributes: list) -> Skeleton:
    """Keep only the listed vertex attributes, in that order (drops vertex_types and contacts)."""
    ids = [a["id"] for a in attributes]
    skel.extra_attributes = [dict(a) for a in attributes]
    for name in ("vertex_types", "cross_sectional_area_contacts"):
        if name not in ids and hasattr(skel, name):
            delattr(skel, name)
    return skel


def fuse(fragments: list, label: int, min_cable_length: float, tick_threshold: float,
         max_cable_length: float | None, attributes: list) -> Skeleton:
    """One skeleton from a label's task fragments: vertices shared at task borders are merged,
    then kimimaro's postprocess (dust by cable length, loops, close components, ticks) runs
    unless the skeleton is longer than `max_cable_length`."""
    skel = Skeleton.simple_merge(fragments).consolidate()
    if max_cable_length is None or skel.cable_length() <= max_cable_length:
        post = kimimaro.postprocess(skel, dust_threshold=min_cable_length, tick_threshold=tick_threshold)
        skel = _carry_attributes(skel, post, attributes)
    skel.id = label
    return keep_attributes(skel, attributes)


def _carry_attributes(src: Skeleton, dst: Skeleton, attributes: list) -> Skeleton:
    """postprocess keeps radius but may drop other attributes: copy them over by vertex position."""
    for attr in attributes:
        name = attr["id"]
        if name == "radius" or not hasattr(src, name) or (hasattr(dst, name) and
                                                           len(getattr(dst, name)) == len(dst.vertices)):
            continue
        if len(dst.vertices) == 0:
            setattr(dst, name, np.zeros((0,), dtype=np.float32))
            continue
        index = {tuple(v): i for i, v in enumerate(src.vertices)}
        values = getattr(src, name)
        setattr(dst, name, np.array([values[index[tuple(v)]] for v in dst.vertices], dtype=np.float32))
    return dst


# ---- label buckets and shards -------------------------------------------------
def buckets_of(labels: np.ndarray, bucket_bits: int, minishard_bits: int) -> dict:
    """bucket number -> labels. A bucket is a label's shard number under a sharding spec with
    `bucket_bits` shard bits and these minishard bits, so a merge job that owns bucket b owns
    exactly the shards whose number is b modulo 2**bucket_bits."""
    labels = np.asarray(labels, dtype=np.uint64)
    if len(labels) == 0:
        return {}
    if bucket_bits == 0:
        return {0: labels.tolist()}
    out = shardcomputer.assign_labels_to_shards(labels, 0, int(bucket_bits), int(minishard_bits))
    return {int(k, 16): v for k, v in out.items()}


def minishard_bits_for(max_labels_per_shard: int, shard_index_bytes: int, minishard_index_bytes: int) -> int:
    """Minishards per shard so that one minishard index stays within `minishard_index_bytes`
    (24 bytes a label) when a shard holds `max_labels_per_shard` labels, capped by how many
    minishard entries (16 bytes each) fit in `shard_index_bytes`."""
    per_minishard = max(1, minishard_index_bytes // 24)
    bits = max(0, math.ceil(math.log2(max(1, max_labels_per_shard) / per_minishard)))
    return int(min(bits, max(0, int(math.log2(max(1, shard_index_bytes // 16))))))


def shard_bits_for(n_labels: int, max_labels_per_shard: int, min_shards: int = 1) -> int:
    """The fewest shard bits that keep the average shard at or under `max_labels_per_shard`."""
    need = max(1, math.ceil(n_labels / max(1, max_labels_per_shard)), int(min_shards))
    return int(math.ceil(math.log2(need)))
