"""ccl: the output partition equals cc3d's 6-connected labelling of the whole array in memory.

Real snakemake runs on small layers cut into many tasks, on data whose components
cross many task boundaries: a thresholded smooth-noise image (near percolation, so
one component winds through most tasks), an image binarized between two float
thresholds, a blocky segmentation whose equal labels touch across tasks, and
global dust. Ids must be 1..N with no gaps.
"""
import numpy as np
import pytest
import scipy.ndimage as ndi
import yaml
from cloudfiles import CloudFiles
from cloudvolume import CloudVolume

import cc3d
import tinybrain
from conftest import make_layer, read, seg_data, snakemake, write_config
from magma import workflow
from magma.errors import MagmaError

SHAPE = (128, 96, 40)
CHUNK = (16, 16, 8)
TASK = [32, 32, 16]  # 4 x 3 x 3 = 36 tasks


def smooth_image(shape, seed, dtype=np.uint8):
    rng = np.random.default_rng(seed)
    arr = ndi.uniform_filter(rng.random(shape), 5)
    arr = (arr - arr.min()) / (arr.max() - arr.min())
    return (arr * 255).astype(np.uint8) if dtype == np.uint8 else arr.astype(dtype)


def bands(shape, seed):
    """A segmentation of intensity bands of a smooth field: equal labels in many separate
    regions, different labels touching, large 64-bit ids, background."""
    ids = np.array([0, 7, 2**40 + 3, 2**63 + 11, 99], dtype=np.uint64)
    return ids[smooth_image(shape, seed) // 52]


STEPS = {
    "thr": dict(src="img", dest="thr_out", threshold_gte=140, dust=20),
    "band": dict(src="fimg", dest="band_out", threshold_gte=0.35, threshold_lte=0.6,
                 encoding="crackle", chunk_size=[32, 32, 16], clean=False),
    "seg": dict(src="seg", dest="seg_out"),
}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("ccl")
    data = {"img": smooth_image(SHAPE, 1), "fimg": smooth_image(SHAPE, 2, np.float32), "seg": bands(SHAPE, 3)}
    layers = {n: make_layer(root / n, a, "segmentation" if n == "seg" else "image", chunk=CHUNK)
              for n, a in data.items()}
    layers.update({s["dest"]: f"file://{root / s['dest']}" for s in STEPS.values()})
    cfg = {"layers": layers,
           "steps": {**{n: dict(op="ccl", shape=TASK, **p) for n, p in STEPS.items()},
                     # a later step on a ccl output: planned before the output's type is narrowed
                     "seg_pyramid": dict(op="downsample", layer="seg_out", num_mips=1)},
           "execution": {"tasks_per_job": 64, "steps": {"thr": {"tasks_per_job": 10}}}}
    cfgfile = write_config(root / "ccl.yaml", cfg)
    work = root / "work"
    work.mkdir()
    snakemake(work, cfgfile)
    return root, data, layers, workflow.plan(yaml.safe_load(cfgfile.read_text())), (work, cfgfile)


def reference(data, p):
    src = data[p["src"]]
    if "threshold_gte" in p or "threshold_lte" in p:
        src = (src >= p.get("threshold_gte", -np.inf)) & (src <= p.get("threshold_lte", np.inf))
    labels = cc3d.connected_components(src, connectivity=6)
    if p.get("dust"):
        labels = cc3d.dust(labels, threshold=p["dust"], connectivity=6)
    return labels


def task_ids(shape, task):
    """The task index of every voxel (x fastest, like the plan)."""
    g = [np.arange(s) // t for s, t in zip(shape, task)]
    n = [-(-s // t) for s, t in zip(shape, task)]
    x, y, z = np.meshgrid(*g, indexing="ij")
    return x + n[0] * (y + n[1] * z)


def assert_same_partition(out, ref):
    assert np.array_equal(out == 0, ref == 0), "foreground differs"
    pairs = np.unique(np.stack([out[out != 0], ref[ref != 0]]), axis=1)
    assert len(np.unique(pairs[0])) == pairs.shape[1], "a magma component holds several cc3d components"
    assert len(np.unique(pairs[1])) == pairs.shape[1], "a cc3d component is split in magma's output"


@pytest.mark.parametrize("step", sorted(STEPS))
def test_partition_equals_cc3d_whole_array(run, step):
    root, data, layers, plan, _ = run
    p = STEPS[step]
    out = read(layers[p["dest"]])
    ref = reference(data, p)
    assert_same_partition(out, ref)
    ids = np.unique(out[out != 0])
    assert np.array_equal(ids, np.arange(1, len(ids) + 1)), "ids are not 1..N"
    assert len(ids) == len(np.unique(ref[ref != 0])) > 20
    # components really cross tasks: the largest one lies in many of them
    tasks = task_ids(SHAPE, TASK)
    biggest = np.bincount(ref.ravel())[1:].argmax() + 1
    assert len(np.unique(tasks[ref == biggest])) >= 12
    assert plan.steps[step].stages[0].grid.n == 36


def test_dust_is_global(run):
    """A component above the dust size survives even where its piece in a task is smaller."""
    root, data, layers, plan, _ = run
    p = STEPS["thr"]
    whole = cc3d.connected_components(data["img"] >= p["threshold_gte"], connectivity=6)
    sizes = np.bincount(whole.ravel())
    assert np.any((sizes[1:] > 0) & (sizes[1:] < p["dust"])), "nothing to dust"
    tasks = task_ids(SHAPE, TASK)
    fg = whole != 0
    piece = np.unique(np.stack([whole[fg], tasks[fg]]), axis=1, return_counts=True)
    (labels, _), counts = piece
    small_piece_of_kept = (counts < p["dust"]) & (sizes[labels] >= p["dust"])
    assert small_piece_of_kept.any(), "test data has no kept component with a small piece in some task"
    out = read(layers[p["dest"]])
    kept = np.unique(labels[small_piece_of_kept])
    assert np.all(out[np.isin(whole, kept)] != 0)


def test_output_layer(run):
    root, data, layers, plan, _ = run
    info = CloudVolume(layers["thr_out"]).info
    assert info["type"] == "segmentation" and info["num_channels"] == 1
    for p in STEPS.values():  # the smallest type that holds the largest label
        out = CloudVolume(layers[p["dest"]])
        top = int(read(layers[p["dest"]]).max())
        want = "uint8" if top < 2**8 else "uint16" if top < 2**16 else "uint32"
        assert (out.info["data_type"], top) == (want, top) and out.dtype == np.dtype(want)
    # the downsample planned before the type was narrowed kept it, and built the mip from it
    seg_out = CloudVolume(layers["seg_out"], mip=1)
    assert seg_out.info["data_type"] == CloudVolume(layers["seg_out"]).info["data_type"] == seg_out.dtype.name
    assert np.array_equal(seg_out[seg_out.bounds][..., 0], tinybrain.downsample_segmentation(
        read(layers["seg_out"])[..., np.newaxis], (2, 2, 1), num_mips=1)[0][..., 0])
    assert info["scales"][0]["encoding"] == "compresso"
    assert info["scales"][0]["chunk_sizes"] == [list(CHUNK)]
    opts = CloudVolume(layers["band_out"]).info["scales"][0]
    assert opts["encoding"] == "crackle" and opts["chunk_sizes"] == [[32, 32, 16]]
    prov = CloudVolume(layers["thr_out"]).provenance
    assert prov.sources == [layers["img"]]
    assert prov.processing[-1]["method"]["threshold_gte"] == 140


def test_intermediates(run):
    """Cleaned by default; kept (next to the source data) with clean: false."""
    root, data, layers, plan, _ = run
    assert list(CloudFiles(layers["img"]).list(prefix="8_8_40/ccl/")) == []
    assert list(CloudFiles(layers["seg"]).list(prefix="8_8_40/ccl/")) == []
    kept = list(CloudFiles(layers["fimg"]).list(prefix="8_8_40/ccl/"))
    assert any("/ccl/band/faces/" in f for f in kept) and any("/ccl/band/relabel/" in f for f in kept)
    max_label = CloudFiles(layers["fimg"]).get_json("8_8_40/ccl/band/max_label.json")
    assert max_label == [int(read(layers["band_out"]).max())]


# ---- bad input ------------------------------------------------------------------
@pytest.fixture(scope="module")
def small(tmp_path_factory):
    root = tmp_path_factory.mktemp("cclbad")
    img = smooth_image((64, 64, 16), 5)
    return {"img": make_layer(root / "img", img, "image", chunk=(32, 32, 16)),
            "seg": make_layer(root / "seg", seg_data((64, 64, 16), 6), "segmentation", chunk=(32, 32, 16)),
            "rgb": make_layer(root / "rgb", np.stack([img, img], axis=3), "image", chunk=(32, 32, 16)),
            "other": make_layer(root / "other", seg_data((32, 64, 16), 6), "segmentation", chunk=(32, 32, 16)),
            "out": f"file://{root / 'out'}"}


BAD = {
    "thresholds on a segmentation": (dict(src="seg", dest="out", threshold_gte=3), ["steps.s.threshold_gte", "segmentation"]),
    "image without thresholds": (dict(src="img", dest="out"), ["steps.s", "threshold_gte and/or threshold_lte"]),
    "empty threshold band": (dict(src="img", dest="out", threshold_gte=200, threshold_lte=100), ["steps.s.threshold_gte", "200 > threshold_lte 100"]),
    "shape off the chunk grid": (dict(src="seg", dest="out", shape=[48, 64, 16]), ["steps.s.shape", "[32, 32, 16]"]),
    "two channels": (dict(src="rgb", dest="out", threshold_gte=3), ["steps.s.src", "2 channels"]),
    "same path": (dict(src="seg", dest="seg"), ["steps.s", "same path"]),
    "dest exists, other size": (dict(src="seg", dest="other"), ["steps.s.dest", "scales[0].size"]),
    "image encoding": (dict(src="seg", dest="out", encoding="jpeg"), ["steps.s.encoding"]),
    "negative dust": (dict(src="seg", dest="out", dust=-1), ["steps.s.dust"]),
    "threshold not a number": (dict(src="img", dest="out", threshold_gte="10"), ["steps.s.threshold_gte"]),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input(small, case):
    p, words = BAD[case]
    with pytest.raises(MagmaError) as err:
        workflow.plan({"layers": small, "steps": {"s": dict(op="ccl", **p)}})
    for w in words:
        assert w in str(err.value), f"{w!r} not in {err.value}"


def test_bad_input_writes_nothing(small, tmp_path, workdir):
    cfgfile = write_config(tmp_path / "bad.yaml", {"layers": small, "steps": {"s": dict(op="ccl", src="seg", dest="out", threshold_lte=1)}})
    proc = snakemake(workdir, cfgfile, check=False)
    assert proc.returncode != 0
    assert "steps.s.threshold_lte" in proc.stderr + proc.stdout
    assert CloudFiles(small["out"]).get("info") is None
    assert list(CloudFiles(small["seg"]).list(prefix="8_8_40/ccl/")) == []


# ---- kill and resume ------------------------------------------------------------
def test_kill_and_resume(tmp_path, workdir):
    """SIGKILL the run at seeded points in its stages, re-run: no finished job is redone,
    and the output equals the whole-array labelling (a clean run gives exactly that)."""
    import random

    from test_resume import job_markers, kill_then_resume

    rng = random.Random(20261125)
    img = smooth_image(SHAPE, 7)
    p = dict(src="img", dest="out", threshold_gte=140, dust=20)
    layers = {"img": make_layer(tmp_path / "img", img, "image", chunk=CHUNK), "out": f"file://{tmp_path / 'out'}"}
    cfg = {"layers": layers, "steps": {"cc": dict(op="ccl", shape=TASK, **p)},
           "execution": {"tasks_per_job": 12, "threads": 1}}  # 3 jobs per stage, 11 in all
    cfgfile = write_config(tmp_path / "k.yaml", cfg)

    kill_then_resume(workdir, cfgfile, sorted(rng.sample(range(2, 10), 2)))
    now = job_markers(workdir)
    assert len([m for m in now if not m.name.startswith(".")]) == 11  # not a killed marker's temp file
    assert "Nothing to be done" in snakemake(workdir, cfgfile).stderr

    out = read(layers["out"])
    ref = reference({"img": img}, p)
    assert_same_partition(out, ref)
    ids = np.unique(out[out != 0])
    assert np.array_equal(ids, np.arange(1, len(ids) + 1))
    assert list(CloudFiles(layers["img"]).list(prefix="8_8_40/ccl/")) == []


def test_rerun_after_narrowing_does_nothing(run):
    """Planning again sees the narrowed output type; the plan (and so every job's params)
    must not change, or Snakemake would redo the finished steps."""
    work, cfgfile = run[4]
    again = snakemake(work, cfgfile, "--dry-run")
    assert "Nothing to be done" in again.stdout + again.stderr, again.stdout[-3000:]
