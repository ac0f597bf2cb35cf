"""The spatial index database: `magma spatial-index db` turns a layer's `.spatial` files
into SQLite, and a box query returns exactly the labels with a bounding box that
intersects the box: the same as brute force over the index files and as
CloudVolume's own spatial_index.query, and CloudVolume can read the database too.

The index files are written in the format Igneous writes (one JSON file per index
chunk, label -> [x0, y0, z0, x1, y1, z1] in nm, named by the chunk's physical box).
"""
import json
import subprocess
import sys

import numpy as np
import pytest
from cloudfiles import CloudFiles
from cloudvolume import Bbox, CloudVolume

from conftest import make_layer, seg_data
from magma import spatial_db
from magma.errors import MagmaError

RES = (8, 8, 40)
SIZE = (256, 256, 64)
INDEX_CHUNK = (64, 64, 32)  # voxels


def write_index(url: str, kind: str, rng) -> dict:
    """Random per-chunk label boxes (some labels in many chunks, ids up to 2**64-1); -> {label: [boxes]}."""
    vol = CloudVolume(url, progress=False)
    vol.info["mesh" if kind == "mesh" else "skeletons"] = kind + "es" if kind == "mesh" else "skeletons"
    vol.commit_info()
    folder = vol.info["mesh" if kind == "mesh" else "skeletons"]
    info = {"spatial_index": {"resolution": list(RES), "chunk_size": [c * r for c, r in zip(INDEX_CHUNK, RES)]}}
    if kind == "mesh":
        info.update({"@type": "neuroglancer_legacy_mesh", "mip": 0})
    else:
        info.update({"@type": "neuroglancer_skeletons", "transform": [1, 0, 0, 0, 0, 1, 0, 0, 0, 0, 1, 0],
                     "vertex_attributes": []})
    cf = CloudFiles(f"{url}/{folder}")
    cf.put_json("info", info)
    pool = [int(x) for x in rng.integers(1, 2**63, size=30, dtype=np.uint64)] + [2**64 - 59, 2**63 + 5]
    truth = {}
    files = []
    phys = np.asarray(RES)
    for x in range(0, SIZE[0], INDEX_CHUNK[0]):
        for y in range(0, SIZE[1], INDEX_CHUNK[1]):
            for z in range(0, SIZE[2], INDEX_CHUNK[2]):
                lo = np.array([x, y, z]) * phys
                hi = np.minimum(np.array([x, y, z]) + INDEX_CHUNK, SIZE) * phys
                content = {}
                for i in rng.choice(len(pool), size=int(rng.integers(0, 8)), replace=False):
                    label = pool[i]
                    a = rng.integers(lo, hi)
                    b = np.minimum(a + rng.integers(1, (hi - lo) // 2 + 2), hi)
                    content[str(int(label))] = [int(v) for v in np.concatenate([a, b])]
                    truth.setdefault(int(label), []).append(Bbox(a, b))
                files.append((f"{Bbox(lo, hi).to_filename()}.spatial", json.dumps(content).encode()))
    cf.puts(files, compress="gzip")
    return truth


def brute_force(truth: dict, box: Bbox) -> list:
    return sorted(label for label, boxes in truth.items() if any(Bbox.intersects(b, box) for b in boxes))


@pytest.fixture(scope="module", params=["mesh", "skeleton"])
def index(request, tmp_path_factory):
    root = tmp_path_factory.mktemp("sdb")
    url = make_layer(root / "seg", seg_data(SIZE), "segmentation", chunk=(64, 64, 32), resolution=RES)
    truth = write_index(url, request.param, np.random.default_rng(3))
    db = root / "index.db"
    proc = subprocess.run([sys.executable, "-m", "magma.cli", "spatial-index", "db", url, str(db),
                           "--kind", request.param], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert f"{len(truth)} labels" in proc.stdout
    return url, request.param, truth, db


def query_boxes(n=40, seed=9):
    rng = np.random.default_rng(seed)
    whole = np.asarray(SIZE) * RES
    boxes = [Bbox((0, 0, 0), whole)]
    for _ in range(n):
        a = rng.integers(0, whole)
        boxes.append(Bbox(a, np.minimum(a + rng.integers(1, whole // 2), whole)))
    return boxes


def test_query_is_exact(index):
    url, kind, truth, db = index
    source = getattr(CloudVolume(url, progress=False), kind)
    seen = set()
    for box in query_boxes():
        want = brute_force(truth, box)
        got = spatial_db.query(str(db), box)
        assert got == want
        assert got == sorted(int(x) for x in source.spatial_index.query(box))
        seen.add(len(want))
    assert len(seen) > 3, "query boxes should give different answers"


def test_cli_query_and_cloudvolume_reads_the_database(index):
    url, kind, truth, db = index
    box = query_boxes()[5]
    lo = ",".join(str(int(v)) for v in box.minpt)
    hi = ",".join(str(int(v)) for v in box.maxpt)
    proc = subprocess.run([sys.executable, "-m", "magma.cli", "spatial-index", "query", str(db), lo, hi],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert [int(x) for x in proc.stdout.split()] == brute_force(truth, box)
    vox = Bbox([0, 0, 0], [64, 64, 32])
    proc = subprocess.run([sys.executable, "-m", "magma.cli", "spatial-index", "query", str(db), "0,0,0", "64,64,32",
                           "--voxels"], capture_output=True, text=True)
    assert [int(x) for x in proc.stdout.split()] == brute_force(truth, Bbox(vox.minpt * RES, vox.maxpt * RES))
    # CloudVolume's own tables: its spatial_index_db option answers from the file
    cv = CloudVolume(url, progress=False, spatial_index_db=f"sqlite://{db}")
    where = getattr(cv, kind).spatial_index.file_locations_per_label()
    where = {label % 2**64: files for label, files in where.items()}  # ids >= 2**63 are stored signed
    assert sorted(where) == sorted(truth)
    assert all(len(where[label]) == len(boxes) for label, boxes in truth.items())


def test_errors(tmp_path):
    url = make_layer(tmp_path / "seg", seg_data((8, 8, 8)), "segmentation")
    with pytest.raises(MagmaError, match="no such database"):
        spatial_db.query(str(tmp_path / "none.db"), Bbox((0, 0, 0), (1, 1, 1)))
    proc = subprocess.run([sys.executable, "-m", "magma.cli", "spatial-index", "db", url, str(tmp_path / "x.db")],
                          capture_output=True, text=True)
    assert proc.returncode == 1 and "has no spatial_index" in proc.stderr
    assert not (tmp_path / "x.db").exists()
