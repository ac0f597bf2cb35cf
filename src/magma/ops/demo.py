"""demo: synthesize a small EM-like dataset (image + segmentation) so a newcomer can run
the whole pipeline with no data of their own.

Objects are branching tubes (random-walk trunks with side branches), like
neurites, that cross the whole volume and therefore every task boundary. The
segmentation is the set of voxels near each object's centreline (nearest
centreline wins where tubes touch); labels are random over the 64-bit range.
The image darkens membranes (label boundaries), keeps cytoplasm mid-gray and
adds blur and noise. Everything is deterministic in `seed`.
"""
from __future__ import annotations

import numpy as np
from cloudvolume import Bbox, CloudVolume
from scipy import ndimage

from ..plan import Grid, StepPlan, make_stage
from .common import open_volume


def reads(p):
    return []


def writes(p):
    return [p["image"], p["segmentation"]]


def creates(p):
    return [p["image"], p["segmentation"]]


def infos(p: dict) -> tuple:
    common = dict(resolution=p["resolution"], voxel_offset=[0, 0, 0], volume_size=p["size"],
                  chunk_size=p["chunk_size"])
    image = CloudVolume.create_new_info(1, "image", "uint8", "raw", **common)
    seg = CloudVolume.create_new_info(1, "segmentation", "uint64", "raw", **common)
    return image, seg


def plan(ctx, name: str, p: dict) -> StepPlan:
    image, seg = infos(p)
    step = StepPlan(name, "demo", p, writes=[p["image"], p["segmentation"]])
    step.infos = {p["image"]: image, p["segmentation"]: seg}
    ctx.infos.update(step.infos)
    whole = Bbox([0, 0, 0], p["size"])
    # the distance transform with indices holds ~64 bytes per voxel at its peak
    stage = make_stage("synthesize", Grid.of(whole, p["size"]), dict(p), ctx.step_exec,
                       task_bytes=64.0 * float(np.prod(p["size"])))
    step.stages.append(stage)
    step.notes.append(f"synthesize {p['objects']} objects into {p['size']} voxels (seed {p['seed']})")
    return step


# ---- kernel -----------------------------------------------------------------
def _walk(rng, start, direction, steps, size, aniso):
    """Points of a smooth random walk (voxel coordinates), stopping at the volume's edge."""
    pts = []
    pos = np.array(start, dtype=float)
    d = np.array(direction, dtype=float)
    for _ in range(steps):
        d += rng.normal(0, 0.12, 3)
        d /= np.linalg.norm(d)
        pos = pos + d * np.array([1.0, 1.0, 1.0 / aniso])
        if np.any(pos < 0) or np.any(pos >= size):
            break
        pts.append(pos.copy())
    return pts


def synthesize(size, seed: int = 1, objects: int = 40, anisotropy: float = 5.0):
    """(image uint8, labels uint64) of `size`, deterministic in `seed`."""
    size = np.asarray(size)
    rng = np.random.default_rng(seed)
    centre = np.zeros(size, dtype=np.uint16)  # object index on centrelines, 0 elsewhere
    radii = np.zeros(objects + 1)
    span = int(np.linalg.norm(size[:2]) * 1.5)
    for obj in range(1, objects + 1):
        start = rng.uniform(0, 1, 3) * size
        d = rng.normal(0, 1, 3)
        d[2] *= 0.5
        trunk = _walk(rng, start, d / np.linalg.norm(d), span, size, anisotropy)
        trunk += _walk(rng, start, -d / np.linalg.norm(d), span, size, anisotropy)
        pts = list(trunk)
        for _ in range(rng.integers(1, 4)):  # side branches
            if not trunk:
                break
            base = trunk[rng.integers(len(trunk))]
            bd = rng.normal(0, 1, 3)
            pts += _walk(rng, base, bd / np.linalg.norm(bd), span // 3, size, anisotropy)
        if not pts:
            pts = [start]
        idx = np.clip(np.round(np.array(pts)).astype(int), 0, size - 1)
        centre[idx[:, 0], idx[:, 1], idx[:, 2]] = obj
        radii[obj] = rng.uniform(3.0, 9.0)

    dist, nearest = ndimage.distance_transform_edt(centre == 0, sampling=(1.0, 1.0, anisotropy), return_indices=True)
    owner = centre[nearest[0], nearest[1], nearest[2]]
    del nearest
    inside = dist <= radii[owner]
    ids = np.unique(rng.integers(1, np.iinfo(np.uint64).max, size=objects * 2, dtype=np.uint64))[:objects]
    rng.shuffle(ids)
    lut = np.concatenate([[0], ids]).astype(np.uint64)
    labels = np.where(inside, lut[owner], 0).astype(np.uint64)

    # membranes: label changes between xy neighbours
    edge = np.zeros(size, dtype=bool)
    edge[1:] |= labels[1:] != labels[:-1]
    edge[:, 1:] |= labels[:, 1:] != labels[:, :-1]
    img = np.where(labels == 0, 185.0, 135.0)
    img += rng.normal(0, 1, size=(int(size[0]) // 8 + 1, int(size[1]) // 8 + 1, int(size[2]))).repeat(8, 0).repeat(8, 1)[: size[0], : size[1]] * 12
    img[edge] = 45.0
    img = ndimage.gaussian_filter(img, sigma=(1.0, 1.0, 0.0))
    img += rng.normal(0, 8, size)
    image = np.clip(img, 0, 255).astype(np.uint8)
    return image, labels


def run_task(params: dict, box: Bbox, paths: dict) -> dict:
    image, labels = synthesize(params["size"], params["seed"], params["objects"])
    for name, arr in ((params["image"], image), (params["segmentation"], labels)):
        open_volume(paths[name], 0)[:, :, :] = arr  # info was written by the setup job
    return {"voxels_written": int(image.size * 2), "objects": int(len(np.unique(labels)) - 1)}
