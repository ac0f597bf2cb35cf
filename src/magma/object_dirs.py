"""Copying, converting and deleting a layer's mesh or skeleton directory (the shared
body of mesh_transfer, skeleton_transfer, mesh_delete and skeleton_delete).

Work is split by file-name prefix (magma.label_files) or by shard number, both
fixed at plan time, because the directory may be written by a step earlier in the
same run. What the source holds (sharded or not, legacy or multi-LOD meshes) is
read when the tasks run.

Unsharded -> sharded is a byte-level repack with CloudVolume's sharding code: a
skeleton's sharded record is its unsharded file; a multi-LOD mesh's is its fragment
data followed by its manifest (`<label>` + `<label>.index`), the index pointing at
the manifest. Legacy meshes (`<label>:0` manifests) would need re-encoding as
multi-LOD Draco and are rejected.
"""
from __future__ import annotations

import json
import posixpath
import re

from cloudfiles import CloudFiles
from cloudvolume.datasource.precomputed.sharding import (
    ShardingSpecification,
    compute_shard_params_for_hashed,
    synthesize_shard_files,
)

from . import label_files, storage
from .errors import MagmaError
from .plan import Grid, StepPlan, make_stage

INFO_KEY = {"mesh": "mesh", "skeleton": "skeletons"}
WORK = "magma-xfer"  # work lists of an unsharded -> sharded conversion, removed by its last stage
MULTIRES = "neuroglancer_multilod_draco"
FRAGMENT = re.compile(r"^\d+:\d+:.+")  # Igneous/magma forge fragment names: <label>:<lod>:<box>


def directory(kind: str, where: str, lname: str, info: dict, explicit) -> str:
    d = explicit or info.get(INFO_KEY[kind])
    if not d:
        what = "meshes" if kind == "mesh" else "skeletons"
        raise MagmaError(f"{where}: layer '{lname}' has no {what} (its info names no `{INFO_KEY[kind]}` directory);"
                         f" run a {kind} step on it first or give `dir`")
    return str(d).strip("/")


def _join(path: str, d: str) -> str:
    return posixpath.join(path.rstrip("/"), d)


# ---- delete and clean -------------------------------------------------------------
def plan_delete(kind: str, op: str, ctx, name: str, p: dict) -> StepPlan:
    where = f"steps.{name}"
    d = directory(kind, where, p["layer"], ctx.infos[p["layer"]], p["dir"])
    params = {"layer": p["layer"], "dir": d, "magnitude": p["magnitude"], "clean": p["clean"], "kind": kind}
    step = StepPlan(name, op, p, writes=[p["layer"]])
    stage = make_stage("clean" if p["clean"] else "delete", Grid.indices(label_files.task_count(p["magnitude"])),
                       params, ctx.step_exec)
    step.stages.append(stage)
    what = "forge intermediates" if p["clean"] else "every file"
    step.notes.append(f"{stage.name}: {what} of {d}/ in {stage.grid.n} prefix tasks -> {stage.jobs} jobs")
    return step


def intermediate(name: str, multires: bool) -> bool:
    """Files a forge leaves behind once the merge has written the meshes/skeletons."""
    top = name.split("/", 1)[0]
    if "/" in name and top in ("magma-work", "frags", WORK):
        return True
    if name.endswith((".frags", ".labels")):
        return True
    # fragments are the mesh in the legacy format (its manifests list them); after a
    # multi-LOD merge they are leftovers
    return multires and FRAGMENT.match(name) is not None


def delete_task(params: dict, box, paths: dict) -> dict:
    cf = storage.files(_join(paths[params["layer"]], params["dir"]))
    task = int(box.minpt.x)
    names = label_files.names(cf, label_files.prefixes(params["magnitude"])[task], params["magnitude"], recursive=True)
    if params["clean"]:
        info = cf.get_json("info") or {}
        multires = info.get("@type") == MULTIRES
        names = [n for n in names if intermediate(n, multires)]
    else:
        names = list(names)
    cf.delete(names)
    return {"files_deleted": len(names)}


# ---- transfer ----------------------------------------------------------------------
def plan_transfer(kind: str, op: str, ctx, name: str, p: dict, shard_tasks: int) -> StepPlan:
    where = f"steps.{name}"
    src_dir = directory(kind, where, p["src"], ctx.infos[p["src"]], None)
    # like Igneous: an explicit dir, else the directory dest already names, else src's name
    dest_dir = (p["dir"] or ctx.infos[p["dest"]].get(INFO_KEY[kind]) or src_dir).strip("/")
    if ctx.paths[p["src"]].rstrip("/") == ctx.paths[p["dest"]].rstrip("/") and dest_dir == src_dir:
        raise MagmaError(f"{where}: src and dest are the same layer and no other `dir` is given; nothing to copy")
    info = dict(ctx.infos[p["dest"]])
    info[INFO_KEY[kind]] = dest_dir
    params = {"kind": kind, "src": p["src"], "dest": p["dest"], "src_dir": src_dir, "dest_dir": dest_dir,
              "magnitude": p["magnitude"]}
    step = StepPlan(name, op, p, writes=[p["dest"]], sources=[p["src"]], infos={p["dest"]: info})
    ctx.infos[p["dest"]] = info
    if not p["sharded"]:
        stage = make_stage("copy", Grid.indices(label_files.task_count(p["magnitude"])),
                           dict(params, task="copy_task"), ctx.step_exec)
        step.stages.append(stage)
    else:
        sharding = {k: p[k] for k in ("shard_index_bytes", "minishard_index_bytes", "min_shards",
                                       "minishard_index_encoding", "data_encoding")}
        params = dict(params, tasks=shard_tasks, sharding=sharding)
        if kind == "mesh":  # used only when legacy meshes are encoded as multi-LOD
            params.update({k: p[k] for k in ("nlod", "min_chunk_size", "vertex_quantization_bits",
                                             "draco_compression_level")})
        for stage_name, task, n in (("spec", "spec_task", 1), ("shards", "shards_task", shard_tasks),
                                    ("finish-xfer", "cleanup_task", 1)):
            step.stages.append(make_stage(stage_name, Grid.indices(n), dict(params, task=task), ctx.step_exec))
    for st in step.stages:
        step.notes.append(f"{st.name}: {st.grid.n} tasks -> {st.jobs} jobs")
    return step


def _dirs(params: dict, paths: dict):
    return (storage.files(_join(paths[params["src"]], params["src_dir"])),
            storage.files(_join(paths[params["dest"]], params["dest_dir"])))


def copy_task(params: dict, box, paths: dict) -> dict:
    """Copy the files of one prefix task as stored (same encoding and compression)."""
    src, dest = _dirs(params, paths)
    task = int(box.minpt.x)
    names = list(label_files.names(src, label_files.prefixes(params["magnitude"])[task], params["magnitude"],
                                   recursive=True))
    names = [n for n in names if not intermediate(n, multires=False)]  # forge leftovers stay behind
    if names:
        src.transfer_to(dest, paths=names)
    return {"files_copied": len(names)}


def _src_info(src: CloudFiles, kind: str) -> dict:
    info = src.get_json("info")
    if info is None:
        raise MagmaError(f"{src.cloudpath}: no {kind} info file; nothing to transfer")
    return info


LEGACY_MANIFEST = re.compile(r"^(\d+):0$")


def _unsharded_labels(src: CloudFiles, info: dict, kind: str) -> list:
    """Every label of an unsharded directory (one listing, like Igneous's task creation)."""
    if kind == "mesh":
        if info.get("@type") != MULTIRES:
            return sorted(int(m.group(1)) for m in map(LEGACY_MANIFEST.match, src.list(flat=True)) if m)
        return sorted(int(n[:-len(".index")]) for n in src.list(flat=True)
                      if n.endswith(".index") and n[:-len(".index")].isdigit())
    return sorted(int(n) for n in src.list(flat=True) if label_files.LABEL.match(n))


def spec_task(params: dict, box, paths: dict) -> dict:
    """Choose the sharding from the label count, write the destination info and the work lists."""
    src, dest = _dirs(params, paths)
    info = _src_info(src, params["kind"])
    work = storage.files(_join(paths[params["dest"]], params["dest_dir"]) + "/" + WORK)
    if "sharding" in info:  # already sharded: the shards stage copies the shard files as they are
        dest.put_json("info", info)
        work.put_json("plan.json", {"mode": "copy", "shard_bits": ShardingSpecification.from_dict(info["sharding"]).shard_bits})
        return {"labels": 0}
    labels = _unsharded_labels(src, info, params["kind"])
    s = params["sharding"]
    shard_bits, minishard_bits, preshift_bits = compute_shard_params_for_hashed(
        num_labels=max(1, len(labels)), shard_index_bytes=int(s["shard_index_bytes"]),
        minishard_index_bytes=int(s["minishard_index_bytes"]), min_shards=int(s["min_shards"]))
    spec = ShardingSpecification(
        type="neuroglancer_uint64_sharded_v1", preshift_bits=preshift_bits, hash="murmurhash3_x86_128",
        minishard_bits=minishard_bits, shard_bits=shard_bits, minishard_index_encoding=s["minishard_index_encoding"],
        # multi-LOD mesh shards are read by byte range inside each record: no data encoding
        data_encoding="raw" if params["kind"] == "mesh" else s["data_encoding"])
    out = dict(info, sharding=spec.to_dict())
    res = None
    if params["kind"] == "mesh" and info.get("@type") != MULTIRES:
        # legacy vertices are nm; the multi-LOD model space is voxels of the mip the meshes were made at
        layer = storage.files(paths[params["src"]]).get_json("info")
        res = layer["scales"][int(info.get("mip", 0))]["resolution"]
        out = {"@type": MULTIRES, "mip": info.get("mip", 0), "vertex_quantization_bits": params["vertex_quantization_bits"],
               "transform": [res[0], 0, 0, 0, 0, res[1], 0, 0, 0, 0, res[2], 0], "lod_scale_multiplier": 1.0,
               "sharding": spec.to_dict(), "spatial_index": info.get("spatial_index")}
    by_task = {}
    for label in labels:
        number = int(spec.compute_shard_location(label).shard_number, 16)
        by_task.setdefault(number % params["tasks"], []).append(label)
    work.puts(((f"{t}.json", json.dumps(ls).encode()) for t, ls in by_task.items()), compress="gzip")
    mode = "encode" if params["kind"] == "mesh" and info.get("@type") != MULTIRES else "repack"
    work.put_json("plan.json", {"mode": mode, "tasks_with_work": sorted(by_task), "resolution": res})
    dest.put_json("info", out)  # after the work lists: a dest info with sharding means the lists are complete
    return {"labels": len(labels)}


def shards_task(params: dict, box, paths: dict) -> dict:
    src, dest = _dirs(params, paths)
    task = int(box.minpt.x)
    work = storage.files(_join(paths[params["dest"]], params["dest_dir"]) + "/" + WORK)
    plan = work.get_json("plan.json")
    if plan["mode"] == "copy":
        names = [n for n in label_files.shard_names(plan["shard_bits"], task, params["tasks"]) if src.exists(n)]
        if names:
            src.transfer_to(dest, paths=names)
        return {"shards": len(names)}
    if task not in plan["tasks_with_work"]:
        return {"shards": 0}
    labels = work.get_json(f"{task}.json")
    spec = ShardingSpecification.from_dict(dest.get_json("info")["sharding"])
    if plan["mode"] == "encode":
        data, offsets = _legacy_to_multilod(src, labels, dict(params, resolution=plan["resolution"]))
        shards = synthesize_shard_files(spec, data, offsets)
    elif params["kind"] == "mesh":
        names = [f"{label}" for label in labels] + [f"{label}.index" for label in labels]
        files = _get_all(src, names)
        data = {label: files[f"{label}"] + files[f"{label}.index"] for label in labels}
        # cloud-volume's data_offset is the manifest's length: the minishard index points at the
        # manifest, the fragments sit just before it
        offsets = {label: len(files[f"{label}.index"]) for label in labels}
        shards = synthesize_shard_files(spec, data, offsets)
    else:
        files = _get_all(src, [str(label) for label in labels])
        shards = synthesize_shard_files(spec, {label: files[str(label)] for label in labels})
    dest.puts(shards.items(), compress=None, content_type="application/octet-stream", cache_control="no-cache")
    return {"shards": len(shards), "labels": len(labels)}


def _legacy_to_multilod(src: CloudFiles, labels: list, params: dict) -> tuple:
    """Legacy meshes -> ({label: fragments + manifest}, {label: manifest length}) for the shards."""
    import zmesh

    from .meshes import multilod

    manifests = _get_all(src, [f"{label}:0" for label in labels])
    wanted = {label: json.loads(manifests[f"{label}:0"])["fragments"] for label in labels}
    frags = _get_all(src, sorted({f for names in wanted.values() for f in names}))
    data, offsets = {}, {}
    for label, names in wanted.items():
        parts = [zmesh.Mesh.from_precomputed(frags[n]) for n in names]
        if not parts:
            continue
        mesh = multilod.weld(parts, params["resolution"], label)  # seams of forge tasks, as the mesh merge
        out = multilod.encode(label, mesh, params["resolution"], params["nlod"], params["min_chunk_size"],
                              params["vertex_quantization_bits"], params["draco_compression_level"])
        if out is not None:
            manifest, blob = out
            data[label], offsets[label] = blob + manifest, len(manifest)
    return data, offsets


def _get_all(cf: CloudFiles, names: list) -> dict:
    out = {}
    for res in cf.get(names):
        if res["error"] is not None or res["content"] is None:
            raise MagmaError(f"{cf.cloudpath}/{res['path']}: missing or unreadable ({res['error']})")
        out[res["path"]] = res["content"]
    return out


def cleanup_task(params: dict, box, paths: dict) -> dict:
    work = storage.files(_join(paths[params["dest"]], params["dest_dir"]) + "/" + WORK)
    names = list(work.list())
    work.delete(names)
    return {"files_deleted": len(names)}

