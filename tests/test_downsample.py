"""Downsampled mips are bit-identical to tinybrain run on the whole array in memory.

Even-sized layers are compared with raw tinybrain calls. Odd-sized layers are
compared with magma's kernel on the whole array (tinybrain's odd edges are not
defined, see magma.ops.downsample.pyramid), which proves tiling changes nothing.

Real snakemake runs on small generated layers; task shapes are made small
(memory_target) so every pass has many tasks and task boundaries matter, and
num_mips exceeds what one task holds so several passes chain.
"""
import json

import numpy as np
import pytest
import tinybrain
import yaml

from conftest import image_data, make_layer, read, seg_data, snakemake, write_config
from magma import workflow
from magma.ops.downsample import pyramid

SHAPE = (256, 192, 32)  # a multiple of factor^mips: tinybrain is defined everywhere
CHUNK = (16, 16, 8)
ODD = (300, 260, 70)  # not a multiple of the chunk size: edge tasks are partial and odd
ODD_CHUNK = (32, 32, 16)

STEPS = {
    "ds_img": dict(layer="img", num_mips=3, memory_target=5.0e4),
    "ds_seg": dict(layer="seg", num_mips=3, memory_target=4.0e5),
    "ds_img3": dict(layer="img3", num_mips=2, factor=[2, 2, 2], memory_target=5.0e4),
    "ds_seg3": dict(layer="seg3", num_mips=2, factor=[2, 2, 2], memory_target=4.0e5),
    "ds_max": dict(layer="imgmax", num_mips=3, method="max", memory_target=5.0e4),
    "ds_sparse": dict(layer="segsparse", num_mips=3, sparse=True, memory_target=4.0e5),
    "ds_odd_img": dict(layer="oddimg", num_mips=3, memory_target=4.0e5),
    "ds_odd_seg": dict(layer="oddseg", num_mips=3, factor=[2, 2, 2], memory_target=3.2e6),
}

TINYBRAIN = {
    "avg": lambda a, f, n, sp: tinybrain.downsample_with_averaging(a, f, num_mips=n, sparse=sp),
    "mode": lambda a, f, n, sp: tinybrain.downsample_segmentation(a, f, num_mips=n, sparse=sp),
    "max": lambda a, f, n, sp: tinybrain.downsample_with_max_pooling(a, f, num_mips=n),
}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("ds")
    img, seg = image_data(SHAPE, 1), seg_data(SHAPE, 2)
    data = {"img": img, "img3": img, "imgmax": img, "seg": seg, "seg3": seg, "segsparse": seg,
            "oddimg": image_data(ODD, 3), "oddseg": seg_data(ODD, 4)}
    layers = {}
    for name, arr in data.items():
        kind = "image" if arr.dtype == np.uint8 else "segmentation"
        layers[name] = make_layer(root / name, arr, kind, chunk=ODD_CHUNK if name.startswith("odd") else CHUNK)
    cfg = {"layers": layers, "steps": {n: dict(op="downsample", **p) for n, p in STEPS.items()},
           "execution": {"tasks_per_job": 16, "threads": 2}}
    cfgfile = write_config(root / "ds.yaml", cfg)
    work = root / "work"
    work.mkdir()
    proc = snakemake(work, cfgfile)
    return root, work, data, workflow.plan(yaml.safe_load(cfgfile.read_text())), proc


def reference(whole: np.ndarray, stages, kernel):
    """Chain a kernel on the whole array exactly as the plan's passes do."""
    mips = {stages[0].params["mip"]: np.asfortranarray(whole)}
    for st in stages:
        p = st.params
        for i, arr in enumerate(kernel(mips[p["mip"]], p["factor"], p["num_mips"], p["sparse"]), start=1):
            mips[p["mip"] + i] = np.asfortranarray(arr)
    return mips


@pytest.mark.parametrize("step", sorted(STEPS))
def test_mips_equal_tinybrain_whole_array(run, step):
    root, work, data, plan, _ = run
    sp = plan.steps[step]
    layer = STEPS[step]["layer"]
    assert len(sp.stages) >= 2, "test needs chained passes"
    assert all(st.grid.n > 1 for st in sp.stages[:1]), "test needs several tasks per pass"
    p = sp.stages[0].params
    if layer.startswith("odd"):
        kernel = lambda a, f, n, sparse: pyramid(a, p["method"], f, n, sparse)  # noqa: E731
    else:
        kernel = lambda a, f, n, sparse: TINYBRAIN[p["method"]](a, tuple(f), n, sparse)  # noqa: E731
    ref = reference(data[layer], sp.stages, kernel)
    url = plan.paths[layer]
    for mip, expected in ref.items():
        got = read(url, mip)
        assert got.shape == expected.shape[:3], (step, mip)
        assert np.array_equal(got, expected[..., 0] if expected.ndim == 4 else expected), (step, mip)


def test_info_scales_like_igneous(run):
    root, work, data, plan, _ = run
    info = json.loads((root / "oddimg" / "info").read_text())
    assert [s["resolution"] for s in info["scales"]] == [[8, 8, 40], [16, 16, 40], [32, 32, 40], [64, 64, 40]]
    assert [s["size"] for s in info["scales"]] == [[300, 260, 70], [150, 130, 70], [75, 65, 70], [38, 33, 70]]
    for s in info["scales"]:
        assert s["chunk_sizes"] == [list(ODD_CHUNK)] and s["encoding"] == "raw" and s["voxel_offset"] == [0, 0, 0]
        assert s["key"] == "_".join(map(str, s["resolution"]))
    info3 = json.loads((root / "img3" / "info").read_text())
    assert [s["resolution"] for s in info3["scales"]] == [[8, 8, 40], [16, 16, 80], [32, 32, 160]]


def test_markers_and_provenance(run):
    root, work, data, plan, proc = run
    markers = sorted((work / "results" / "ds" / "markers" / "ds_img" / "jobs").rglob("*.json"))
    assert len(markers) == plan.steps["ds_img"].jobs
    m = json.loads(markers[0].read_text())
    assert m["tasks"] >= 1 and m["voxels_read"] > 0 and m["seconds"] >= 0
    done = json.loads((work / "results" / "ds" / "markers" / "ds_img" / "done.json").read_text())
    assert done["tasks"] == sum(st.grid.n for st in plan.steps["ds_img"].stages)
    prov = json.loads((root / "img" / "provenance").read_text())
    entry = prov["processing"][-1]
    assert entry["method"]["task"] == "magma.downsample" and entry["method"]["num_mips"] == 3
    assert "magma plan" in proc.stderr and "ds_img" in proc.stderr


def test_rerun_does_nothing(run):
    root, work, data, plan, _ = run
    proc = snakemake(work, root / "ds.yaml")
    assert "Nothing to be done" in proc.stdout + proc.stderr


def test_sharded_downsample(tmp_path, workdir):
    img = image_data((256, 192, 40), 5)
    url = make_layer(tmp_path / "img", img, "image", chunk=(32, 32, 8))
    cfg = {"layers": {"img": url}, "steps": {"ds": {"op": "downsample", "layer": "img", "sharded": True,
                                                    "num_mips": 2, "memory_target": 2.0e5}}}
    snakemake(workdir, write_config(tmp_path / "s.yaml", cfg))
    info = json.loads((tmp_path / "img" / "info").read_text())
    assert info["scales"][1]["sharding"]["@type"] == "neuroglancer_uint64_sharded_v1"
    assert list((tmp_path / "img" / info["scales"][1]["key"]).glob("*.shard"))
    mip1 = pyramid(img, "avg", (2, 2, 1), 1)[0]
    mip2 = pyramid(mip1, "avg", (2, 2, 1), 1)[0]
    assert np.array_equal(read(url, 1), mip1)
    assert np.array_equal(read(url, 2), mip2)


@pytest.mark.parametrize("method,sparse", [("avg", False), ("avg", True), ("mode", False), ("mode", True),
                                           ("min", False), ("max", False), ("striding", False)])
@pytest.mark.parametrize("shape", [(150, 130, 20), (151, 133, 19)])
def test_mips_made_chunk_by_chunk_equal_the_whole_block(tmp_path, method, sparse, shape):
    """The chunkwise path of a downsample task (each chunk's mips placed side by side) gives
    the whole block's mips, odd volume edges included."""
    from cloudvolume import Bbox, CloudVolume

    from magma import chunk_files
    from magma.ops.downsample import Pyramid, chunkwise

    data = seg_data(shape, 1) if method in ("mode", "striding") else image_data(shape, 1)
    if sparse:
        data[::3] = 0
    url = make_layer(tmp_path / "l", data, "image", chunk=(32, 32, 8), offset=(64, 0, 8))
    meta = CloudVolume(url).meta
    box = Bbox((64, 0, 8), np.asarray((64, 0, 8)) + shape)
    if method == "mode" or data.dtype.itemsize >= 4:
        assert chunkwise(meta, 0, box, 2, (2, 2, 1), method) and not chunkwise(meta, 0, box, 6, (2, 2, 1), method)
    pyr = Pyramid(box, 2, (2, 2, 1), data.dtype, 1, method, sparse)
    for chunk, image in chunk_files.read_chunks(url, meta, 0, box):
        pyr.add(image, chunk)
    for got, want in zip(pyr.images, pyramid(data[..., None], method, (2, 2, 1), 2, sparse)):
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("dtype", [np.uint8, np.int16, np.float32, np.uint64])
def test_min_pooling_equals_numpy(dtype):
    x = (np.random.default_rng(0).integers(0, 200, (16, 12, 3, 1)) - (90 if dtype == np.int16 else 0)).astype(dtype)
    mip1, mip2 = pyramid(x, "min", (2, 2, 1), 2)
    np.testing.assert_array_equal(mip1, x.reshape(8, 2, 6, 2, 3, 1).min(axis=(1, 3)))
    np.testing.assert_array_equal(mip2, x.reshape(4, 4, 3, 4, 3, 1).min(axis=(1, 3)))
