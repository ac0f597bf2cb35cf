"""Checks of the executor a run uses, made when Snakemake starts, before any job runs.

SLURM: a batch job submitted without a partition goes to the cluster's default partition;
on a cluster without one, sbatch refuses every job ("No partition specified or system
default partition"), but only after the setup jobs have run on the submit host and written
their info files. So magma asks first: every batch job needs `slurm_partition` (profile,
--default-resources or set-resources) unless `sinfo` marks a default partition with '*'.
"""
from __future__ import annotations

import subprocess

from .errors import MagmaError


def partitions(sinfo=None) -> list:
    """The cluster's partitions as sinfo prints them (the default one ends with '*')."""
    try:
        out = sinfo() if sinfo else subprocess.run(["sinfo", "-h", "-o", "%P"], capture_output=True, text=True,
                                                   timeout=60, check=True).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        detail = (getattr(exc, "stderr", None) or str(exc)).strip()[:300]
        raise MagmaError(
            f"SLURM: cannot ask the cluster for its default partition (sinfo: {detail}); name one:"
            " --default-resources slurm_partition=<name> (or slurm_partition in the profile)"
        ) from None
    return out.split()


def check_slurm_partitions(jobs, sinfo=None) -> None:
    """`jobs`: (rule name, is_local, slurm_partition) of the jobs to run."""
    missing = sorted({rule for rule, local, part in jobs if not local and not str(part or "").strip("'\" ")})
    if not missing:
        return
    names = partitions(sinfo)
    if any(n.endswith("*") for n in names):
        return
    raise MagmaError(
        f"SLURM: jobs of rule(s) {', '.join(missing)} have no slurm_partition and the cluster has no default"
        f" partition (sinfo lists: {', '.join(names) or 'none'}); sbatch would refuse them. Name one:"
        " --default-resources slurm_partition=<name> (or slurm_partition in the profile, or per rule"
        " under set-resources)"
    )


def check(workflow) -> None:
    """Called from the Snakefile's onstart: the executor is known and the DAG is built."""
    plugin = getattr(workflow, "executor_plugin", None)
    if plugin is None or getattr(plugin, "name", None) != "slurm":
        return
    jobs = [(job.rule.name, job.is_local, job.resources.get("slurm_partition")) for job in workflow.dag.needrun_jobs()]
    check_slurm_partitions(jobs)
