"""Mesh kernels (plain functions, no Snakemake): forge a block into per-label meshes,
build multi-LOD Draco meshes, and the sharding arithmetic. magma.ops.mesh plans and
runs them."""
