"""Bad input gets a clear message naming the problem, before anything is written."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO, SNAKEFILE, image_data, make_layer, seg_data, snakemake, write_config
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
        "noscales": _info_only(root / "noscales", {"type": "image", "data_type": "uint8", "num_channels": 1}),
        "notjson": _info_only(root / "notjson", '{"type": "image", "scales": ['),
        "floatseg": _info_only(root / "floatseg", dict(
            json.loads((root / "seg" / "info").read_text()), data_type="float32")),
    }


def _info_only(folder, info) -> str:
    folder.mkdir(parents=True)
    (folder / "info").write_text(info if isinstance(info, str) else json.dumps(info))
    return f"file://{folder}"


def snapshot(layers) -> dict:
    """Every file under the layers' common folder: path -> (size, mtime)."""
    root = os.path.commonpath([u[7:] for u in layers.values()])
    out = {}
    for folder, _, files in os.walk(root):
        for f in files:
            st = os.stat(os.path.join(folder, f))
            out[os.path.join(folder, f)] = (st.st_size, st.st_mtime_ns)
    return out


def _planned_op() -> str:
    """An op of the SPEC that this version does not have yet (the list shrinks as ops land)."""
    from magma.config import PLANNED_OPS, implemented_ops, load_schema

    todo = sorted(PLANNED_OPS - set(implemented_ops(load_schema())))
    return todo[0] if todo else "no-such-op-left"


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
        lambda L: cfg(L, s={"op": _planned_op(), "layer": "seg"}),
        # once every op of the SPEC has landed there is none left: then it is an unknown op
        ["steps.s.op", "unknown op" if _planned_op() == "no-such-op-left" else "not available"]),
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
    "info with missing keys": (
        lambda L: cfg(L, s={"op": "downsample", "layer": "noscales"}),
        ["layer 'noscales'", "info is missing scales"]),
    "info that is not JSON": (
        lambda L: cfg(L, s={"op": "downsample", "layer": "notjson"}),
        ["layer 'notjson'", "/info is not valid JSON"]),
    "float segmentation": (
        lambda L: cfg(L, s={"op": "transfer", "src": "floatseg", "dest": "out"}),
        ["layer 'floatseg'", "integer labels", "float32"]),
    "unknown encoding": (
        lambda L: cfg(L, s={"op": "downsample", "layer": "img", "encoding": "jpg"}),
        ["steps.s.encoding", "'jpg' is not one of"]),
    "negative chunk size": (
        lambda L: cfg(L, s={"op": "transfer", "src": "img", "dest": "out", "chunk_size": [-64, 64, 16]}),
        ["steps.s.chunk_size", "-64"]),
    "zero threads": (
        lambda L: dict(cfg(L, s={"op": "downsample", "layer": "img"}), execution={"threads": 0}),
        ["execution.threads", "0"]),
    "run_dir climbing out of the working directory": (
        lambda L: dict(cfg(L, s={"op": "downsample", "layer": "img"}), execution={"run_dir": "results/../../x"}),
        ["execution.run_dir", "'..'"]),
    "run_dir with shell characters": (
        lambda L: dict(cfg(L, s={"op": "downsample", "layer": "img"}), execution={"run_dir": "r; rm -rf ~"}),
        ["execution.run_dir", "only letters, digits"]),
    "execution override for no step": (
        lambda L: dict(cfg(L, s={"op": "downsample", "layer": "img"}), execution={"steps": {"t": {"threads": 2}}}),
        ["execution.steps.t", "no step named 't'"]),
    "empty config": (lambda L: None, ["config is empty"]),
    "config without layers": (lambda L: {"steps": {}}, ["config: 'layers' is a required property"]),
    "step without op": (
        lambda L: cfg(L, s={"layer": "img"}),
        ["steps.s", "'op' is a required property"]),
    "transfer onto an existing layer of another kind": (
        lambda L: cfg(L, s={"op": "transfer", "src": "img", "dest": "seg"}),
        ["steps.s.dest", "layer 'seg' already exists", "data_type"]),
    "memory target below one chunk": (
        lambda L: cfg(L, s={"op": "transfer", "src": "img", "dest": "out", "memory_target": 1000}),
        ["steps.s.memory_target", "too small for one chunk"]),
    "translate moving the source out of the destination": (
        lambda L: cfg(L, s={"op": "transfer", "src": "img", "dest": "out", "translate": [-128, 0, 0]}),
        ["steps.s.translate", "outside the destination", "copy would be empty"]),
    "sharded output with bounds": (
        lambda L: cfg(L, s={"op": "transfer", "src": "img", "dest": "out", "sharded": True,
                            "bounds": [[0, 0, 0], [64, 64, 16]]}),
        ["steps.s.bounds", "whole shards"]),
    "demo into one layer": (
        lambda L: dict(cfg(L), demo={"image": "out", "segmentation": "out"}),
        ["demo", "different layers"]),
    "layer path not a cloud path": (
        lambda L: cfg(dict(L, img="/data/img"), s={"op": "downsample", "layer": "img"}),
        ["layers.img", "/data/img"]),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_config_is_rejected_with_its_name(layers, case):
    make, needles = CASES[case]
    before = snapshot(layers)
    with pytest.raises(MagmaError) as err:
        workflow.plan(make(layers))
    for needle in needles:
        assert needle in str(err.value), f"{case}: {needle!r} not in {err.value}"
    assert snapshot(layers) == before, f"{case}: a file was written or changed"


def test_at_least_25_distinct_cases():
    assert len(CASES) >= 25


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


def test_damaged_chunk_is_named(tmp_path, workdir):
    """A truncated gzip chunk (a crash of some other writer): the task that reads it fails naming
    the file, and writes nothing of its own block."""
    img = image_data((128, 128, 32))
    url = make_layer(tmp_path / "img", img, "image", chunk=(32, 32, 16))
    bad = tmp_path / "img" / "8_8_40" / "32-64_64-96_16-32.gz"
    bad.write_bytes(bad.read_bytes()[:100])
    cfg_ = {"layers": {"img": url},
            "steps": {"ds": {"op": "downsample", "layer": "img", "num_mips": 1, "memory_target": 2.0e4}},
            "execution": {"threads": 1, "retries": 0}}
    proc = snakemake(workdir, write_config(tmp_path / "d.yaml", cfg_), "--keep-going", check=False)
    assert proc.returncode != 0
    logs = "".join(p.read_text() for p in (workdir / "results" / "d" / "logs").rglob("*.log"))
    assert f"{url}/8_8_40/32-64_64-96_16-32 is damaged and cannot be decoded" in logs, logs[-3000:]
    assert "Traceback" not in logs
    # the block that holds the damaged chunk was not written; the others were
    written = {p.name for p in (tmp_path / "img" / "16_16_40").iterdir()}
    assert "0-32_32-64_16-32.gz" not in written and "0-32_0-32_0-16.gz" in written, sorted(written)


def test_slurm_without_a_partition_is_refused_before_any_job(tmp_path, workdir):
    """The SLURM profile leaves slurm_partition empty (the cluster's default). On a cluster without
    a default partition sbatch refuses every job, after the setup jobs wrote their infos; magma
    asks sinfo when Snakemake starts and stops before any job. (sinfo here is a stand-in that prints
    what a cluster without a default partition prints; tests/test_slurm.py runs the real one.)"""
    from magma.executors import check_slurm_partitions

    url = make_layer(tmp_path / "img", image_data((64, 64, 16)), "image", chunk=(32, 32, 16))
    info_before = (tmp_path / "img" / "info").read_text()
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "sinfo").write_text("#!/bin/sh\nprintf 'debug\\ncompute\\n'\n")
    (bindir / "sinfo").chmod(0o755)
    cfgfile = write_config(tmp_path / "slurm.yaml", dict(cfg({"img": url}, ds={"op": "downsample", "layer": "img"}),
                                                         execution={"report": False}))
    env = dict(os.environ, PATH=f"{bindir}:{os.path.dirname(sys.executable)}:{os.environ['PATH']}")
    proc = subprocess.run([sys.executable, "-m", "snakemake", "-s", str(SNAKEFILE), "-d", str(workdir),
                           "--configfile", str(cfgfile), "--profile", str(REPO / "profiles" / "slurm")],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode != 0
    assert ("magma: SLURM: jobs of rule(s) downsample have no slurm_partition and the cluster has no default"
            " partition (sinfo lists: debug, compute)") in proc.stderr, proc.stderr[-3000:]
    assert "--default-resources slurm_partition=<name>" in proc.stderr
    assert not (workdir / "results").exists(), "no job ran"
    assert (tmp_path / "img" / "info").read_text() == info_before

    # the same jobs pass with a partition named, or on a cluster that has a default one
    check_slurm_partitions([("downsample", False, "compute"), ("setup", True, "")], sinfo=lambda: "debug\n")
    check_slurm_partitions([("downsample", False, "''")], sinfo=lambda: "debug*\ncompute\n")
    with pytest.raises(MagmaError, match="cannot ask the cluster"):
        check_slurm_partitions([("downsample", False, "")], sinfo=lambda: (_ for _ in ()).throw(OSError("no sinfo")))
