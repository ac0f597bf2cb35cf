"""Transfer output equals the source exactly (rechunked, translated, re-encoded, sharded),
its automatic downsamples equal the downsample step's, and delete removes exactly
the chunks asked for."""
import json

import numpy as np
import pytest
from cloudvolume import CloudVolume

from conftest import image_data, make_layer, read, seg_data, snakemake, write_config
from magma.ops.downsample import pyramid

SHAPE = (256, 192, 32)


def half_black(img):
    out = img.copy()
    out[:128] = 0
    return out


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("xfer")
    img, seg = image_data(SHAPE, 7), seg_data(SHAPE, 8)
    layers = {
        "img": make_layer(root / "img", img, "image", chunk=(32, 32, 16)),
        "seg": make_layer(root / "seg", seg, "segmentation", chunk=(32, 32, 16)),
    }
    layers["sparse_img"] = make_layer(root / "sparse_img", half_black(img), "image", chunk=(32, 32, 16))
    layers["img_b"] = make_layer(root / "img_b", img, "image", chunk=(32, 32, 16))
    for name in ("img_t", "seg_rechunk", "seg_moved", "img_sharded", "img_ds_copy", "seg_cseg", "img_png", "img_jpeg",
                 "seg_crackle", "seg_cpso"):
        layers[name] = f"file://{root / name}"
    steps = {
        "rechunk": dict(op="transfer", src="seg", dest="seg_rechunk", chunk_size=[64, 64, 8], memory_target=4.0e6),
        "moved": dict(op="transfer", src="seg", dest="seg_moved", dest_voxel_offset=[100, 40, 8],
                      skip_downsamples=True, compress="br", memory_target=2.0e6),
        "sharded": dict(op="transfer", src="img", dest="img_sharded", sharded=True, memory_target=2.0e5),
        "copy_then_ds": dict(op="transfer", src="img", dest="img_ds_copy", skip_downsamples=True),
        "ds_copy": dict(op="downsample", layer="img_ds_copy", num_mips=2),
        "cseg": dict(op="transfer", src="seg", dest="seg_cseg", encoding="compressed_segmentation",
                     skip_downsamples=True),
        "png": dict(op="transfer", src="img", dest="img_png", encoding="png", memory_target=2.0e6),
        "jpeg": dict(op="transfer", src="img", dest="img_jpeg", encoding="jpeg", encoding_level=95,
                     skip_downsamples=True),
        "crackle": dict(op="transfer", src="seg", dest="seg_crackle", encoding="crackle", memory_target=4.0e6),
        "cpso": dict(op="transfer", src="seg", dest="seg_cpso", encoding="compresso", compress="none",
                     skip_downsamples=True),
        "bounded_ds": dict(op="downsample", layer="img_b", num_mips=1, bounds=[[0, 0, 0], [128, 128, 32]]),
        "translated": dict(op="transfer", src="img", dest="img_t", translate=[32, 0, 0], skip_downsamples=True,
                           bounds=[[64, 0, 0], [192, 192, 32]]),
        "black": dict(op="downsample", layer="sparse_img", num_mips=2, method="max", delete_black_uploads=True),
    }
    cfgfile = write_config(root / "x.yaml", {"layers": layers, "steps": steps,
                                             "execution": {"tasks_per_job": 8}})
    work = root / "work"
    work.mkdir()
    snakemake(work, cfgfile)
    return root, layers, img, seg


def test_rechunk_equals_source_and_downsamples(run):
    root, layers, img, seg = run
    info = json.loads((root / "seg_rechunk" / "info").read_text())
    assert info["scales"][0]["chunk_sizes"] == [[64, 64, 8]]
    assert len(info["scales"]) >= 2, "transfer should build downsamples"
    assert np.array_equal(read(layers["seg_rechunk"], 0), seg)
    expected = pyramid(seg, "mode", (2, 2, 1), len(info["scales"]) - 1)
    for mip, arr in enumerate(expected, start=1):
        assert np.array_equal(read(layers["seg_rechunk"], mip), arr), mip


def test_translation_is_a_pure_shift(run):
    root, layers, img, seg = run
    info = json.loads((root / "seg_moved" / "info").read_text())
    assert info["scales"][0]["voxel_offset"] == [100, 40, 8]
    assert len(info["scales"]) == 1
    assert np.array_equal(read(layers["seg_moved"], 0), seg)
    assert list((root / "seg_moved" / info["scales"][0]["key"]).glob("*.br")), "compress: br not applied"
    prov = json.loads((root / "seg_moved" / "provenance").read_text())
    assert prov["sources"] == [layers["seg"]]


def test_sharded_transfer_reads_back(run):
    root, layers, img, seg = run
    info = json.loads((root / "img_sharded" / "info").read_text())
    assert info["scales"][0]["sharding"]["@type"] == "neuroglancer_uint64_sharded_v1"
    assert list((root / "img_sharded" / info["scales"][0]["key"]).glob("*.shard"))
    assert np.array_equal(read(layers["img_sharded"], 0), img)


def test_transfer_then_downsample_chain(run):
    root, layers, img, seg = run
    expected = pyramid(img, "avg", (2, 2, 1), 2)
    for mip, arr in enumerate(expected, start=1):
        assert np.array_equal(read(layers["img_ds_copy"], mip), arr), mip


def test_reencoding(run):
    root, layers, img, seg = run
    info = json.loads((root / "seg_cseg" / "info").read_text())
    assert info["scales"][0]["encoding"] == "compressed_segmentation"
    assert info["scales"][0]["compressed_segmentation_block_size"] == [8, 8, 8]
    assert np.array_equal(read(layers["seg_cseg"], 0), seg)


@pytest.mark.parametrize("layer,source,encoding", [
    ("img_png", "img", "png"), ("seg_crackle", "seg", "crackle"), ("seg_cpso", "seg", "compresso"),
])
def test_lossless_encodings_round_trip(run, layer, source, encoding):
    root, layers, img, seg = run
    src = {"img": img, "seg": seg}[source]
    info = json.loads((root / layer / "info").read_text())
    assert all(s["encoding"] == encoding for s in info["scales"])
    assert np.array_equal(read(layers[layer], 0), src)
    method = "avg" if source == "img" else "mode"
    for mip, arr in enumerate(pyramid(src, method, (2, 2, 1), len(info["scales"]) - 1), start=1):
        assert np.array_equal(read(layers[layer], mip), arr), (layer, mip)


def test_jpeg_is_close(run):
    root, layers, img, seg = run
    info = json.loads((root / "img_jpeg" / "info").read_text())
    assert info["scales"][0]["encoding"] == "jpeg" and info["scales"][0]["jpeg_quality"] == 95
    got = read(layers["img_jpeg"], 0).astype(int)
    assert got.shape == img.shape and np.abs(got - img).mean() < 20
    assert not list((root / "img_jpeg" / "8_8_40").glob("*.gz")), "jpeg chunks must not be gzipped again"


def test_delete_black_uploads_and_method(run):
    root, layers, img, seg = run
    mips = pyramid(half_black(img), "max", (2, 2, 1), 2)
    for mip, arr in enumerate(mips, start=1):
        vol = CloudVolume(layers["sparse_img"], mip=mip, fill_missing=True, progress=False)
        assert np.array_equal(vol[vol.bounds][..., 0], arr), mip
    names = {p.name for p in (root / "sparse_img" / "16_16_40").iterdir()}
    assert not any(n.startswith(("0-32_", "32-64_")) for n in names), "all-black chunks must not be uploaded"
    assert any(n.startswith("64-96_") for n in names)


def test_bounded_downsample_touches_only_the_box(run):
    root, layers, img, seg = run
    vol = CloudVolume(layers["img_b"], mip=1, fill_missing=True, progress=False)
    got = vol[vol.bounds][..., 0]
    assert np.array_equal(got[:64, :64], pyramid(img[:128, :128], "avg", (2, 2, 1), 1)[0])
    names = {p.name for p in (root / "img_b" / "16_16_40").iterdir()}
    assert names == {f"{x}-{x + 32}_{y}-{y + 32}_{z}-{z + 16}.gz" for x in (0, 32) for y in (0, 32) for z in (0, 16)}


def test_translate_within_bounds(run):
    root, layers, img, seg = run
    vol = CloudVolume(layers["img_t"], fill_missing=True, progress=False)
    got = vol[vol.bounds][..., 0]
    assert np.array_equal(got[64:192], img[32:160])
    assert not got[:64].any() and not got[192:].any()


def test_delete_removes_exactly_the_box(tmp_path, workdir):
    img = image_data((128, 128, 32), 9)
    url = make_layer(tmp_path / "img", img, "image", chunk=(32, 32, 16))
    cfg = {"layers": {"img": url}, "steps": {
        "pyr": {"op": "downsample", "layer": "img", "num_mips": 1},
        "rm": {"op": "delete", "layer": "img", "bounds": [[0, 0, 0], [64, 64, 16]], "num_mips": 1},
    }}
    snakemake(workdir, write_config(tmp_path / "d.yaml", cfg))
    mip0 = sorted(p.name for p in (tmp_path / "img" / "8_8_40").iterdir())
    assert "0-32_0-32_0-16.gz" not in mip0 and "32-64_32-64_0-16.gz" not in mip0
    assert "64-96_0-32_0-16.gz" in mip0 and "0-32_0-32_16-32.gz" in mip0
    assert len(mip0) == 4 * 4 * 2 - 4
    mip1 = sorted(p.name for p in (tmp_path / "img" / "16_16_40").iterdir())
    assert "0-32_0-32_0-16.gz" not in mip1 and len(mip1) == 2 * 2 * 2 - 1
