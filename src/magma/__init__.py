"""magma: Neuroglancer Precomputed volumes produced by a Snakemake workflow."""
__version__ = "0.1.0"
