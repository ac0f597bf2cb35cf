# Every step is setup -> stages of batch jobs -> finish. One rule per op for the
# batch jobs (so `snakemake -n` counts jobs per op); the plan decides the rest.
# Jobs are `run:` blocks that hand their parameters to magma.jobs as Python
# objects (see run_job in common.smk): no shell, no script file.

EXEC = PLAN.config["execution"]


rule setup:
    output:
        f"{RUN}/markers/{{step}}/setup.json",
    input:
        setup_inputs,
    params:
        spec=setup_spec,
    log:
        f"{RUN}/logs/{{step}}/setup.log",
    wildcard_constraints:
        step=steps_regex(),
    localrule: True
    run:
        run_job("jobs", params, input, output, log, threads)


for _op in sorted({s.op for s in PLAN.steps.values()}):

    rule:
        name:
            _op
        output:
            f"{RUN}/markers/{{step}}/jobs/{{stage}}/{{job}}.json",
        input:
            batch_inputs,
        params:
            spec=batch_spec,
        log:
            f"{RUN}/logs/{{step}}/{{stage}}/{{job}}.log",
        wildcard_constraints:
            step=steps_regex({_op}),
            job=r"\d+",
        threads: step_threads
        resources:
            mem_mb=step_mem_mb,
            runtime=step_runtime,
        retries: EXEC["retries"]
        run:
            run_job("jobs", params, input, output, log, threads)


rule stage_done:
    output:
        f"{RUN}/markers/{{step}}/stages/{{stage}}.done",
    input:
        gate_inputs,
    wildcard_constraints:
        step=steps_regex(),
    log:
        f"{RUN}/logs/{{step}}/stages/{{stage}}.log",
    localrule: True
    run:
        # nothing to compute: written here, in the Snakemake process
        Path(log[0]).write_text(f"stage {wildcards.stage} of step {wildcards.step}: all jobs done\n")
        Path(output[0]).touch()


rule finish:
    output:
        f"{RUN}/markers/{{step}}/done.json",
    input:
        finish_inputs,
    params:
        spec=finish_spec,
    log:
        f"{RUN}/logs/{{step}}/finish.log",
    wildcard_constraints:
        step=steps_regex(),
    localrule: True
    run:
        run_job("jobs", params, input, output, log, threads)
