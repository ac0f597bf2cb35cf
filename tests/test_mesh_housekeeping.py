"""The housekeeping verbs on what the real `mesh` op writes, in one snakemake run:
legacy meshes -> sharded multi-LOD (mesh_transfer), and the spatial index database
queried against CloudVolume's own spatial_index.query. (Cleaning multi-LOD forge
leftovers is in test_mesh_skeleton_files, on files named as the mesh op names them.)
"""
import subprocess
import sys

import numpy as np
import pytest
from cloudfiles import CloudFiles
from cloudvolume import Bbox, CloudVolume

from conftest import make_layer, snakemake, write_config
from magma import object_dirs, spatial_db

SHAPE = (64, 64, 32)
RES = (8, 8, 40)


def objects() -> np.ndarray:
    """Separate boxes with 64-bit ids, some crossing forge-task borders, so box queries differ."""
    seg = np.zeros(SHAPE, dtype=np.uint64)
    boxes = {3: ((2, 2, 2), (12, 10, 8)), 2**40 + 7: ((28, 4, 4), (40, 20, 20)), 99: ((50, 50, 2), (62, 62, 10)),
             2**63 + 5: ((5, 40, 12), (25, 60, 30)), 12345: ((40, 30, 14), (48, 38, 22))}
    for label, (lo, hi) in boxes.items():
        seg[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]] = label
    return seg


def area(mesh) -> float:
    v = mesh.vertices[mesh.faces]
    return float(np.linalg.norm(np.cross(v[:, 1] - v[:, 0], v[:, 2] - v[:, 0]), axis=1).sum() / 2)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("housekeeping")
    seg = objects()
    layers = {"leg": make_layer(root / "leg", seg, "segmentation", chunk=(32, 32, 16), resolution=RES),
              "out": make_layer(root / "out", seg, "segmentation", chunk=(32, 32, 16), resolution=RES)}
    cfg = {"layers": layers, "steps": {
        "mesh_leg": dict(op="mesh", layer="leg", shape=[32, 32, 16], simplification=False),
        "to_shards": dict(op="mesh_transfer", src="leg", dest="out", sharded=True, min_shards=2, shard_tasks=2,
                          nlod=1, min_chunk_size=[8, 8, 4]),
    }, "execution": {"tasks_per_job": 64, "threads": 2}}
    work = root / "work"
    work.mkdir()
    snakemake(work, write_config(root / "hk.yaml", cfg))
    return root, layers


def test_legacy_meshes_become_sharded_multilod(run):
    root, layers = run
    src, dst = CloudVolume(layers["leg"], progress=False), CloudVolume(layers["out"], progress=False)
    assert dst.mesh.meta.is_sharded() and dst.mesh.meta.info["@type"] == "neuroglancer_multilod_draco"
    labels = sorted(int(x) for x in np.unique(objects()) if x)
    before = src.mesh.get(labels, fuse=False)
    after = dst.mesh.get(labels, lod=0)
    assert sorted(after) == labels
    step = np.asarray(RES) * 2 / 2**16  # one quantization step of the coarsest cell, generously
    for label in labels:
        a, b = before[label], after[label]
        assert np.allclose(a.vertices.min(0), b.vertices.min(0), atol=step.max() * 64)
        assert np.allclose(a.vertices.max(0), b.vertices.max(0), atol=step.max() * 64)
        assert abs(area(a) - area(b)) <= 1e-3 * area(a), label
    assert not [n for n in CloudFiles(f"{layers['out']}/{dst.info['mesh']}").list() if n.startswith(object_dirs.WORK)]


def test_spatial_index_database_of_a_real_mesh_run(run, tmp_path):
    root, layers = run
    db = tmp_path / "leg.db"
    proc = subprocess.run([sys.executable, "-m", "magma.cli", "spatial-index", "db", layers["leg"], str(db)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    index = CloudVolume(layers["leg"], progress=False).mesh.spatial_index
    rng = np.random.default_rng(1)
    whole = np.asarray(SHAPE) * RES
    answers = set()
    for _ in range(30):
        lo = rng.integers(0, whole)
        box = Bbox(lo, np.minimum(lo + rng.integers(1, whole // 2 + 2), whole))
        want = sorted(int(x) for x in index.query(box))
        assert spatial_db.query(str(db), box) == want
        answers.add(len(want))
    assert len(answers) > 2
