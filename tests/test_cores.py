"""Spare cores of a batch job: forks that run side by side, give their cores back, report
failures, and a mesh merge whose output does not depend on them."""
import multiprocessing
import os

import numpy as np
import pytest

from magma import cores
from magma.meshes import forge

RES = (8, 8, 40)


@pytest.fixture
def spare():
    def start(n):
        cores.start(n)
        return n
    yield start
    cores.stop()


def _free() -> int:
    n = cores.borrow(1000)
    cores.give_back(n)
    return n


def test_fork_each_results_in_order_and_cores_come_back(spare):
    spare(1)
    out = cores.fork_each(lambda b: (b, os.getpid()), list(range(7)))
    assert [b for b, _ in out] == list(range(7))
    assert os.getpid() not in {pid for _, pid in out}  # every batch ran in a fork
    assert _free() == 1


def test_inline_runs_in_this_process_and_forks_onto_spare_cores(spare):
    spare(0)
    out = cores.fork_each(lambda b: (b, os.getpid()), list(range(5)), inline=True)
    assert out == [(b, os.getpid()) for b in range(5)]
    spare(1)
    big = b"x" * (4 << 20)  # more than a pipe holds: forks hand results over in a file
    out = cores.fork_each(lambda b: (b, os.getpid(), big), list(range(6)), inline=True)
    assert [b for b, _, _ in out] == list(range(6)) and all(x == big for _, _, x in out)
    pids = {pid for _, pid, _ in out}
    assert os.getpid() in pids and len(pids) > 1
    assert _free() == 1


def test_batches_run_side_by_side_only_on_spare_cores(spare):
    # two batches meet at a barrier: that works only if both run at the same time
    for n, meets in ((1, True), (0, False)):
        spare(n)
        barrier = multiprocessing.get_context("fork").Barrier(2)

        def meet(_):
            try:
                barrier.wait(timeout=3)
                return True
            except Exception:
                return False

        assert cores.fork_each(meet, [0, 1]) == [meets, meets]
        assert _free() == n


def test_a_failing_batch_raises_with_its_traceback(spare):
    spare(1)

    def fn(b):
        if b == 2:
            raise ValueError("batch two is bad")
        return b

    for inline in (False, True):
        with pytest.raises((RuntimeError, ValueError), match="batch two is bad"):
            cores.fork_each(fn, [0, 1, 2, 3], inline=inline)
        assert _free() == 1


def _blob_block():
    """Two big labels (each a batch of its own) and small ones sharing batches."""
    x, y, z = np.meshgrid(*[np.arange(s) for s in (160, 160, 64)], indexing="ij")
    block = np.zeros((160, 160, 64), dtype=np.uint64)
    block[(x - 50) ** 2 + (y - 60) ** 2 + 16 * (z - 30) ** 2 < 45 ** 2] = 2**40 + 1
    block[(x - 115) ** 2 + (y - 100) ** 2 + 9 * (z - 34) ** 2 < 44 ** 2] = 7
    for k in range(20):
        block[8 * k: 8 * k + 5, 150:155, 5:9] = 100 + k
    return np.asfortranarray(block)


def test_merge_simplification_ignores_cores(spare, monkeypatch):
    """The merge simplifies labels in forks, side by side when the job has spare cores:
    what it writes does not depend on how many there were or how labels were batched."""
    from magma.ops import mesh as mesh_op

    block = _blob_block()
    parts = {label: [m] for label, m in forge.mesh_labels(block, RES).items()}
    params = {"resolution": RES, "simplification": True, "max_simplification_error": 40, "kind": "legacy"}

    def merged():
        out = {}
        sizes = {lab: sum(len(m.faces) for m in ms) for lab, ms in parts.items()}
        for done in cores.fork_each(lambda batch: [(lab, mesh_op._finish(params, lab, parts[lab])) for lab in batch],
                                    mesh_op._batches(sizes)):
            out.update(done)
        return out

    spare(0)
    alone = merged()
    monkeypatch.setattr(mesh_op, "BATCH_BYTES", 1)
    assert len(mesh_op._batches({lab: 1 for lab in parts})) == len(parts)
    spare(1)
    assert merged() == alone
    assert set(alone) == set(parts) and all(len(v[1]) > 0 for v in alone.values())


def test_batch_job_lends_the_cores_its_workers_do_not_use(tmp_path, monkeypatch):
    from magma import jobs
    from magma.plan import Grid, Stage

    class Probe:  # an op whose tasks report how many cores they could borrow
        @staticmethod
        def run_task(params, box, paths):
            n = cores.borrow(10)
            cores.give_back(n)
            return {"borrowed": n}

    monkeypatch.setitem(jobs.OPS, "probe", Probe)
    for tasks, threads, expected in ((1, 3, 2), (1, 1, 0)):
        stage = Stage("probe", Grid.indices(tasks), tasks, {}, 0.0)
        spec = {"op": "probe", "step": "p", "job": 0, "stage": stage.to_dict(), "paths": {}}
        marker = tmp_path / f"{tasks}-{threads}.json"
        totals = jobs.run_batch(spec, str(marker), threads=threads)
        assert totals["tasks"] == tasks and totals["borrowed"] == expected


def test_processes_a_job_spawns_keep_freed_memory_too():
    import subprocess
    import sys

    code = ("import os, subprocess, sys; from magma import malloc; assert malloc.keep_freed_memory(); "
            "print(subprocess.run([sys.executable, '-c', 'import os; print(os.environ[\"MALLOC_MMAP_MAX_\"],"
            " os.environ[\"MALLOC_TRIM_THRESHOLD_\"])'], capture_output=True, text=True).stdout)")
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True).stdout
    assert out.split() == ["0", str(2**31 - 1)]


def test_forge_label_batches_ignore_cores(spare):
    """Forge extracts its labels' meshes in batches, in forks while the job has spare cores:
    every mesh is the same, vertex for vertex, as one process extracting them all."""
    block = _blob_block()
    alone = forge.mesh_labels(block, RES)
    seen = []

    def forks(fn, batches):
        seen.append(len(batches))
        return cores.fork_each(fn, batches, inline=True)

    spare(1)
    split = forge.mesh_labels(block, RES, map_fn=forks)
    assert seen == [forge.GET_BATCHES] and _free() == 1
    assert sorted(split) == sorted(alone) and len(alone) == 22
    for label, m in alone.items():
        assert np.array_equal(m.vertices, split[label].vertices) and np.array_equal(m.faces, split[label].faces)
