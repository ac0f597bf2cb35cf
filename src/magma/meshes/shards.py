"""Sharding arithmetic for meshes and the label buckets merge work is split into.

Shard parameters come from cloud-volume (the same equations Igneous uses), shard
files from cloud-volume's synthesize_shard_files; here are only Igneous's extra knob
(max_labels_per_shard) and magma's bucket hash.
"""
from __future__ import annotations

import math

import numpy as np
from cloudvolume.datasource.precomputed.sharding import ShardingSpecification, compute_shard_params_for_hashed

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def spec_for(num_labels: int, shard_index_bytes: int, minishard_index_bytes: int, min_shards: int,
             max_labels_per_shard: int | None, minishard_index_encoding: str) -> ShardingSpecification:
    """The mesh sharding spec for `num_labels` labels: murmurhash3_x86_128, raw Draco data."""
    if max_labels_per_shard:
        min_shards = max(int(min_shards), math.ceil(num_labels / int(max_labels_per_shard)))
    shard_bits, minishard_bits, preshift_bits = compute_shard_params_for_hashed(
        num_labels=int(num_labels), shard_index_bytes=int(shard_index_bytes),
        minishard_index_bytes=int(minishard_index_bytes), min_shards=max(1, int(min_shards)))
    return ShardingSpecification(
        type="neuroglancer_uint64_sharded_v1", preshift_bits=preshift_bits, hash="murmurhash3_x86_128",
        minishard_bits=minishard_bits, shard_bits=shard_bits,
        minishard_index_encoding=minishard_index_encoding, data_encoding="raw")


def buckets(labels, n: int) -> np.ndarray:
    """Bucket (0..n-1) of each label: a multiplicative hash, so sequential or strided ids
    spread evenly over the merge tasks."""
    labels = np.asarray(labels, dtype=np.uint64)
    with np.errstate(over="ignore"):
        mixed = labels * _GOLDEN
    return ((mixed >> np.uint64(32)) % np.uint64(n)).astype(np.int64)


def mapkey(label: int) -> int:
    """mapbuffer looks keys up as signed 64-bit: ids >= 2**63 go in as their two's complement."""
    label = int(label)
    return label if label < 2**63 else label - 2**64


def pack(manifest: bytes, fragments: bytes) -> bytes:
    """A label's sharded blob (fragments then manifest) with the manifest length in front,
    so the shard stage can point the minishard index at the manifest."""
    return len(manifest).to_bytes(4, "little") + fragments + manifest


def unpack(value: bytes):
    """-> (blob for the shard, manifest length: cloud-volume's `data_offset`)."""
    return bytes(value[4:]), int.from_bytes(value[:4], "little")
