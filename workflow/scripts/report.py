# Draws the pictures and tables of `snakemake --report`; see magma.report.
from magma.report import main

main(snakemake)  # noqa: F821 (provided by Snakemake)
