"""mesh: forge per-task mesh fragments from a segmentation, then merge them per label.

Stages (one snakemake run):
  forge   grid of `shape` at `mip`, 1-voxel high-side overlap: exact marching-cubes
          fragments (one map per task) + spatial index
  index   one task: reads what forge recorded, writes the mesh info (with the sharding
          spec, sized from the label count) and one work list per merge bucket
  merge   a fixed number of label-hash buckets: each label's fragments welded into one
          mesh and simplified whole (so task seams leave no trace), then written as a
          legacy fragment + manifest `SEGID:0`, a multi-LOD Draco mesh (`SEGID.index` +
          `SEGID`), or, sharded, into per-shard partial maps of encoded labels
  shards  (sharded only) the same number of tasks, each assembling the shard files
          whose number falls to it from the partial maps
  clean   one task: removes the work lists and partial maps

Intermediates live next to the meshes (`<mesh_dir>/magma-work/`, and the forge
fragment maps `<box>.frags`, which stay, as Igneous leaves its forge fragments, until a
`mesh_delete` with `clean: true`), so cluster and cloud runs work.
Every task rewrites whole files, so a killed job is simply run again.
"""
from __future__ import annotations

import functools
import json
from collections import defaultdict

import numpy as np
import zmesh
from cloudvolume import Bbox
from cloudvolume.datasource.precomputed.sharding import ShardingSpecification, synthesize_shard_files
from cloudvolume.lib import getprecision
from mapbuffer import IntMap, MapBuffer
from mapbuffer.compression import zstd_compress, zstd_decompress

from .. import chunk_files, cores, layers, storage
from ..errors import MagmaError
from ..meshes import forge as kernel
from ..meshes import bounds, multilod
from ..meshes.simplify import simplify
from ..meshes.shards import buckets, mapkey, pack, spec_for, unpack
from ..plan import Grid, StepPlan, make_stage
from .common import compress_arg, dtype_width, open_volume

WORK = "magma-work"
MAX_BUCKETS = 1000  # merge tasks; each holds the meshes of 1/N of the labels


# ---- planning ---------------------------------------------------------------
# reads, writes, creates: the defaults (ops/__init__.py): reads and writes `layer`


def _number(x) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


def kind_of(p) -> str:
    if p["sharded"]:
        return "sharded"
    return "multilod" if (p["nlod"] or 0) > 0 else "legacy"


def plan(ctx, name: str, p: dict) -> StepPlan:
    where = f"steps.{name}"
    lname = p["layer"]
    info = ctx.infos[lname]
    layers.check_mip(lname, info, p["mip"], key=f"{where}.mip")
    if info["type"] != "segmentation":
        raise MagmaError(f"{where}.layer: meshes are made from a segmentation; layer '{lname}' is of type '{info['type']}'")
    if int(info["num_channels"]) != 1:
        raise MagmaError(f"{where}.layer: layer '{lname}' has {info['num_channels']} channels; meshing needs 1")
    if p["object_ids"] is not None and len(p["object_ids"]) == 0:
        raise MagmaError(f"{where}.object_ids: an empty list would mesh nothing; leave it out to mesh every label")
    mip = p["mip"]
    meta = layers.meta(info)
    mesh_dir = p["mesh_dir"] or info.get("mesh") or f"mesh_mip_{mip}_err_{_number(p['max_simplification_error'])}"
    if mesh_dir.strip("/") == "" or ".." in mesh_dir.split("/"):
        raise MagmaError(f"{where}.mesh_dir: {mesh_dir!r} is not a directory inside the layer")
    kind = kind_of(p)
    nlod = p["nlod"] if p["nlod"] is not None else (1 if p["sharded"] else 0)
    level = p["draco_compression_level"]
    if level is None:
        level = 7 if p["sharded"] else 1  # Igneous: merge-sharded 7, unsharded multires merge 1

    whole = meta.bounds(mip)
    forge_grid = Grid.of(whole, p["shape"], overlap=1)
    threads = int(ctx.step_exec["threads"])
    n_buckets = int(min(MAX_BUCKETS, max(forge_grid.n, 2 * threads)))
    res = [int(r) if float(r).is_integer() else float(r) for r in meta.resolution(mip)]
    common = {
        "layer": lname, "mip": mip, "mesh_dir": mesh_dir, "kind": kind, "resolution": res,
        "shape": [int(s) for s in p["shape"]], "bounds": [whole.minpt.tolist(), whole.maxpt.tolist()],
        "spatial_index": p["spatial_index"], "buckets": n_buckets,
    }
    forge_params = dict(common, task="forge", simplification=p["simplification"],
                        max_simplification_error=p["max_simplification_error"],
                        dust_threshold=p["dust_threshold"], dust_global=p["dust_global"],
                        object_ids=p["object_ids"], exclude_object_ids=p["exclude_object_ids"],
                        fill_holes=p["fill_holes"], fill_missing=p["fill_missing"],
                        closed_dataset_edges=p["closed_dataset_edges"], compress=p["compress"], step=name)
    lod = {"nlod": nlod, "vertex_quantization_bits": p["vertex_quantization_bits"],
           "min_chunk_size": list(p["min_chunk_size"]), "draco_compression_level": level}
    shard = {k: p[k] for k in ("shard_index_bytes", "minishard_index_bytes", "min_shards", "max_labels_per_shard",
                               "minishard_index_encoding")}
    index_params = dict(common, task="index", **(lod if kind != "legacy" else {}), **(shard if p["sharded"] else {}))
    merge_params = dict(common, task="merge", simplification=p["simplification"],
                        max_simplification_error=p["max_simplification_error"], compress=p["compress"],
                        **(lod if kind != "legacy" else {}))

    width = dtype_width(info)
    # labels, renumbered copy, mesher; the exact meshes (~0.45 faces a voxel of dense labels, ~46 bytes a
    # face with its vertices and their stored copy)
    task_bytes = float(np.prod(np.asarray(p["shape"]) + 1)) * (2 * width + 12 + 21)
    ex = ctx.step_exec
    step = StepPlan(name, "mesh", p, writes=[lname], sources=[lname])
    step.stages.append(make_stage("forge", forge_grid, forge_params, ex, task_bytes))
    step.stages.append(make_stage("index", Grid.indices(1), index_params, ex))
    step.stages.append(make_stage("merge", Grid.indices(n_buckets), merge_params, ex))
    if p["sharded"]:
        step.stages.append(make_stage("shards", Grid.indices(n_buckets), dict(common, task="assemble"), ex))
    step.stages.append(make_stage("clean", Grid.indices(1), dict(common, task="clean"), ex))
    for st in step.stages:
        step.notes.append(f"{st.name}: {st.grid.n} tasks -> {st.jobs} jobs")

    out = dict(info, mesh=mesh_dir)
    step.infos[lname] = out
    ctx.infos[lname] = out
    step.checks = [(lname, mip, whole, p["fill_missing"])]
    return step


# ---- names ------------------------------------------------------------------
def core_boxes(params) -> Grid:
    """The forge grid without overlap: task i's own box names its files."""
    lo, hi = params["bounds"]
    return Grid(lo, hi, params["shape"], 0)


def spatial_name(params, core: Bbox) -> str:
    """Where forge records which labels a task meshed: the spatial index file, or, when
    the spatial index is off, the same record in the work directory."""
    res = np.asarray(params["resolution"])  # ints when integral, as CloudVolume's reader names them
    precision = max(getprecision(r) for r in params["resolution"])
    name = Bbox(core.minpt * res, core.maxpt * res).to_filename(precision) + ".spatial"
    return f"{params['mesh_dir']}/{name}" if params["spatial_index"] else f"{params['mesh_dir']}/{WORK}/forge/{name}"


def frags_name(params, task: str) -> str:
    """Forge's fragments of one task (named by its core box): a MapBuffer label -> exact mesh
    (precomputed mesh bytes, each a zstd frame)."""
    return f"{params['mesh_dir']}/{task}.frags"


def shard_name(spec: ShardingSpecification, number: int) -> str:
    return format(number, "x").zfill(int(np.ceil(spec.shard_bits / 4.0)))  # as cloud-volume names shards


def mesh_info(params, spec=None) -> dict:
    res = params["resolution"]
    info = {"@type": "neuroglancer_legacy_mesh", "mip": params["mip"], "chunk_size": params["shape"]}
    if params["spatial_index"]:
        info["spatial_index"] = {"resolution": res, "chunk_size": [s * r for s, r in zip(params["shape"], res)]}
    if params["kind"] != "legacy":
        info["@type"] = "neuroglancer_multilod_draco"
        info["vertex_quantization_bits"] = int(params["vertex_quantization_bits"])
        info["transform"] = [res[0], 0, 0, 0, 0, res[1], 0, 0, 0, 0, res[2], 0]
        info["lod_scale_multiplier"] = 1.0
    if spec is not None:
        info["sharding"] = spec.to_dict()
    return info


# ---- forge ------------------------------------------------------------------
@functools.lru_cache(maxsize=2)
def _voxel_counts(path: str, key: str):
    raw = storage.files(path).get(f"{key}/stats/voxel_counts.im")
    return None if raw is None else IntMap(raw)


# fragments live until the merge reads them once: zstd's fastest level (1.2 s against 1.8 s at the
# default level 3 for a 448^3 task's 22 M faces, 6% more bytes)
FRAGMENT_ZSTD_LEVEL = 1


def forge(params: dict, box: Bbox, paths: dict) -> dict:
    path = paths[params["layer"]]
    mip = params["mip"]
    vol = open_volume(path, mip, fill_missing=params["fill_missing"])
    whole = Bbox(*params["bounds"])
    core = Bbox.clamp(Bbox(box.minpt, box.minpt + np.asarray(params["shape"])), whole)
    counts = None
    if params["dust_threshold"] and params["dust_global"]:
        counts = _voxel_counts(path, vol.meta.key(mip))
        if counts is None:
            raise MagmaError(
                f"steps.{params['step']}.dust_global: {path}/{vol.meta.key(mip)}/stats/voxel_counts.im does not"
                " exist; run a voxel_counts step on this layer first, or set dust_global: false")

    labels = vol.download(box, mip=mip)[..., 0]
    edges = None
    if params["closed_dataset_edges"]:
        edges = kernel.dataset_edges(box.minpt, box.maxpt, whole.minpt, whole.maxpt)
    labels = kernel.keep_labels(labels, params["dust_threshold"], counts, params["object_ids"],
                                params["exclude_object_ids"])
    low = box.minpt - (edges[0] if edges is not None else 0)  # the padded block's first voxel
    origin = (low * np.asarray(params["resolution"])).astype(np.float32)

    def finish(m):  # in layer nm; stored compressed, so the forks share the compression too
        if len(m.faces) == 0:
            return None
        m.vertices += origin
        lo, hi = bounds(m.vertices)
        bbox = [float(x) for x in lo + hi]
        return zstd_compress(m.to_precomputed(), FRAGMENT_ZSTD_LEVEL), bbox

    # idle cores of this job extract label batches in forks of this task
    meshes = kernel.mesh_labels(labels, params["resolution"], params["fill_holes"], cores.spread, finish, edges,
                                consume=True)
    done = {label: out for label, out in meshes.items() if out is not None}
    frags = {label: data for label, (data, _) in done.items()}
    bboxes = {str(label): bbox for label, (_, bbox) in done.items()}

    cf = storage.files(path)
    cf.put(frags_name(params, core.to_filename()), MapBuffer(frags).tobytes(), compress=None,
           content_type="application/x.mapbuffer")
    # the record of what this task meshed goes last: the index stage trusts it
    cf.put_json(spatial_name(params, core), bboxes, compress=compress_arg(params["compress"]))
    return {"voxels": int(np.prod(box.size3())), "labels": len(frags), "files": 2}


# ---- index ------------------------------------------------------------------
def work_list(params, bucket: int) -> str:
    return f"{params['mesh_dir']}/{WORK}/labels/{bucket}.json"


def index(params: dict, box: Bbox, paths: dict) -> dict:
    """Collect label -> forge tasks from forge's records; write the mesh info and the work lists."""
    cf = storage.files(paths[params["layer"]])
    d = params["mesh_dir"]
    stale = [f for f in cf.list(prefix=f"{d}/{WORK}/") if "/forge/" not in f]
    cf.delete(stale)
    grid = core_boxes(params)
    names = {spatial_name(params, grid.task(i)): grid.task(i).to_filename() for i in range(grid.n)}
    where = defaultdict(list)
    for item in cf.get(list(names)):
        if item["content"] is None:
            raise MagmaError(f"mesh index: forge record {item['path']} is missing; re-run the forge stage")
        for label in json.loads(item["content"]):
            where[int(label)].append(names[item["path"]])
    labels = np.fromiter(where, dtype=np.uint64, count=len(where))
    spec = None
    if params["kind"] == "sharded":
        spec = spec_for(len(labels), params["shard_index_bytes"], params["minishard_index_bytes"],
                        params["min_shards"], params["max_labels_per_shard"], params["minishard_index_encoding"])
    lists = defaultdict(dict)
    for label, b in zip(labels.tolist(), buckets(labels, params["buckets"]).tolist()):
        lists[b][str(label)] = sorted(where[label])
    cf.puts(((work_list(params, b), json.dumps(lists.get(b, {}))) for b in range(params["buckets"])),
            compress=None, content_type="application/json")
    cf.put_json(f"{d}/info", mesh_info(params, spec), compress=None)
    return {"labels": len(labels), "files": params["buckets"] + 1}


# ---- merge ------------------------------------------------------------------
def merge(params: dict, box: Bbox, paths: dict) -> dict:
    bucket = int(box.minpt[0])
    cf = storage.files(paths[params["layer"]])
    d = params["mesh_dir"]
    work = cf.get_json(work_list(params, bucket))
    if work is None:
        raise MagmaError(f"mesh merge: work list {work_list(params, bucket)} is missing; re-run the index stage")
    work = {int(k): v for k, v in work.items()}
    parts = _fragments(cf, params, work)
    seams = seam_planes(params)

    def run(batch):  # decoding happens here too, so it shares the spare cores
        return [(label, _finish(params, label, [_decode(b) for b in parts[label]], seams)) for label in batch]

    encoded = {}
    for done in cores.spread(run, _batches({label: sum(map(len, p)) for label, p in parts.items()})):
        encoded.update((label, out) for label, out in done if out is not None)

    if params["kind"] == "legacy":
        cf.puts([(f"{d}/{name}", data) for name, data in encoded.values()],
                compress=compress_arg(params["compress"]), content_type="model/mesh")
        # manifests last: they publish the meshes
        cf.puts([(f"{d}/{label}:0", json.dumps({"fragments": [name]})) for label, (name, _) in encoded.items()],
                compress=None, content_type="application/json")
        return {"labels": len(encoded), "files": 2 * len(encoded)}
    if params["kind"] == "multilod":
        files = []
        for label, (manifest, data) in encoded.items():
            files += [(f"{d}/{label}", data), (f"{d}/{label}.index", manifest)]
        cf.puts(files, compress=None, content_type="application/octet-stream")
        return {"labels": len(encoded), "files": len(files)}

    spec = ShardingSpecification.from_dict(cf.get_json(f"{d}/info")["sharding"])
    by_shard = defaultdict(dict)
    for label, (manifest, data) in encoded.items():
        by_shard[spec.compute_shard_location(label).shard_number][label] = pack(manifest, data)
    cf.puts(((f"{d}/{WORK}/shards/{s}/{bucket}.mb", MapBuffer(group).tobytes()) for s, group in by_shard.items()),
            compress=None, content_type="application/x.mapbuffer")
    return {"labels": len(encoded), "files": len(by_shard)}


# Stored fragment bytes (zstd) simplified in one batch: ~0.7 M faces (about 6 stored bytes a face),
# a few seconds of simplifying, so forking costs well under 1%.
BATCH_BYTES = 4 << 20


def _batches(sizes: dict) -> list:
    """Labels in batches, biggest labels first, each batch at most BATCH_BYTES of stored
    fragments and at most a quarter of what is left, so the batches shrink to single
    labels at the end (cores.fork_each runs them in this process, and side by side in
    forks while the job has spare cores: small last batches leave a core idle for less)."""
    order = sorted(sizes, key=lambda label: (-sizes[label], label))
    left = sum(sizes.values())
    batches, current, held = [], [], 0
    for label in order:
        if current and held + sizes[label] > min(BATCH_BYTES, left / 4):
            batches.append(current)
            left -= held
            current, held = [], 0
        current.append(label)
        held += sizes[label]
    if current:
        batches.append(current)
    return batches


def _decode(stored: bytes) -> zmesh.Mesh:
    return zmesh.Mesh.from_precomputed(zstd_decompress(stored))


def _finish(params: dict, label: int, parts: list, seams=None):
    """One label's forge fragments -> its stored form: (fragment name, bytes) for legacy meshes,
    (manifest, fragments) for multi-LOD ones; None when nothing is left. `seams`: where the
    forge tasks meet (`seam_planes`), else every vertex is a candidate for welding."""
    whole = multilod.weld(parts, params["resolution"], label, distinct=True, seams=seams)
    if params["simplification"]:
        whole = simplify(whole, params["max_simplification_error"])
    if len(whole.faces) == 0:
        return None
    if params["kind"] == "legacy":
        res = np.asarray(params["resolution"], dtype=np.float64)
        lo = np.floor(whole.vertices.min(axis=0) / res).astype(np.int64)
        hi = np.ceil(whole.vertices.max(axis=0) / res).astype(np.int64)
        return f"{label}:0:{Bbox(lo, hi).to_filename()}", whole.to_precomputed()
    return multilod.encode(label, whole, params["resolution"], params["nlod"], params["min_chunk_size"],
                           params["vertex_quantization_bits"], params["draco_compression_level"])


def seam_planes(params: dict) -> list:
    """Per axis, where forge tasks meet (nm): neighbours share the voxel plane at each task's
    low side (1-voxel high-side overlap), and their fragments share vertices only there."""
    grid = core_boxes(params)
    lo, shape, res = grid.minpt, grid.shape, params["resolution"]
    return [[(lo[a] + m * shape[a] + 0.5) * float(res[a]) for m in range(1, grid.counts[a])] for a in range(3)]


def _fragments(cf, params, work: dict) -> dict:
    """label -> its fragments as stored (zstd precomputed meshes), read from forge's fragment maps
    (one read per forge task), in task order whatever order storage answers in: the
    simplifier's ties follow face order."""
    parts = defaultdict(list)
    wanted = defaultdict(list)
    for label, boxes in work.items():
        for b in boxes:
            wanted[b].append(label)
    tasks = sorted(wanted)
    for b, item in zip(tasks, chunk_files.fetch(cf, [frags_name(params, b) for b in tasks])):
        if item["content"] is None:
            raise MagmaError(f"mesh merge: forge fragments {item['path']} are missing; re-run the forge stage")
        mb = MapBuffer(item["content"])
        for label in wanted[b]:
            parts[label].append(mb[mapkey(label)])
    return parts


# ---- shards -----------------------------------------------------------------
def assemble(params: dict, box: Bbox, paths: dict) -> dict:
    """Shard files numbered task, task + N, task + 2N, ... from the merge buckets' partial maps."""
    task = int(box.minpt[0])
    cf = storage.files(paths[params["layer"]])
    d = params["mesh_dir"]
    spec = ShardingSpecification.from_dict(cf.get_json(f"{d}/info")["sharding"])
    written = labels = 0
    for number in range(task, 2**spec.shard_bits, params["buckets"]):
        prefix = f"{d}/{WORK}/shards/{shard_name(spec, number)}/"
        data, offsets = {}, {}
        for item in cf.get(sorted(cf.list(prefix=prefix))):
            mb = MapBuffer(item["content"])
            for label in mb.keys():
                data[int(label)], offsets[int(label)] = unpack(mb[mapkey(label)])
        if not data:
            continue
        for fname, content in synthesize_shard_files(spec, data, offsets).items():
            cf.put(f"{d}/{fname}", content, compress=None, content_type="application/octet-stream")
            written += 1
        labels += len(data)
    return {"labels": labels, "files": written}


# ---- clean ------------------------------------------------------------------
def clean(params: dict, box: Bbox, paths: dict) -> dict:
    """Remove the work lists and partial shard maps (forge's records stay, as its fragments do)."""
    cf = storage.files(paths[params["layer"]])
    stale = [f for f in cf.list(prefix=f"{params['mesh_dir']}/{WORK}/") if "/forge/" not in f]
    cf.delete(stale)
    return {"files": len(stale)}


def run_task(params: dict, box: Bbox, paths: dict) -> dict:
    return globals()[params["task"]](params, box, paths)
