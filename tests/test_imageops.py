"""quantize, remap, reorder and roi in one real snakemake run, each against numpy on the whole
array; bad mapping files and bad sources are rejected at plan time naming the key."""
import json

import numpy as np
import pytest
from cloudvolume import CloudVolume

from conftest import image_data, make_layer, read, seg_data, snakemake, write_config
from magma import workflow
from magma.errors import MagmaError
from magma.ops.downsample import pyramid

SEG_SHAPE = (150, 130, 20)
MOVES = {"0": 5, "5": 0, "3": 4, "4": 3, "9": 11, "10": 9, "11": 10}
HOLE = "32-64_64-96_8-16"  # a chunk of seg32_cs that is not written
BLOCKS = [((32, 32, 2), (96, 96, 10)), ((160, 144, 0), (224, 208, 16))]  # tissue, mip 0, max exclusive


def tissue(shape=(256, 256, 16)):
    img = np.zeros(shape, dtype=np.uint8)
    for lo, hi in BLOCKS:
        img[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]] = 120
    rng = np.random.default_rng(5)
    for _ in range(6):  # specks far from the blocks: dust
        x, y, z = rng.integers(110, 140), rng.integers(8, 24), rng.integers(0, 16)
        img[x, y, z] = 200
    return img


def mapping_pairs(seg):
    labels = np.unique(seg)
    nonzero = labels[labels != 0]
    # merge pairs of labels into new large ids, leave the last one unmapped
    return np.array([[int(v), 2**50 + i // 2] for i, v in enumerate(nonzero[:-1])], dtype=np.uint64)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("imageops")
    rng = np.random.default_rng(11)
    aff = rng.random(SEG_SHAPE + (3,), dtype=np.float32)
    seg = seg_data(SEG_SHAPE, 3)
    img = image_data((100, 90, 12), 4)
    pairs = mapping_pairs(seg)
    np.save(root / "agglo.npy", pairs)
    seg32 = (seg_data((64, 64, 16), 9) % np.uint64(1000)).astype(np.uint32)
    (root / "wide.json").write_text(json.dumps({"0": 3, str(int(seg32.max())): 2**40}))
    (root / "moves.json").write_text(json.dumps(MOVES))
    seg32_cs = (seg_data((151, 133, 20), 6) % np.uint64(50)).astype(np.uint32)  # odd edges
    (root / "holes.json").write_text(json.dumps({"0": 7, **{str(v): 1000 + v % 3 for v in range(1, 50)}}))
    layers = {
        "seg_cs": make_layer(root / "seg_cs", seg, "segmentation", chunk=(32, 32, 8), offset=(16, 0, 4),
                             encoding="compressed_segmentation"),
        "seg32_cs": make_layer(root / "seg32_cs", seg32_cs, "segmentation", chunk=(32, 32, 8),
                               encoding="compressed_segmentation"),
        "aff": make_layer(root / "aff", aff, "image", chunk=(32, 32, 8)),
        "seg": make_layer(root / "seg", seg, "segmentation", chunk=(32, 32, 8)),
        "img": make_layer(root / "img", img, "image", chunk=(32, 32, 4)),
        "seg32": make_layer(root / "seg32", seg32, "segmentation", chunk=(32, 32, 8)),
        "tissue": make_layer(root / "tissue", tissue(), "image", chunk=(32, 32, 8), offset=(64, 0, 0)),
        "tissue2": make_layer(root / "tissue2", tissue(), "image", chunk=(32, 32, 8)),
    }
    (root / "seg32_cs" / "8_8_40" / f"{HOLE}.gz").unlink()  # a missing chunk, read as 0 (fill_missing)
    seg32_cs[32:64, 64:96, 8:16] = 0
    for name in ("q", "agglo", "wide", "reordered", "agglo_cs", "holes_cs"):
        layers[name] = f"file://{root / name}"
    steps = {
        "quantize": dict(op="quantize", src="aff", dest="q", chunk_size=[64, 64, 8], shape=[128, 128, 8]),
        "agglomerate": dict(op="remap", src="seg", dest="agglo", mapping_file=str(root / "agglo.npy"),
                            shape=[64, 64, 8], encoding="compresso"),
        # compressed_segmentation in and out, same chunks: relabeled in the chunks' lookup tables
        "agglo_tables": dict(op="remap", src="seg_cs", dest="agglo_cs", mapping_file=str(root / "agglo.npy"),
                             shape=[64, 64, 8]),
        "holes": dict(op="remap", src="seg32_cs", dest="holes_cs", mapping_file=str(root / "holes.json"),
                      shape=[128, 128, 16], fill_missing=True),
        "widen": dict(op="remap", src="seg32", dest="wide", mapping_file=f"file://{root}/wide.json",
                      data_type="uint64", shape=[64, 64, 8]),
        "reorder": dict(op="reorder", src="img", dest="reordered", mapping_file=str(root / "moves.json"),
                        chunk_size=[32, 32, 1], shape=[64, 64, 4]),
        "tissue_ds": dict(op="downsample", layer="tissue2", num_mips=1),
        "roi": dict(op="roi", layer="tissue2"),  # the last mip: 1
        "roi_steps": dict(op="roi", layer="tissue", mip=0, z_step=8, max_axial_len=64),
        "tissue_ds2": dict(op="downsample", layer="tissue", num_mips=1),  # rewrites the info after roi
    }
    cfgfile = write_config(root / "ops.yaml", {"layers": layers, "steps": steps, "execution": {"tasks_per_job": 16}})
    work = root / "work"
    work.mkdir()
    snakemake(work, cfgfile)
    again = snakemake(work, cfgfile, "-n")  # planning after the run (rois now in the info) changes nothing
    assert "Nothing to be done" in again.stdout + again.stderr, again.stdout[-3000:]
    return root, layers, dict(aff=aff, seg=seg, img=img, pairs=pairs, seg32=seg32, seg32_cs=seg32_cs), workflow.plan(
        {"layers": layers, "steps": steps})


def test_quantize_equals_numpy(run):
    _, layers, data, plan = run
    assert plan.steps["quantize"].stages[0].grid.n == 2 * 2 * 3
    want = (data["aff"][..., 0] * 255.0).astype(np.uint8)
    vol = CloudVolume(layers["q"], progress=False)
    assert vol.dtype == np.uint8 and vol.num_channels == 1 and vol.layer_type == "image"
    assert list(vol.chunk_size) == [64, 64, 8]
    np.testing.assert_array_equal(read(layers["q"]), want)
    np.testing.assert_array_equal(read(layers["q"], 1), pyramid(want, "avg", (2, 2, 1), 1)[0])


def remap_numpy(seg, table, dtype):
    labels, inverse = np.unique(seg, return_inverse=True)
    new = np.array([table.get(int(v), int(v)) for v in labels], dtype=dtype)
    return new[inverse].reshape(seg.shape)


def test_remap_npy_equals_numpy(run):
    _, layers, data, _ = run
    table = {int(a): int(b) for a, b in data["pairs"]}
    want = remap_numpy(data["seg"], table, np.uint64)
    assert len(np.unique(want)) < len(np.unique(data["seg"]))  # labels were merged
    np.testing.assert_array_equal(read(layers["agglo"]), want)
    np.testing.assert_array_equal(read(layers["agglo"], 1), pyramid(want, "mode", (2, 2, 1), 1)[0])
    assert CloudVolume(layers["agglo"], progress=False).info["scales"][0]["encoding"] == "compresso"


def test_remap_in_lookup_tables_equals_numpy(run):
    """compressed_segmentation chunks relabeled without decoding: the same voxels, and mips
    from the relabeled voxels, at an offset, with clipped edge chunks."""
    _, layers, data, plan = run
    assert plan.steps["agglo_tables"].stages[0].params["tables"] is True
    assert plan.steps["agglomerate"].stages[0].params["tables"] is False  # compresso out
    want = remap_numpy(data["seg"], {int(a): int(b) for a, b in data["pairs"]}, np.uint64)
    vol = CloudVolume(layers["agglo_cs"], progress=False)
    assert vol.info["scales"][0]["encoding"] == "compressed_segmentation"
    assert list(vol.voxel_offset) == [16, 0, 4] and len(vol.info["scales"]) == 2
    np.testing.assert_array_equal(read(layers["agglo_cs"]), want)
    np.testing.assert_array_equal(read(layers["agglo_cs"], 1), pyramid(want, "mode", (2, 2, 1), 1)[0])


def test_remap_in_lookup_tables_fills_a_missing_chunk(run):
    _, layers, data, plan = run
    assert plan.steps["holes"].stages[0].params["tables"] is True
    table = {0: 7, **{v: 1000 + v % 3 for v in range(1, 50)}}
    want = remap_numpy(data["seg32_cs"], table, np.uint32)
    assert np.all(want[32:64, 64:96, 8:16] == 7)
    np.testing.assert_array_equal(read(layers["holes_cs"]), want)
    mips = pyramid(want, "mode", (2, 2, 1), 2)  # made chunk by chunk, equal to the whole array's
    assert len(CloudVolume(layers["holes_cs"], progress=False).info["scales"]) == 3
    np.testing.assert_array_equal(read(layers["holes_cs"], 1), mips[0])
    np.testing.assert_array_equal(read(layers["holes_cs"], 2), mips[1])


def test_remap_changing_the_label_type_decodes_instead(tmp_path):
    seg = (seg_data((96, 96, 16), 2) % np.uint64(90)).astype(np.uint32)
    url = make_layer(tmp_path / "s", seg, "segmentation", chunk=(32, 32, 8), encoding="compressed_segmentation")
    (tmp_path / "m.json").write_text(json.dumps({"1": 2}))
    steps = {"r": dict(op="remap", src="s", dest="d", mapping_file=str(tmp_path / "m.json"), shape=[32, 32, 8])}
    lay = {"s": url, "d": f"file://{tmp_path}/d"}
    assert workflow.plan({"layers": lay, "steps": steps}).steps["r"].stages[0].params["tables"] is True
    steps["r"]["data_type"] = "uint64"  # table entries change width: every voxel is re-encoded
    assert workflow.plan({"layers": lay, "steps": steps}).steps["r"].stages[0].params["tables"] is False


def test_remap_json_into_wider_type(run):
    _, layers, data, _ = run
    seg32 = data["seg32"]
    table = {0: 3, int(seg32.max()): 2**40}
    vol = CloudVolume(layers["wide"], progress=False)
    assert vol.dtype == np.uint64
    np.testing.assert_array_equal(read(layers["wide"]), remap_numpy(seg32, table, np.uint64))


def test_reorder_moves_slices(run):
    _, layers, data, _ = run
    img = data["img"]
    want = img.copy()
    for z, new in MOVES.items():
        want[:, :, new] = img[:, :, int(z)]
    got = read(layers["reordered"])
    np.testing.assert_array_equal(got, want)
    assert not np.array_equal(got, img)
    assert CloudVolume(layers["reordered"], progress=False).info["scales"][0]["chunk_sizes"] == [[32, 32, 1]]


def test_roi_boxes_of_two_tissue_blocks(run):
    _, layers, _, plan = run
    assert plan.steps["roi"].stages[0].params["mip"] == 1
    rois = CloudVolume(layers["tissue2"], progress=False).info["scales"][0]["rois"]
    assert sorted(rois) == sorted([[*lo, *(h - 1 for h in hi)] for lo, hi in BLOCKS])


def test_roi_z_steps_offset_and_in_memory_downsample(run):
    _, layers, _, plan = run
    assert plan.steps["roi_steps"].stages[0].grid.n == 2
    info = CloudVolume(layers["tissue"], progress=False).info
    assert len(info["scales"]) == 2  # a later step rewrote the info and kept the rois
    want = []
    for z0, z1 in ((0, 8), (8, 16)):
        for lo, hi in BLOCKS:
            a, b = max(lo[2], z0), min(hi[2], z1)
            if a < b:  # x shifted by the layer's voxel offset
                want.append([lo[0] + 64, lo[1], a, hi[0] + 64 - 1, hi[1] - 1, b - 1])
    assert sorted(info["scales"][0]["rois"]) == sorted(want)


# ---- errors before anything is written --------------------------------------------
@pytest.fixture(scope="module")
def bad(tmp_path_factory):
    root = tmp_path_factory.mktemp("badops")
    np.save(root / "float.npy", np.array([[1.0, 2.0]]))
    np.save(root / "shape.npy", np.array([1, 2, 3]))
    np.save(root / "dup.npy", np.array([[1, 2], [1, 3]]))
    (root / "frac.json").write_text('{"1.5": 2}')
    (root / "big.json").write_text('{"1": 300}')
    (root / "notjson.json").write_text("{1: 2")
    (root / "lost.json").write_text('{"1": 2}')
    (root / "dups.json").write_text('{"0": 2, "1": 2}')
    (root / "outside.json").write_text('{"1": 40}')
    layers = {"seg": make_layer(root / "seg", np.zeros((32, 32, 3), np.uint8), "segmentation", chunk=(32, 32, 1)),
              "flt": make_layer(root / "flt", np.zeros((32, 32, 3), np.float32), "image", chunk=(32, 32, 1)),
              "out": f"file://{root / 'out'}"}
    return root, layers


BAD = [
    ("remap", "float.npy", {}, ["steps.s.mapping_file", "float64", "integers"]),
    ("remap", "shape.npy", {}, ["steps.s.mapping_file", "(N, 2)"]),
    ("remap", "dup.npy", {}, ["steps.s.mapping_file", "label 1 more than once"]),
    ("remap", "frac.json", {}, ["steps.s.mapping_file", "'1.5' is not an integer label"]),
    ("remap", "notjson.json", {}, ["steps.s.mapping_file"]),
    ("remap", "missing.json", {}, ["steps.s.mapping_file", "cannot read"]),
    ("remap", "big.json", {}, ["steps.s.data_type", "300", "uint8"]),
    ("remap", "lost.json", {"src": "flt"}, ["steps.s.src", "float32"]),
    ("reorder", "lost.json", {}, ["steps.s.mapping_file", "slice 2 would be overwritten by slice 1", "z=1 would receive no slice"]),
    ("reorder", "dups.json", {}, ["steps.s.mapping_file", "slices 0, 1 all move to z=2", "z=0, 1 would receive no slice"]),
    ("reorder", "outside.json", {}, ["steps.s.mapping_file", "z 40 outside", "0..2"]),
    ("reorder", "missing.json", {}, ["steps.s.mapping_file", "cannot read"]),
    ("quantize", None, {"src": "seg"}, ["steps.s.src", "float32/float64", "uint8"]),
    ("roi", None, {"mip": 3}, ["steps.s.mip", "mip 3 does not exist"]),
]


@pytest.mark.parametrize("op,mapping,extra,words", BAD, ids=[f"{b[0]}-{b[1]}-{i}" for i, b in enumerate(BAD)])
def test_bad_input_named_at_plan_time(bad, op, mapping, extra, words):
    root, layers = bad
    step = {"op": op, "layer": "seg"} if op == "roi" else {"op": op, "src": "seg", "dest": "out"}
    if mapping:
        step["mapping_file"] = str(root / mapping)
    step.update(extra)
    with pytest.raises(MagmaError) as err:
        workflow.plan({"layers": layers, "steps": {"s": step}})
    for w in words:
        assert w in str(err.value), str(err.value)
    assert not (root / "out").exists()


@pytest.mark.parametrize("layer_type", ["image", "segmentation"])
def test_roi_reads_chunk_deep_pieces_that_shrink_alone(layer_type):
    """roi's find reads a slab in z pieces (side by side on idle cores) and shrinks each:
    the same image as shrinking the whole slab, pieces on chunk planes, none lost."""
    from cloudvolume import Bbox
    from magma.ops import roi

    box = Bbox((0, 0, 3), (96, 80, 45))
    pieces = roi._z_pieces(box, chunk_z=8, offset_z=3 + 16)
    assert [int(p.minpt[2]) for p in pieces] == [3, 11, 19, 27, 35, 43]
    assert int(pieces[-1].maxpt[2]) == 45 and all(p.size3()[2] <= 8 for p in pieces)
    assert len(roi._z_pieces(box, chunk_z=2, offset_z=0, most=5)) <= 6
    rng = np.random.default_rng(1)
    img = rng.integers(0, 255, size=(96, 80, 42), dtype=np.uint8)
    mips = roi.shrink_mips(img.shape, 30)
    assert mips == 4
    parts = [roi.shrink(img[:, :, int(p.minpt[2]) - 3:int(p.maxpt[2]) - 3], layer_type, mips) for p in pieces]
    assert np.array_equal(np.concatenate(parts, axis=2), roi.shrink(img, layer_type, mips))
