"""Relabeling compressed_segmentation chunks in their lookup tables gives, once decoded by
the reference codec, exactly the relabeled voxels: uint32 and uint64, edge-chunk shapes
that are not whole blocks, uniform blocks (0 bits), shared tables. (The codec crashes encoding two-channel
chunks, so those are not tested; segmentation layers have one.)"""
import compressed_segmentation as cseg
import fastremap
import numpy as np
import pytest

from magma import cseg_tables


def relabeled(x, block, table):
    enc = cseg.compress(np.asfortranarray(x), block_size=block, order="F")
    out = cseg_tables.relabel_chunk(enc, x.shape, block, x.dtype, lambda v: fastremap.remap(v, table))
    return cseg.decompress(out, x.shape, x.dtype, block_size=block, order="F")


@pytest.mark.parametrize("dtype", [np.uint32, np.uint64])
@pytest.mark.parametrize("shape", [(64, 64, 32, 1), (37, 64, 19, 1), (8, 8, 8, 1), (1, 1, 1, 1), (20, 9, 8, 1)])
@pytest.mark.parametrize("labels", [1, 3, 17, 300, 5000])
def test_relabel_equals_remapping_the_voxels(dtype, shape, labels):
    rng = np.random.default_rng(labels)
    big = 2**40 if dtype == np.uint64 else 7
    x = (rng.integers(0, labels, size=shape).astype(dtype) * dtype(big) + dtype(1))
    x[: shape[0] // 2] = 5  # uniform blocks, and tables the encoder shares between blocks
    ids = np.unique(x)
    table = dict(zip(ids.tolist(), rng.integers(0, np.iinfo(dtype).max, size=len(ids), dtype=dtype).tolist()))
    np.testing.assert_array_equal(relabeled(x, (8, 8, 8), table), fastremap.remap(x, table))


def test_merging_labels_keeps_a_valid_chunk():
    x = np.arange(16 * 16 * 8, dtype=np.uint64).reshape(16, 16, 8, 1)
    table = {int(v): int(v) // 100 for v in np.unique(x)}  # many labels onto few: tables repeat values
    np.testing.assert_array_equal(relabeled(x, (8, 8, 8), table), fastremap.remap(x, table))


def test_a_damaged_chunk_is_refused():
    x = np.arange(16 * 16 * 8, dtype=np.uint64).reshape(16, 16, 8, 1)
    enc = cseg.compress(np.asfortranarray(x), block_size=(8, 8, 8), order="F")
    with pytest.raises(cseg_tables.Unsupported):
        cseg_tables.relabel_chunk(enc[: len(enc) // 2], x.shape, (8, 8, 8), np.uint64, lambda v: v)
    with pytest.raises(cseg_tables.Unsupported):
        cseg_tables.relabel_chunk(enc, x.shape, (8, 8, 8), np.uint16, lambda v: v)


def test_remap_task_falls_back_to_decoding_a_chunk_it_cannot_parse(tmp_path, monkeypatch):
    import hashlib
    import json

    from cloudvolume import Bbox, CloudVolume

    from conftest import make_layer, read, seg_data
    from magma.ops import remap

    seg = (seg_data((64, 64, 8), 4) % np.uint64(40)).astype(np.uint32)
    src = make_layer(tmp_path / "s", seg, "segmentation", chunk=(32, 32, 8), encoding="compressed_segmentation")
    CloudVolume(f"file://{tmp_path}/d", info=CloudVolume(src).info).commit_info()
    (tmp_path / "m.json").write_text(json.dumps({str(v): v + 1 for v in range(40)}))
    params = {"src": "s", "dest": "d", "mip": 0, "num_mips": 0, "fill_missing": False, "compress": None,
              "mapping_file": str(tmp_path / "m.json"), "data_type": "uint32", "preserve_missing_labels": True,
              "mapping_sha256": hashlib.sha256((tmp_path / "m.json").read_bytes()).hexdigest(), "tables": True}

    def refuse(*args):
        raise cseg_tables.Unsupported("test")

    monkeypatch.setattr(cseg_tables, "relabel_chunk", refuse)
    remap.run_task(params, Bbox((0, 0, 0), (64, 64, 8)), {"s": src, "d": f"file://{tmp_path}/d"})
    np.testing.assert_array_equal(read(f"file://{tmp_path}/d"), seg + 1)
