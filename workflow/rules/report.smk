# The report: `snakemake --report report.html` after a run. Each step that makes
# something worth looking at gets a job that draws its pictures into
# {RUN}/report/<step>/<layer>.<picture>.png once the step is done; one more job
# writes the tables (steps, parameters, timings; layers and Neuroglancer links).
from magma import report as magma_report


report: "../report/workflow.rst"


rule report_figures:
    output:
        report(
            directory(f"{RUN}/report/{{step}}"),
            patterns=["{layer}.{picture}.png"],
            caption="../report/figure.rst",
            category="{step}",
            subcategory="{layer}",
            labels={"layer": "{layer}", "picture": "{picture}"},
        ),
    input:
        lambda wc: finish_marker(wc.step),
    params:
        spec=lambda wc: magma_report.figures_spec(PLAN, wc.step),
    log:
        f"{RUN}/logs/{{step}}/report.log",
    wildcard_constraints:
        step=steps_regex(),
    # bounded reads (a few crops, sampled objects): not worth a cluster job
    localrule: True
    run:
        run_job("report", params, input, output, log, threads)


rule report_tables:
    output:
        report(f"{RUN}/report/steps.html", caption="../report/steps.rst", category="Run",
               labels={"table": "steps, parameters, timings"}),
        report(f"{RUN}/report/layers.html", caption="../report/layers.rst", category="Run",
               labels={"table": "layers and Neuroglancer links"}),
    input:
        [finish_marker(name) for name in PLAN.steps],
    params:
        spec=lambda wc: magma_report.tables_spec(PLAN, RUN, CONFIGFILES[-1]),
    log:
        f"{RUN}/logs/report-tables.log",
    localrule: True
    run:
        run_job("report", params, input, output, log, threads)
