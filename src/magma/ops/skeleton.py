"""skeleton: kimimaro TEASAR skeletons of a segmentation, forged per task and merged per label.

Stages:
  forge  tasks of `shape` overlapping their high-side neighbours by one voxel. Each task
         skeletonizes its block and writes its fragments grouped by merge bucket
         (`<skel_dir>/frags/<bucket>/<task>.frags`, a MapBuffer label -> precomputed bytes),
         plus the spatial index and, for sharded output, the task's label list.
  spec   (sharded) one task counts the labels and writes the sharding spec into the skeleton info.
  merge  one task per bucket: fuse each label's fragments (they meet at shared border
         vertices), postprocess, write `<skel_dir>/<label>` or whole shard files.
  clean  (delete_fragments) one task per bucket removes the fragments.

A bucket is a label's shard number under a spec with `bucket_bits` shard bits and the
output's minishard bits, so the buckets are known at plan time and, once the real shard
count is known, every shard is built from the buckets of exactly one merge task.
"""
from __future__ import annotations

import copy
import math

import fastremap
import numpy as np
from cloudfiles import CloudFiles
from cloudvolume import Bbox, Skeleton, Vec
from cloudvolume.lib import getprecision
from cloudvolume.datasource.precomputed.sharding import ShardingSpecification, synthesize_shard_files
from mapbuffer import IntMap, MapBuffer

from .. import cores, layers, skeletonize, storage
from ..errors import MagmaError
from ..plan import Grid, StepPlan, make_stage
from .common import open_volume

FRAGS = "frags"
MAX_MERGE_TASKS = 4096
MAX_HELPERS = 63  # extra tracing forks a forge task may run on its job's idle cores
BYTES_PER_VOXEL = 24  # labels + kimimaro's distance fields on the block, measured ~20 B/voxel


# reads, writes, creates: the defaults (ops/__init__.py): reads and writes `layer`


# ---- planning -----------------------------------------------------------------
def merge_bucket_bits(merge_tasks, forge_tasks: int) -> int:
    """log2 of the number of merge buckets: `merge_tasks` (or one per forge task) rounded up
    to a power of two, at most MAX_MERGE_TASKS."""
    n = merge_tasks or forge_tasks
    return int(min(math.ceil(math.log2(max(1, n))), math.log2(MAX_MERGE_TASKS)))


def skeleton_info(p: dict, resolution, attributes: list) -> dict:
    res = [float(r) if not float(r).is_integer() else int(r) for r in resolution]
    info = {"@type": "neuroglancer_skeletons", "transform": [1, 0, 0, 0, 0, 1, 0, 0, 0, 0, 1, 0],
            "mip": int(p["mip"]), "vertex_attributes": attributes, "spatial_index": None}
    if p["spatial_index"]:
        info["spatial_index"] = {"resolution": res, "chunk_size": [s * r for s, r in zip(p["shape"], res)]}
    return info


def plan(ctx, name: str, p: dict) -> StepPlan:
    where = f"steps.{name}"
    lname = p["layer"]
    info = ctx.infos[lname]
    if info["type"] != "segmentation":
        raise MagmaError(f"{where}.layer: skeletons are made from a segmentation; layer '{lname}' is of type"
                         f" '{info['type']}'")
    if int(info["num_channels"]) != 1:
        raise MagmaError(f"{where}.layer: layer '{lname}' has {info['num_channels']} channels; skeletons need 1")
    layers.check_mip(lname, info, p["mip"], key=f"{where}.mip")
    if p["object_ids"] and p["mask_ids"] and set(p["object_ids"]) <= set(p["mask_ids"]):
        raise MagmaError(f"{where}.mask_ids: every id in object_ids is masked out; nothing would be skeletonized")
    meta = layers.meta(info)
    mip = p["mip"]
    whole = meta.bounds(mip)
    # not the layer's current `skeletons` (Igneous reuses it): a re-plan after the run must not change
    skel_dir = p["skel_dir"] or f"skeletons_mip_{mip}"
    attributes = skeletonize.vertex_attributes(p["cross_sectional_area"])
    minishard_bits = 0
    if p["sharded"]:
        minishard_bits = skeletonize.minishard_bits_for(p["max_labels_per_shard"], p["shard_index_bytes"],
                                                        p["minishard_index_bytes"])
    skel_info = skeleton_info(p, meta.resolution(mip).tolist(), attributes)

    forge_grid = Grid.of(whole, p["shape"], overlap=1)
    bucket_bits = merge_bucket_bits(p["merge_tasks"], forge_grid.n)
    # CloudVolume finds index files by names printed with the info resolution's decimals
    precision = max(getprecision(r) for r in (skel_info["spatial_index"] or {}).get("resolution", [0]))
    common = {"layer": lname, "index_precision": precision, "skel_dir": skel_dir, "bucket_bits": bucket_bits,
              "minishard_bits": minishard_bits, "attributes": attributes, "step": name}
    forge_keys = ("mip", "shape", "teasar_params", "dust_threshold", "dust_global", "fix_branching", "fix_borders",
                  "fix_avocados", "fill_holes", "object_ids", "mask_ids", "cross_sectional_area",
                  "cross_sectional_area_smoothing_window", "cross_sectional_area_shape_delta", "spatial_index",
                  "fill_missing", "sharded")
    merge_keys = ("min_cable_length", "max_cable_length", "tick_threshold")

    step = StepPlan(name, "skeleton", p, writes=[lname], sources=[lname])
    grown = np.asarray(p["shape"]) + 1 + (2 * p["cross_sectional_area_shape_delta"] if p["cross_sectional_area"] else 0)
    task_bytes = float(np.prod(grown)) * BYTES_PER_VOXEL
    step.stages.append(make_stage("forge", forge_grid, dict(common, task="forge", **{k: p[k] for k in forge_keys}),
                                  ctx.step_exec, task_bytes))
    buckets = Grid.indices(2 ** bucket_bits)
    merge = dict(common, **{k: p[k] for k in merge_keys})
    if p["sharded"]:
        shard_keys = ("max_labels_per_shard", "min_shards", "minishard_index_encoding", "data_encoding")
        step.stages.append(make_stage("spec", Grid.indices(1), dict(common, task="shard_spec", skel_info=skel_info,
                                                                   **{k: p[k] for k in shard_keys}), ctx.step_exec))
        step.stages.append(make_stage("merge", buckets, dict(merge, task="merge_sharded"), ctx.step_exec))
    else:
        step.stages.append(make_stage("merge", buckets, dict(merge, task="merge"), ctx.step_exec))
    if p["delete_fragments"]:
        step.stages.append(make_stage("clean", buckets, dict(common, task="clean"), ctx.step_exec))
    for st in step.stages:
        step.notes.append(f"{st.name}: {st.grid.n} tasks -> {st.jobs} jobs")

    new_info = copy.deepcopy(info)
    new_info["skeletons"] = skel_dir
    step.infos[lname] = new_info
    ctx.infos[lname] = new_info
    step.files[lname] = {f"{skel_dir}/info": skel_info}
    step.checks = [(lname, mip, whole, p["fill_missing"])]
    if p["dust_global"] and p["dust_threshold"] > 0:
        step.preflight = {"path": ctx.paths[lname], "name": f"{meta.key(mip)}/stats/voxel_counts.im"}
    return step


def preflight(step: str, params: dict) -> None:
    """Setup-time check (before any write) that dust_global has its voxel counts to read."""
    if not storage.files(params["path"]).exists(params["name"]):
        raise MagmaError(f"steps.{step}.dust_global: {params['path']}/{params['name']} does not exist; run a"
                         " voxel_counts step on this layer and mip first, or set dust_global: false")


# ---- forge --------------------------------------------------------------------
def _frag_name(box: Bbox, shape, whole: Bbox) -> tuple:
    """The task's grid cell (its box without the one-voxel overlap), which names its files."""
    cell = Bbox.clamp(Bbox(box.minpt, box.minpt + Vec(*shape)), whole)
    return cell, cell.to_filename()


def _global_dust(params: dict, path: str, key: str, labels: np.ndarray) -> np.ndarray:
    """Zero labels whose whole-layer voxel count (voxel_counts step output) is under dust_threshold."""
    name = f"{key}/stats/voxel_counts.im"
    data = storage.files(path).get(name)
    if data is None:
        raise MagmaError(f"steps.{params['step']}.dust_global: {path}/{name} does not exist; run a voxel_counts"
                         " step on this layer and mip first, or set dust_global: false")
    # the (label, count) table itself: IntMap lookups by id overflow for ids >= 2**63
    table = IntMap(data).index()
    big_enough = table[table[:, 1] >= params["dust_threshold"], 0]
    present = fastremap.unique(labels)
    keep = present[(present != 0) & np.isin(present, big_enough)]
    return fastremap.mask_except(labels, keep.tolist(), in_place=True)


def _labels(vol, box: Bbox, params: dict, path: str) -> np.ndarray:
    labels = np.asfortranarray(vol.download(box)[..., 0])
    labels = skeletonize.mask_labels(labels, params["object_ids"], params["mask_ids"])
    if params["dust_global"] and params["dust_threshold"] > 0:
        labels = _global_dust(params, path, vol.key, labels)
    return labels


def forge(params: dict, box: Bbox, paths: dict) -> dict:
    path = paths[params["layer"]]
    mip = params["mip"]
    vol = open_volume(path, mip, fill_missing=params["fill_missing"], bounded=True)
    res = vol.meta.resolution(mip)
    labels = _labels(vol, box, params, path)
    dust = 0 if params["dust_global"] else params["dust_threshold"]
    # idle cores of this job trace label sets in forks of this task
    sets = 1 + cores.spare(MAX_HELPERS)
    skels = skeletonize.forge(labels, res, params["teasar_params"], dust, params["fix_branching"],
                              params["fix_borders"], params["fix_avocados"], params["fill_holes"], sets,
                              cores.spread)
    del labels
    if params["cross_sectional_area"] and skels:
        big = Bbox.clamp(Bbox(box.minpt - params["cross_sectional_area_shape_delta"],
                              box.maxpt + params["cross_sectional_area_shape_delta"]), vol.meta.bounds(mip))
        skels = skeletonize.cross_sections(_labels(vol, big, params, path), skels, res, box.minpt - big.minpt,
                                           params["cross_sectional_area_smoothing_window"], params["fill_holes"])
    # voxel centres in layer nm, anchored at mip 0's offset as Igneous places them
    offset = (box.minpt.astype(np.float32) - vol.meta.voxel_offset(mip) + 0.5) * res
    offset += vol.meta.voxel_offset(0) * vol.meta.resolution(0)
    for label, skel in skels.items():
        skel.vertices += offset.astype(np.float32)
        skel.id = int(label)
        skeletonize.keep_attributes(skel, params["attributes"])

    cell, name = _frag_name(box, params["shape"], vol.meta.bounds(mip))
    cf = storage.files(path)
    root = params["skel_dir"]
    ids = np.fromiter(skels.keys(), dtype=np.uint64, count=len(skels))
    files = []
    for bucket, members in sorted(skeletonize.buckets_of(ids, params["bucket_bits"],
                                                         params["minishard_bits"]).items()):
        mb = MapBuffer({int(k): skels[int(k)].to_precomputed() for k in members}, compress="gzip")
        files.append((f"{root}/{FRAGS}/{bucket}/{name}.frags", mb.tobytes()))
    if params["sharded"]:
        files.append((f"{root}/{FRAGS}/labels/{name}.labels", np.sort(ids).tobytes()))
    cf.puts(files, compress=None, content_type="application/octet-stream", cache_control="no-cache")
    if params["spatial_index"]:
        index = {int(k): Bbox.from_points(s.vertices).to_list() for k, s in skels.items() if len(s.vertices)}
        nm = cell.astype(res.dtype) * res
        cf.put_json(f"{root}/{nm.to_filename(params['index_precision'])}.spatial", index, compress="gzip", cache_control="no-cache")
    return {"voxels": int(box.volume()), "fragments": len(skels)}


# ---- merge --------------------------------------------------------------------
def _fragments(cf: CloudFiles, root: str, buckets) -> dict:
    """label -> fragment bytes from every forge task, for these buckets (files in name order)."""
    names = sorted(n for b in buckets for n in cf.list(prefix=f"{root}/{FRAGS}/{b}/") if n.endswith(".frags"))
    out = {}
    for name in names:
        # items(), not mb[label]: MapBuffer lookups by id overflow for ids >= 2**63
        for label, frag in MapBuffer(cf.get(name)).items():
            out.setdefault(int(label), []).append(bytes(frag))
    return out


def _fused(params: dict, label: int, frags: list) -> Skeleton | None:
    attrs = params["attributes"]
    pieces = [Skeleton.from_precomputed(b, segid=label, vertex_attributes=attrs) for b in frags]
    skel = skeletonize.fuse(pieces, label, params["min_cable_length"], params["tick_threshold"],
                            params["max_cable_length"], attrs)
    return None if skel.empty() else skel


def merge(params: dict, box: Bbox, paths: dict) -> dict:
    """Unsharded: one file `<skel_dir>/<label>` per label of bucket box.minpt.x."""
    cf = storage.files(paths[params["layer"]])
    root = params["skel_dir"]
    frags = _fragments(cf, root, [int(box.minpt.x)])
    written = {"labels": 0, "skeletons": 0}

    def files():
        for label in sorted(frags):
            skel = _fused(params, label, frags.pop(label))
            written["labels"] += 1
            if skel is not None:
                written["skeletons"] += 1
                yield f"{root}/{label}", skel.to_precomputed()

    cf.puts(files(), compress="gzip", content_type="application/octet-stream", cache_control="no-cache")
    return written


def _spec(cf: CloudFiles, root: str) -> ShardingSpecification:
    info = cf.get_json(f"{root}/info")
    return ShardingSpecification.from_dict(info["sharding"])


def merge_sharded(params: dict, box: Bbox, paths: dict) -> dict:
    """Sharded: the shard files whose number is this task's index modulo the bucket count.

    With fewer shards than buckets, task j < shards builds shard j from every bucket
    congruent to j; the other tasks have nothing to do. Shards are built one at a time.
    """
    cf = storage.files(paths[params["layer"]])
    root = params["skel_dir"]
    spec = _spec(cf, root)
    j, n_buckets, n_shards = int(box.minpt.x), 2 ** params["bucket_bits"], 2 ** spec.shard_bits
    if n_shards >= n_buckets:
        buckets = [j]
    elif j < n_shards:
        buckets = [b for b in range(n_buckets) if b % n_shards == j]
    else:
        return {"labels": 0, "skeletons": 0, "shards": 0}
    frags = _fragments(cf, root, buckets)
    by_shard = {}
    for label in frags:
        by_shard.setdefault(spec.compute_shard_location(label).shard_number, []).append(label)
    out = {"labels": len(frags), "skeletons": 0, "shards": 0}
    for shard in sorted(by_shard):
        data = {}
        for label in sorted(by_shard[shard]):
            skel = _fused(params, label, frags.pop(label))
            if skel is not None:
                data[label] = skel.to_precomputed()
        if not data:
            continue
        shard_files = synthesize_shard_files(spec, data)
        cf.puts([(f"{root}/{fname}", content) for fname, content in shard_files.items()], compress=None,
                content_type="application/octet-stream", cache_control="no-cache")
        out["skeletons"] += len(data)
        out["shards"] += len(shard_files)
    return out


def shard_spec(params: dict, box: Bbox, paths: dict) -> dict:
    """Count the forged labels, size the shards, write the spec into the skeleton info."""
    cf = storage.files(paths[params["layer"]])
    root = params["skel_dir"]
    names = [n for n in cf.list(prefix=f"{root}/{FRAGS}/labels/") if n.endswith(".labels")]
    ids = [np.frombuffer(f["content"], dtype=np.uint64) for f in cf.get(names) if f["content"]]
    n = int(len(np.unique(np.concatenate(ids)))) if ids else 0
    spec = ShardingSpecification(
        type="neuroglancer_uint64_sharded_v1", preshift_bits=0, hash="murmurhash3_x86_128",
        minishard_bits=params["minishard_bits"],
        shard_bits=skeletonize.shard_bits_for(n, params["max_labels_per_shard"], params["min_shards"]),
        minishard_index_encoding=params["minishard_index_encoding"], data_encoding=params["data_encoding"],
    )
    info = dict(params["skel_info"], sharding=spec.to_dict())
    cf.put_json(f"{root}/info", info, cache_control="no-cache")
    return {"labels": n, "shards": int(2 ** spec.shard_bits)}


def clean(params: dict, box: Bbox, paths: dict) -> dict:
    """delete_fragments: remove bucket box.minpt.x's fragments (task 0 also the label lists)."""
    cf = storage.files(paths[params["layer"]])
    root = params["skel_dir"]
    j = int(box.minpt.x)
    names = list(cf.list(prefix=f"{root}/{FRAGS}/{j}/"))
    if j == 0:
        names += list(cf.list(prefix=f"{root}/{FRAGS}/labels/"))
    cf.delete(names)
    return {"deleted": len(names)}


def run_task(params: dict, box: Bbox, paths: dict) -> dict:
    return forge(params, box, paths)
