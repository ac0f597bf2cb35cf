"""What a Snakemake job runs: a step's setup, a batch of its tasks, or its finish.

Every job ends by writing its marker (atomically, after all of its data is
stored), so a job that dies leaves no marker and is simply run again.
"""
from __future__ import annotations

import getpass
import importlib
import json
import logging
import multiprocessing
import os
import signal
import socket
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from datetime import datetime, timezone
from types import SimpleNamespace

import numpy as np
from cloudvolume import Bbox, CloudVolume
from cloudvolume.exceptions import EmptyVolumeException

from . import __version__, chunk_files, cores, job_server, layers, malloc, safe_writes, storage
from .errors import MagmaError
from .markers import read_marker, write_marker
from .ops import OPS
from .plan import Stage

log = logging.getLogger("magma")
safe_writes.install()  # every file:// object a job writes is all-or-nothing


def _logging(logfile):
    log.setLevel(logging.INFO)
    log.handlers.clear()
    fmt = logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S")
    for h in ([logging.FileHandler(logfile)] if logfile else []) + [logging.StreamHandler()]:
        h.setFormatter(fmt)
        log.addHandler(h)


# ---- fault injection ------------------------------------------------------------
def fault_points(stage_tasks: dict) -> list:
    """Every point `fault_point` knows, in the order one step reaches them:
    `stage_tasks` is {stage name: [tasks of job 0, tasks of job 1, ...]} of one step."""
    points = ["setup/start", "setup/written"]
    for stage, jobs in stage_tasks.items():
        for job, n in enumerate(jobs):
            points += [f"{stage}/{job}/start"] + ([f"{stage}/{job}/mid"] if n >= 2 else []) + [f"{stage}/{job}/written"]
    return points + ["finish/start", "finish/written"]


def fault_point(point: str) -> None:
    """Crash or pause on purpose, for tests. MAGMA_FAULT_AT names one point of one job,
    "<step>/" + one of `fault_points` (e.g. "meshes/forge/0/mid": job 0 of the forge stage,
    half of its tasks done). The job that reaches it stops the run there: MAGMA_FAULT=kill
    (the default) SIGKILLs its process group, which is Snakemake, the job server and every
    job at whatever they were doing; MAGMA_FAULT=hold waits until the file MAGMA_FAULT_RELEASE
    exists."""
    if os.environ.get("MAGMA_FAULT_AT") != point:
        return
    if os.environ.get("MAGMA_FAULT", "kill") == "hold":
        log.info(f"fault point {point}: holding until {os.environ['MAGMA_FAULT_RELEASE']} exists")
        while not os.path.exists(os.environ["MAGMA_FAULT_RELEASE"]):
            time.sleep(0.02)
        return
    os.killpg(os.getpgrp(), signal.SIGKILL)


# ---- setup --------------------------------------------------------------------
def missing_chunks(path: str, info: dict, mip: int, box: Bbox, limit: int) -> list | None:
    """Names of chunks inside `box` that are not stored, or None when not checked
    (sharded scale, or more than `limit` chunks to look at)."""
    m = layers.meta(info)
    if "sharding" in info["scales"][mip]:
        return None
    chunk = m.chunk_size(mip)
    whole = m.bounds(mip)
    box = Bbox.clamp(box.expand_to_chunk_size(chunk, offset=whole.minpt), whole)
    if box.volume() == 0 or box.num_chunks(chunk) > limit:
        return None
    key = m.key(mip)
    expected = {name for name, _ in chunk_files.chunks_in(m, mip, box)}
    stored = set(storage.files(path).list(prefix=f"{key}/"))
    return sorted(expected - stored)


def setup(spec: dict, marker: str, logfile=None) -> None:
    """Check what the step will read, then write the info files it needs."""
    _logging(logfile)
    t0 = time.time()
    fault_point(f"{spec['step']}/setup/start")
    for layer, mip, lo, hi, fill_missing in spec["checks"]:
        if fill_missing:
            continue
        path = spec["paths"][layer]
        info = layers.read_info(layer, path)
        missing = missing_chunks(path, info, mip, Bbox(lo, hi), spec["preflight_chunk_limit"])
        if missing is None:
            log.info(f"[{spec['step']}] preflight: too many chunks in {layer} mip {mip} to list; checked per task")
        elif missing:
            raise MagmaError(
                f"steps.{spec['step']}: layer '{layer}' mip {mip} is missing {len(missing)} chunk(s) the step reads,"
                f" e.g. {', '.join(missing[:5])}. Set fill_missing: true to read them as background."
            )
    if spec.get("preflight") is not None:  # the op's own checks of what it reads (e.g. every input file)
        OPS[spec["op"]].preflight(spec["step"], spec["preflight"])
    for layer, info in spec["infos"].items():
        stored = storage.files(spec["paths"][layer]).get_json("info")
        info = layers.with_results(info, stored)  # e.g. rois found by an earlier roi step
        vol = CloudVolume(spec["paths"][layer], info=info, progress=False)
        vol.commit_info()
        log.info(f"[{spec['step']}] wrote {spec['paths'][layer]}/info ({len(info['scales'])} scales)")
    for layer, files in spec.get("files", {}).items():
        cf = storage.files(spec["paths"][layer])
        for name, content in files.items():
            cf.put_json(name, content, cache_control="no-cache")
            log.info(f"[{spec['step']}] wrote {spec['paths'][layer]}/{name}")
    fault_point(f"{spec['step']}/setup/written")
    write_marker(marker, {"step": spec["step"], "stage": "setup", "seconds": round(time.time() - t0, 3),
                          "files": len(spec["infos"]) + sum(len(f) for f in spec.get("files", {}).values())})


# ---- task batches ---------------------------------------------------------------
def _run_task(op_name: str, params: dict, box: Bbox, paths: dict, step: str) -> dict:
    try:
        return getattr(OPS[op_name], params.get("task", "run_task"))(params, box, paths)
    except EmptyVolumeException as exc:
        raise MagmaError(
            f"steps.{step}: missing chunk while reading {box.minpt.tolist()}..{box.maxpt.tolist()}"
            f" ({exc}). Set fill_missing: true to read missing chunks as background."
        ) from exc
    except MagmaError:
        raise
    except Exception as exc:
        where = getattr(exc, "magma_path", None)
        if where is None:
            raise
        # a plain message: it crosses the worker process boundary and names the object
        raise MagmaError(f"steps.{step}: task {box.minpt.tolist()}..{box.maxpt.tolist()}: "
                         + storage.failure_message(where, exc)) from None


def run_batch(spec: dict, marker: str, threads: int = 1, logfile=None) -> dict:
    """Run tasks [first, last) of one stage on `threads` worker processes, then write the marker.

    Processes, not threads: the kernels and codecs hold the GIL for much of their work.
    """
    _logging(logfile)
    stage = Stage.from_dict(spec["stage"])
    tasks = stage.job_tasks(spec["job"])
    label = f"[{spec['step']} {stage.name} job {spec['job'] + 1}/{stage.jobs}]"
    t0 = last = time.time()
    totals = {"tasks": 0}
    args = [(spec["op"], stage.params, stage.grid.task(i), spec["paths"], spec["step"]) for i in tasks]
    workers = max(1, min(threads, len(args)))
    log.info(f"{label} {len(args)} tasks on {workers} worker(s)")
    point = f"{spec['step']}/{stage.name}/{spec['job']}"
    fault_point(f"{point}/start")
    cores.start(threads - workers)  # cores no worker uses; more as workers run out of tasks
    if workers == 1:
        results = (_run_task(*a) for a in args)
        pool = None
    else:
        pool = ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("fork"))
        results = (f.result() for f in as_completed([pool.submit(_run_task, *a) for a in args]))
    try:
        for done, stats in enumerate(results, start=1):
            if len(args) - done < workers and done < len(args):
                cores.lend()  # a worker found no task left: running tasks may use its core
            totals["tasks"] += 1
            for k, v in stats.items():
                totals[k] = totals.get(k, 0) + v
            if done == len(args) // 2:
                fault_point(f"{point}/mid")
            if time.time() - last > 10 or done == len(args):  # progress without flooding the log
                last = time.time()
                log.info(f"{label} {done}/{len(args)} tasks done ({last - t0:.1f} s)")
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
        cores.stop()
    totals.update(step=spec["step"], stage=stage.name, job=spec["job"], seconds=round(time.time() - t0, 3))
    fault_point(f"{point}/written")
    write_marker(marker, totals)
    return totals


# ---- finish -------------------------------------------------------------------
def finish(spec: dict, job_markers: list, marker: str, logfile=None) -> dict:
    """Record provenance on every layer the step wrote and sum the job markers."""
    _logging(logfile)
    fault_point(f"{spec['step']}/finish/start")
    summary = {"step": spec["step"], "op": spec["op"], "jobs": 0, "seconds": 0.0}
    for path in job_markers:
        m = read_marker(path)
        summary["jobs"] += 1
        for k, v in m.items():
            if isinstance(v, (int, float)) and k not in ("job",):
                summary[k] = summary.get(k, 0) + v
    entry = {
        "method": {"task": f"magma.{spec['op']}", "step": spec["step"], **spec["params"]},
        "by": f"{getpass.getuser()}@{socket.gethostname()}",
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M %Z"),
        "magma_version": __version__,
    }
    for layer in spec["writes"]:
        vol = CloudVolume(spec["paths"][layer], progress=False)
        if spec["sources"] and spec["sources"] != [layer]:
            vol.provenance.sources = [spec["paths"][s] for s in spec["sources"]]
        done = vol.provenance.processing
        if done and done[-1].get("method") == json.loads(json.dumps(entry["method"])):
            done.pop()  # this finish job ran before and was killed before its marker: record it once
        done.append(entry)
        vol.commit_provenance()
        log.info(f"[{spec['step']}] provenance recorded on {spec['paths'][layer]}")
    summary["seconds"] = round(summary["seconds"], 3)
    fault_point(f"{spec['step']}/finish/written")
    write_marker(marker, summary)
    log.info(f"[{spec['step']}] done: " + json.dumps(summary))
    return summary


def main(smk) -> None:
    """Run a setup, batch or finish job described by a JobArgs."""
    spec = smk.params.spec
    logfile = smk.log[0] if smk.log else None
    kind = spec["kind"]
    malloc.keep_freed_memory()
    # from the config, not from params: tuning retries must not make Snakemake redo finished jobs
    ex = (getattr(smk, "config", None) or {}).get("execution") or {}
    storage.install(ex.get("storage_attempts"), ex.get("storage_first_wait"))
    _logging(logfile)
    log.info(f"[{spec['step']}] {kind} job started")
    try:
        if kind == "setup":
            setup(spec, smk.output[0], logfile)
        elif kind == "batch":
            run_batch(spec, smk.output[0], smk.threads, logfile)
        else:
            finish(spec, [p for p in smk.input if "/jobs/" in p], smk.output[0], logfile)
    except MagmaError as exc:
        log.error(f"ERROR: {exc}")
        raise JobFailed(str(exc)) from None
    except Exception as exc:  # setup and finish read and write info/provenance files
        where = getattr(exc, "magma_path", None)
        if where is None:
            raise
        message = f"steps.{spec['step']}: {storage.failure_message(where, exc)}"
        log.error(f"ERROR: {message}")
        raise JobFailed(message) from None


# ---- how Snakemake starts a job ----------------------------------------------------
class JobFailed(Exception):
    """A job stopped with an error it has already logged."""


@dataclass
class JobArgs:
    """What a Snakemake job hands magma, as plain values that can cross into a forked process
    (named as on Snakemake's job object: params, input, output, log, threads, config)."""

    entry: str  # "jobs" (setup, batch, finish) or "report"
    params: SimpleNamespace
    input: list
    output: list
    log: list
    threads: int
    config: dict


def run_here(args: JobArgs) -> None:
    importlib.import_module(f"magma.{args.entry}").main(args)


def run(args: JobArgs, fork: bool) -> None:
    """Run a job. `fork`: in the Snakemake process that schedules the jobs (a local run, or a
    cluster run's local rules), the job runs in a child of the job server, so that it has a
    process of its own (cores, crash isolation, its log) at almost no start-up cost.
    Otherwise this process exists for this one job (a cluster node, a pod): it runs here."""
    if not fork:
        run_here(args)
        return
    job_server.start(["magma.jobs"])  # (started with the plan's ops at the start of the run)
    code = job_server.submit(args)
    if code != 0:
        how = "was killed" if code is None else f"failed (exit code {code})"
        raise JobFailed(f"{args.entry} job {how}" + (f"; log: {args.log[0]}" if args.log else ""))
