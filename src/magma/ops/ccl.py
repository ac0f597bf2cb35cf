"""ccl: 6-connected components of a whole layer, written into a new segmentation layer.

Tasks tile the volume without overlap, each labels its block with cc3d, and the
labels are joined across task boundaries afterwards:

  faces         label each task, store its boundary planes (+ the source values on
                them for segmentations, + per-label voxel counts when `dust` is set)
  equivalences  pair each task's low planes with its low neighbours' high planes:
                touching foreground voxels of equal source value are one component
  labels        one global task: union of every task's labels over those pairs
                (scipy's connected_components on the pair graph), dust, final ids
                1..N in scan order of tasks, one relabel table per task
  relabel       label each task again (cc3d is deterministic), map through its
                table, write into `dest`
  clean         delete the intermediates (`clean: true`)

Every task reads the source exactly once per labelling pass and no chunk twice
(no overlap), so the source is read twice in all (Igneous reads an overlapping
block three times). Intermediates live next to the source data, under
`<scale key>/ccl/<step>/`, so cluster and cloud runs work.

`dust` is global: a component is removed when the whole component has fewer
voxels, wherever its pieces lie (Igneous removes pieces per task).

Ids are 1..N with no gaps, and the output dtype is the smallest unsigned type that
holds N (uint32 at least with compressed_segmentation, which stores no less). N is
known only after the labels stage, so the plan (and setup, which writes `dest`'s
info) uses the type that holds one label per voxel; the labels stage narrows the
info to N's type before any voxel is written. Later steps keep the stored type.
"""
from __future__ import annotations

import io

import cc3d
import fastremap
import numpy as np
from cloudfiles import CloudFiles
from cloudvolume import Bbox
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from .. import layers, storage
from ..errors import MagmaError
from ..plan import Grid, StepPlan, make_stage
from .common import check_new_layer, dtype_width, open_volume
from .downsample import _set_encoding

INTERMEDIATE_COMPRESSION = "zstd"
READ_BATCH = 500  # intermediate files fetched at once by the global task


# ---- kernels ------------------------------------------------------------------
def foreground(image: np.ndarray, gte, lte) -> np.ndarray:
    """Binarize an image: voxels >= gte and <= lte (either bound may be None)."""
    # element-wise results keep the image's memory order (Fortran from CloudVolume),
    # so cc3d gets it without a copy
    if gte is not None and lte is not None:
        return (image >= gte) & (image <= lte)
    return image >= gte if gte is not None else image <= lte


def label_block(image: np.ndarray, binary: bool, gte=None, lte=None):
    """cc3d 6-connected labels of one block (1..N) and N. A segmentation keeps its
    label boundaries (touching voxels of different labels are different components)."""
    data = foreground(image, gte, lte) if binary else image
    return cc3d.connected_components(np.asfortranarray(data), connectivity=6, return_N=True)


def face_pairs(low_labels, high_labels, low_values=None, high_values=None) -> np.ndarray:
    """Unique (low label, high label) pairs of two touching planes: both foreground and,
    for a segmentation, the same source label."""
    mask = (low_labels != 0) & (high_labels != 0)
    if low_values is not None:
        mask &= low_values == high_values
    pairs = np.stack([low_labels[mask].astype(np.uint64), high_labels[mask].astype(np.uint64)], axis=1)
    return fastremap.unique(pairs, axis=0) if len(pairs) else pairs.reshape(0, 2)


def global_labels(counts_per_task, pairs, sizes=None, dust: int = 0):
    """Final id of every task label.

    counts_per_task: N_t for each task t (labels 1..N_t); pairs: (task a, task b,
    array of (label in a, label in b)) for every pair of touching tasks; sizes:
    voxels of every task label, in task order (needed for dust). Returns (final ids
    of all task labels concatenated in task order, offsets of each task, max id).
    Ids are 1..N in order of each component's first task label; dust removes
    components with fewer than `dust` voxels (their id is 0).
    """
    n_labels = np.asarray(counts_per_task, dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(n_labels)])
    total = int(offsets[-1])
    if total == 0:
        return np.zeros(0, dtype=np.uint64), offsets, 0
    rows = [np.zeros(0, np.int64)]
    cols = [np.zeros(0, np.int64)]
    for a, b, ab in pairs:
        if len(ab):
            rows.append(offsets[a] + ab[:, 0].astype(np.int64) - 1)
            cols.append(offsets[b] + ab[:, 1].astype(np.int64) - 1)
    rows, cols = np.concatenate(rows), np.concatenate(cols)
    graph = coo_matrix((np.ones(len(rows), dtype=np.int8), (rows, cols)), shape=(total, total))
    _, comp = connected_components(graph, directed=False)
    # number components by their first label (task order, then cc3d's order in the task)
    comp, _ = fastremap.renumber(comp.astype(np.uint64) + 1, in_place=True)
    comp = comp.astype(np.int64) - 1
    n_comp = int(comp.max()) + 1
    keep = np.ones(n_comp, dtype=bool)
    if dust > 0:
        voxels = np.bincount(comp, weights=np.asarray(sizes, dtype=np.float64), minlength=n_comp)
        keep = voxels >= dust
    new_ids = (np.cumsum(keep) * keep).astype(np.uint64)
    return new_ids[comp], offsets, int(keep.sum())


def output_dtype(max_label: int, encoding: str) -> str:
    """Smallest unsigned dtype that holds ids up to max_label in this encoding."""
    dtype = np.dtype(fastremap.fit_dtype(np.uint64, max(int(max_label), 1)))
    if encoding == "compressed_segmentation" and dtype.itemsize < 4:
        dtype = np.dtype(np.uint32)  # the smallest type compressed_segmentation stores
    return dtype.name


# ---- planning -------------------------------------------------------------------
def dest_info(src: dict, p: dict, dtype: str) -> dict:
    import copy

    info = copy.deepcopy(src)
    mip = p["mip"]
    info["scales"] = info["scales"][: mip + 1]
    for key in ("mesh", "meshing", "skeletons"):
        info.pop(key, None)
    info["type"] = "segmentation"
    info["data_type"] = dtype
    info["num_channels"] = 1
    scale = info["scales"][mip]
    scale.pop("sharding", None)
    if p["chunk_size"] is not None:
        scale["chunk_sizes"] = [list(p["chunk_size"])]
    for s in info["scales"]:
        if s["encoding"] in ("jpeg", "png"):
            s["encoding"] = "raw"
    _set_encoding(info, [mip], p["encoding"], None)
    return info


def _check_source(where: str, name: str, info: dict, p: dict) -> bool:
    """Whether the source is binarized (an image); raise on what cannot be labelled."""
    gte, lte = p["threshold_gte"], p["threshold_lte"]
    if int(info["num_channels"]) != 1:
        raise MagmaError(f"{where}.src: layer '{name}' has {info['num_channels']} channels; ccl labels one channel")
    if info["type"] == "segmentation":
        key = "threshold_gte" if gte is not None else "threshold_lte" if lte is not None else None
        if key:
            raise MagmaError(
                f"{where}.{key}: layer '{name}' is a segmentation, whose labels are used as they are;"
                " thresholds binarize an image layer. Remove threshold_gte/threshold_lte"
            )
        if np.dtype(info["data_type"]).kind not in "ui":
            raise MagmaError(f"{where}.src: segmentation '{name}' has data type {info['data_type']}; ccl needs integer labels")
        return False
    if info["type"] != "image":
        raise MagmaError(f"{where}.src: layer '{name}' is of type '{info['type']}'; ccl takes an image or a segmentation")
    if gte is None and lte is None:
        raise MagmaError(
            f"{where}: layer '{name}' is an image; set threshold_gte and/or threshold_lte to say which voxels are"
            " foreground"
        )
    if gte is not None and lte is not None and gte > lte:
        raise MagmaError(f"{where}.threshold_gte: {gte} > threshold_lte {lte}; no voxel could be foreground")
    return True


def plan(ctx, name: str, p: dict) -> StepPlan:
    where = f"steps.{name}"
    check_new_layer(where, ctx, p)
    src = ctx.infos[p["src"]]
    mip = p["mip"]
    layers.check_mip(p["src"], src, mip, key=f"{where}.mip")
    binary = _check_source(where, p["src"], src, p)
    smeta = layers.meta(src)
    box = smeta.bounds(mip)
    # provisional: one label per voxel; the labels stage narrows it to the labels found
    dtype = output_dtype(int(np.prod(box.size3())), p["encoding"])
    info = dest_info(src, p, dtype)
    layers.check_encoding(where, p["dest"], info, p["encoding"])
    meta = layers.meta(info)
    chunk = meta.chunk_size(mip)
    shape = np.asarray(p["shape"])
    if np.any(shape % chunk != 0):
        raise MagmaError(
            f"{where}.shape: {p['shape']} is not a multiple of the destination chunk size {chunk.tolist()};"
            " tasks would write parts of the same chunks. Use a multiple, or set chunk_size"
        )
    existing = ctx.infos.get(p["dest"])
    if existing is not None:
        diffs = layers.same_geometry(existing, info, mip)
        if np.dtype(existing["data_type"]).kind == "u":  # narrowed by an earlier run of this step
            diffs = [d for d in diffs if d != "data_type"]
        if diffs:
            raise MagmaError(
                f"{where}.dest: layer '{p['dest']}' already exists with a different {', '.join(diffs)};"
                " delete it or choose another dest"
            )

    grid = Grid.of(box, p["shape"])
    params = {"src": p["src"], "dest": p["dest"], "mip": mip, "binary": binary,
              "threshold_gte": p["threshold_gte"], "threshold_lte": p["threshold_lte"],
              "dust": p["dust"], "fill_missing": p["fill_missing"], "encoding": p["encoding"],
              "prefix": f"{smeta.key(mip)}/ccl/{name}", "grid": grid.to_dict()}
    width = dtype_width(src)
    # source + labels (<= 8 B) + output, per voxel of a task
    task_bytes = float(np.prod(shape)) * (width + 8 + np.dtype(dtype).itemsize + 1)
    ex = ctx.step_exec
    stages = [
        make_stage("faces", grid, dict(params, task="faces_task"), ex, task_bytes),
        make_stage("equivalences", grid, dict(params, task="equivalences_task"), ex),
        make_stage("labels", Grid.indices(1), dict(params, task="labels_task"), ex),
        make_stage("relabel", grid, dict(params, task="run_task"), ex, task_bytes),
    ]
    if p["clean"]:
        stages.append(make_stage("clean", Grid.indices(1), dict(params, task="clean_task"), ex))
    step = StepPlan(name, "ccl", p, stages=stages, writes=[p["dest"]], sources=[p["src"]])
    for st in stages:
        step.notes.append(f"{st.name}: {st.grid.n} tasks of {st.grid.shape} -> {st.jobs} jobs")
    step.infos[p["dest"]] = info
    ctx.infos[p["dest"]] = info
    step.checks = [(p["src"], mip, box, p["fill_missing"])]
    return step


# ---- execution ------------------------------------------------------------------
def _task_index(params: dict, box: Bbox):
    grid = Grid(**params["grid"])
    point = (box.minpt - np.asarray(grid.minpt)) // np.asarray(grid.shape)
    counts = grid.counts
    index = int(point[0] + counts[0] * (point[1] + counts[1] * point[2]))
    return index, point, counts


def _strides(counts) -> list:
    return [1, int(counts[0]), int(counts[0] * counts[1])]


def _put_arrays(cf: CloudFiles, key: str, **arrays) -> None:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    cf.put(key, buf.getvalue(), compress=INTERMEDIATE_COMPRESSION)


def _load(blob: bytes | None, key: str) -> dict:
    if blob is None:
        raise MagmaError(f"ccl: intermediate file {key} is missing; re-run the step from its faces stage")
    with np.load(io.BytesIO(blob), allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def _label(params: dict, box: Bbox, paths: dict):
    vol = open_volume(paths[params["src"]], params["mip"], fill_missing=params["fill_missing"])
    image = vol.download(box, mip=params["mip"])[..., 0]
    labels, n = label_block(image, params["binary"], params["threshold_gte"], params["threshold_lte"])
    return image, labels, int(n)


def faces_task(params: dict, box: Bbox, paths: dict) -> dict:
    """Label the block; store the planes its neighbours touch (and label sizes for dust)."""
    image, labels, n = _label(params, box, paths)
    t, point, counts = _task_index(params, box)
    out = {"n": np.array(n, dtype=np.int64)}
    for axis in range(3):
        index = [slice(None)] * 3
        for side, pos, present in (("lo", 0, point[axis] > 0), ("hi", -1, point[axis] < counts[axis] - 1)):
            if not present:
                continue
            index[axis] = pos
            out[f"{side}{axis}"] = labels[tuple(index)]
            if not params["binary"]:
                out[f"v{side}{axis}"] = image[tuple(index)]
    if params["dust"] > 0:
        out["sizes"] = np.bincount(labels.ravel(order="K"), minlength=n + 1)[1:].astype(np.uint64)
    _put_arrays(storage.files(paths[params["src"]]), f"{params['prefix']}/faces/{t}", **out)
    return {"voxels_read": int(np.prod(box.size3())), "task_labels": n}


def equivalences_task(params: dict, box: Bbox, paths: dict) -> dict:
    """Pairs of labels that touch across this task's low faces."""
    t, point, counts = _task_index(params, box)
    strides = _strides(counts)
    cf = storage.files(paths[params["src"]])
    prefix = params["prefix"]
    keys = [f"{prefix}/faces/{t}"] + [f"{prefix}/faces/{t - strides[a]}" for a in range(3) if point[a] > 0]
    blobs = cf.get(keys, return_dict=True)
    own = _load(blobs[keys[0]], keys[0])
    out = {"n": own["n"]}
    if "sizes" in own:
        out["sizes"] = own["sizes"]
    links = 0
    for axis in range(3):
        if point[axis] == 0:
            continue
        key = f"{prefix}/faces/{t - strides[axis]}"
        low = _load(blobs[key], key)
        pairs = face_pairs(low[f"hi{axis}"], own[f"lo{axis}"], low.get(f"vhi{axis}"), own.get(f"vlo{axis}"))
        out[f"pairs{axis}"] = pairs
        links += len(pairs)
    _put_arrays(cf, f"{prefix}/equivalences/{t}", **out)
    return {"links": links}


def labels_task(params: dict, box: Bbox, paths: dict) -> dict:
    """The global union: final ids for every task's labels, one relabel table per task."""
    grid = Grid(**params["grid"])
    counts = grid.counts
    strides = _strides(counts)
    cf = storage.files(paths[params["src"]])
    prefix = params["prefix"]
    n_tasks = grid.n
    n_labels, sizes, pairs = [], [], []
    for start in range(0, n_tasks, READ_BATCH):
        keys = [f"{prefix}/equivalences/{t}" for t in range(start, min(start + READ_BATCH, n_tasks))]
        blobs = cf.get(keys, return_dict=True)
        for t, key in zip(range(start, start + len(keys)), keys):
            eq = _load(blobs[key], key)
            n_labels.append(int(eq["n"]))
            if params["dust"] > 0:
                sizes.append(eq["sizes"])
            for axis in range(3):
                if f"pairs{axis}" in eq:
                    pairs.append((t - strides[axis], t, eq[f"pairs{axis}"]))
        del blobs
    final, offsets, max_label = global_labels(
        n_labels, pairs, np.concatenate(sizes) if sizes else None, params["dust"])
    dtype = np.dtype(output_dtype(max_label, params["encoding"]))
    dest = storage.files(paths[params["dest"]])
    info = dest.get_json("info")
    if info["data_type"] != dtype.name:  # before any voxel is written: relabel reads it back
        info["data_type"] = dtype.name
        dest.put_json("info", info, cache_control="no-cache")

    def tables():
        for t in range(n_tasks):
            buf = io.BytesIO()
            np.save(buf, final[offsets[t]: offsets[t + 1]].astype(dtype))
            yield f"{prefix}/relabel/{t}", buf.getvalue()

    cf.puts(tables(), compress=INTERMEDIATE_COMPRESSION)
    cf.put_json(f"{prefix}/max_label.json", [max_label])
    return {"components": max_label, "task_labels": int(offsets[-1])}


def run_task(params: dict, box: Bbox, paths: dict) -> dict:
    """relabel: label the block again, map it through its table, write it into dest."""
    _, labels, n = _label(params, box, paths)
    t, _, _ = _task_index(params, box)
    key = f"{params['prefix']}/relabel/{t}"
    blob = storage.files(paths[params["src"]]).get(key)
    if blob is None:
        raise MagmaError(f"ccl: intermediate file {key} is missing; re-run the step from its faces stage")
    table = np.load(io.BytesIO(blob), allow_pickle=False)
    if len(table) != n:
        raise MagmaError(
            f"ccl: task {t} found {n} components but its relabel table has {len(table)};"
            " the source changed during the run. Re-run the step from its faces stage"
        )
    dest = open_volume(paths[params["dest"]], params["mip"])
    if table.dtype != dest.dtype:
        raise MagmaError(
            f"ccl: {paths[params['dest']]}/info says {dest.dtype} but task {t}'s relabel table is {table.dtype};"
            " the layer changed during the run. Re-run the step from its labels stage"
        )
    lut = np.concatenate([np.zeros(1, dtype=table.dtype), table])
    # index in memory order (cc3d's output is Fortran-ordered): 15x faster than np.take here
    out = lut[labels.ravel(order="K")].reshape(labels.shape, order="F" if labels.flags.f_contiguous else "C")
    dest[box] = out[..., np.newaxis]
    return {"voxels_written": int(out.size)}


def clean_task(params: dict, box: Bbox, paths: dict) -> dict:
    cf = storage.files(paths[params["src"]])
    names = list(cf.list(prefix=f"{params['prefix']}/"))
    cf.delete(names)
    return {"files_deleted": len(names)}
