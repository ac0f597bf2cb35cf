"""profiles/slurm on a real single-node SLURM cluster.

The cluster comes from scripts/slurm/start.sh (Debian packages installed by
scripts/install-test-servers.sh) and is stopped by scripts/slurm/stop.sh in the
fixture's finalizer, also when the test fails. A smaller demo pipeline with the
kinds of steps of config/config.yaml (downsample of image and segmentation, a
rechunking compresso transfer, a sharded transfer) runs through
`--profile profiles/slurm`, and the same config runs locally with `--cores 2`
into other paths; every layer's info and every mip must be identical. SLURM's
own record of the jobs (squeue keeps finished jobs for MinJobAge) must show one
completed job per planned batch job, with the plan's CPUs, memory and time
limit. If the cluster cannot be started, the test fails with the reason.
"""
from __future__ import annotations

import fcntl
import json
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from cloudvolume import CloudVolume

from conftest import REPO, SNAKEFILE, snakemake, write_config
from magma import workflow

PROFILE = REPO / "profiles" / "slurm"
START = REPO / "scripts" / "slurm" / "start.sh"
STOP = REPO / "scripts" / "slurm" / "stop.sh"
SLURM_DIR = Path(os.environ.get("MAGMA_SLURM_DIR", "/tmp/magma-slurm"))
# one cluster per machine: concurrent test sessions take turns
LOCK = Path(f"{SLURM_DIR}.lock")
LOCK_WAIT = 900
# the SLURM run takes ~1.5 min here; a hang (e.g. a status command that never
# sees the jobs finish) must not block CI
RUN_TIMEOUT = 480
LAYERS = ("image", "seg", "seg_rechunked", "image_sharded")


def config(root: Path) -> dict:
    """The demo's steps on a 192x192x64 volume; only the paths depend on `root`."""
    return {
        "layers": {name: f"file://{root / 'data' / name}" for name in LAYERS},
        "demo": {"image": "image", "segmentation": "seg", "seed": 3, "size": [192, 192, 64],
                 "chunk_size": [64, 64, 64], "objects": 12},
        "steps": {
            "image_pyramid": {"op": "downsample", "layer": "image", "num_mips": 3, "memory_target": 1.0e6},
            "seg_pyramid": {"op": "downsample", "layer": "seg", "num_mips": 2, "memory_target": 1.6e7},
            "seg_copy": {"op": "transfer", "src": "seg", "dest": "seg_rechunked", "chunk_size": [64, 64, 32],
                         "encoding": "compresso", "memory_target": 1.6e7, "after": ["seg_pyramid"]},
            "image_shards": {"op": "transfer", "src": "image", "dest": "image_sharded", "sharded": True,
                             "memory_target": 1.0e6},
        },
        "execution": {
            "threads": 1,
            "tasks_per_job": 4,
            "run_dir": str(root / "run"),
            # one step's jobs ask for 2 CPUs: the override must reach sbatch
            "steps": {"image_pyramid": {"threads": 2}},
        },
    }


@dataclass
class Cluster:
    error: str | None
    env: dict


def _run_script(script: Path, timeout: int) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(script)], capture_output=True, text=True, timeout=timeout,
                          env=dict(os.environ, MAGMA_SLURM_DIR=str(SLURM_DIR)))


def _take_lock(f) -> bool:
    deadline = time.monotonic() + LOCK_WAIT
    while True:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if time.monotonic() > deadline:
                return False
            time.sleep(1)


@pytest.fixture(scope="module")
def slurm_cluster():
    """Start the cluster; always stop it afterwards. A start failure is handed to the test, which fails."""
    with open(LOCK, "w") as lock:
        if not _take_lock(lock):
            yield Cluster(f"another test session held {LOCK} for more than {LOCK_WAIT} s", {})
            return
        try:
            try:
                proc = _run_script(START, 180)
                error = None if proc.returncode == 0 else (
                    f"scripts/slurm/start.sh failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
            except subprocess.TimeoutExpired as exc:
                error = f"scripts/slurm/start.sh did not finish in {exc.timeout} s:\n{exc.stderr or ''}"
            env = dict(os.environ, SLURM_CONF=str(SLURM_DIR / "slurm.conf"),
                       PATH=f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}")
            yield Cluster(error, env)
        finally:
            stop = _run_script(STOP, 120)
            if stop.returncode != 0:
                sys.stderr.write(f"scripts/slurm/stop.sh failed ({stop.returncode}):\n{stop.stderr}\n")


def squeue_jobs(run_id: str, env: dict) -> list[dict]:
    out = subprocess.run(["squeue", "--states=all", "--noheader", "--name", run_id, "-o", "%i|%T|%C|%m|%l|%k"],
                         capture_output=True, text=True, timeout=30, env=env, check=True).stdout
    keys = ("id", "state", "cpus", "mem", "time", "comment")
    return [dict(zip(keys, line.split("|"))) for line in out.splitlines() if line.strip()]


def expected_jobs(cfg: dict) -> dict:
    """comment the plugin gives each batch job -> (cpus, memory, time limit) the plan asks for."""
    plan = workflow.plan(cfg)
    out = {}
    for name, sp in plan.steps.items():
        hours, minutes = divmod(sp.runtime, 60)
        for st in sp.stages:
            for j in range(st.jobs):
                comment = f"rule_{sp.op}_wildcards_{name}_{st.name}_{j}"
                out[comment] = (str(sp.threads), f"{sp.mem_mb}M", f"{hours}:{minutes:02d}:00")
    return out


def layer_files(url: str) -> list[str]:
    root = Path(url.removeprefix("file://"))
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and p.name != "provenance")


def test_slurm_profile_matches_local_run(slurm_cluster, tmp_path):
    if slurm_cluster.error:
        pytest.fail(f"could not start the single-node SLURM cluster: {slurm_cluster.error}")
    env = slurm_cluster.env

    cfg_slurm, cfg_local = config(tmp_path / "slurm"), config(tmp_path / "local")
    expected = expected_jobs(cfg_slurm)
    assert len(expected) >= 8 and {c[0] for c in expected.values()} == {"1", "2"}
    work_slurm, work_local = tmp_path / "slurm" / "work", tmp_path / "local" / "work"
    work_slurm.mkdir(parents=True)
    work_local.mkdir(parents=True)
    cfgfile_slurm = write_config(tmp_path / "slurm" / "run.yaml", cfg_slurm)
    cfgfile_local = write_config(tmp_path / "local" / "run.yaml", cfg_local)

    cmd = ["timeout", "-k", "20", str(RUN_TIMEOUT), sys.executable, "-m", "snakemake", "-s", str(SNAKEFILE),
           "-d", str(work_slurm), "--profile", str(PROFILE), "--configfile", str(cfgfile_slurm)]
    t0 = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=RUN_TIMEOUT + 60, env=env, cwd=work_slurm)
    t_slurm = time.monotonic() - t0
    out = proc.stdout + proc.stderr
    if proc.returncode != 0:
        queue = subprocess.run(["squeue", "--states=all", "-o", "%i|%T|%C|%m|%k|%r"], capture_output=True,
                               text=True, env=env).stdout
        why = "timed out (killed by `timeout`)" if proc.returncode in (124, 137) else f"exit {proc.returncode}"
        pytest.fail(f"snakemake --profile profiles/slurm {why} after {t_slurm:.0f} s:\n{out[-8000:]}\n"
                    f"squeue:\n{queue}")
    assert "magma: finished. Layers written:" in out

    # every batch job went through SLURM exactly once, with the plan's resources;
    # setup, stage gates and finish are local rules and never reach sbatch
    m = re.search(r"SLURM run ID: (\S+)", out)
    assert m, out[-4000:]
    jobs = squeue_jobs(m.group(1), env)
    assert sorted(j["comment"] for j in jobs) == sorted(expected), jobs
    for j in jobs:
        assert j["state"] == "COMPLETED", j
        assert (j["cpus"], j["mem"], j["time"]) == expected[j["comment"]], j

    t0 = time.monotonic()
    snakemake(work_local, cfgfile_local)
    t_local = time.monotonic() - t0

    for name in LAYERS:
        a_url, b_url = cfg_slurm["layers"][name], cfg_local["layers"][name]
        a_info = json.loads(Path(a_url.removeprefix("file://"), "info").read_text())
        b_info = json.loads(Path(b_url.removeprefix("file://"), "info").read_text())
        assert a_info == b_info, name
        assert layer_files(a_url) == layer_files(b_url), name
        for mip in range(len(a_info["scales"])):
            a = CloudVolume(a_url, mip=mip, progress=False)
            b = CloudVolume(b_url, mip=mip, progress=False)
            a_arr, b_arr = a[a.bounds], b[b.bounds]
            assert a_arr.shape == b_arr.shape and a_arr.dtype == b_arr.dtype, (name, mip)
            assert np.array_equal(a_arr, b_arr), (name, mip)
            assert a_arr.any(), (name, mip)
    prov = json.loads(Path(cfg_slurm["layers"]["seg_rechunked"].removeprefix("file://"), "provenance").read_text())
    assert any("seg_copy" in json.dumps(entry) for entry in prov.get("processing", [])), prov
    print(f"\nSLURM run {t_slurm:.1f} s ({len(jobs)} SLURM jobs), local run {t_local:.1f} s")
