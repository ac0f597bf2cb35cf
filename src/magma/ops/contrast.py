"""contrast: per-z-slice histogram equalization (or CLAHE) of an image into a new layer + pyramid.

mode equalize (Igneous `image contrast histogram` then `equalize`):
  stage histogram: one task per chunk-deep z slab. A slab samples `coverage_factor`
    of its xy area in 2048x2048 patches (chosen at random, seeded by the slab's z so
    a re-run picks the same ones) and reads each patch once through the whole slab
    depth, so every chunk is fetched once; Igneous fetches a 64-deep chunk once per
    slice. Each slice's histogram goes to `levels/{mip}/{z}` in the source layer's
    storage, in Igneous's format, so either tool can read the other's levels.
  stage equalize: tasks of `shape`; per slice, the histogram (black excluded) gives
    the values below which lie clip_fraction of the voxels on each side; they are
    stretched to the full range of the data type, then clipped to minval..maxval.
mode clahe (Igneous `image contrast clahe`): OpenCV's CLAHE per slice. The tiles
  are laid on the whole region, not on each task (as Igneous does), and each task
  reads one tile of margin, so the result equals CLAHE of the whole slice at once
  (but for float rounding in OpenCV: ±1 grey level on about 1e-5 of the voxels).
"""
from __future__ import annotations

import json

import numpy as np
from cloudvolume import Bbox

from .. import layers, storage
from ..errors import MagmaError
from ..plan import Grid, StepPlan, make_stage
from . import _derived
from .common import check_new_layer, dtype_width, file_compression, open_volume

PATCH = 2048  # side of a histogram sample patch, as Igneous's


# ---- kernels ----------------------------------------------------------------
def slab_histograms(image: np.ndarray, nbins: int) -> np.ndarray:
    """(z, nbins) uint64 counts of each slice of a (x, y, z) block."""
    out = np.zeros((image.shape[2], nbins), dtype=np.uint64)
    for z in range(image.shape[2]):
        out[z] = np.bincount(image[:, :, z].ravel(order="K"), minlength=nbins)
    return out


def clamping_values(levels: np.ndarray, lower_fraction: float, upper_fraction: float):
    """Per slice (lower, upper): the last bin whose cumulative share (black left out)
    is still <= the fraction, for the two fractions. Slices with no voxels give (0, 0)."""
    h = np.array(levels, dtype=np.uint64, ndmin=2)
    h[:, 0] = 0  # pure black carries no information in EM images
    cdf = np.cumsum(h, axis=1, dtype=np.uint64)
    total = cdf[:, -1].astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        share = cdf.astype(np.float64) / total[:, None]

    def last_within(fraction):
        above = share > fraction
        first = np.where(above.any(axis=1), above.argmax(axis=1), h.shape[1])
        return np.maximum(first - 1, 0)

    empty = total == 0
    return np.where(empty, 0, last_within(lower_fraction)), np.where(empty, 0, last_within(upper_fraction))


def equalize_lut(lower: int, upper: int, dtype, minval=None, maxval=None) -> np.ndarray:
    """The output value of every input value for one slice: lower..upper stretched to the
    dtype's full range in float32, rounded, clipped to minval..maxval."""
    top = float(np.iinfo(dtype).max)
    values = np.arange(int(top) + 1, dtype=np.float32)
    lo, hi = float(lower), float(upper)
    if lo != hi:
        values = (values - lo) * (top / (hi - lo))
    np.round(values, out=values)
    np.clip(values, 0.0 if minval is None else minval, top if maxval is None else maxval, out=values)
    return values.astype(dtype)


def equalize_image(image: np.ndarray, lower, upper, minval=None, maxval=None) -> np.ndarray:
    """Each slice through its lookup table (the same float32 arithmetic per voxel value,
    without a float copy of the block)."""
    image = np.asfortranarray(image)  # CloudVolume's order already: a z slice is one run of memory
    out = np.empty_like(image, order="F")
    for z in range(image.shape[2]):
        lut = equalize_lut(lower[z], upper[z], image.dtype, minval, maxval)
        # flat contiguous views, and no bounds check (the table covers every value of the
        # dtype): 7x faster than take() on the 2D slices, which copied through a buffer
        np.take(lut, image[:, :, z].ravel(order="K"), out=out[:, :, z].ravel(order="K"), mode="clip")
    return out


def clahe_slices(image: np.ndarray, clip_limit: float, tiles) -> np.ndarray:
    """OpenCV CLAHE on each slice of a (x, y, z) block; `tiles` counts along x, y."""
    import cv2

    cv2.setNumThreads(0)  # tasks already run in parallel processes
    # a slice of a Fortran-ordered block, transposed, is a C-ordered (y, x) image: OpenCV
    # reads it without a copy, with x as columns, so its grid size (cols, rows) is (x, y)
    op = cv2.createCLAHE(clipLimit=float(clip_limit), tileGridSize=(int(tiles[0]), int(tiles[1])))
    image = np.asfortranarray(image)
    out = np.empty_like(image, order="F")
    for z in range(image.shape[2]):
        out[:, :, z] = op.apply(image[:, :, z].T).T
    return out


# ---- planning ---------------------------------------------------------------
def _check(where, name, src, p):
    if src["data_type"] not in ("uint8", "uint16"):
        raise MagmaError(f"{where}.src: contrast works on uint8 or uint16 images; layer '{name}' is {src['data_type']}")
    if int(src["num_channels"]) != 1:
        raise MagmaError(f"{where}.src: contrast works on one channel; layer '{name}' has {src['num_channels']}")
    clip = p["clip_fraction"]
    lo, hi = (clip, clip) if isinstance(clip, (int, float)) else clip
    if lo + hi > 1:
        raise MagmaError(f"{where}.clip_fraction: {clip} clips more than the whole histogram (the two sides add to {lo + hi})")
    top = np.iinfo(src["data_type"]).max
    for key in ("minval", "maxval"):
        if p[key] is not None and not 0 <= p[key] <= top:
            raise MagmaError(f"{where}.{key}: {p[key]} is outside the range of {src['data_type']} (0..{top})")
    if p["minval"] is not None and p["maxval"] is not None and p["minval"] > p["maxval"]:
        raise MagmaError(f"{where}.minval: {p['minval']} is above maxval {p['maxval']}")
    return float(lo), float(hi)


def plan(ctx, name: str, p: dict) -> StepPlan:
    where = f"steps.{name}"
    check_new_layer(where, ctx, p)
    src, mip = ctx.infos[p["src"]], p["mip"]
    layers.check_mip(p["src"], src, mip, key=f"{where}.mip")
    lower, upper = _check(where, p["src"], src, p)
    info = _derived.dest_info(src, mip)
    box = layers.user_bounds(where, p["src"], src, p["bounds"], p["bounds_mip"], mip)
    shape = _derived.task_shape(where, p["shape"], info, mip, box, 0, 0)
    info, k = _derived.add_mips(where, info, box, mip, shape)
    _derived.check_existing(where, ctx, p["dest"], info, mip)
    width = dtype_width(src)
    params = {"src": p["src"], "dest": p["dest"], "mip": mip, "num_mips": k, "fill_missing": p["fill_missing"],
              "compress": file_compression(None, info["scales"][mip]["encoding"]),
              "region": [box.minpt.tolist(), box.maxpt.tolist()]}
    step = StepPlan(name, "contrast", p, writes=[p["dest"]], sources=[p["src"]])
    # a task holds the block as read, as float32, as written, and its mips
    task_bytes = float(np.prod(shape)) * (2 * width + 4) * 4 / 3
    if p["mode"] == "equalize":
        whole = layers.meta(src).bounds(mip)
        cz = int(layers.meta(src).chunk_size(mip)[2])
        z0 = whole.minpt[2] + (box.minpt[2] - whole.minpt[2]) // cz * cz  # slabs on the chunk grid
        slabs = Bbox((box.minpt[0], box.minpt[1], z0), box.maxpt)
        hist = make_stage("histogram", Grid.of(slabs, (box.size3()[0], box.size3()[1], cz)),
                          dict(params, task="histogram", coverage_factor=p["coverage_factor"]),
                          ctx.step_exec, width * 2.0 * min(PATCH, box.size3()[0]) * min(PATCH, box.size3()[1]) * cz)
        eq = make_stage(f"equalize-mip{mip}" + (f"-{mip + k}" if k else ""), Grid.of(box, shape),
                        dict(params, task="equalize", lower_fraction=lower, upper_fraction=1.0 - upper,
                             minval=p["minval"], maxval=p["maxval"]),
                        ctx.step_exec, task_bytes)
        step.stages += [hist, eq]
    else:
        gx, gy = p["tile_grid_size"]
        size = box.size3()
        if size[0] < 2 * gx or size[1] < 2 * gy:
            raise MagmaError(f"{where}.tile_grid_size: {[gx, gy]} tiles need a region of at least"
                             f" {2 * gx}x{2 * gy} voxels; it is {size[0]}x{size[1]}")
        tile = [-(-int(size[0]) // gx), -(-int(size[1]) // gy)]
        margin = [min(2 * t, int(s)) for t, s in zip(tile, size)]
        grow = (min(shape[0], size[0]) + margin[0]) * (min(shape[1], size[1]) + margin[1]) / (
            min(shape[0], size[0]) * min(shape[1], size[1]))
        step.stages.append(make_stage(f"clahe-mip{mip}" + (f"-{mip + k}" if k else ""), Grid.of(box, shape),
                                      dict(params, task="clahe", clip_limit=p["clip_limit"],
                                           tile_grid_size=[gx, gy], tile=tile),
                                      ctx.step_exec, task_bytes * grow))
    for st in step.stages:
        step.notes.append(f"{st.name}: {st.grid.n} tasks of {st.grid.shape} -> {st.jobs} jobs")
    step.infos[p["dest"]] = info
    ctx.infos[p["dest"]] = info
    step.checks = [(p["src"], mip, box, p["fill_missing"])]
    return step


# ---- execution --------------------------------------------------------------
def _region(params) -> Bbox:
    return Bbox(*params["region"])


def _levels_key(mip, z) -> str:
    return f"levels/{mip}/{z}"


def histogram(params: dict, box: Bbox, paths: dict) -> dict:
    """Histograms of the slices of one slab from sampled patches, each read once."""
    box = Bbox.intersection(box, _region(params))
    mip = params["mip"]
    vol = open_volume(paths[params["src"]], mip, fill_missing=params["fill_missing"])
    nbins = 2 ** (8 * np.dtype(vol.dtype).itemsize)
    size = box.size3()
    nx, ny = -(-int(size[0]) // PATCH), -(-int(size[1]) // PATCH)
    cells = nx * ny
    want = int(np.ceil(cells * params["coverage_factor"]))
    picks = np.sort(np.random.default_rng(int(box.minpt[2])).choice(cells, size=want, replace=False))
    counts = np.zeros((int(size[2]), nbins), dtype=np.uint64)
    area, biggest = 0, (0, 0)
    for cell in picks:
        lo = box.minpt + (int(cell % nx) * PATCH, int(cell // nx) * PATCH, 0)
        patch = Bbox.intersection(Bbox(lo, lo + (PATCH, PATCH, int(size[2]))), box)
        counts += slab_histograms(vol.download(patch, mip=mip)[..., 0], nbins)
        pxy = tuple(int(v) for v in patch.size3()[:2])
        area += pxy[0] * pxy[1]
        biggest = max(biggest, pxy, key=lambda s: s[0] * s[1])
    files = []
    for i, z in enumerate(range(int(box.minpt[2]), int(box.maxpt[2]))):
        doc = {"levels": counts[i].tolist(), "patch_size": [biggest[0], biggest[1], 1],
               "num_patches": len(picks), "coverage_ratio": area / float(size[0] * size[1])}
        files.append({"path": _levels_key(mip, z), "content": json.dumps(doc).encode()})
    storage.files(paths[params["src"]]).puts(files, content_type="application/json", compress=None,
                                          cache_control="no-cache")
    return {"voxels_read": int(area * size[2]), "files": len(files)}


def read_levels(path: str, mip: int, z0: int, z1: int) -> np.ndarray:
    keys = [_levels_key(mip, z) for z in range(z0, z1)]
    got = storage.files(path).get(keys, return_dict=True)
    missing = [k for k in keys if got.get(k) is None]
    if missing:
        raise MagmaError(f"{path}: histograms {', '.join(missing[:5])} are missing; the histogram stage did not run")
    return np.array([json.loads(got[k])["levels"] for k in keys], dtype=np.uint64)


def equalize(params: dict, box: Bbox, paths: dict) -> dict:
    mip = params["mip"]
    src = open_volume(paths[params["src"]], mip, fill_missing=params["fill_missing"])
    dest = open_volume(paths[params["dest"]], mip, compress=params["compress"])
    levels = read_levels(paths[params["src"]], mip, int(box.minpt[2]), int(box.maxpt[2]))
    lower, upper = clamping_values(levels, params["lower_fraction"], params["upper_fraction"])
    image = src.download(box, mip=mip)[..., 0]
    out = equalize_image(image, lower, upper, params["minval"], params["maxval"])
    written = _derived.write_block(dest, out, box, mip, params["num_mips"], "avg")
    return {"voxels_read": int(image.size), "voxels_written": written}


def clahe(params: dict, box: Bbox, paths: dict) -> dict:
    """CLAHE of one block. Tiles of `tile` voxels sit on a lattice anchored at the
    region's corner; the block is read with one tile of margin on the lattice and the
    far edge padded as OpenCV pads the whole slice, so every tile histogram and every
    interpolation is the one the whole slice would have."""
    mip = params["mip"]
    region = _region(params)
    tile = np.array(params["tile"] + [1])
    grid = np.array(params["tile_grid_size"] + [1])
    r0, r1 = region.minpt, region.maxpt
    lo = r0 + ((box.minpt - r0) // tile - 1) * tile
    hi = r0 + (-(-(box.maxpt - r0) // tile) + 1) * tile
    lo[2], hi[2] = box.minpt[2], box.maxpt[2]
    read = Bbox(np.maximum(lo, r0), np.minimum(hi, r1))
    src = open_volume(paths[params["src"]], mip, fill_missing=params["fill_missing"])
    image = src.download(read, mip=mip)[..., 0]
    padded_end = r0 + grid * tile  # OpenCV's extent of the whole slice
    pad = [(0, int(padded_end[i] - r1[i]) if read.maxpt[i] == r1[i] else 0) for i in range(2)] + [(0, 0)]
    if any(p for _, p in pad):
        image = np.pad(image, pad, mode="reflect")  # numpy's reflect = OpenCV's BORDER_REFLECT_101
    tiles = [image.shape[i] // int(tile[i]) for i in range(2)]
    out = clahe_slices(image, params["clip_limit"], tiles)
    at = box.minpt - read.minpt
    out = out[at[0]: at[0] + box.size3()[0], at[1]: at[1] + box.size3()[1]]
    dest = open_volume(paths[params["dest"]], mip, compress=params["compress"])
    written = _derived.write_block(dest, out, box, mip, params["num_mips"], "avg")
    return {"voxels_read": int(read.volume()), "voxels_written": written}


def run_task(params: dict, box: Bbox, paths: dict) -> dict:
    return globals()[params["task"]](params, box, paths)
