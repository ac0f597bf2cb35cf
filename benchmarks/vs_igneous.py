"""magma against Igneous, side by side, on the same synthetic EM dataset.

    python benchmarks/vs_igneous.py [--scale 1] [--cores 1,2] [--ops all] [--work DIR]

1. Makes (once per scale, kept under --work) an EM-like uint8 image and a dense
   uint64 neuron-like segmentation (benchmarks/synthetic.py): 2048 x 2048 x 256
   voxels (1.07 gigavoxels) at --scale 1; --scale s scales x and y by sqrt(s).
2. Uses Igneous from --igneous-venv (installs igneous-pipeline there if missing).
3. For every op and core count, runs the op on a fresh copy of its input layers,
   once with Igneous's CLI (`igneous -p N image ...`) and once with magma
   (`snakemake --cores N`), each as a whole shell command, measuring wall time,
   CPU seconds (user + sys of the whole process tree), peak memory (PSS summed
   over the process tree, sampled up to 10 times a second, at ~2% of a core) and files written.
4. Checks that both wrote the same arrays (every mip, voxel for voxel).
5. Adds the floors: the library kernel on the whole array in one process, and
   CloudVolume reading the input and writing the output bytes with no compute.
6. Prints the table and writes it to benchmarks/results/vs_igneous-scale<s>.md.

Runs unattended; a failing command is recorded in the table, not fatal.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import psutil
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import synthetic  # noqa: E402

FULL = (2048, 2048, 256)
CHUNK = (128, 128, 64)
RESOLUTION = (8, 8, 40)
SEED = 7
IGNEOUS_VERSION = "4.37.0"
LAYERS = ("image", "seg", "copy", "eq", "ccl", "aff", "quant", "ws", "agglo", "reordered")
QUANTIZE_SHAPE = (512, 512, 64)   # both tools' quantize tasks (Igneous has no default)
REMAP_SHAPE = (2048, 2048, 64)    # Igneous's remap default task shape


# ---- dataset --------------------------------------------------------------------
def dataset_size(scale: float) -> tuple:
    side = lambda s: max(256, int(round(s * np.sqrt(scale) / 256)) * 256)  # noqa: E731
    return side(FULL[0]), side(FULL[1]), FULL[2]


def _gen_block(args):
    from cloudvolume import CloudVolume

    coarse_path, image, seg, lo, hi = args
    coarse = np.load(coarse_path, mmap_mode="r")
    img, lab = synthetic.make_block(coarse, lo, hi, SEED)
    box = tuple(slice(a, b) for a, b in zip(lo, hi))
    CloudVolume(image, progress=False)[box] = img
    CloudVolume(seg, progress=False)[box] = lab
    return int(np.prod(img.shape))


def make_dataset(work: Path, scale: float, cores: int) -> dict:
    from cloudvolume import CloudVolume

    size = dataset_size(scale)
    folder = work / f"data-{size[0]}x{size[1]}x{size[2]}"
    paths = {"image": f"file://{folder}/image", "seg": f"file://{folder}/seg"}
    if (folder / "done.json").exists():
        return {"size": size, "paths": paths, "folder": folder}
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    t0 = time.time()
    for name, dtype, layer_type, enc in (("image", "uint8", "image", "raw"),
                                         ("seg", "uint64", "segmentation", "compressed_segmentation")):
        info = CloudVolume.create_new_info(1, layer_type, dtype, enc, list(RESOLUTION), [0, 0, 0], list(size),
                                           chunk_size=list(CHUNK))
        CloudVolume(paths[name], info=info).commit_info()
    coarse_path = folder / "coarse.npy"
    np.save(coarse_path, synthetic.coarse_labels(size, SEED))
    jobs = [(str(coarse_path), paths["image"], paths["seg"], lo, hi) for lo, hi in synthetic.blocks(size)]
    done = 0
    with get_context("spawn").Pool(cores) as pool:
        for n in pool.imap_unordered(_gen_block, jobs):
            done += n
            log(f"  dataset: {done / np.prod(size):.0%}")
    coarse_path.unlink()
    (folder / "done.json").write_text(json.dumps({"size": size, "seconds": time.time() - t0}))
    log(f"dataset {size} made in {time.time() - t0:.0f} s")
    return {"size": size, "paths": paths, "folder": folder}


# ---- derived inputs (made once per scale, next to the dataset) ---------------------
def _aff_block(args):
    """3-channel float32 affinities of one block: high where a voxel and its lower
    neighbour along x / y / z share a nonzero label, low across boundaries, plus noise."""
    from cloudvolume import CloudVolume

    seg, aff, lo, hi = args
    src = CloudVolume(seg, progress=False)
    pad = [max(0, a - 1) for a in lo]
    lab = src[pad[0]:hi[0], pad[1]:hi[1], pad[2]:hi[2]][..., 0]
    core = lab[tuple(slice(a - p, None) for a, p in zip(lo, pad))]
    out = np.empty(core.shape + (3,), dtype=np.float32)
    rng = np.random.default_rng([SEED, *lo])
    for c in range(3):
        lower = np.roll(lab, 1, axis=c)[tuple(slice(a - p, None) for a, p in zip(lo, pad))]
        same = (core == lower) & (core != 0)
        if lo[c] == 0:  # no neighbour below the volume's first plane
            idx = [slice(None)] * 3
            idx[c] = slice(0, 1)
            same[tuple(idx)] = False
        noise = rng.normal(0, 0.05, core.shape).astype(np.float32)
        out[..., c] = np.clip(np.where(same, np.float32(0.9), np.float32(0.1)) + noise, 0, 1)
    CloudVolume(aff, progress=False)[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]] = out
    return int(core.size)


def _unique_block(args):
    import fastremap
    from cloudvolume import CloudVolume

    seg, lo, hi = args
    return fastremap.unique(CloudVolume(seg, progress=False)[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]])


def _renumber_block(args):
    import fastremap
    from cloudvolume import CloudVolume

    seg, ws, table, lo, hi = args
    old, new = np.load(table)
    lab = CloudVolume(seg, progress=False)[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
    out = fastremap.remap(lab, dict(zip(old.tolist(), new.tolist())), preserve_missing_labels=False)
    CloudVolume(ws, progress=False)[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]] = out
    return int(lab.size)


def make_derived(data: dict, name: str, cores: int) -> None:
    """Inputs some ops need besides the image and segmentation: `aff`, float32
    affinities (3 channels) for quantize; `ws`, the segmentation renumbered 1..N (a
    watershed-like layer whose ids index a dense remap array, as Igneous's remap
    needs) with `agglomeration.npy`, merging every three consecutive ids."""
    from cloudvolume import CloudVolume

    folder = data["folder"]
    done = folder / f"{name}.done"
    if name not in ("aff", "ws") or done.exists():
        return
    size, seg = data["size"], data["paths"]["seg"]
    path = f"file://{folder}/{name}"
    shutil.rmtree(folder / name, ignore_errors=True)
    t0 = time.time()
    boxes = list(synthetic.blocks(size))
    with get_context("spawn").Pool(cores) as pool:
        if name == "aff":
            info = CloudVolume.create_new_info(3, "image", "float32", "raw", list(RESOLUTION), [0, 0, 0],
                                               list(size), chunk_size=list(CHUNK))
            CloudVolume(path, info=info).commit_info()
            list(pool.imap_unordered(_aff_block, [(seg, path, lo, hi) for lo, hi in boxes]))
        else:
            labels = np.unique(np.concatenate(pool.map(_unique_block, [(seg, lo, hi) for lo, hi in boxes])))
            labels = labels[labels != 0]
            table = folder / "ws-table.npy"
            np.save(table, np.stack([np.r_[0, labels], np.arange(len(labels) + 1)]).astype(np.uint64))
            info = json.loads(json.dumps(CloudVolume(seg, progress=False).info))
            CloudVolume(path, info=info).commit_info()
            list(pool.imap_unordered(_renumber_block, [(seg, path, str(table), lo, hi) for lo, hi in boxes]))
            table.unlink()
            ids = np.arange(len(labels) + 1, dtype=np.uint64)
            dense = (ids + 2) // 3  # 1,2,3 -> 1; 4,5,6 -> 2; ...; 0 stays 0
            np.save(folder / "agglomeration.npy", dense)  # Igneous: value at index old
            np.save(folder / "agglomeration-pairs.npy", np.stack([ids, dense], axis=1))  # magma: [old, new] rows
    done.write_text(json.dumps({"seconds": time.time() - t0}))
    log(f"{name} made in {time.time() - t0:.0f} s")


# ---- measuring a command ----------------------------------------------------------
TIMEOUT = 4 * 3600  # seconds one command may take (--timeout)


def _kill_tree(proc) -> None:
    """End a timed-out command and everything it started (children first)."""
    try:
        tree = proc.children(recursive=True)
    except psutil.Error:
        tree = []
    for p in reversed(tree):
        try:
            p.kill()
        except psutil.Error:
            pass
    proc.kill()


# The memory sampler's own CPU, as a share of one core. Reading PSS walks every page table
# of every process in the tree: at a fixed 0.1 s it took 27 s of CPU (23 s in the kernel)
# during a 2-core mesh run of 125 s, a fifth of a core taken from the command measured.
SAMPLE_SHARE = 0.02


def measure(argv: list, logfile: Path, cwd: Path, env: dict | None = None) -> dict:
    """Run `argv` to completion: wall s, CPU s of the whole tree, peak summed PSS.
    Samples at least every second and at most 10 times a second, spaced so that sampling
    costs about SAMPLE_SHARE of one core. A command still running after TIMEOUT seconds is
    killed and counts as failed."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    with open(logfile, "w") as out:
        proc = psutil.Popen(argv, stdout=out, stderr=subprocess.STDOUT, cwd=cwd, env=env)
        peak = 0
        while proc.poll() is None:
            if time.perf_counter() - t0 > TIMEOUT:
                _kill_tree(proc)
                proc.wait()
                break
            spent = time.process_time()  # user + sys of this process: the sampling
            try:
                tree = [proc] + proc.children(recursive=True)
                peak = max(peak, sum(_pss(p) for p in tree))
            except psutil.Error:
                pass
            pause = min(1.0, max(0.1, (time.process_time() - spent) / SAMPLE_SHARE))
            try:
                proc.wait(timeout=pause)  # returns as soon as the command ends: no wall added
            except (psutil.TimeoutExpired, subprocess.TimeoutExpired):
                pass
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"wall": wall, "cpu": cpu, "rss": peak, "rc": proc.returncode}


def _pss(p) -> int:
    """A process's proportional set size: pages shared between forked processes (both tools
    fork their workers) count once over the tree, where summed RSS counts them per process."""
    try:
        return p.memory_full_info().pss
    except (psutil.Error, AttributeError):
        return 0


def count_files(folder: Path) -> int:
    return sum(len(files) for _, _, files in os.walk(folder))


# ---- the ops ---------------------------------------------------------------------
# Each op: the input layers it needs, the Igneous commands, the magma step, and the
# layers (and from which mip) whose arrays must agree.
def ops(num_mips: int) -> dict:
    return {
        "downsample image": {
            "inputs": ["image"], "compare": [("image", 1)],
            "igneous": lambda p, n: [["image", "downsample", p["image"], "--mip", "0", "--num-mips", str(num_mips)]],
            "magma": {"op": "downsample", "layer": "image", "num_mips": num_mips},
        },
        "downsample seg": {
            "inputs": ["seg"], "compare": [("seg", 1)],
            "igneous": lambda p, n: [["image", "downsample", p["seg"], "--mip", "0", "--num-mips", str(num_mips)]],
            "magma": {"op": "downsample", "layer": "seg", "num_mips": num_mips},
        },
        "transfer image": {
            "inputs": ["image"], "compare": [("copy", 0)],
            "igneous": lambda p, n: [["image", "xfer", p["image"], p["copy"], "--chunk-size", "64,64,64"]],
            "magma": {"op": "transfer", "src": "image", "dest": "copy", "chunk_size": [64, 64, 64]},
        },
        "contrast": {
            "inputs": ["image"], "compare": [("eq", 0)],
            "igneous": lambda p, n: [["image", "contrast", "histogram", p["image"]],
                                     ["image", "contrast", "equalize", p["image"], p["eq"]]],
            "magma": {"op": "contrast", "src": "image", "dest": "eq"},
        },
        "roi": {
            "inputs": ["image"], "compare": [("image", "rois")], "floors": False,
            "igneous": lambda p, n: [["image", "roi", p["image"]]],
            "magma": {"op": "roi", "layer": "image"},
        },
        "ccl": {
            "inputs": ["seg"], "compare": [("ccl", "partition")],
            "igneous": lambda p, n: [["image", "ccl", "auto", p["seg"], p["ccl"]]],
            "magma": {"op": "ccl", "src": "seg", "dest": "ccl"},
        },
        "voxel_counts": {
            "inputs": ["seg"], "compare": [("seg", "voxel_counts")],
            "igneous": lambda p, n: [["image", "voxels", "count", p["seg"]], ["image", "voxels", "sum", p["seg"]]],
            "magma": {"op": "voxel_counts", "layer": "seg"},
        },
        "mesh": {
            "inputs": ["seg"], "compare": [("seg", "meshes")],
            "igneous": lambda p, n: [["mesh", "forge", p["seg"]], ["mesh", "merge", p["seg"]]],
            "magma": {"op": "mesh", "layer": "seg"},
        },
        "skeleton": {
            "inputs": ["seg"], "compare": [("seg", "skeletons")],
            "igneous": lambda p, n: [["skeleton", "forge", p["seg"]], ["skeleton", "merge", p["seg"]]],
            "magma": {"op": "skeleton", "layer": "seg"},
        },
        # Igneous's CLI has no quantize or remap command: its Python task creators run in a
        # LocalTaskQueue, as its CLI runs every other op (`igneous -p N` does the same)
        "quantize": {
            # no floors: the whole 3-channel float array (12.9 GB at --scale 1) and its copies
            # would not fit in the floor process beside the page cache
            "inputs": [], "shared": ["aff"], "compare": [("quant", 0)], "floors": False,
            "igneous_py": lambda p, n: (
                f"tasks = tc.create_quantize_tasks({p['aff']!r}, {p['quant']!r}, shape={QUANTIZE_SHAPE!r}, mip=0)\n"
                f"LocalTaskQueue(parallel={n}, progress=False).insert_all(tasks)\n"),
            "magma": {"op": "quantize", "src": "aff", "dest": "quant", "shape": list(QUANTIZE_SHAPE)},
        },
        "remap": {
            "inputs": [], "shared": ["ws"], "compare": [("agglo", 0)],
            "igneous_py": lambda p, n: (
                "shutil.rmtree('/tmp/WatershedRemapTask', ignore_errors=True)  # its cache of the map file\n"
                "import igneous.downsample_scales as ds, igneous.task_creation.obsolete as ob\n"
                "import igneous.tasks.image.obsolete as tob, igneous.tasks.image.image as timg\n"
                "# two names Igneous 4.37.0's (obsolete) remap modules use but do not import;\n"
                "# supplied here, before the queue forks its workers\n"
                "ob.downsample_scales, tob.downsample_and_upload = ds, timg.downsample_and_upload\n"
                f"CloudVolume({p['agglo']!r}, info=CloudVolume({p['ws']!r}).info).commit_info()\n"
                f"tasks = tc.create_watershed_remap_tasks({p['map'] + '/agglomeration.npy'!r}, {p['ws']!r}, "
                f"{p['agglo']!r}, shape={REMAP_SHAPE!r})\n"
                "tasks.on_finish = lambda: None  # its provenance record fails (names it lacks, numpy ints)\n"
                "# its tasks build one mip more than its info declares (mips from the 64^3 chunks of mip 1,\n"
                "# scales from the 128^3 of mip 0): declare that one too, else every task fails at its top\n"
                f"ds.add_scales({p['agglo']!r}, len(CloudVolume({p['agglo']!r}).info['scales']) - 1, 1,"
                " preserve_chunk_size=False).commit_info()\n"
                f"LocalTaskQueue(parallel={n}, progress=False).insert_all(tasks)\n"),
            "magma": lambda p: {"op": "remap", "src": "ws", "dest": "agglo", "shape": list(REMAP_SHAPE),
                                "mapping_file": p["map"].removeprefix("file://") + "/agglomeration-pairs.npy"},
        },
        "reorder": {
            "inputs": ["image"], "compare": [("reordered", 0)], "floors": False,
            "igneous": lambda p, n: [["image", "reorder", p["image"], p["reordered"],
                                      "--mapping-file", p["reorder_json"]]],
            "magma": lambda p: {"op": "reorder", "src": "image", "dest": "reordered",
                                "mapping_file": p["reorder_json"]},
        },
        # sharded output: Igneous merges each shard in one task; the floors are those of the
        # unsharded rows (same kernel), so they are not measured again
        "mesh sharded": {
            "inputs": ["seg"], "compare": [("seg", "meshes")], "floors": False,
            "igneous": lambda p, n: [["mesh", "forge", p["seg"], "--sharded"],
                                     ["mesh", "merge-sharded", p["seg"], "--nlod", "1"]],
            "magma": {"op": "mesh", "layer": "seg", "sharded": True, "nlod": 1},
        },
        "skeleton sharded": {
            "inputs": ["seg"], "compare": [("seg", "skeletons")], "floors": False,
            "igneous": lambda p, n: [["skeleton", "forge", p["seg"], "--sharded"],
                                     ["skeleton", "merge-sharded", p["seg"]]],
            "magma": {"op": "skeleton", "layer": "seg", "sharded": True},
        },
    }


def run_paths(folder: Path) -> dict:
    return {name: f"file://{folder}/{name}" for name in LAYERS}


def fresh_copy(data: dict, op: dict, folder: Path) -> dict:
    """Copies of the op's input layers (links to the read-only ones) and the paths both
    tools get: every layer, the dataset folder (`map`) and a z-reversing reorder mapping."""
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    for name in op["inputs"]:
        shutil.copytree(data["folder"] / name, folder / name)
    for name in op.get("shared", []):
        (folder / name).symlink_to(data["folder"] / name)
    nz = int(data["size"][2])
    (folder / "reorder.json").write_text(json.dumps({str(z): nz - 1 - z for z in range(nz)}))
    return dict(run_paths(folder), map=f"file://{data['folder']}", reorder_json=str(folder / "reorder.json"))


IGNEOUS_PY = ("import shutil\nfrom cloudvolume import CloudVolume\nfrom taskqueue import LocalTaskQueue\n"
              "import igneous.task_creation as tc\n")


def igneous_commands(igneous: str, op: dict, paths: dict, cores: int) -> list:
    if "igneous_py" in op:
        return [[str(Path(igneous).parent / "python"), "-c", IGNEOUS_PY + op["igneous_py"](paths, cores)]]
    return [[igneous, "-p", str(cores), *args] for args in op["igneous"](paths, cores)]


def run_igneous(igneous: str, op: dict, paths: dict, cores: int, folder: Path) -> dict:
    total = {"wall": 0.0, "cpu": 0.0, "rss": 0, "rc": 0}
    for i, argv in enumerate(igneous_commands(igneous, op, paths, cores)):
        m = measure(argv, folder / f"igneous-{i}.log", folder)
        total = {"wall": total["wall"] + m["wall"], "cpu": total["cpu"] + m["cpu"],
                 "rss": max(total["rss"], m["rss"]), "rc": total["rc"] or m["rc"]}
    return total


def run_magma(op: dict, paths: dict, cores: int, folder: Path) -> dict:
    step = op["magma"](paths) if callable(op["magma"]) else dict(op["magma"])
    cfg = {"layers": {k: paths[k] for k in LAYERS}, "steps": {"bench": step},
           "execution": {"threads": cores, "report": False, "run_dir": str(folder / "run")}}
    cfgfile = folder / "magma.yaml"
    cfgfile.write_text(yaml.safe_dump(cfg, sort_keys=False))
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"),
               PATH=f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}")
    argv = [sys.executable, "-m", "snakemake", "-s", str(ROOT / "workflow" / "Snakefile"), "-d", str(folder),
            "--cores", str(cores), "--configfile", str(cfgfile)]
    t0 = time.time()
    m = measure(argv, folder / "magma.log", folder, env)
    t1 = time.time()
    markers = list((folder / "run" / "markers" / "bench" / "jobs").glob("*/*.json"))
    m["jobs"] = len(markers)
    secs = [json.loads(p.read_text()).get("seconds", 0.0) for p in markers]
    m["task_seconds"] = sum(secs)
    # where the wall time went: a job marker's mtime is when its tasks ended, `seconds` how long they ran
    if markers:
        ends = [p.stat().st_mtime for p in markers]
        first = min(e - s for e, s in zip(ends, secs))
        m["profile"] = {"before_tasks": first - t0, "tasks": max(ends) - first, "after_tasks": t1 - max(ends)}
    m["bookkeeping"] = count_files(folder / "run") + count_files(folder / ".snakemake")
    return m


def data_files(folder: Path, before: int) -> int:
    return sum(count_files(folder / n) for n in LAYERS if (folder / n).exists()) - before


# ---- checking ----------------------------------------------------------------------
def check(a: str, b: str, how) -> str:
    if how == "partition":
        return same_partition(a, b)
    if how == "voxel_counts":
        return same_voxel_counts(a, b)
    if how == "rois":
        return same_rois(a, b)
    if how == "meshes":
        return similar_objects(a, b, "mesh")
    if how == "skeletons":
        return similar_objects(a, b, "skeleton")
    return compare(a, b, how)


def same_rois(a: str, b: str) -> str:
    """The tissue boxes both tools stored in the info (Igneous: scales[0].rois)."""
    from cloudfiles import CloudFiles

    found = []
    for path in (a, b):
        info = CloudFiles(path).get_json("info")
        found.append(sorted(next((s["rois"] for s in info["scales"] if "rois" in s), [])))
    if found[0] == found[1]:
        return f"identical rois ({len(found[0])} boxes)"
    return f"rois differ: {found[0]} vs {found[1]}"


def same_partition(a: str, b: str) -> str:
    """Both labelings split the volume into the same components (ids may differ)."""
    import fastremap
    from cloudvolume import CloudVolume

    va, vb = CloudVolume(a, progress=False), CloudVolume(b, progress=False)
    bounds = va.meta.bounds(0)
    if bounds != vb.meta.bounds(0):
        return f"bounds {bounds} vs {vb.meta.bounds(0)}"
    step = max(1, int(2**27 // max(1, np.prod(bounds.size3()[:2]))))
    pairs = set()
    for z in range(int(bounds.minpt[2]), int(bounds.maxpt[2]), step):
        box = np.s_[:, :, z:min(z + step, int(bounds.maxpt[2]))]
        x, y = va[box][..., 0].ravel(), vb[box][..., 0].ravel()
        # (a, b) label pairs: renumber both sides to small ids, pack each pair into one
        # integer (np.unique(axis=0) on 10^8 rows takes many minutes)
        rx, mx = fastremap.renumber(x, in_place=False)
        ry, my = fastremap.renumber(y, in_place=False)
        keys = fastremap.unique(rx.astype(np.uint64) << np.uint64(32) | ry.astype(np.uint64))
        bx = {v: k for k, v in mx.items()}
        by = {v: k for k, v in my.items()}
        pairs.update((bx[int(k >> 32)], by[int(k & 0xFFFFFFFF)]) for k in keys.tolist())
    na, nb = len({a for a, _ in pairs}), len({b for _, b in pairs})
    if na == nb == len(pairs):
        return f"same partition ({na - 1 if any(a == 0 for a, _ in pairs) else na} components)"
    return f"partitions differ: {na} vs {nb} labels, {len(pairs)} pairs"


def same_voxel_counts(a: str, b: str) -> str:
    from cloudfiles import CloudFiles
    from cloudvolume import CloudVolume
    from mapbuffer import IntMap

    key = CloudVolume(a, progress=False).meta.key(0)
    maps = []
    for path in (a, b):
        raw = CloudFiles(path).get(f"{key}/stats/voxel_counts.im")
        if raw is None:
            return f"no {key}/stats/voxel_counts.im in {path}"
        im = IntMap(raw)
        maps.append({int(k): int(v) for k, v in im.items()})  # im[k] fails on ids >= 2**63
    if maps[0] == maps[1]:
        return f"identical counts ({len(maps[0])} labels)"
    diff = sum(1 for k in set(maps[0]) | set(maps[1]) if maps[0].get(k) != maps[1].get(k))
    return f"{diff} of {len(set(maps[0]) | set(maps[1]))} labels differ"


def object_stats(path: str, kind: str) -> dict:
    """Count, total surface area (um^2) or cable length (um) of every stored mesh/skeleton."""
    from cloudvolume import CloudVolume

    from magma import report

    vol = CloudVolume(path, progress=False)
    src = vol.mesh if kind == "mesh" else vol.skeleton
    folder = vol.info.get("mesh" if kind == "mesh" else "skeletons")
    sharded = "sharding" in (src.meta.info or {})
    labels = report._stored_labels(path, folder, src.reader if sharded else None)
    total = 0.0
    for label in labels:
        legacy = (src.meta.info or {}).get("@type") == "neuroglancer_legacy_mesh"
        obj = src.get(label, fuse=True) if (kind == "mesh" and legacy) else src.get(label)  # multi-LOD: LOD 0
        if isinstance(obj, dict):
            obj = obj.get(label)
        if obj is None:
            continue
        if kind == "mesh":
            v = obj.vertices[obj.faces]
            total += 0.5 * np.linalg.norm(np.cross(v[:, 1] - v[:, 0], v[:, 2] - v[:, 0]), axis=1).sum() / 1e6
        else:
            total += obj.cable_length() / 1000.0
    return {"count": len(labels), "total": total}


PLURAL = {"mesh": "meshes", "skeleton": "skeletons"}


def similar_objects(a: str, b: str, kind: str) -> str:
    try:
        sa, sb = object_stats(a, kind), object_stats(b, kind)
    except Exception as exc:  # a format one side cannot read is a finding, not a crash
        return f"could not read the {PLURAL[kind]}: {exc}"
    unit = "um^2 surface" if kind == "mesh" else "um cable"
    rel = abs(sa["total"] - sb["total"]) / max(sa["total"], 1e-9)
    return (f"{PLURAL[kind]} {sa['count']} vs {sb['count']}, {sa['total']:.0f} vs {sb['total']:.0f} {unit} "
            f"({rel:.1%} apart)")


def compare(a: str, b: str, first_mip: int) -> str:
    """'identical' when every mip from first_mip has the same size and voxels in a and b."""
    from cloudvolume import CloudVolume

    va, vb = CloudVolume(a, progress=False), CloudVolume(b, progress=False)
    na, nb = len(va.info["scales"]), len(vb.info["scales"])
    notes = []
    differ, total = 0, 0
    for mip in range(first_mip, min(na, nb)):
        sa, sb = va.meta.bounds(mip), vb.meta.bounds(mip)
        if sa != sb:
            notes.append(f"mip {mip} bounds {sa} vs {sb}")
            continue
        za, zb = int(sa.minpt[2]), int(sa.maxpt[2])
        step = max(1, int(2**28 // max(1, np.prod(sa.size3()[:2]) * 8)))
        for z in range(za, zb, step):
            box = np.s_[sa.minpt[0]:sa.maxpt[0], sa.minpt[1]:sa.maxpt[1], z:min(z + step, zb)]
            x = CloudVolume(a, mip=mip, progress=False)[box]
            y = CloudVolume(b, mip=mip, progress=False)[box]
            differ += int(np.count_nonzero(x != y))
            total += x.size
    if differ:
        notes.append(f"{differ} of {total} voxels differ ({differ / total:.2%})")
    extra = "" if na == nb else f"; Igneous wrote {na} mips, magma {nb}"
    return ("; ".join(notes) if notes else f"identical (mips {first_mip}-{min(na, nb) - 1})") + extra


# ---- floors ------------------------------------------------------------------------
def _slabs(shape, itemsize, budget=2**31):
    """z ranges whose full-xy slab stays under `budget` bytes (the whole array when it fits)."""
    per_z = int(np.prod(shape[:2])) * itemsize
    step = max(1, budget // max(1, per_z))
    return [(z, min(z + step, shape[2])) for z in range(0, shape[2], step)]


def kernel(name: str, arr: np.ndarray, k: int, resolution) -> list:
    """The op's library kernel on `arr` (x, y, z, 1): [(mip, array to write)]."""
    import tinybrain

    if name.startswith("downsample") or name.startswith("transfer"):
        fn = tinybrain.downsample_segmentation if "seg" in name else tinybrain.downsample_with_averaging
        outs = list(enumerate(fn(np.asfortranarray(arr), (2, 2, 1), num_mips=k) if k else [], start=1))
        return ([(0, arr)] if name.startswith("transfer") else []) + outs
    if name == "contrast":
        out = np.empty_like(arr)
        for z in range(arr.shape[2]):  # a histogram and a lookup table per slice
            hist = np.bincount(arr[:, :, z, 0].ravel(), minlength=256)
            cdf = np.cumsum(hist) / max(1, hist.sum())
            out[:, :, z, 0] = (cdf * 255).astype(np.uint8)[arr[:, :, z, 0]]
        return [(0, out)]
    if name == "quantize":
        q = (arr[..., :1] * np.float32(255.0)).astype(np.uint8)
        return [(0, q)] + list(enumerate(tinybrain.downsample_with_averaging(q, (2, 2, 1), num_mips=k), start=1))
    if name == "remap":
        import fastremap

        ids = fastremap.unique(arr)
        # the benchmark's map; in place, as magma's tasks do (the array is not needed after)
        out = fastremap.remap(arr, dict(zip(ids.tolist(), ((ids + 2) // 3).tolist())), in_place=True)
        return [(0, out)] + list(enumerate(tinybrain.downsample_segmentation(out, (2, 2, 1), num_mips=k), start=1))
    if name == "ccl":
        import cc3d

        return [(0, cc3d.connected_components(arr[..., 0], connectivity=6)[..., None])]
    if name == "voxel_counts":
        import fastremap

        fastremap.unique(arr, return_counts=True)
        return []
    if name == "mesh":
        import zmesh

        mesher = zmesh.Mesher(resolution)
        # closed at the dataset's edges, as both tools mesh by default (7% more faces here)
        mesher.mesh(np.asfortranarray(np.pad(arr[..., 0], 1)))
        for label in mesher.ids():
            mesher.get(label, normals=False, reduction_factor=100, max_error=40)
        return []
    if name == "skeleton":
        import kimimaro

        kimimaro.skeletonize(arr[..., 0], teasar_params={"scale": 4, "const": 10}, dust_threshold=1000,
                             anisotropy=resolution, fix_branching=True, fix_borders=True, parallel=1)
        return []
    raise KeyError(name)


def floors(name: str, src: str, made: str, scratch: Path) -> dict:
    """Seconds of the kernel on the whole array (full-xy slabs when it would exceed
    2 GiB) and of CloudVolume reading the input and writing the output bytes, both
    in this one process with no parallelism (divide by cores for a perfect-scaling bound)."""
    from cloudvolume import CloudVolume

    info = json.loads(json.dumps(CloudVolume(made, progress=False).info))
    k = len(info["scales"]) - 1  # mips above mip 0
    vin = CloudVolume(src, progress=False)
    arr = vin[vin.bounds]
    resolution = tuple(vin.resolution)
    t0, c0 = time.perf_counter(), time.process_time()
    writes = {}
    for z0, z1 in _slabs(arr.shape, arr.dtype.itemsize):
        for mip, out in kernel(name, arr[:, :, z0:z1], k, resolution):
            writes.setdefault(mip, []).append(out)
    kernel_s, kernel_cpu = time.perf_counter() - t0, time.process_time() - c0

    shutil.rmtree(scratch, ignore_errors=True)
    dest = f"file://{scratch}"
    CloudVolume(dest, info=info).commit_info()
    del arr
    t0, c0 = time.perf_counter(), time.process_time()
    vin = CloudVolume(src, progress=False)
    _ = vin[vin.bounds]
    del _  # an 8.6 GB input and its remapped copy would not both fit beside this
    for mip, parts in writes.items():
        out = CloudVolume(dest, mip=mip, progress=False)
        size = out.bounds.size3()
        data = (parts[0] if len(parts) == 1 else np.concatenate(parts, axis=2))[: size[0], : size[1], : size[2]]
        out[out.bounds] = data.astype(out.dtype, copy=False)
    io_s, io_cpu = time.perf_counter() - t0, time.process_time() - c0
    shutil.rmtree(scratch, ignore_errors=True)
    return {"kernel": kernel_s, "kernel_cpu": kernel_cpu, "io": io_s, "io_cpu": io_cpu}


# ---- igneous ----------------------------------------------------------------------
def igneous_exe(venv: Path) -> str:
    exe = venv / "bin" / "igneous"
    if not exe.exists():
        log(f"installing igneous-pipeline {IGNEOUS_VERSION} into {venv}")
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(venv / "bin" / "pip"), "install", "-q", f"igneous-pipeline=={IGNEOUS_VERSION}"],
                       check=True)
    # compresso is optional in Igneous but its `image ccl` default encoding
    if subprocess.run([str(venv / "bin" / "python"), "-c", "import compresso"], capture_output=True).returncode:
        subprocess.run([str(venv / "bin" / "pip"), "install", "-q", "compresso"], check=True)
    return str(exe)


# ---- table -------------------------------------------------------------------------
def fmt_s(x):
    return "-" if x is None else f"{x:.1f}"


def wall_range(run: dict) -> str:
    """' (min-max)' of a row's repeated runs; nothing for a single run."""
    walls = run.get("walls") or []
    return f" ({min(walls):.1f}-{max(walls):.1f})" if len(walls) > 1 else ""


def fmt_mb(x):
    return "-" if not x else f"{x / 1e6:.0f}"


def table(rows: list) -> str:
    head = ["op", "cores", "Igneous wall s", "magma wall s", "ratio", "CPU s (ign / magma)",
            "peak PSS MB (ign / magma)", "files (ign / magma + bookkeeping)", "magma jobs (task s)", "outputs"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        if r.get("floor"):
            lines.append(f"| {r['op']} | {r['cores']} | | {fmt_s(r['wall'])} | | {fmt_s(r.get('cpu'))} | | | | "
                         f"{r['what']} |")
            continue
        i, m = r["igneous"], r["magma"]
        ratio = m["wall"] / i["wall"] if i["rc"] == 0 and m["rc"] == 0 else None
        lines.append(
            f"| {r['op']} | {r['cores']} | {fmt_s(i['wall'])}{wall_range(i)}{'' if i['rc'] == 0 else ' (failed)'} | "
            f"{fmt_s(m['wall'])}{wall_range(m)}{'' if m['rc'] == 0 else ' (failed)'} | {'-' if ratio is None else f'{ratio:.2f}'} | "
            f"{fmt_s(i['cpu'])} / {fmt_s(m['cpu'])} | {fmt_mb(i['rss'])} / {fmt_mb(m['rss'])} | "
            f"{r['files_igneous']} / {r['files_magma']} + {m['bookkeeping']} | {m['jobs']} ({m['task_seconds']:.1f}) | "
            f"{r['check']} |")
    prof = [f"| {r['op']} | {r['cores']} | {fmt_s(r['magma']['profile']['before_tasks'])} | "
            f"{fmt_s(r['magma']['profile']['tasks'])} | {fmt_s(r['magma']['profile']['after_tasks'])} |"
            for r in rows if "magma" in r and "profile" in r["magma"]]
    if prof:
        lines += ["", "Where magma's wall time goes (from the job markers): before the first task starts "
                  "(Snakemake start-up and planning, the setup job, the batch job's interpreter start), the span "
                  "of the tasks, and after the last task (gate, finish job, Snakemake exit).", "",
                  "| op | cores | before tasks s | tasks s | after tasks s |", "|---|---|---|---|---|", *prof]
    return "\n".join(lines)


def _cpu_work() -> float:
    t = time.perf_counter()
    x = 0
    for i in range(20_000_000):
        x += i
    return time.perf_counter() - t


def _memory_work() -> float:
    a = np.ones(64_000_000)  # 512 MB: far beyond any cache, so every pass streams from memory
    t = time.perf_counter()
    for _ in range(16):
        a *= 1.0001
    return time.perf_counter() - t


def _speedup(fn, n: int, rounds: int = 5) -> float:
    """How much more work n processes at once get done than one alone (n = perfect scaling):
    the median of alternating rounds, as a shared VM's speed drifts from second to second."""
    ratios = []
    with get_context("fork").Pool(n) as pool:
        for _ in range(rounds):
            alone = fn()
            together = pool.starmap(fn, [()] * n, chunksize=1)
            ratios.append(n * alone / max(together))
    return float(np.median(ratios))


def scaling_probe(n: int) -> dict:
    """What n cores give on this machine: pure CPU work and memory-streaming work, n processes
    at once against one alone. Memory-heavy kernels (kimimaro, the simplifier, marching cubes
    over large blocks) cannot speed up more than the memory figure allows."""
    return {"cores": n, "cpu": _speedup(_cpu_work, n), "memory": _speedup(_memory_work, n)} if n > 1 else {}


def log(msg: str) -> None:
    print(f"{datetime.datetime.now():%H:%M:%S} {msg}", flush=True)


def probe_text(data: dict) -> str:
    p = data.get("probe")
    if not p:
        return ""
    return (f"This machine's own scaling, {p['cores']} processes at once against one alone: pure CPU work "
            f"{p['cpu']:.2f}x the throughput, memory-streaming work {p['memory']:.2f}x. A kernel's speed-up from "
            "1 to {0} cores falls between the two, by how much of its time it waits on memory.\n\n".format(p["cores"]))


def write_table(rows: list, data: dict, args) -> str:
    """The markdown table (and raw rows as .json) so far: written after every op, so an
    interrupted run keeps what it measured."""
    out = Path(args.out) if args.out else ROOT / "benchmarks" / "results" / f"vs_igneous-scale{args.scale:g}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(rows, indent=1, default=str))
    size = data["size"]
    text = (f"# magma vs Igneous {IGNEOUS_VERSION}\n\n"
            f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, {platform.node()}, "
            f"{psutil.cpu_count()} CPUs, {psutil.virtual_memory().total / 2**30:.0f} GiB RAM. "
            f"Dataset: {size[0]}x{size[1]}x{size[2]} voxels ({np.prod(size) / 1e9:.2f} Gvx, --scale {args.scale}), "
            f"uint8 image (raw, gzip) and uint64 segmentation (compressed_segmentation), chunks "
            f"{'x'.join(map(str, CHUNK))}, on local disk (file://).\n\n"
            "Wall, CPU (user + sys of the process tree) and peak memory (PSS summed over the tree: pages forked processes share count once) per whole command; "
            "ratio = magma wall / Igneous wall" + (
                f"; each tool ran {args.repeat} times per row, alternating with the other, and the row has "
                "the median run (wall range in brackets)" if args.repeat > 1 else "") + ". Files: data files written (magma also writes markers, logs and "
            "Snakemake metadata: the bookkeeping count). magma jobs: Snakemake batch jobs and the sum of their "
            "task time. Floors: the tinybrain/numpy kernel on the whole array in one process, and CloudVolume "
            "reading the input and writing the output bytes with no compute.\n\n" + probe_text(data) + table(rows) + "\n")
    out.write_text(text)
    log(f"table written to {out}")
    return text


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--scale", type=float, default=1.0, help="fraction of the 1.07 gigavoxel dataset (default 1)")
    ap.add_argument("--cores", default="1,2", help="core counts to run (default 1,2)")
    ap.add_argument("--ops", default="all", help="comma-separated op names (default: all)")
    ap.add_argument("--num-mips", type=int, default=3, help="mips the downsample ops build (default 3)")
    ap.add_argument("--work", default=None, help="scratch directory (default: benchmarks/work, git-ignored)")
    ap.add_argument("--igneous-venv", default="/tmp/ign", help="venv with igneous (installed when missing)")
    ap.add_argument("--out", default=None, help="markdown file for the table (default benchmarks/results/...)")
    ap.add_argument("--repeat", type=int, default=1,
                    help="runs of each tool per op and core count, alternating; the table has the median")
    ap.add_argument("--timeout", type=float, default=TIMEOUT, help="seconds one command may run (default 4 h)")
    args = ap.parse_args(argv)
    globals()["TIMEOUT"] = args.timeout

    work = Path(args.work or ROOT / "benchmarks" / "work").resolve()
    work.mkdir(parents=True, exist_ok=True)
    cores_list = [int(c) for c in args.cores.split(",")]
    igneous = igneous_exe(Path(args.igneous_venv))
    data = make_dataset(work, args.scale, max(cores_list))
    data["probe"] = scaling_probe(max(cores_list))
    if data["probe"]:
        log("scaling probe: " + probe_text(data).strip())
    all_ops = ops(args.num_mips)
    chosen = list(all_ops) if args.ops == "all" else [o.strip() for o in args.ops.split(",")]
    rows = []
    for name in chosen:
        op = all_ops[name]
        for layer in op.get("shared", []):
            make_derived(data, layer, max(cores_list))
        slug = name.replace(" ", "_")
        for cores in cores_list:
            log(f"{name}, {cores} core(s)")
            row = {"op": name, "cores": cores}
            runs = {"igneous": [], "magma": []}
            for _ in range(args.repeat):  # alternating, so the machine's drift hits both tools alike
                for tool in ("igneous", "magma"):
                    folder = work / "runs" / f"{slug}-{tool}"
                    paths = fresh_copy(data, op, folder)
                    before = data_files(folder, 0)
                    res = run_igneous(igneous, op, paths, cores, folder) if tool == "igneous" else \
                        run_magma(op, paths, cores, folder)
                    runs[tool].append(res)
                    row[f"files_{tool}"] = data_files(folder, before)
                    log(f"  {tool}: {res['wall']:.1f} s wall, {res['cpu']:.1f} s CPU, rc {res['rc']}")
            for tool, done in runs.items():  # the median run by wall time, and the spread
                row[tool] = dict(sorted(done, key=lambda r: r["wall"])[len(done) // 2],
                                 walls=[r["wall"] for r in done])
            ign, mag = work / "runs" / f"{slug}-igneous", work / "runs" / f"{slug}-magma"
            checks = []
            if row["igneous"]["rc"] == 0 and row["magma"]["rc"] == 0:
                for layer, how in op["compare"]:
                    checks.append(check(f"file://{ign}/{layer}", f"file://{mag}/{layer}", how))
            row["check"] = "; ".join(checks) or f"not compared (a run failed; logs in {work / 'logs'})"
            rows.append(row)
            if row["magma"]["rc"] == 0 and cores == cores_list[-1] and op.get("floors", True):
                layer, _ = op["compare"][0]
                src = run_paths(mag)[(op["inputs"] + op.get("shared", []))[0]]
                fl = floors(name, src, f"file://{mag}/{layer}", work / "floor")
                rows.append({"floor": True, "op": name, "cores": 1, "wall": fl["kernel"], "cpu": fl["kernel_cpu"],
                             "what": "floor: library kernel on the whole array, one process"})
                rows.append({"floor": True, "op": name, "cores": 1, "wall": fl["io"], "cpu": fl["io_cpu"],
                             "what": "floor: CloudVolume read + write of the same bytes, one process"})
        for tool in ("igneous", "magma"):  # keep the command logs, drop the data
            folder = work / "runs" / f"{slug}-{tool}"
            logs = work / "logs" / f"{slug}-{tool}"
            logs.mkdir(parents=True, exist_ok=True)
            for f in folder.glob("*.log"):
                shutil.copy(f, logs / f.name)
            shutil.rmtree(folder, ignore_errors=True)
        write_table(rows, data, args)

    text = write_table(rows, data, args)
    print("\n" + text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
