"""SIGKILL the whole snakemake process tree mid-run, re-run: the result is identical to a
clean run and no job that had finished is redone."""
import os
import random
import signal
import subprocess
import sys
import time

import numpy as np

from conftest import SNAKEFILE, image_data, make_layer, read, seg_data, snakemake, write_config
from magma.ops.downsample import pyramid


def job_markers(workdir):
    root = workdir / "results" / "k" / "markers"
    return {p: p.stat().st_mtime_ns for p in root.rglob("jobs/*/*.json")} if root.exists() else {}


def incomplete(workdir):
    """Outputs Snakemake itself still counts as unfinished (its .snakemake/incomplete records)."""
    import base64

    root = workdir / ".snakemake" / "incomplete"
    out = set()
    for rec in root.rglob("*") if root.exists() else []:
        if rec.is_file() and rec.name != "migration_underway":
            parts = rec.relative_to(root).parts
            name = "".join(p.lstrip("@") for p in parts)
            out.add(base64.urlsafe_b64decode(name).decode())
    return out


def finished(workdir):
    """Job markers of jobs Snakemake recorded as finished."""
    unfinished = incomplete(workdir)
    return {p: t for p, t in job_markers(workdir).items()
            if str(p.relative_to(workdir)) not in unfinished and str(p) not in unfinished}


def start(workdir, cfgfile):
    cmd = [sys.executable, "-m", "snakemake", "-s", str(SNAKEFILE), "-d", str(workdir), "--cores", "2",
           "--configfile", str(cfgfile), "--rerun-incomplete"]
    env = dict(os.environ, PATH=f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}")
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
                            start_new_session=True)


def kill_after(workdir, cfgfile, n_markers, timeout=300):
    """Run until at least n_markers job markers exist, then SIGKILL the process group."""
    proc = start(workdir, cfgfile)
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None and len(job_markers(workdir)) < n_markers:
        time.sleep(0.05)
    finished_before = proc.poll() is not None
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not finished_before, "the run ended before the kill point; make the test data bigger"


def kill_then_resume(workdir, cfgfile, kill_points):
    """For each n in `kill_points`: unlock (a killed run leaves Snakemake's lock behind), run
    until n job markers exist and SIGKILL the run; then unlock and run to the end. Fails if a
    job that had finished is redone. Returns the final run and, per kill, the finished jobs."""
    done, progress = {}, []
    for n in kill_points:
        snakemake(workdir, cfgfile, "--unlock")
        kill_after(workdir, cfgfile, n)
        now = job_markers(workdir)
        redone = [p for p, t in done.items() if now.get(p) != t]
        assert not redone, f"finished jobs were redone after a kill: {redone}"
        done = finished(workdir)
        progress.append(len(done))
    snakemake(workdir, cfgfile, "--unlock")
    final = snakemake(workdir, cfgfile, "--rerun-incomplete")
    now = job_markers(workdir)
    redone = [p for p, t in done.items() if now.get(p) != t]
    assert not redone, f"finished jobs were redone after a kill: {redone}\n{final.stderr[-20000:]}"
    return final, progress


def test_kill_and_resume(tmp_path, workdir):
    rng = random.Random(20261124)  # seeded kill points, so a failure reproduces
    img, seg = image_data((256, 256, 64), 11), seg_data((256, 256, 64), 12)
    layers = {"img": make_layer(tmp_path / "img", img, "image", chunk=(32, 32, 16)),
              "seg": make_layer(tmp_path / "seg", seg, "segmentation", chunk=(32, 32, 16)),
              "copy": f"file://{tmp_path / 'copy'}"}
    cfg = {"layers": layers,
           "steps": {"pyr": {"op": "downsample", "layer": "img", "num_mips": 2, "memory_target": 1.0e5},
                     "xfer": {"op": "transfer", "src": "seg", "dest": "copy", "chunk_size": [64, 64, 16],
                              "memory_target": 1.0e6}},
           "execution": {"tasks_per_job": 2, "threads": 1}}
    cfgfile = write_config(tmp_path / "k.yaml", cfg)

    _, progress = kill_then_resume(workdir, cfgfile, sorted(rng.sample(range(3, 30), 3)))
    assert all(progress), f"nothing had finished before a kill: {progress}"
    assert "Nothing to be done" in snakemake(workdir, cfgfile).stderr

    # outputs equal the whole-array kernel (a clean run gives exactly that, see test_downsample)
    ref = pyramid(img, "avg", (2, 2, 1), 1)
    ref2 = pyramid(ref[0], "avg", (2, 2, 1), 1)
    assert np.array_equal(read(layers["img"], 1), ref[0])
    assert np.array_equal(read(layers["img"], 2), ref2[0])
    assert np.array_equal(read(layers["copy"], 0), seg)
