"""Transient storage errors are retried with backoff; a persistent one fails the job with a
message naming the object; an error no retry can fix (no such bucket) is not retried at all.

A loopback proxy (flaky_proxy.py) in front of the moto S3 server answers 503 SlowDown or drops
the connection for chosen requests. botocore's own retries are switched off (AWS_MAX_ATTEMPTS=1)
so that the attempts counted are magma's.
"""
from __future__ import annotations

import subprocess
import sys
import time

import numpy as np
import pytest
import yaml
from cloudvolume import CloudVolume

from conftest import SNAKEFILE, image_data
from flaky_proxy import FlakyProxy
from s3server import running_server

from magma.ops.downsample import pyramid

BUCKET = "magma-flaky"


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    yield from running_server(tmp_path_factory.mktemp("s3"), (BUCKET,))


def upload(s3, path: str, data: np.ndarray) -> None:
    info = CloudVolume.create_new_info(1, "image", "uint8", "raw", [8, 8, 40], [0, 0, 0], list(data.shape),
                                       chunk_size=[32, 32, 16])
    with s3.in_process():
        vol = CloudVolume(path, info=info, progress=False, secrets=s3.secrets_dict())
        vol.commit_info()
        vol[:, :, :] = data


def run(tmp_path, env, cfg, name):
    work = tmp_path / name
    work.mkdir()
    cfgfile = tmp_path / f"{name}.yaml"
    cfgfile.write_text(yaml.safe_dump(cfg, sort_keys=False))
    cmd = [sys.executable, "-m", "snakemake", "-s", str(SNAKEFILE), "-d", str(work), "--cores", "2",
           "--configfile", str(cfgfile)]
    t0 = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    logs = "".join(p.read_text() for p in (work / "results").rglob("*.log")) if (work / "results").exists() else ""
    return proc, logs, time.time() - t0


def test_transient_errors_are_retried_and_persistent_ones_named(s3, tmp_path):
    img = image_data((128, 128, 32), 3)
    src = f"s3://{BUCKET}/flaky/img"
    upload(s3, src, img)
    env = s3.env()
    env.update(AWS_MAX_ATTEMPTS="1", AWS_RETRY_MODE="standard")
    execution = {"threads": 1, "tasks_per_job": 8, "retries": 0, "storage_attempts": 4, "storage_first_wait": 0.05,
                 "report": False}  # (the report reads chunks again)

    # every chunk read and write fails twice (a 503, then a dropped connection) before it works
    proxy = FlakyProxy(s3.url, fail_first=2, match="/flaky/").start()
    try:
        env["AWS_ENDPOINT_URL_S3"] = proxy.url
        cfg = {"layers": {"img": src}, "steps": {"pyr": {"op": "downsample", "layer": "img", "num_mips": 1}},
               "execution": execution}
        proc, logs, seconds = run(tmp_path, env, cfg, "transient")
        assert proc.returncode == 0, proc.stderr[-4000:] + logs[-3000:]
        chunk_gets = [k for k in proxy.counts if k[0] == "GET" and "/8_8_40/" in k[1]]
        chunk_puts = [k for k in proxy.counts if k[0] == "PUT" and "/16_16_40/" in k[1]]
        assert len(chunk_gets) == 32 and len(chunk_puts) == 8, (chunk_gets, chunk_puts)
        odd = {k: (proxy.counts[k], proxy.failed[k]) for k in chunk_gets + chunk_puts if (proxy.counts[k], proxy.failed[k]) != (3, 2)}
        assert not odd, odd
        print(f"{sum(proxy.failed.values())} requests failed and were retried; run took {seconds:.1f} s")
    finally:
        proxy.stop()
    with s3.in_process():
        out = CloudVolume(src, mip=1, progress=False, secrets=s3.secrets_dict())
        assert np.array_equal(out[out.bounds][..., 0], pyramid(img, "avg", (2, 2, 1), 1)[0])

    # one chunk that never comes back: the job fails after storage_attempts tries, naming it
    bad = "flaky/img/8_8_40/32-64_64-96_16-32"
    proxy = FlakyProxy(s3.url, always=bad).start()
    try:
        env["AWS_ENDPOINT_URL_S3"] = proxy.url
        cfg["steps"]["pyr"]["num_mips"] = 2
        proc, logs, seconds = run(tmp_path, env, cfg, "persistent")
        assert proc.returncode != 0
        assert f"s3://{BUCKET}/{bad}: still failing after 4 attempts" in logs, logs[-3000:]
        assert proxy.counts[("GET", f"/{BUCKET}/{bad}")] == 4
        assert "Traceback" not in logs and s3.secret_key not in logs + proc.stderr + proc.stdout
    finally:
        proxy.stop()


def test_missing_bucket_fails_at_once(s3, tmp_path):
    """No retry can create a bucket: planning stops on the first answer, naming layer and bucket."""
    cfg = {"layers": {"em": "s3://magma-no-such-bucket/fly/em"},
           "steps": {"pyr": {"op": "downsample", "layer": "em"}}}
    proxy = FlakyProxy(s3.url).start()  # fails nothing; counts the requests
    try:
        env = dict(s3.env(), AWS_MAX_ATTEMPTS="1", AWS_RETRY_MODE="standard", AWS_ENDPOINT_URL_S3=proxy.url)
        proc, _, seconds = run(tmp_path, env, cfg, "nobucket")
    finally:
        proxy.stop()
    assert proc.returncode != 0
    assert "magma: layer 'em': cannot read s3://magma-no-such-bucket/fly/em/info" in proc.stderr, proc.stderr[-3000:]
    assert "bucket 'magma-no-such-bucket' does not exist" in proc.stderr
    assert proxy.counts[("GET", "/magma-no-such-bucket/fly/em/info")] == 1, proxy.counts
    assert not (tmp_path / "nobucket" / "results").exists()
