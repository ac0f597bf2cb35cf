"""Layers on `s3://`: the demo pipeline against a real S3-compatible HTTP server (moto, on loopback)
gives exactly what it gives on local disk, and never prints the credentials.

The server is a separate `python -m moto.server` process (see s3server.py). If it cannot start, the
tests fail with moto's output; they are never skipped.
"""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from cloudfiles import CloudFiles
from cloudvolume import CloudVolume

from conftest import SNAKEFILE
from s3server import running_server

from magma import workflow
from magma.config import validate
from magma.errors import MagmaError

LAYERS = ("image", "seg", "seg_rechunked", "image_sharded")


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    yield from running_server(tmp_path_factory.mktemp("s3"), ())


def demo_config(paths: dict) -> dict:
    """The kinds of steps of config/config.yaml on a small demo volume."""
    return {
        "layers": paths,
        "demo": {"image": "image", "segmentation": "seg", "size": [192, 192, 64], "objects": 12},
        "steps": {
            "image_pyramid": {"op": "downsample", "layer": "image", "num_mips": 2, "memory_target": 2.0e6},
            "seg_pyramid": {"op": "downsample", "layer": "seg", "num_mips": 2, "memory_target": 6.4e7},
            "seg_copy": {"op": "transfer", "src": "seg", "dest": "seg_rechunked", "chunk_size": [64, 64, 32],
                         "encoding": "compresso", "memory_target": 6.4e7},
            "image_shards": {"op": "transfer", "src": "image", "dest": "image_sharded", "sharded": True,
                             "memory_target": 1.0e6},
        },
        "execution": {"threads": 2, "tasks_per_job": 4},
    }


def start_snakemake(workdir: Path, cfgfile: Path, env: dict, *args):
    cmd = [sys.executable, "-m", "snakemake", "-s", str(SNAKEFILE), "-d", str(workdir), "--cores", "2",
           "--configfile", str(cfgfile), *args]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def stored_keys(path: str, secrets=None) -> set:
    """Object names of a layer, without the compression suffix file:// adds (`.gz`, `.br`)."""
    keys = CloudFiles(path, secrets=secrets).list()
    return {k[:-3] if k.endswith((".gz", ".br")) else k for k in keys}


def test_pipeline_on_s3_equals_local(s3, tmp_path, missing_bucket_run):
    # (missing_bucket_run: only started here, so that its waiting overlaps with this test)
    bucket = "magma-e2e"
    s3.create_bucket(bucket)
    local = {n: f"file://{tmp_path / 'local-data' / n}" for n in LAYERS}
    remote = {n: f"s3://{bucket}/demo/{n}" for n in LAYERS}
    env = s3.env()

    runs = {}
    for kind, paths in (("local", local), ("s3", remote)):
        d = tmp_path / kind
        (d / "work").mkdir(parents=True)
        cfgfile = d / "demo.yaml"  # same name: same run dir results/demo
        cfgfile.write_text(yaml.safe_dump(demo_config(paths), sort_keys=False))
        runs[kind] = (d / "work", cfgfile)

    # both runs at once: the machine has 2 cores and each job is mostly interpreter start-up
    t0 = time.time()
    procs = {kind: start_snakemake(w, c, env) for kind, (w, c) in runs.items()}
    out = {}
    try:
        for kind, proc in procs.items():
            stdout, stderr = proc.communicate(timeout=300)
            out[kind] = (proc.returncode, stdout, stderr)
    finally:
        for proc in procs.values():  # only after a timeout or an interrupt
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    for kind, (rc, stdout, stderr) in out.items():
        assert rc == 0, f"{kind} run failed ({rc}):\n{stdout[-3000:]}\n{stderr[-6000:]}"
    print(f"both pipelines: {time.time() - t0:.1f} s")

    # the S3 run wrote to the bucket, not to local disk
    s3_work = runs["s3"][0]
    assert s3.keys(bucket, "demo/image_sharded/")
    assert not any(p.name in LAYERS for p in s3_work.rglob("*") if p.is_dir())
    for n in LAYERS:
        assert remote[n] in out["s3"][1] + out["s3"][2], "the run ends by listing the layers written"

    # shards and chunks carry the same Cache-Control header (CloudVolume's default for chunks)
    client = s3.client()
    shard = next(k for k in s3.keys(bucket, "demo/image_sharded/") if k.endswith(".shard"))
    chunk = next(k for k in s3.keys(bucket, "demo/seg_rechunked/") if k.rsplit("/", 1)[-1] != "info")
    for key in (shard, chunk):
        assert client.head_object(Bucket=bucket, Key=key).get("CacheControl") == "max-age=3600, s-max-age=3600"

    secrets = s3.secrets_dict()
    with s3.in_process():
        for n in LAYERS:
            a_info = CloudFiles(local[n]).get_json("info")
            b_info = CloudFiles(remote[n], secrets=secrets).get_json("info")
            assert a_info == b_info, f"{n}: info differs"
            if n in ("image", "seg"):
                assert len(a_info["scales"]) == 3, "the two pyramids were built"
            assert stored_keys(local[n]) == stored_keys(remote[n], secrets), f"{n}: different objects stored"
            for mip in range(len(a_info["scales"])):
                a = CloudVolume(local[n], mip=mip, progress=False)
                b = CloudVolume(remote[n], mip=mip, progress=False, secrets=secrets)
                va, vb = a[a.bounds], b[b.bounds]
                assert va.dtype == vb.dtype and va.shape == vb.shape, f"{n} mip {mip}"
                assert np.array_equal(va, vb), f"{n} mip {mip}: data differs"
            pa = CloudFiles(local[n]).get_json("provenance")
            pb = CloudFiles(remote[n], secrets=secrets).get_json("provenance")
            assert [e["method"] for e in pa["processing"]] == [e["method"] for e in pb["processing"]]
        assert len(a_info["scales"]) == 1 and "sharding" in a_info["scales"][0]  # image_sharded, last

    # the credentials appear nowhere: not in snakemake's output, not in any file of the run
    rc, stdout, stderr = out["s3"]
    for value in (s3.access_key, s3.secret_key):
        assert value not in stdout and value not in stderr
        for f in s3_work.rglob("*"):
            if f.is_file():
                assert value.encode() not in f.read_bytes(), f"credential found in {f}"
    logs = list((s3_work / "results" / "demo" / "logs").rglob("*.log"))
    assert len(logs) > 10 and list((s3_work / ".snakemake" / "log").glob("*.log"))


@pytest.fixture(scope="module")
def missing_bucket_run(s3, tmp_path_factory):
    """`snakemake -n` on a layer in a bucket that does not exist, started in the background: cloud-files
    retries the failed read for 15-30 s, which overlaps with the pipeline test that requests this too."""
    tmp = tmp_path_factory.mktemp("missing-bucket")
    cfg = {"layers": {"em": "s3://magma-no-such-bucket/fly/em"},
           "steps": {"em_pyramid": {"op": "downsample", "layer": "em", "num_mips": 2}}}
    cfgfile = tmp / "bad.yaml"
    cfgfile.write_text(yaml.safe_dump(cfg))
    (tmp / "work").mkdir()
    proc = start_snakemake(tmp / "work", cfgfile, s3.env(), "-n")
    yield proc
    if proc.poll() is None:
        proc.kill()
    proc.communicate()


def test_missing_bucket_is_a_plan_error(s3, missing_bucket_run):
    """A layer in a bucket that does not exist: `snakemake -n` stops at planning, naming the layer."""
    stdout, err = missing_bucket_run.communicate(timeout=180)
    assert missing_bucket_run.returncode != 0
    assert "magma: layer 'em': cannot read s3://magma-no-such-bucket/fly/em/info" in err, err[-3000:]
    assert "bucket 'magma-no-such-bucket' does not exist" in err and s3.url in err, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    assert s3.secret_key not in err + stdout


def test_env_credentials_need_session_token(s3, tmp_path):
    """cloud-files 6 reads AWS_* credentials only with AWS_SESSION_TOKEN set: magma says so."""
    cfg = {"layers": {"em": "s3://magma-e2e-any/em"},
           "steps": {"em_pyramid": {"op": "downsample", "layer": "em"}}}
    cfgfile = tmp_path / "env.yaml"
    cfgfile.write_text(yaml.safe_dump(cfg))
    env = s3.env()
    env.update(CLOUD_VOLUME_DIR=str(tmp_path / "no-secrets"), AWS_ACCESS_KEY_ID=s3.access_key,
               AWS_SECRET_ACCESS_KEY=s3.secret_key)
    proc = subprocess.run([sys.executable, "-m", "magma.cli", "plan", "--configfile", str(cfgfile)],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 1
    assert "layer 'em'" in proc.stderr and "AWS_SESSION_TOKEN is not" in proc.stderr, proc.stderr
    assert s3.secret_key not in proc.stderr + proc.stdout

    # with the (empty) token, the same variables work: the read reaches the server
    s3.create_bucket("magma-e2e-any")
    env["AWS_SESSION_TOKEN"] = ""
    proc = subprocess.run([sys.executable, "-m", "magma.cli", "plan", "--configfile", str(cfgfile)],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 1 and "no info file at s3://magma-e2e-any/em/info" in proc.stderr, proc.stderr


def test_gs_layer_paths_plan():
    """`gs://` paths pass the schema and plan like any other (CloudVolume does their I/O)."""
    cfg = {"layers": {"em": "gs://my-lab-bucket/fly/em", "em_copy": "gs://my-lab-bucket/fly/em_copy"},
           "steps": {"pyr": {"op": "downsample", "layer": "em", "num_mips": 2},
                     "copy": {"op": "transfer", "src": "em", "dest": "em_copy", "chunk_size": [128, 128, 32]}}}
    assert validate(cfg)["layers"]["em"] == "gs://my-lab-bucket/fly/em"
    info = CloudVolume.create_new_info(1, "image", "uint8", "raw", [8, 8, 40], [0, 0, 0], [1024, 1024, 128],
                                       chunk_size=[64, 64, 64])
    seen = []

    def read_info(name, path):
        seen.append(path)
        if name == "em":
            return json.loads(json.dumps(info))
        raise MagmaError(f"layer '{name}': no info file at {path}/info")

    plan = workflow.plan(cfg, read_info=read_info)
    assert sorted(seen) == ["gs://my-lab-bucket/fly/em", "gs://my-lab-bucket/fly/em_copy"]
    assert list(plan.steps) == ["pyr", "copy"] and plan.paths["em_copy"] == "gs://my-lab-bucket/fly/em_copy"
    assert all(s.jobs >= 1 for s in plan.steps.values())

    for bad in ("gcs://bucket/em", "s3:/bucket/em", "bucket/em"):
        with pytest.raises(MagmaError, match="layers.em"):
            validate(cfg | {"layers": {"em": bad, "em_copy": "gs://b/c"}})


def test_storage_errors_say_what_to_check(monkeypatch):
    """The messages for failures the moto server cannot produce (it accepts any credentials)."""
    from botocore.exceptions import ClientError, EndpointConnectionError

    from magma.storage import describe_error

    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "https://s3.example.org")
    denied = ClientError({"Error": {"Code": "InvalidAccessKeyId", "Message": "no such key id"}}, "GetObject")
    msg = describe_error("s3://lab/em", denied)
    assert "refused (InvalidAccessKeyId)" in msg and "https://s3.example.org" in msg and "credentials" in msg
    msg = describe_error("s3://lab/em", EndpointConnectionError(endpoint_url="https://s3.example.org/lab/em/info"))
    assert msg.startswith("cannot connect to the S3 endpoint https://s3.example.org (from AWS_ENDPOINT_URL_S3)")
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3")
    assert "AWS S3" in describe_error("s3://lab/em", EndpointConnectionError(endpoint_url="https://x"))
    assert describe_error("gs://lab/em", RuntimeError("boom")) == "RuntimeError: boom"
