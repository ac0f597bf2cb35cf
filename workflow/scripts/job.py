# Runs one magma job (setup, a batch of tasks, or finish); see magma.jobs.
from magma.jobs import main

main(snakemake)  # noqa: F821 (provided by Snakemake)
