"""The job server local jobs fork from: what it preloads for a config, and how it ends.

The Snakefile starts it while Snakemake reads the workflow, before planning, so it reads
the config as written; a run that never sends it a job (a dry run, a plan that failed)
must not wait for its imports at exit.
"""
from __future__ import annotations

import os
import sys
import time
from types import SimpleNamespace

import pytest

from magma import job_server
from magma.jobs import JobArgs


def test_modules_for_reads_the_config_as_written():
    cfg = {"steps": {"a": {"op": "mesh"}, "b": {"op": "downsample"}, "c": {"op": "mesh"},
                     "d": {"op": "no_such_op"}, "e": "not a step"}}
    assert job_server.modules_for(cfg) == ["magma.jobs", "magma.ops.downsample", "magma.ops.mesh",
                                           "magma.report", "matplotlib.pyplot"]
    cfg["execution"] = {"report": False}
    assert job_server.modules_for(cfg) == ["magma.jobs", "magma.ops.downsample", "magma.ops.mesh"]
    # malformed configs are planning's to report: the server still gets the job runner
    assert job_server.modules_for({"steps": ["op"]}) == ["magma.jobs"]
    assert job_server.modules_for({"steps": {}, "execution": "fast"}) == ["magma.jobs"]
    assert job_server.modules_for({}) == ["magma.jobs", "magma.report", "matplotlib.pyplot"]
    # the demo synthesis is a step of its own when the config has `demo:` (the demo config)
    assert job_server.modules_for({"demo": {}, "steps": {"a": {"op": "mesh"}}, "execution": {"report": False}}) \
        == ["magma.jobs", "magma.ops.demo", "magma.ops.mesh"]


@pytest.fixture
def fresh_server(monkeypatch):
    monkeypatch.setattr(job_server, "_server", None)
    monkeypatch.setattr(job_server, "_used", False)
    yield
    if job_server.running():
        job_server._server.kill()
        job_server._server.wait()


def test_an_unused_server_is_killed_at_exit_even_while_importing(fresh_server, tmp_path, monkeypatch):
    # a module whose import takes long stands in for the libraries of the ops
    (tmp_path / "slow_import.py").write_text("import time\ntime.sleep(60)\n")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(tmp_path), *sys.path]))
    job_server.start(["slow_import"])
    time.sleep(0.5)
    assert job_server.running()
    t0 = time.monotonic()
    job_server._stop()
    assert time.monotonic() - t0 < 10
    assert job_server._server.returncode == -9


def test_a_used_server_finishes_its_jobs_and_exits_cleanly(fresh_server, tmp_path):
    job_server.start(["magma.jobs"])
    # a job the server runs to its end: one of no known kind fails in the child, which says so
    args = JobArgs("jobs", SimpleNamespace(spec={"kind": "nothing"}), [], [str(tmp_path / "out.json")],
                   [str(tmp_path / "job.log")], 1, {"execution": {}})
    assert job_server.submit(args) == 1
    job_server._stop()
    assert job_server._server.returncode == 0
