"""Volumes stored in local image files: TIFF (a stack of slices or one multi-page
file), .npy, HDF5, NIfTI and NRRD, read one box at a time.

`describe()` reads headers only (of the first slice for a stack) so a step plans
in milliseconds however many slices there are; `check_all()` reads every header
(the step's setup job runs it once, before anything is written); `read()` returns
one box as an x, y, z, channel array without loading the rest of the volume
(memory-mapped .npy and raw NRRD, h5py and nibabel slicing, one TIFF page at a
time). Errors name the file.
"""
from __future__ import annotations

import functools
import glob
import os
import re

import numpy as np

from .errors import MagmaError

EXTENSIONS = {
    "tiff": (".tif", ".tiff"),
    "npy": (".npy",),
    "hdf5": (".h5", ".hdf5", ".hdf"),
    "nifti": (".nii", ".nii.gz"),
    "nrrd": (".nrrd", ".nhdr"),
}
# length units of NIfTI / NRRD headers -> nanometres (Precomputed resolutions are nm)
NM_PER_UNIT = {"meter": 1e9, "m": 1e9, "mm": 1e6, "millimeter": 1e6, "millimeters": 1e6, "micron": 1e3,
               "microns": 1e3, "um": 1e3, "micrometer": 1e3, "micrometers": 1e3, "nm": 1.0, "nanometer": 1.0,
               "nanometers": 1.0}
NUMBER = re.compile(r"(\d+)\D*$")  # the last run of digits in a name


def format_of(path: str) -> str | None:
    low = path.lower()
    for fmt, exts in EXTENSIONS.items():
        if low.endswith(exts):
            return fmt
    return None


def find_files(src: str, where: str) -> list[str]:
    """The files `src` names: one file, every TIFF in a directory, or a glob's matches."""
    if os.path.isdir(src):
        base = src.rstrip("/") + "/"
        found = [base + f for f in os.listdir(src) if f.lower().endswith(EXTENSIONS["tiff"])]
        if not found:
            raise MagmaError(f"{where}.src: directory {src} holds no .tif/.tiff files")
        return found
    if glob.has_magic(src):
        found = [f for f in glob.glob(src) if os.path.isfile(f)]
        if not found:
            raise MagmaError(f"{where}.src: no file matches {src}")
        return found
    if not os.path.isfile(src):
        raise MagmaError(f"{where}.src: {src} does not exist")
    return [src]


def number_slices(files: list[str], where: str) -> list[str]:
    """Files of a stack in slice order; every number from the first to the last must be there once."""
    numbered = []
    search = NUMBER.search
    for f in files:
        m = search(f[f.rfind("/") + 1:].split(".", 1)[0])
        if m is None:
            raise MagmaError(f"{where}.src: {f} has no slice number in its name; stack files need one (e.g. z0042.tif)")
        numbered.append((int(m.group(1)), f))
    numbered.sort(key=lambda t: t[0])
    for (a, fa), (b, fb) in zip(numbered, numbered[1:]):
        if a == b:
            raise MagmaError(f"{where}.src: {fa} and {fb} both claim slice number {a}")
        if b != a + 1:
            gap = f"{a + 1}" if b == a + 2 else f"{a + 1}..{b - 1}"
            raise MagmaError(f"{where}.src: slice number {gap} is missing (between {fa} and {fb})")
    return [f for _, f in numbered]


def _unreadable(where: str, path: str, exc: Exception) -> MagmaError:
    return MagmaError(f"{where}.src: cannot read {path}: {type(exc).__name__}: {exc}")


# ---- per-format headers ---------------------------------------------------------
def _tiff_page(path: str, where: str) -> tuple:
    """(pages, page shape, dtype, axes) of a TIFF file's first series."""
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            series = tif.series[0]
            return series.shape, str(series.dtype), series.axes
    except Exception as exc:  # tifffile raises many kinds on a damaged file
        raise _unreadable(where, path, exc) from exc


def _tiff_layout(path: str, shape, axes: str, where: str, stack: bool) -> tuple:
    """(slices, height, width, channels) of one TIFF file; pages must index z."""
    axes = axes.replace("S", "C")
    if axes in ("YX", "YXC"):
        z = 1
    elif not stack and len(axes) >= 3 and axes[0] in "ZQIT" and axes[1:] in ("YX", "YXC"):
        z, shape = shape[0], shape[1:]
    else:
        what = "a stack slice must be one 2-D page (YX or YXS)" if stack else "supported: pages of YX or YXS"
        raise MagmaError(f"{where}.src: {path} has TIFF axes {axes} (shape {list(shape)}); {what}")
    return int(z), int(shape[0]), int(shape[1]), int(shape[2]) if len(shape) == 3 else 1


def _nifti(path: str, where: str):
    import nibabel

    try:
        return nibabel.load(path)
    except Exception as exc:
        raise _unreadable(where, path, exc) from exc


def _nrrd_header(path: str, where: str) -> tuple:
    """(header, data file, byte offset of raw data or None when it must be decoded whole)."""
    import nrrd

    try:
        with open(path, "rb") as fh:
            header = nrrd.read_header(fh)
            offset = fh.tell()
    except Exception as exc:
        raise _unreadable(where, path, exc) from exc
    datafile = header.get("data file", header.get("datafile"))
    if datafile is not None:
        datafile = datafile if os.path.isabs(datafile) else os.path.join(os.path.dirname(path), datafile)
        offset = 0
    else:
        datafile = path
    skip_lines = header.get("line skip", header.get("lineskip", 0))
    skip = header.get("byte skip", header.get("byteskip", 0))
    if header.get("encoding") != "raw" or skip_lines:
        return header, datafile, None
    if skip == -1:
        nbytes = int(np.prod(header["sizes"])) * _nrrd_dtype(header).itemsize
        return header, datafile, os.path.getsize(datafile) - nbytes
    return header, datafile, offset + int(skip)


def _nrrd_dtype(header) -> np.dtype:
    from nrrd.reader import _determine_datatype  # pynrrd's own type/endian table

    return _determine_datatype(header)


def _nrrd_axes(header, path: str, where: str) -> str:
    sizes = list(header["sizes"])
    if len(sizes) == 3:
        return "xyz"
    kinds = [str(k).lower() for k in header.get("kinds", [])]
    if len(sizes) == 4 and kinds and kinds[0] not in ("domain", "space", "time"):
        return "cxyz"  # NRRD puts per-voxel vectors (RGB, ...) on the fastest axis
    raise MagmaError(f"{where}.src: {path} has NRRD sizes {sizes} (kinds {kinds or '?'}); expected 3 space axes"
                     " and at most one leading vector axis")


def _units_to_nm(units, where: str) -> float:
    factors = {NM_PER_UNIT.get(str(u).lower()) for u in units}
    if len(factors) == 1 and None not in factors:
        return factors.pop()
    return 1.0  # unknown units: the numbers are taken as nanometres (documented)


def _nm(value, scale: float, digits: int) -> float:
    """A header length in nm, rounded to the header's precision (float32 0.004 mm is 4000 nm, not 4000.0002)."""
    return float(f"{float(value) * scale:.{digits}g}")


def _hdf5_dataset(path: str, dataset: str | None, where: str) -> tuple:
    import h5py

    try:
        f = h5py.File(path, "r")
    except Exception as exc:
        raise _unreadable(where, path, exc) from exc
    with f:
        if dataset is None:
            names = []
            f.visititems(lambda name, obj: names.append(name) if isinstance(obj, h5py.Dataset) else None)
            if len(names) != 1:
                raise MagmaError(f"{where}.dataset: {path} holds {len(names)} datasets ({', '.join(names[:10])});"
                                 " name the one to ingest")
            dataset = names[0]
        obj = f.get(dataset)
        if not isinstance(obj, h5py.Dataset):
            raise MagmaError(f"{where}.dataset: {path} has no dataset '{dataset}'")
        return dataset, tuple(int(s) for s in obj.shape), str(obj.dtype)


def _axes(axes: str | None, ndim: int, path: str, where: str) -> str:
    if axes is None:
        axes = "xyz" if ndim == 3 else "xyzc"
    if len(axes) != ndim:
        raise MagmaError(f"{where}.axes: '{axes}' names {len(axes)} axes but {path} has {ndim} dimensions")
    return axes


def describe(p: dict, where: str) -> dict:
    """What the step will ingest, from headers only (the first slice of a stack):
    {format, files, shape [x, y, z], channels, dtype, resolution (from the file or None), ...}.
    Everything in it is plain data: it travels to the jobs in their parameters."""
    files = find_files(p["src"], where)
    fmt = p["format"]
    if fmt == "auto":
        # one lookup per distinct extension, not per slice (".nii.gz" needs its last 7 characters)
        tails = {f[-7:].lower() if f.lower().endswith(".gz") else f[f.rfind("."):].lower() for f in files}
        kinds = {format_of(t) for t in tails}
        if len(kinds) != 1 or None in kinds:
            raise MagmaError(
                f"{where}.format: cannot tell the format of {p['src']} from its file name(s)"
                f" ({', '.join(sorted(os.path.basename(f) for f in files)[:3])}); set format to one of {', '.join(EXTENSIONS)}"
            )
        fmt = kinds.pop()
    if fmt != "tiff" and len(files) != 1:
        raise MagmaError(f"{where}.src: {p['src']} matches {len(files)} files; only TIFF stacks span several files")
    if p["axes"] is not None and fmt not in ("npy", "hdf5"):
        raise MagmaError(f"{where}.axes: only .npy and HDF5 inputs take axes; {fmt} files carry their own order")
    if p["dataset"] is not None and fmt != "hdf5":
        raise MagmaError(f"{where}.dataset: only HDF5 inputs have datasets; {p['src']} is {fmt}")
    desc = {"format": fmt, "src": p["src"], "resolution": None}

    if fmt == "tiff":
        stack = len(files) > 1
        files = number_slices(files, where) if stack else files
        shape, dtype, axes = _tiff_page(files[0], where)
        z, h, w, c = _tiff_layout(files[0], shape, axes, where, stack)
        desc.update(files=len(files), first=files[0], last=files[-1], stack=stack,
                    shape=[w, h, len(files) if stack else z], channels=c, dtype=dtype)
    elif fmt == "npy":
        try:
            arr = np.load(files[0], mmap_mode="r")
        except Exception as exc:
            raise _unreadable(where, files[0], exc) from exc
        axes = _axes(p["axes"], arr.ndim, files[0], where)
        desc.update(file=files[0], axes=axes, **_geometry(arr.shape, axes), dtype=str(arr.dtype))
    elif fmt == "hdf5":
        dataset, shape, dtype = _hdf5_dataset(files[0], p["dataset"], where)
        axes = _axes(p["axes"], len(shape), files[0], where)
        desc.update(file=files[0], dataset=dataset, axes=axes, **_geometry(shape, axes), dtype=dtype)
    elif fmt == "nifti":
        img = _nifti(files[0], where)
        shape = img.shape
        if len(shape) == 5 and shape[3] == 1:  # NIfTI keeps vectors on the 5th axis
            shape = shape[:3] + shape[4:]
        if len(shape) not in (3, 4):
            raise MagmaError(f"{where}.src: {files[0]} has {len(shape)} dimensions {list(shape)}; expected 3 or 4")
        try:
            dtype = str(img.dataobj[(slice(0, 1),) * len(img.shape)].dtype)  # scaling may turn ints into floats
        except Exception as exc:
            raise _unreadable(where, files[0], exc) from exc
        unit = img.header.get_xyzt_units()[0]
        scale = _units_to_nm([unit], where)
        desc.update(file=files[0], axes="xyz" if len(shape) == 3 else "xyzc", **_geometry(shape, "xyz" if len(shape) == 3 else "xyzc"),
                    dtype=dtype, resolution=[_nm(z, scale, 7) for z in img.header.get_zooms()[:3]])
    else:  # nrrd
        header, datafile, offset = _nrrd_header(files[0], where)
        axes = _nrrd_axes(header, files[0], where)
        sizes = [int(s) for s in header["sizes"]]
        space = [i for i, a in enumerate(axes) if a != "c"]
        spacing = None
        if "spacings" in header:
            spacing = [float(header["spacings"][i]) for i in space]
        elif "space directions" in header:
            dirs = header["space directions"]
            spacing = [float(np.linalg.norm(dirs[i])) for i in space]
        if spacing is not None and not all(np.isfinite(spacing)):
            spacing = None
        scale = _units_to_nm(header.get("space units", ["?"]), where)
        desc.update(file=files[0], datafile=datafile, offset=offset, axes=axes, **_geometry(sizes, axes),
                    dtype=str(_nrrd_dtype(header)),
                    resolution=None if spacing is None else [_nm(s, scale, 12) for s in spacing])
    return desc


def _geometry(shape, axes: str) -> dict:
    return {"shape": [int(shape[axes.index(a)]) for a in "xyz"],
            "channels": int(shape[axes.index("c")]) if "c" in axes else 1}


# ---- every header, once -----------------------------------------------------------
def check_all(desc: dict, where: str) -> None:
    """Every slice of a TIFF stack has the first slice's shape and type (other formats
    are one file, checked when described). Raises naming the first bad file."""
    if desc["format"] != "tiff" or not desc["stack"]:
        return
    files = stack_files(desc["src"], where)
    if len(files) != desc["files"]:
        raise MagmaError(f"{where}.src: {desc['src']} now matches {len(files)} files, not {desc['files']}")
    want = (desc["shape"][1], desc["shape"][0], desc["channels"])
    for f in files:
        shape, dtype, axes = _tiff_page(f, where)
        _, h, w, c = _tiff_layout(f, shape, axes, where, stack=True)
        if (h, w, c) != want or dtype != desc["dtype"]:
            raise MagmaError(
                f"{where}.src: {f} is a {w}x{h} {dtype} slice with {c} channel(s), but {desc['first']} is"
                f" {want[1]}x{want[0]} {desc['dtype']} with {want[2]}; every slice must match"
            )


@functools.lru_cache(maxsize=4)
def stack_files(src: str, where: str) -> list:
    """A stack's slices in order (listed once per worker process)."""
    return number_slices(find_files(src, where), where)


# ---- reading one box --------------------------------------------------------------
def read(desc: dict, lo, hi, where: str = "create") -> np.ndarray:
    """Voxels [lo, hi) (file coordinates, x y z) as an x, y, z, channel array."""
    (x0, y0, z0), (x1, y1, z1) = lo, hi
    fmt = desc["format"]
    if fmt == "tiff":
        return _read_tiff(desc, x0, x1, y0, y1, z0, z1, where)
    want = {"x": slice(x0, x1), "y": slice(y0, y1), "z": slice(z0, z1), "c": slice(None)}
    axes = desc["axes"]
    key = tuple(want[a] for a in axes)
    if fmt == "npy":
        block = np.asarray(np.load(desc["file"], mmap_mode="r")[key])
    elif fmt == "hdf5":
        import h5py

        with h5py.File(desc["file"], "r") as f:
            block = f[desc["dataset"]][key]
    elif fmt == "nifti":
        img = _nifti(desc["file"], where)
        full = key if len(img.shape) == len(axes) else key[:3] + (slice(None),) + key[3:]
        block = np.asarray(img.dataobj[full]).reshape([s.stop - s.start if a != "c" else desc["channels"]
                                                       for a, s in zip(axes, key)])
    else:
        block = _nrrd_array(desc)[key]
    order = [axes.index(a) for a in "xyz"] + ([axes.index("c")] if "c" in axes else [])
    block = np.transpose(np.asarray(block), order)
    return block if block.ndim == 4 else block[..., np.newaxis]


def _nrrd_array(desc: dict):
    header_dtype = np.dtype(desc["dtype"])
    shape = [desc["shape"]["xyz".index(a)] if a != "c" else desc["channels"] for a in desc["axes"]]
    if desc["offset"] is not None:  # raw: map the bytes, read only the box
        return np.memmap(desc["datafile"], dtype=header_dtype, mode="r", offset=desc["offset"], shape=tuple(shape), order="F")
    import nrrd

    data, _ = nrrd.read(desc["file"], index_order="F")  # compressed: decoded whole (documented)
    return data


def _read_tiff(desc: dict, x0, x1, y0, y1, z0, z1, where: str) -> np.ndarray:
    import tifffile

    out = np.empty((x1 - x0, y1 - y0, z1 - z0, desc["channels"]), dtype=desc["dtype"])
    if desc["stack"]:
        files = stack_files(desc["src"], where)
        for z in range(z0, z1):
            try:
                page = tifffile.imread(files[z])
            except Exception as exc:
                raise _unreadable(where, files[z], exc) from exc
            if page.shape[:2] != (desc["shape"][1], desc["shape"][0]) or str(page.dtype) != desc["dtype"]:
                raise MagmaError(f"{where}.src: {files[z]} is {page.dtype} {list(page.shape)}, unlike the first slice")
            out[:, :, z - z0] = _xyc(page[y0:y1, x0:x1])
    else:
        try:
            with tifffile.TiffFile(desc["first"]) as tif:
                for z in range(z0, z1):
                    page = tif.series[0].asarray(key=z) if desc["shape"][2] > 1 else tif.series[0].asarray()
                    out[:, :, z - z0] = _xyc(page[y0:y1, x0:x1])
        except MagmaError:
            raise
        except Exception as exc:
            raise _unreadable(where, desc["first"], exc) from exc
    return out


def _xyc(page: np.ndarray) -> np.ndarray:
    """A (y, x[, c]) page as (x, y, c)."""
    page = page if page.ndim == 3 else page[..., np.newaxis]
    return np.transpose(page, (1, 0, 2))
