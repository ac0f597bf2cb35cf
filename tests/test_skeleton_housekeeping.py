"""The housekeeping verbs on what the real `skeleton` op writes, in one snakemake run:
SWC export equals the stored skeletons, unsharded -> sharded transfer reads back the
same, and `clean` removes the forge fragments while the skeletons stay readable.
"""
import json

import numpy as np
import pytest
from cloudfiles import CloudFiles
from cloudvolume import CloudVolume, Skeleton

from conftest import make_layer, snakemake, write_config
from magma import object_dirs

SHAPE = (64, 64, 32)
RES = (8, 8, 40)
TUBES = {7: ((2, 10, 4), (60, 18, 10)), 2**40 + 3: ((10, 30, 8), (18, 62, 14)), 2**63 + 21: ((30, 40, 16), (58, 48, 28))}


def tubes() -> np.ndarray:
    seg = np.zeros(SHAPE, dtype=np.uint64)
    for label, (lo, hi) in TUBES.items():
        seg[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]] = label
    return seg


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("skelhk")
    layers = {"seg": make_layer(root / "seg", tubes(), "segmentation", chunk=(32, 32, 16), resolution=RES),
              "out": make_layer(root / "out", tubes(), "segmentation", chunk=(32, 32, 16), resolution=RES)}
    cfg = {"layers": layers, "steps": {
        "skel": dict(op="skeleton", layer="seg", shape=[32, 32, 16], dust_threshold=0, min_cable_length=0),
        "swc": dict(op="skeleton_export", layer="seg", dest=str(root / "swc"), magnitude=1),
        "to_shards": dict(op="skeleton_transfer", src="seg", dest="out", sharded=True, shard_tasks=2),
        "clean": dict(op="skeleton_delete", layer="seg", clean=True, magnitude=1),
    }, "execution": {"tasks_per_job": 64, "threads": 2}}
    work = root / "work"
    work.mkdir()
    snakemake(work, write_config(root / "skel.yaml", cfg))
    return root, layers, work


def key(v):
    return tuple(np.round(v, 2))


def test_swc_equals_the_stored_skeletons(run):
    root, layers, work = run
    stored = {s.id: s for s in CloudVolume(layers["seg"], progress=False).skeleton.get(list(TUBES))}
    assert sorted(p.name for p in (root / "swc").iterdir()) == sorted(f"{label}.swc" for label in TUBES)
    for label, want in stored.items():
        got = Skeleton.from_swc((root / "swc" / f"{label}.swc").read_text())
        assert len(want.edges) > 0 and len(got.vertices) == len(want.vertices)
        edges = lambda s: {frozenset((key(s.vertices[a]), key(s.vertices[b]))) for a, b in s.edges}  # noqa: E731
        assert edges(got) == edges(want)
        radii = lambda s: {key(v): round(float(r), 2) for v, r in zip(s.vertices, s.radius)}  # noqa: E731
        assert radii(got) == radii(want)


def test_sharded_copy_reads_back_the_same(run):
    root, layers, work = run
    src, dst = CloudVolume(layers["seg"], progress=False), CloudVolume(layers["out"], progress=False)
    assert dst.skeleton.meta.is_sharded() and not src.skeleton.meta.is_sharded()
    b = {s.id: s for s in dst.skeleton.get(list(TUBES))}
    for s in src.skeleton.get(list(TUBES)):
        assert np.array_equal(s.vertices, b[s.id].vertices) and np.array_equal(s.edges, b[s.id].edges)
        assert np.array_equal(s.radius, b[s.id].radius)


def test_clean_leaves_skeletons(run):
    root, layers, work = run
    vol = CloudVolume(layers["seg"], progress=False)
    names = list(CloudFiles(f"{layers['seg']}/{vol.info['skeletons']}").list())
    assert not [n for n in names if object_dirs.intermediate(n, False)]
    assert {str(label) for label in TUBES} <= set(names)
    assert len(vol.skeleton.get(list(TUBES))) == len(TUBES)
    done = json.loads((work / "results" / "skel" / "markers" / "clean" / "done.json").read_text())
    assert done["files_deleted"] > 0, "the forge left fragments for clean to remove"
