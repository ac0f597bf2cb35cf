"""skeleton_export: SWC files read back (CloudVolume's SWC reader) give the same vertices,
edges and radii as the skeletons stored in the layer, unsharded and sharded.

Skeletons are written with CloudVolume's own API (unsharded upload; sharded files from
its synthesize_shard_files), labels chosen so every kind of prefix task has work:
one-digit, two-digit and long ids, and one above 2**63.
"""
import numpy as np
import pytest
from cloudvolume import CloudVolume, Skeleton
from cloudvolume.datasource.precomputed.sharding import ShardingSpecification, synthesize_shard_files
from cloudfiles import CloudFiles

from conftest import seg_data, make_layer, snakemake, write_config
from magma import workflow
from magma.errors import MagmaError

LABELS = [5, 7, 12, 40, 123, 9071, 2**40 + 3, 2**63 + 11]


def tree(label: int, seed: int) -> Skeleton:
    """A random tree with distinct vertices (nm), radii and vertex types."""
    rng = np.random.default_rng(seed)
    n = int(rng.integers(4, 30))
    steps = rng.integers(-40, 41, size=(n, 3)).astype(np.float32) * np.float32(0.25)
    verts = np.cumsum(steps, axis=0) + rng.integers(0, 5000, size=3) + np.arange(n)[:, None] * 1000
    parents = [int(rng.integers(0, i)) for i in range(1, n)]
    edges = np.array([[p, i] for i, p in enumerate(parents, start=1)], dtype=np.uint32)
    radii = (rng.random(n) * 50 + 1).astype(np.float32).round(3)
    return Skeleton(verts.astype(np.float32), edges, radii=radii, vertex_types=rng.integers(0, 4, n).astype(np.uint8),
                    segid=label)


def edge_set(skel: Skeleton) -> set:
    v = [tuple(np.round(x, 3)) for x in skel.vertices]
    return {frozenset((v[a], v[b])) for a, b in skel.edges}


def radius_map(skel: Skeleton) -> dict:
    return {tuple(np.round(x, 3)): round(float(r), 3) for x, r in zip(skel.vertices, skel.radius)}


def skeleton_layer(root, name: str, skels: list, sharded: bool) -> str:
    url = make_layer(root / name, seg_data((32, 32, 16)), "segmentation", chunk=(32, 32, 16))
    vol = CloudVolume(url, progress=False)
    vol.info["skeletons"] = "skeletons"
    vol.commit_info()
    info = {"@type": "neuroglancer_skeletons", "transform": [1, 0, 0, 0, 0, 1, 0, 0, 0, 0, 1, 0],
            "vertex_attributes": [{"id": "radius", "data_type": "float32", "num_components": 1}],
            "spatial_index": None}
    cf = CloudFiles(f"{url}/skeletons")
    if sharded:
        spec = ShardingSpecification("neuroglancer_uint64_sharded_v1", preshift_bits=0, hash="murmurhash3_x86_128",
                                     minishard_bits=1, shard_bits=2, minishard_index_encoding="gzip",
                                     data_encoding="gzip")
        info["sharding"] = spec.to_dict()
        cf.put_json("info", info)
        files = synthesize_shard_files(spec, {s.id: s.to_precomputed() for s in skels})
        assert len(files) >= 2, "test needs several shards"
        cf.puts(files.items(), compress=None)
    else:
        cf.put_json("info", info)
        CloudVolume(url, progress=False).skeleton.upload(skels)
    return url


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("swc")
    skels = {label: tree(label, i) for i, label in enumerate(LABELS)}
    layers = {"plain": skeleton_layer(root, "plain", list(skels.values()), False),
              "sharded": skeleton_layer(root, "sharded", list(skels.values()), True)}
    cfg = {"layers": layers, "steps": {
        "swc_plain": dict(op="skeleton_export", layer="plain", dest=str(root / "swc_plain")),
        "swc_sharded": dict(op="skeleton_export", layer="sharded", dest=f"file://{root}/swc_sharded", magnitude=1),
        "swc_some": dict(op="skeleton_export", layer="sharded", dest=str(root / "swc_some"), object_ids=[12, 2**63 + 11]),
    }, "execution": {"tasks_per_job": 64, "threads": 2}}
    work = root / "work"
    work.mkdir()
    snakemake(work, write_config(root / "swc.yaml", cfg))
    return root, skels


@pytest.mark.parametrize("out", ["swc_plain", "swc_sharded"])
def test_swc_round_trip(run, out):
    root, skels = run
    files = sorted(p.name for p in (root / out).iterdir())
    assert files == sorted(f"{label}.swc" for label in LABELS)
    for label, want in skels.items():
        got = Skeleton.from_swc((root / out / f"{label}.swc").read_text())
        assert len(got.vertices) == len(want.vertices)
        assert edge_set(got) == edge_set(want)
        assert radius_map(got) == radius_map(want)


def test_object_ids_only(run):
    root, skels = run
    assert sorted(p.name for p in (root / "swc_some").iterdir()) == ["12.swc", f"{2**63 + 11}.swc"]


def test_layer_without_skeletons(tmp_path):
    url = make_layer(tmp_path / "seg", seg_data((8, 8, 8)), "segmentation")
    cfg = {"layers": {"seg": url}, "steps": {"x": dict(op="skeleton_export", layer="seg", dest=str(tmp_path / "o"))}}
    with pytest.raises(MagmaError, match=r"steps.x.layer: layer 'seg' has no skeletons"):
        workflow.plan(cfg)
    with pytest.raises(MagmaError, match=r"steps.x: .*dest"):
        workflow.plan({"layers": {"seg": url}, "steps": {"x": dict(op="skeleton_export", layer="seg")}})
