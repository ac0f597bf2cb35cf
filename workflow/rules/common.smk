# Paths, marker names and input functions: the only place that turns the plan
# into Snakemake wildcards; and how the `run:` block of a rule starts its job.
from types import SimpleNamespace

from magma import jobs as magma_jobs


def run_job(entry, params, input, output, log, threads):
    args = magma_jobs.JobArgs(entry, SimpleNamespace(spec=params.spec), list(input), list(output),
                              list(log), threads, {"execution": PLAN.config["execution"]})
    magma_jobs.run(args, fork=FORK)


def start_job_server():
    """The server local jobs fork from: started while the Snakefile was read (a no-op then),
    or now if it has exited since."""
    if not FORK:
        return
    if not workflow.use_threads:
        sys.stderr.write("magma: Snakemake was started without the magma workflow profile (it sets"
                         " force-use-threads): every job starts a whole Snakemake process."
                         " Pass --force-use-threads to avoid that.\n")
    magma_job_server.start(magma_job_server.modules_for(PLAN.config))


def stop_rate_timers():
    """Snakemake re-checks its job-rate limit with 1 s timers that are not daemon threads, so
    its exit waits for the last one; the scheduling is over when this runs."""
    import threading

    for t in threading.enumerate():
        if isinstance(t, threading.Timer):
            t.cancel()


def setup_marker(step):
    return f"{RUN}/markers/{step}/setup.json"


def job_marker(step, stage, job):
    return f"{RUN}/markers/{step}/jobs/{stage}/{job}.json"


def gate_marker(step, stage):
    return f"{RUN}/markers/{step}/stages/{stage}.done"


def finish_marker(step):
    return f"{RUN}/markers/{step}/done.json"


def stage_of(step, stage_name):
    for i, st in enumerate(PLAN.steps[step].stages):
        if st.name == stage_name:
            return i, st
    raise ValueError(f"step {step} has no stage {stage_name}")


def job_markers(step, stage):
    return [job_marker(step, stage.name, j) for j in range(stage.jobs)]


def setup_inputs(wc):
    return [finish_marker(d) for d in PLAN.steps[wc.step].after]


def batch_inputs(wc):
    i, _ = stage_of(wc.step, wc.stage)
    if i == 0:
        return [setup_marker(wc.step)]
    return [gate_marker(wc.step, PLAN.steps[wc.step].stages[i - 1].name)]


def gate_inputs(wc):
    _, st = stage_of(wc.step, wc.stage)
    return job_markers(wc.step, st)


def finish_inputs(wc):
    sp = PLAN.steps[wc.step]
    out = [gate_marker(wc.step, sp.stages[-1].name)]
    for st in sp.stages:
        out += job_markers(wc.step, st)
    return out


def setup_spec(wc):
    sp = PLAN.steps[wc.step]
    return {
        "kind": "setup",
        "step": sp.name,
        "op": sp.op,
        "preflight": sp.preflight,
        "paths": PLAN.paths,
        "infos": sp.infos,
        "files": sp.files,
        "checks": [
            (layer, mip, box.minpt.tolist(), box.maxpt.tolist(), fill)
            for layer, mip, box, fill in sp.checks
        ],
        "preflight_chunk_limit": PLAN.config["execution"]["preflight_chunk_limit"],
    }


def batch_spec(wc):
    sp = PLAN.steps[wc.step]
    _, st = stage_of(wc.step, wc.stage)
    return {
        "kind": "batch",
        "step": sp.name,
        "op": sp.op,
        "paths": PLAN.paths,
        "stage": st.to_dict(),
        "job": int(wc.job),
    }


def finish_spec(wc):
    sp = PLAN.steps[wc.step]
    params = {k: v for k, v in sp.params.items() if k not in ("op", "after")}
    return {
        "kind": "finish",
        "step": sp.name,
        "op": sp.op,
        "paths": PLAN.paths,
        "params": params,
        "writes": sp.writes,
        "sources": sp.sources,
    }


def step_threads(wc):
    return PLAN.steps[wc.step].threads


def step_mem_mb(wc, attempt):
    # a retried job asks for more memory each time
    return PLAN.steps[wc.step].mem_mb * attempt


def step_runtime(wc):
    return PLAN.steps[wc.step].runtime


def steps_regex(ops=None):
    names = [n for n, s in PLAN.steps.items() if ops is None or s.op in ops]
    return "|".join(names) if names else "(?!)"


def print_outputs():
    written = []
    for sp in PLAN.steps.values():
        for layer in sp.writes:
            if layer not in written:
                written.append(layer)
    print("\nmagma: finished. Layers written:")
    for layer in written:
        print(f"  {layer:<16} {PLAN.paths[layer]}")
    print(f"markers and logs: {RUN}/")
    print(neuroglancer_summary(written))
    if PLAN.config["execution"]["report"]:
        print(f"report: snakemake --report report.html{' --configfile ' + str(CONFIGFILES[-1]) if workflow.overwrite_configfiles else ''}\n")


def neuroglancer_summary(written):
    from magma import layers as magma_layers, neuroglancer

    infos = {}
    for sp in PLAN.steps.values():
        infos.update(sp.infos)
    for layer in written:
        if layer not in infos:
            try:
                infos[layer] = magma_layers.read_info(layer, PLAN.paths[layer])
            except MagmaError:
                pass
    return neuroglancer.summary(written, PLAN.paths, infos, str(CONFIGFILES[-1]))
