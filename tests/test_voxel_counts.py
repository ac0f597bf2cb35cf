"""voxel_counts: the IntMap at <scale key>/stats/voxel_counts.im equals numpy's counts of
the whole array (or of the bounded box), read back the way Igneous users read it."""
import numpy as np
import pytest
import scipy.ndimage as ndi
from cloudfiles import CloudFiles
from mapbuffer import IntMap

import cc3d
from conftest import image_data, make_layer, read, snakemake, write_config
from magma import workflow
from magma.errors import MagmaError

SHAPE = (128, 96, 40)


def many_labels(shape, seed):
    """Thousands of labels with large 64-bit ids, background included."""
    rng = np.random.default_rng(seed)
    field = ndi.uniform_filter(rng.random(shape), 4)
    labels = cc3d.connected_components(field > np.median(field), connectivity=6).astype(np.uint64)
    return np.where(labels > 0, labels * np.uint64(2**40 + 7) + np.uint64(2**63), 0).astype(np.uint64)


def intmap(url, key):
    return IntMap(CloudFiles(url).get(f"{key}/stats/voxel_counts.im")).todict()


def numpy_counts(arr):
    u, c = np.unique(arr, return_counts=True)
    return dict(zip(u.tolist(), c.tolist()))


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("vc")
    data = {"seg": many_labels(SHAPE, 1), "seg2": many_labels(SHAPE, 2)}
    layers = {n: make_layer(root / n, a, "segmentation", chunk=(16, 16, 8)) for n, a in data.items()}
    cfg = {"layers": layers,
           "steps": {"counts": {"op": "voxel_counts", "layer": "seg", "shape": [32, 32, 16]},
                     "pyr": {"op": "downsample", "layer": "seg2", "num_mips": 1},
                     "counts2": {"op": "voxel_counts", "layer": "seg2", "mip": 1, "bounds_mip": 0,
                                 "bounds": [[16, 16, 8], [112, 80, 40]], "shape": [16, 16, 16], "compress": "gzip"}},
           "execution": {"tasks_per_job": 64}}
    work = root / "work"
    work.mkdir()
    snakemake(work, write_config(root / "vc.yaml", cfg))
    return data, layers


def test_counts_equal_numpy_whole_array(run):
    data, layers = run
    counts = intmap(layers["seg"], "8_8_40")
    assert len(counts) > 300 and 0 in counts
    assert counts == numpy_counts(data["seg"])
    assert list(CloudFiles(layers["seg"]).list(prefix="8_8_40/stats/voxel_counts/")) == []  # per-task files cleaned


def test_counts_of_bounds_at_mip1(run):
    data, layers = run
    mip1 = read(layers["seg2"], 1)  # the downsample step ran first: it writes the layer too
    assert mip1.shape == (64, 48, 40)
    assert intmap(layers["seg2"], "16_16_40") == numpy_counts(mip1[8:56, 8:40, 8:40])


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    root = tmp_path_factory.mktemp("vcbad")
    return {"img": make_layer(root / "img", image_data((64, 64, 16)), "image", chunk=(32, 32, 16)),
            "seg": make_layer(root / "seg", many_labels((64, 64, 16), 3), "segmentation", chunk=(32, 32, 16))}


BAD = {
    "image layer": (dict(layer="img"), ["steps.s.layer", "'img'", "segmentation"]),
    "missing mip": (dict(layer="seg", mip=2), ["steps.s.mip", "mip 2 does not exist"]),
    "bounds outside": (dict(layer="seg", bounds=[[0, 0, 0], [65, 64, 16]]), ["steps.s.bounds", "outside"]),
    "unknown compression": (dict(layer="seg", compress="lzma"), ["steps.s.compress"]),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input(small, case):
    p, words = BAD[case]
    with pytest.raises(MagmaError) as err:
        workflow.plan({"layers": small, "steps": {"s": dict(op="voxel_counts", **p)}})
    for w in words:
        assert w in str(err.value), f"{w!r} not in {err.value}"


@pytest.mark.parametrize("dtype", [np.uint8, np.uint32, np.uint64, np.int64])
def test_count_kernel_equals_numpy(dtype):
    """The renumber + bincount kernel against np.unique, on sparse 64-bit ids (negative
    ones in signed types), a block with one label, and both memory orders."""
    from magma.ops.voxel_counts import count_block

    rng = np.random.default_rng(7)
    hi = np.iinfo(dtype).max
    pool = np.unique(rng.integers(np.iinfo(dtype).min, hi, 500, dtype=dtype, endpoint=True))  # negatives too
    blocks = [pool[rng.integers(0, len(pool), (40, 30, 20))], np.full((8, 8, 8), pool[3], dtype=dtype)]
    blocks.append(np.asfortranarray(blocks[0]))
    for block in blocks:
        want = np.unique(block, return_counts=True)
        got = count_block(block.copy(order="K"))
        assert np.array_equal(got[0], want[0].astype(np.uint64))
        assert np.array_equal(got[1], want[1].astype(np.uint64))
