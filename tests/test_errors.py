"""Bad input gets a clear message naming the problem, before anything is written."""
import json
import os

import numpy as np
import pytest

from conftest import image_data, make_layer, seg_data, snakemake, write_config
from magma import workflow
from magma.errors import MagmaError


@pytest.fixture(scope="module")
def layers(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    return {
        "img": make_layer(root / "img", image_data((128, 128, 32)), "image", chunk=(32, 32, 16)),
        "seg": make_layer(root / "seg", seg_data((128, 128, 32)), "segmentation", chunk=(32, 32, 16)),
        "out": f"file://{root / 'out'}",
        "nothing": f"file://{root / 'nothing'}",
    }


def cfg(layers, **steps):
    return {"layers": layers, "steps": steps}


CASES = {
    "typo in a parameter": (
        lambda L: cfg(L, s={"op": "downsample", "layer": "img", "num_mip": 2}),
        ["steps.s", "'num_mip'", "did you mean 'num_mips'"]),
    "wrong type": (
        lambda L: cfg(L, s={"op": "downsample", "layer": "img", "num_mips": "three"}),
        ["steps.s.num_mips", "'three'"]),
    "unknown top-level key": (
        lambda L: dict(cfg(L, s={"op": "downsample", "layer": "img"}), exeuction={}),
        ["unknown key 'exeuction'", "did you mean 'execution'"]),
    "unknown op": (
        lambda L: cfg(L, s={"op": "downsampel", "layer": "img"}),
        ["steps.s.op", "unknown op 'downsampel'", "did you mean 'downsample'"]),
    "op of a later release": (
        lambda L: cfg(L, s={"op": "mesh", "layer": "seg"}),
        ["steps.s.op", "not available"]),
    "factor not 2x2x1 or 2x2x2": (
        lambda L: cfg(L, s={"op": "downsample", "layer": "img", "factor": [3, 3, 1]}),
        ["steps.s.factor"]),
    "zero shape": (
        lambda L: cfg(L, s={"op": "transfer", "src": "img", "dest": "out", "shape": [0, 64, 64]}),
        ["steps.s.shape"]),
    "undeclared layer": (
        lambda L: cfg(L, s={"op": "downsample", "layer": "imgg"}),
        ["steps.s.layer", "no layer named 'imgg'"]),
    "layer without info": (
        lambda L: cfg(L, s={"op": "downsample", "layer": "nothing"}),
        ["layer 'nothing'", "no info file"]),
    "encoding for the wrong layer type": (
        lambda L: cfg(L, s={"op": "downsample", "layer": "img", "encoding": "compressed_segmentation"}),
        ["steps.s.encoding", "needs a segmentation layer", "'img'"]),
    "jpeg on a segmentation": (
        lambda L: cfg(L, s={"op": "transfer", "src": "seg", "dest": "out", "encoding": "jpeg"}),
        ["steps.s.encoding", "jpeg", "image layer"]),
    "mip that does not exist": (
        lambda L: cfg(L, s={"op": "downsample", "layer": "img", "mip": 4}),
        ["steps.s.mip", "mip 4 does not exist"]),
    "bounds outside the volume": (
        lambda L: cfg(L, s={"op": "downsample", "layer": "img", "bounds": [[0, 0, 0], [256, 64, 16]]}),
        ["steps.s.bounds", "outside layer 'img'", "[128, 128, 32]"]),
    "bounds not chunk aligned": (
        lambda L: cfg(L, s={"op": "downsample", "layer": "img", "num_mips": 1, "bounds": [[0, 0, 0], [40, 64, 16]]}),
        ["steps.s.bounds", "not aligned", "nearest aligned box"]),
    "empty bounds": (
        lambda L: cfg(L, s={"op": "delete", "layer": "img", "bounds": [[32, 0, 0], [32, 64, 16]]}),
        ["steps.s.bounds", "empty"]),
    "transfer onto its own source": (
        lambda L: cfg(dict(L, same=L["img"]), s={"op": "transfer", "src": "img", "dest": "same"}),
        ["steps.s", "same path"]),
    "two steps creating one layer": (
        lambda L: cfg(L, a={"op": "transfer", "src": "img", "dest": "out"},
                      b={"op": "transfer", "src": "seg", "dest": "out"}),
        ["both create layer 'out'"]),
    "dependency cycle": (
        lambda L: cfg(L, a={"op": "downsample", "layer": "img", "after": ["b"]},
                      b={"op": "downsample", "layer": "seg", "after": ["a"]}),
        ["dependency cycle"]),
    "after names no step": (
        lambda L: cfg(L, a={"op": "downsample", "layer": "img", "after": ["zzz"]}),
        ["steps.a.after", "no step named 'zzz'"]),
    "translate into negative coordinates": (
        lambda L: cfg(L, s={"op": "transfer", "src": "img", "dest": "out", "dest_voxel_offset": [-64, 0, 0]}),
        ["steps.s.dest_voxel_offset", "negative"]),
    "bad step name": (
        lambda L: cfg(L, **{"my step": {"op": "downsample", "layer": "img"}}),
        ["'my step'", "must start with a letter"]),
    "layer path not a cloud path": (
        lambda L: cfg(dict(L, img="/data/img"), s={"op": "downsample", "layer": "img"}),
        ["layers.img", "/data/img"]),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_config_is_rejected_with_its_name(layers, case):
    make, needles = CASES[case]
    with pytest.raises(MagmaError) as err:
        workflow.plan(make(layers))
    for needle in needles:
        assert needle in str(err.value), f"{case}: {needle!r} not in {err.value}"


def test_snakemake_reports_bad_config_and_writes_nothing(layers, tmp_path, workdir):
    before = json.loads(open(layers["img"][7:] + "/info").read())
    cfgfile = write_config(tmp_path / "bad.yaml", cfg(layers, s={"op": "downsample", "layer": "img", "num_mip": 2}))
    for extra in ((), ("-n",)):
        proc = snakemake(workdir, cfgfile, *extra, check=False)
        assert proc.returncode != 0
        assert "magma: config: steps.s: unknown key 'num_mip' (did you mean 'num_mips'?)" in proc.stderr
    assert not (workdir / "results").exists()
    assert json.loads(open(layers["img"][7:] + "/info").read()) == before


def test_missing_chunk_fails_before_writing(tmp_path, workdir):
    img = image_data((128, 128, 32))
    url = make_layer(tmp_path / "img", img, "image", chunk=(32, 32, 16))
    os.unlink(tmp_path / "img" / "8_8_40" / "32-64_64-96_16-32.gz")
    info_before = (tmp_path / "img" / "info").read_text()
    cfg_ = {"layers": {"img": url, "out": f"file://{tmp_path / 'out'}"},
            "steps": {"ds": {"op": "downsample", "layer": "img", "num_mips": 1},
                      "copy": {"op": "transfer", "src": "img", "dest": "out"}}}
    proc = snakemake(workdir, write_config(tmp_path / "m.yaml", cfg_), "--keep-going", check=False)
    assert proc.returncode != 0
    logs = "".join(p.read_text() for p in (workdir / "results" / "m" / "logs").rglob("*.log"))
    assert "missing 1 chunk(s)" in logs and "8_8_40/32-64_64-96_16-32" in logs and "fill_missing" in logs
    assert (tmp_path / "img" / "info").read_text() == info_before, "no scale may be added"
    assert not (tmp_path / "img" / "16_16_40").exists()
    assert not (tmp_path / "out").exists(), "the transfer must not create its destination"

    # with fill_missing the same config runs, reading the hole as background
    cfg_["steps"]["ds"]["fill_missing"] = True
    cfg_["steps"]["copy"]["fill_missing"] = True
    snakemake(workdir, write_config(tmp_path / "m.yaml", cfg_))
    from conftest import read

    out = read(f"file://{tmp_path / 'out'}")
    assert np.all(out[32:64, 64:96, 16:32] == 0) and np.array_equal(out[:32], img[:32])
