"""roi: bounding boxes of the tissue in an image, written to the info as `scales[0].rois`.

Igneous: `igneous image roi` (`compute_rois`). Each task reads one `z_step` slab of a
low-resolution mip (the layer's last by default), downsamples it further in memory when
its xy area exceeds `max_axial_len`², keeps voxels brighter than `suppress_faint_voxels`,
labels 26-connected components with cc3d, drops those under `dust` voxels and writes
their bounding boxes to `rois/{mip}/{z0}-{z1}.json`; a last task gathers them into the
info. Boxes are inclusive [x0, y0, z0, x1, y1, z1] in mip 0 voxels including the
layer's voxel offset (Igneous leaves the offset out and adds z at the low mip's scale).
"""
from __future__ import annotations

import cc3d
import numpy as np
import tinybrain
from cloudvolume import Bbox, CloudVolume, Vec

from .. import cores, layers, storage
from ..plan import Grid, StepPlan, make_stage
from .common import dtype_width, open_volume


def shrink_mips(shape, max_axial_len: int) -> int:
    """2x2x1 mips to make in memory so a slab's xy area is at most max_axial_len²."""
    area = int(shape[0]) * int(shape[1])
    return int(np.ceil(np.log2(area / max_axial_len**2))) if area > max_axial_len**2 else 0


def shrink(image: np.ndarray, layer_type: str, mips: int) -> np.ndarray:
    """`image` (x, y, z) pooled 2x2x1 `mips` times. Slice by slice, so z-pieces shrink alone."""
    if mips == 0:
        return image
    pool = tinybrain.downsample_segmentation if layer_type == "segmentation" else tinybrain.downsample_with_averaging
    return pool(np.asfortranarray(image), factor=(2, 2, 1), num_mips=mips)[-1]


def tissue_boxes(image: np.ndarray, layer_type: str, max_axial_len: int, suppress_faint_voxels, dust: int,
                 shrunk: int | None = None):
    """Bounding boxes (lo, hi exclusive, in `image` voxels) of the tissue in a (x, y, z) block.
    `shrunk`: the image has been through `shrink` that many times already."""
    if shrunk is None:
        shrunk = shrink_mips(image.shape, max_axial_len)
        image = shrink(image, layer_type, shrunk)
    labels = cc3d.connected_components(image > suppress_faint_voxels)
    labels = cc3d.dust(labels, threshold=dust, in_place=True)
    stats = cc3d.statistics(labels)
    scale = np.array([2**shrunk, 2**shrunk, 1])
    boxes = []
    for slc, count in zip(stats["bounding_boxes"][1:], stats["voxel_counts"][1:]):
        if slc is None or count == 0:  # dust leaves its labels' numbers unused
            continue
        lo = np.array([s.start for s in slc]) * scale
        hi = np.array([s.stop for s in slc]) * scale
        boxes.append((lo, hi))
    return boxes


def plan(ctx, name: str, p: dict) -> StepPlan:
    where = f"steps.{name}"
    lname = p["layer"]
    info = ctx.infos[lname]
    mip = len(info["scales"]) - 1 if p["mip"] is None else p["mip"]
    layers.check_mip(lname, info, mip, key=f"{where}.mip")
    whole = layers.meta(info).bounds(mip)
    size = whole.size3()
    zstep = int(size[2]) if p["z_step"] is None else p["z_step"]
    params = {"layer": lname, "mip": mip, "dust": p["dust"], "max_axial_len": p["max_axial_len"],
              "suppress_faint_voxels": p["suppress_faint_voxels"], "layer_type": info["type"],
              "region": [whole.minpt.tolist(), whole.maxpt.tolist()], "z_step": zstep}
    step = StepPlan(name, "roi", p, writes=[lname], sources=[lname])
    slab = float(size[0] * size[1] * min(zstep, int(size[2])))
    find = make_stage("find", Grid.of(whole, (size[0], size[1], zstep)), dict(params, task="find"), ctx.step_exec,
                      slab * (dtype_width(info) * int(info["num_channels"]) + 1 + 4 * 2))
    gather = make_stage("gather", Grid.indices(1), dict(params, task="gather"), ctx.step_exec)
    step.stages += [find, gather]
    for st in step.stages:
        step.notes.append(f"{st.name}: {st.grid.n} tasks -> {st.jobs} jobs (mip {mip})")
    # only the gather task changes the info (the boxes are not known before); plans leave
    # `rois` out and setup jobs of later steps carry it over (layers.RESULT_KEYS)
    step.checks = []
    return step


def _key(mip, z0, z1) -> str:
    return f"rois/{mip}/{z0}-{z1}.json"


def find(params: dict, box: Bbox, paths: dict) -> dict:
    mip = params["mip"]
    vol = open_volume(paths[params["layer"]], mip, fill_missing=True)  # as Igneous: unwritten = no tissue
    mips = shrink_mips(box.size3(), params["max_axial_len"])

    def read(piece):  # read and shrink one chunk-deep piece, in a fork: on idle cores side by side
        return shrink(vol.download(piece, mip=mip)[..., 0], params["layer_type"], mips)

    pieces = _z_pieces(box, int(vol.meta.chunk_size(mip)[2]), int(vol.meta.voxel_offset(mip)[2]))
    image = np.concatenate(cores.fork_each(read, pieces), axis=2)
    ratio = vol.meta.downsample_ratio(mip)
    whole0 = vol.meta.bounds(0)
    rois = []
    for lo, hi in tissue_boxes(image, params["layer_type"], params["max_axial_len"],
                               params["suppress_faint_voxels"], params["dust"], shrunk=mips):
        lo0 = (box.minpt + Vec(*lo)) * ratio
        hi0 = (box.minpt + Vec(*hi)) * ratio
        b = Bbox.clamp(Bbox(lo0, hi0), whole0)
        rois.append([int(v) for v in b.minpt] + [int(v) - 1 for v in b.maxpt])
    storage.files(paths[params["layer"]]).put_json(_key(mip, int(box.minpt[2]), int(box.maxpt[2])), rois)
    return {"voxels_read": int(image.size), "rois": len(rois)}


def _z_pieces(box: Bbox, chunk_z: int, offset_z: int, most: int = 64) -> list:
    """`box` cut along z on chunk planes (offset_z + k * chunk_z) into at most `most` pieces,
    so each chunk is read by one piece."""
    z0, z1 = int(box.minpt[2]), int(box.maxpt[2])
    step = chunk_z * max(1, -(-(z1 - z0) // (chunk_z * most)))
    first = offset_z + ((z0 - offset_z) // chunk_z + 1) * chunk_z
    cuts = [z0] + list(range(first, z1, step)) + [z1]
    return [Bbox((*box.minpt[:2], a), (*box.maxpt[:2], b)) for a, b in zip(cuts, cuts[1:]) if b > a]


def gather(params: dict, box: Bbox, paths: dict) -> dict:
    path, mip = paths[params["layer"]], params["mip"]
    lo, hi = params["region"]
    keys = [_key(mip, z, min(z + params["z_step"], hi[2])) for z in range(lo[2], hi[2], params["z_step"])]
    got = storage.files(path).get_json(keys)
    rois = [r for part in got for r in part]
    vol = CloudVolume(path, progress=False)
    vol.info["scales"][0]["rois"] = rois
    vol.commit_info()
    return {"rois": len(rois), "files": 1}


def run_task(params: dict, box: Bbox, paths: dict) -> dict:
    return globals()[params["task"]](params, box, paths)
