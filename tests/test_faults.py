"""Crashes: a write killed half-way leaves nothing behind (file://), and a pipeline (downsample,
transfer, sharded transfer, mesh, skeleton, ccl) SIGKILLed at seeded points, then unlocked and
re-run, ends identical to a clean run without redoing any job that had finished."""
from __future__ import annotations

import json
import os
import random
import re
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cloudfiles import CloudFiles
from cloudfiles.interfaces import FileInterface
from cloudfiles.paths import extract
from cloudvolume import CloudVolume

from conftest import SNAKEFILE, image_data, make_layer, seg_data, snakemake, write_config
from magma import jobs, safe_writes, workflow
from test_resume import incomplete


class DiesMidWrite:
    """A file-like body that hands out one block, then SIGKILLs its own process."""

    def __init__(self, block: bytes):
        self.block, self.calls = block, 0

    def read(self, n=-1):
        self.calls += 1
        if self.calls == 1:
            return self.block
        os.kill(os.getpid(), signal.SIGKILL)

    def seek(self, *a):
        return 0


def put_and_die(url: str, name: str) -> int:
    """Fork a child that writes `name` through cloud-files and is killed in the middle."""
    pid = os.fork()
    if pid == 0:  # child
        try:
            FileInterface(extract(url)).put_file(name, DiesMidWrite(b"x" * 65536), "application/octet-stream", None)
        finally:
            os._exit(3)  # only reached if the kill did not happen
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


@pytest.mark.parametrize("atomic", [False, True])
def test_write_killed_midway_leaves_no_partial_object(tmp_path, atomic):
    url = f"file://{tmp_path}/layer"
    CloudFiles(url).put("0-64_0-64_0-64", b"old" * 10, compress=None)
    was_installed = FileInterface.put_file is safe_writes._put_file  # importing magma.jobs installs it
    safe_writes.install() if atomic else safe_writes.uninstall()
    try:
        assert put_and_die(url, "0-64_0-64_0-64") == -signal.SIGKILL
        assert put_and_die(url, "64-128_0-64_0-64") == -signal.SIGKILL
    finally:
        safe_writes.install() if was_installed else safe_writes.uninstall()
    cf = CloudFiles(url)
    if not atomic:
        # the control: what cloud-files does on its own. The killed write has already destroyed
        # the old object (how much of the new body reached disk depends on buffering), and it
        # leaves an object under the name that was never finished
        assert cf.get("0-64_0-64_0-64") != b"old" * 10
        assert cf.exists("64-128_0-64_0-64")
        return
    assert cf.get("0-64_0-64_0-64") == b"old" * 10, "the old object is untouched"
    assert not cf.exists("64-128_0-64_0-64"), "a killed write creates no object"
    # the re-run of the killed job writes the same objects again: that renames the temporary
    # files the kills left, and nothing else remains
    safe_writes.install()
    try:
        cf.put("0-64_0-64_0-64", b"new0", compress=None)
        cf.put("64-128_0-64_0-64", b"new1", compress=None)
    finally:
        safe_writes.install() if was_installed else safe_writes.uninstall()
    assert cf.get("0-64_0-64_0-64") == b"new0" and cf.get("64-128_0-64_0-64") == b"new1"
    assert sorted(os.listdir(tmp_path / "layer")) == ["0-64_0-64_0-64", "64-128_0-64_0-64"]


# ---- SIGKILL at seeded points of a whole pipeline -----------------------------------------------
KILL_POINTS = int(os.environ.get("MAGMA_FAULT_POINTS", "20"))
SEED = 20261125
RUN = "results/faults"
LAYERS = ("img", "seg", "copy", "shards", "cc")


def pipeline(root: Path) -> dict:
    """Every op that has landed, on small generated data, in jobs of a few tasks each."""
    layers = {name: f"file://{root}/data/{name}" for name in LAYERS}
    steps = {
        "pyr": {"op": "downsample", "layer": "img", "num_mips": 2, "memory_target": 3e4},
        "copy": {"op": "transfer", "src": "seg", "dest": "copy", "chunk_size": [32, 32, 16],
                 "encoding": "compresso", "shape": [64, 64, 16]},
        "shards": {"op": "transfer", "src": "img", "dest": "shards", "sharded": True, "memory_target": 6e4},
        # (no simplification: zmesh spends ~1 s per block on it, and the kill test re-runs forge often)
        "meshes": {"op": "mesh", "layer": "seg", "shape": [64, 64, 32], "simplification": False},
        "skeletons": {"op": "skeleton", "layer": "seg", "shape": [64, 64, 32], "merge_tasks": 2},
        "components": {"op": "ccl", "src": "seg", "dest": "cc", "shape": [64, 64, 32]},
    }
    # few, fuller jobs: each script job costs a Python start-up, and the test pays for ~10 runs
    return {"layers": layers, "steps": steps,
            "execution": {"tasks_per_job": 8, "threads": 1, "retries": 0, "report": False}}


def make_inputs(root: Path) -> None:
    make_layer(root / "data" / "img", image_data((128, 128, 32), 5), "image", chunk=(32, 32, 16))
    make_layer(root / "data" / "seg", seg_data((128, 128, 32), 6), "segmentation", chunk=(32, 32, 16))


def files(root: Path) -> dict:
    """Every file under the layers: relative path -> bytes."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted((root / "data").rglob("*")) if p.is_file()}


def markers(work: Path) -> dict:
    d = work / RUN / "markers"
    return {str(p.relative_to(work)): p.stat().st_mtime_ns for p in d.rglob("*.json")} if d.exists() else {}


def done_markers(work: Path) -> dict:
    todo = incomplete(work)
    return {p: t for p, t in markers(work).items() if p not in todo and str(work / p) not in todo}


def points(cfg: dict) -> list:
    """(marker of the job, fault point) of every point magma.jobs.fault_point knows in this plan."""
    out = []
    for name, sp in workflow.plan(cfg).steps.items():
        tasks = {st.name: [len(st.job_tasks(j)) for j in range(st.jobs)] for st in sp.stages}
        for point in jobs.fault_points(tasks):
            where = point.rsplit("/", 1)[0]
            marker = {"setup": "setup.json", "finish": "done.json"}.get(where, f"jobs/{where}.json")
            out.append((f"{RUN}/markers/{name}/{marker}", f"{name}/{point}"))
    return out


def start(work: Path, cfgfile: Path, *args, fault: str | None = None, **env):
    cmd = [sys.executable, "-m", "snakemake", "-s", str(SNAKEFILE), "-d", str(work), "--cores", "2",
           "--configfile", str(cfgfile), *args]
    env = dict(os.environ, PATH=f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}", **env)
    if fault:
        env["MAGMA_FAULT_AT"] = fault
    # a session of its own: a fault point SIGKILLs the process group, i.e. this whole run
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)


def run_and_kill(work: Path, cfgfile: Path, point: str, timeout=300) -> None:
    """Resume the run with a kill at `point`: the job that reaches it SIGKILLs the run."""
    proc = start(work, cfgfile, "--rerun-incomplete", fault=point)
    try:
        err = proc.communicate(timeout=timeout)[1]
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    assert proc.returncode == -signal.SIGKILL, f"the run did not stop at {point} ({proc.returncode}):\n{err[-3000:]}"


def check_no_partial_files(root: Path, ref: dict) -> None:
    """After a kill: every data object present is complete (byte-equal to the clean run's);
    info and provenance are whole JSON; only hidden .part temporaries may be extra."""
    for name, data in files(root).items():
        base = os.path.basename(name)
        if base.startswith(".") and base.endswith(".part"):
            continue
        if "/magma-work/" in name or "/ccl/" in name:  # a step's intermediates, removed by its last stage
            continue
        assert name in ref, f"unexpected file after a kill: {name}"
        if base in ("info", "provenance"):
            json.loads(data)
        else:
            assert data == ref[name], f"half-written or wrong file after a kill: {name}"


def provenance_steps(data: bytes) -> list:
    return [(e["method"]["step"], json.dumps(e["method"], sort_keys=True)) for e in json.loads(data)["processing"]]


def check_equal_to_clean(root: Path, ref: dict) -> None:
    now = files(root)
    assert sorted(now) == sorted(ref), (f"files differ from the clean run: extra {sorted(set(now) - set(ref))},"
                                        f" missing {sorted(set(ref) - set(now))}")
    for name, data in ref.items():
        if name.endswith("/provenance"):  # dates and hosts differ; the entries may not
            assert provenance_steps(now[name]) == provenance_steps(data), f"{name}: provenance entries differ"
        else:
            assert now[name] == data, f"{name} differs from the clean run"
    for layer in LAYERS:  # and CloudVolume reads every mip
        url = f"file://{root}/data/{layer}"
        for mip in range(len(CloudVolume(url).info["scales"])):
            vol = CloudVolume(url, mip=mip, progress=False)
            assert vol[vol.bounds].shape[:3] == tuple(vol.bounds.size3())


def copy_state(src: Path, dst: Path) -> None:
    """The layers and the working directory (Snakemake's metadata included), mtimes kept."""
    if dst.exists():
        shutil.rmtree(dst)
    dst.mkdir(parents=True)
    for sub in ("data", "work"):
        shutil.copytree(src / sub, dst / sub, symlinks=True)


def test_sigkill_at_seeded_points_then_resume(tmp_path):
    root = tmp_path / "live"
    (root / "work").mkdir(parents=True)
    make_inputs(root)
    cfg = pipeline(root)
    cfgfile = write_config(tmp_path / "faults.yaml", cfg)
    copy_state(root, tmp_path / "inputs")

    # the clean run: the reference outputs, and the order its jobs finished in
    t0 = time.time()
    snakemake(root / "work", cfgfile)
    clean_seconds = time.time() - t0
    ref = files(root)
    finished_at = markers(root / "work")
    candidates = points(cfg)
    assert {m for m, _ in candidates} == set(finished_at), "every job the plan has, and no other, ran"
    candidates.sort(key=lambda c: finished_at[c[0]])  # (stable: a job's points stay in order)

    rng = random.Random(SEED)
    picks = sorted(rng.sample(range(len(candidates)), KILL_POINTS))

    # the lineage: restore the inputs, then for every point resume the previous (killed) state,
    # kill it at this point, and branch off a copy that is unlocked, re-run and compared
    shutil.rmtree(root)
    copy_state(tmp_path / "inputs", root)
    results, used = [], set()
    for i, pick in enumerate(picks):
        done = done_markers(root / "work")
        # a point whose job finished alongside an earlier kill: the next point of a job not done
        marker, point = next(c for c in candidates[pick:] + candidates if c[0] not in done and c[1] not in used)
        used.add(point)
        run_and_kill(root / "work", cfgfile, point)
        check_no_partial_files(root, ref)
        snakemake(root / "work", cfgfile, "--unlock")
        copy_state(root, tmp_path / "killed")  # the lineage goes on from here

        before = done_markers(root / "work")
        snakemake(root / "work", cfgfile, "--rerun-incomplete")
        after = markers(root / "work")
        redone = sorted(p for p, t in before.items() if after.get(p) != t)
        assert not redone, f"point {i} ({point}): finished jobs were redone: {redone}"
        check_equal_to_clean(root, ref)
        results.append((point, len(before)))

        shutil.rmtree(root)
        copy_state(tmp_path / "killed", root)
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    print(f"clean run {clean_seconds:.1f} s, {len(finished_at)} jobs, {len(candidates)} fault points;"
          f" whole test {time.time() - t0:.0f} s, {usage.ru_utime + usage.ru_stime:.0f} s CPU in subprocesses;"
          f" {len(results)} kill points, all identical after resume:")
    for point, n in results:
        print(f"  killed at {point}: {n} job markers kept")
    assert len(results) == KILL_POINTS and len({p for p, _ in results}) == KILL_POINTS


# ---- two runs at once ---------------------------------------------------------------------------
def test_second_run_on_the_same_outputs_is_refused(tmp_path):
    """Snakemake's lock: while a run works on a directory, another run there is refused with a
    message that says how to unlock; after a crash the stale lock is lifted with --unlock."""
    work = tmp_path / "work"
    work.mkdir()
    make_layer(tmp_path / "img", image_data((128, 128, 32), 7), "image", chunk=(32, 32, 16))
    cfg = {"layers": {"img": f"file://{tmp_path}/img"},
           "steps": {"pyr": {"op": "downsample", "layer": "img", "num_mips": 2, "memory_target": 3e4}},
           "execution": {"tasks_per_job": 2, "threads": 1}}
    cfgfile = write_config(tmp_path / "lock.yaml", cfg)
    locks = work / ".snakemake" / "locks"

    def second_run_refused():
        # (--rerun-incomplete: without it Snakemake stops even earlier, at the running job's
        # incomplete marker, and advises this flag)
        proc = snakemake(work, cfgfile, "--rerun-incomplete", check=False)
        assert proc.returncode != 0
        assert "Directory cannot be locked" in proc.stderr and "--unlock" in proc.stderr, proc.stderr[-3000:]
        assert not re.search(r"^(local)?rule \w+:", proc.stdout + proc.stderr, re.M), "the refused run started a job"

    # the first run holds in its setup job until the second has been refused
    release = tmp_path / "release"
    first = start(work, cfgfile, fault="pyr/setup/start", MAGMA_FAULT="hold", MAGMA_FAULT_RELEASE=str(release))
    setup_log = work / "results" / "lock" / "logs" / "pyr" / "setup.log"
    deadline = time.time() + 120
    while not (setup_log.exists() and "holding" in setup_log.read_text()) and first.poll() is None \
            and time.time() < deadline:
        time.sleep(0.02)
    assert first.poll() is None and any(locks.iterdir()), "the first run is not holding"
    second_run_refused()
    release.touch()
    assert first.wait(timeout=300) == 0, first.stderr.read()[-3000:]
    first.stderr.close()

    # a crash leaves the lock behind: refused until `snakemake --unlock`
    # (killed by its own setup job at a fault point: no race with a run that takes a second)
    crashed = start(work, cfgfile, "--forcerun", "setup", fault="pyr/setup/start")
    assert crashed.wait(timeout=300) == -signal.SIGKILL, crashed.stderr.read()[-3000:]
    crashed.stderr.close()
    assert any(locks.iterdir()), "the crashed run left its lock"
    before = markers_of(work)
    second_run_refused()
    assert markers_of(work) == before
    snakemake(work, cfgfile, "--unlock")
    snakemake(work, cfgfile, "--rerun-incomplete")


def markers_of(work: Path) -> dict:
    d = work / "results"
    return {str(p): p.stat().st_mtime_ns for p in d.rglob("*.json")} if d.exists() else {}


# ---- plans do not drift after a run -------------------------------------------------------------
def test_plans_are_the_same_after_a_run(tmp_path):
    """After a run the infos hold what every step added (scales, a mesh key). Planning again must
    give every step the same infos and stages, or Snakemake's params trigger redoes finished work.
    (The kill test found this: a mesh step's key made the downsample and transfer before it drift.)"""
    from magma import workflow

    make_inputs(tmp_path)
    cfg = pipeline(tmp_path)
    cfg["layers"]["segpyr"] = cfg["layers"]["seg"]
    cfg["steps"] = {"segpyr": {"op": "downsample", "layer": "seg", "num_mips": 1}, **cfg["steps"]}
    first = workflow.plan(cfg)
    final = {}
    for sp in first.steps.values():  # what the setup jobs write, the last one winning
        final.update(sp.infos)
    for layer, info in final.items():
        CloudFiles(cfg["layers"][layer]).put_json("info", info)
    again = workflow.plan(cfg)
    for name, sp in first.steps.items():
        assert again.steps[name].infos == sp.infos, f"{name}: predicted infos drift after a run"
        assert [s.to_dict() for s in again.steps[name].stages] == [s.to_dict() for s in sp.stages], name
    assert final["seg"].get("mesh"), "the mesh step's key is in the stored info"
    # a layer that came with a mesh directory keeps it: the mesh step still sees the stored key
    info = dict(final["seg"], mesh="mesh")
    CloudFiles(cfg["layers"]["seg"]).put_json("info", info)
    assert workflow.plan(cfg).steps["meshes"].stages[0].params["mesh_dir"] == "mesh"
