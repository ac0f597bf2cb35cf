"""contrast: equalized slices equal a whole-array numpy reference of the same rule, a badly
exposed slice spans the range afterwards, and CLAHE equals OpenCV's on whole slices (to float rounding).

One real snakemake run on a small odd-sized layer: many equalize and CLAHE tasks, chunk-deep
histogram slabs, one mip built by the tasks.
"""
import json

import cv2
import numpy as np
import pytest
from cloudfiles import CloudFiles

from conftest import make_layer, read, snakemake, write_config
from magma import workflow
from magma.errors import MagmaError
from magma.ops.downsample import pyramid

SHAPE = (200, 180, 40)
DARK = 7  # the badly exposed slice


def exposures(shape, seed=3):
    """Each slice uses a different narrow band of grey values, with black holes."""
    rng = np.random.default_rng(seed)
    out = np.zeros(shape, dtype=np.uint8)
    for z in range(shape[2]):
        lo = int(rng.integers(1, 150))
        width = int(rng.integers(20, 100))
        if z == DARK:
            lo, width = 3, 12
        out[:, :, z] = rng.normal(lo + width / 2, width / 5, size=shape[:2]).clip(lo, lo + width)
    out[rng.random(shape) < 0.05] = 0
    return out


def reference(img, lower_fraction=0.01, upper_fraction=0.99):
    """The rule on the whole array: per slice, black left out of the histogram, the last
    value whose cumulative share is <= each fraction, stretched to 0..255 in float32."""
    out = img.astype(np.float32)
    for z in range(img.shape[2]):
        h = np.bincount(img[:, :, z].ravel(), minlength=256).astype(np.float64)
        h[0] = 0
        share = np.cumsum(h) / h.sum()
        lo = max(int(np.nonzero(share > lower_fraction)[0][0]) - 1, 0)
        hi = max(int(np.nonzero(share > upper_fraction)[0][0]) - 1, 0)
        if lo != hi:
            out[:, :, z] = (out[:, :, z] - np.float32(lo)) * np.float32(255.0 / (hi - lo))
    return np.clip(np.round(out), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("contrast")
    img = exposures(SHAPE)
    layers = {"img": make_layer(root / "img", img, "image", chunk=(64, 64, 16)),
              "eq": f"file://{root / 'eq'}", "cl": f"file://{root / 'cl'}"}
    steps = {
        "equalize": dict(op="contrast", src="img", dest="eq", shape=[128, 128, 16]),
        "clahe": dict(op="contrast", mode="clahe", src="img", dest="cl", shape=[64, 64, 16],
                      tile_grid_size=[4, 3], clip_limit=3.0),
    }
    cfgfile = write_config(root / "c.yaml", {"layers": layers, "steps": steps, "execution": {"tasks_per_job": 12}})
    work = root / "work"
    work.mkdir()
    snakemake(work, cfgfile)
    plan = workflow.plan({"layers": layers, "steps": steps})
    return layers, img, plan


def test_plan_has_histogram_slabs_then_equalize(run):
    _, _, plan = run
    hist, eq = plan.steps["equalize"].stages
    assert hist.grid.n == 3 and list(hist.grid.shape) == [200, 180, 16]  # one chunk-deep slab per task
    assert eq.grid.n == 2 * 2 * 3 and eq.params["num_mips"] == 1


def test_equalized_equals_whole_array_reference(run):
    layers, img, _ = run
    want = reference(img)
    np.testing.assert_array_equal(read(layers["eq"]), want)
    np.testing.assert_array_equal(read(layers["eq"], 1), pyramid(want, "avg", (2, 2, 1), 1)[0])


def test_badly_exposed_slice_spans_the_range(run):
    layers, img, _ = run
    before, after = img[:, :, DARK], read(layers["eq"])[:, :, DARK]
    assert before[before > 0].max() - before[before > 0].min() <= 12
    nonblack = after[before > 0]
    assert nonblack.min() < 32 and nonblack.max() == 255  # 12 grey values now span 0..255
    assert np.percentile(nonblack, 99) - np.percentile(nonblack, 1) > 200


def test_levels_in_igneous_format(run):
    layers, img, _ = run
    doc = json.loads(CloudFiles(layers["img"]).get("levels/0/5"))
    assert set(doc) == {"levels", "patch_size", "num_patches", "coverage_ratio"}
    assert doc["levels"] == np.bincount(img[:, :, 5].ravel(), minlength=256).tolist()
    assert doc["patch_size"] == [200, 180, 1] and doc["num_patches"] == 1 and doc["coverage_ratio"] == 1.0


def test_clahe_equals_opencv_on_whole_slices(run):
    layers, img, plan = run
    assert plan.steps["clahe"].stages[0].grid.n == 4 * 3 * 3
    op = cv2.createCLAHE(clipLimit=3.0, tileGridSize=(3, 4))  # OpenCV: (cols = y, rows = x)
    want = np.stack([op.apply(np.ascontiguousarray(img[:, :, z])) for z in range(SHAPE[2])], axis=2)
    got = read(layers["cl"])
    # OpenCV interpolates between tile centres in float32 from each pixel's position in the
    # image it is given; a task's image starts elsewhere than the slice's, so a few sums that
    # land on .5 round the other way: at most 1 grey level on about 1e-5 of the voxels
    diff = np.abs(got.astype(int) - want)
    assert diff.max() <= 1 and np.count_nonzero(diff) < 1e-4 * diff.size


def test_kernel_matches_igneous_clamping_loop():
    """clamping_values against a literal transcription of the rule as a loop."""
    from magma.ops.contrast import clamping_values

    rng = np.random.default_rng(0)
    levels = rng.integers(0, 50, size=(20, 256)).astype(np.uint64)
    levels[3] = 0
    levels[4, :] = 0
    levels[4, 77] = 9

    def loop(h, frac):
        h = h.copy()
        h[0] = 0
        cdf = np.cumsum(h)
        if cdf[-1] == 0:
            return 0
        out = 0
        for i, v in enumerate(cdf):
            if float(v) / float(cdf[-1]) > frac:
                break
            out = i
        return out

    for lf, uf in ((0.01, 0.99), (0.0, 1.0), (0.3, 0.5)):
        lo, hi = clamping_values(levels, lf, uf)
        assert lo.tolist() == [loop(h, lf) for h in levels]
        assert hi.tolist() == [loop(h, uf) for h in levels]


@pytest.mark.parametrize("step,words", [
    (dict(src="flt"), ["steps.s.src", "uint8 or uint16", "float32"]),
    (dict(clip_fraction=[0.6, 0.5]), ["steps.s.clip_fraction", "more than the whole"]),
    (dict(maxval=300), ["steps.s.maxval", "0..255"]),
    (dict(minval=200, maxval=100), ["steps.s.minval", "above maxval"]),
    (dict(mode="clahe", tile_grid_size=[40, 8]), ["steps.s.tile_grid_size", "80x16"]),
    (dict(shape=[48, 64, 16]), ["steps.s.shape", "multiple of the destination chunk size"]),
    (dict(coverage_factor=0), ["steps.s.coverage_factor"]),
    (dict(dest="img"), ["steps.s", "same path"]),
])
def test_bad_config_named(tmp_path, step, words):
    layers = {"img": make_layer(tmp_path / "img", np.zeros((64, 64, 16), np.uint8), "image", chunk=(32, 32, 16)),
              "flt": make_layer(tmp_path / "flt", np.zeros((64, 64, 16), np.float32), "image", chunk=(32, 32, 16)),
              "out": f"file://{tmp_path / 'out'}"}
    with pytest.raises(MagmaError) as err:
        workflow.plan({"layers": layers, "steps": {"s": dict(dict(op="contrast", src="img", dest="out"), **step)}})
    for w in words:
        assert w in str(err.value)
    assert not (tmp_path / "out").exists()


def test_bounds_restrict_both_stages(tmp_path):
    layers = {"img": make_layer(tmp_path / "img", np.zeros((256, 192, 48), np.uint8), "image", chunk=(64, 64, 16)),
              "out": f"file://{tmp_path / 'out'}"}
    step = dict(op="contrast", src="img", dest="out", shape=[128, 128, 16], bounds=[[0, 0, 16], [128, 128, 48]])
    hist, eq = workflow.plan({"layers": layers, "steps": {"s": step}}).steps["s"].stages
    assert hist.grid.n == 2 and list(hist.grid.shape) == [128, 128, 16]  # slabs 16-32, 32-48 of the box
    assert [hist.grid.task(i).minpt.tolist() for i in range(2)] == [[0, 0, 16], [0, 0, 32]]
    assert eq.grid.n == 2 and eq.grid.bounds.minpt.tolist() == [0, 0, 16]
    with pytest.raises(MagmaError, match="steps.s.bounds"):
        workflow.plan({"layers": layers, "steps": {"s": dict(step, bounds=[[0, 0, 8], [128, 128, 48]])}})
