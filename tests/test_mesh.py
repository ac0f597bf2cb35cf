"""Meshes from a real snakemake run, in all three output kinds, checked against zmesh on the
whole array in memory and, for shards, against an independent reader of the sharding spec.

The segmentation is small but its objects cross many 48x48x24 forge tasks (27 of them),
so every seam between tasks matters.
"""
import gzip
import re
import struct
from pathlib import Path

import DracoPy
import mapbuffer
import numpy as np
import pytest
import zmesh
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from scipy.spatial import cKDTree
from cloudfiles import CloudFiles
from cloudvolume import Bbox, CloudVolume

from conftest import make_layer, snakemake, write_config
from magma import workflow
from magma.errors import MagmaError
from magma.ops import mesh as mesh_op

SHAPE = (144, 144, 72)  # objects big enough that simplification ties move face counts by < 5%
CHUNK = (48, 48, 24)
TASK = [48, 48, 24]
RES = (8, 8, 40)
DUST = 50
MESH_DIR = "mesh_mip_0_err_40"


def objects(shape=SHAPE, seed=0) -> np.ndarray:
    """Ellipsoids spanning several tasks, a tube along x through every task column,
    big 64-bit ids, and small dust blobs."""
    rng = np.random.default_rng(seed)
    x, y, z = np.meshgrid(*[np.arange(s) for s in shape], indexing="ij")
    seg = np.zeros(shape, dtype=np.uint64)
    ids = [3, 17, 2**40 + 5, 999, 123456789, 42, 7, 8, 9, 2**63 + 1]
    for lab in ids:
        c = rng.uniform(0.2, 0.8, 3) * shape
        r = rng.uniform(0.12, 0.3, 3) * shape
        seg[((x - c[0]) / r[0]) ** 2 + ((y - c[1]) / r[1]) ** 2 + ((z - c[2]) / r[2]) ** 2 < 1] = lab
    seg[(y - shape[1] // 2) ** 2 + (z - shape[2] // 3) ** 2 < 16] = 555
    seg[40:50, 40:50, 20:26] = 31337  # floats inside, touches no dataset edge
    for k in range(12):
        p = rng.integers(2, np.asarray(shape) - 4)
        seg[p[0]:p[0] + 3, p[1]:p[1] + 3, p[2]:p[2] + 2] = 10000 + k
    return seg


STEPS = {
    # legacy manifests, Igneous's default simplification, global dust from voxel_counts.im
    "m_leg": dict(layer="leg", dust_threshold=DUST, dust_global=True),
    # unsharded multi-LOD, Igneous's default simplification, no spatial index
    "m_ml": dict(layer="ml", nlod=2, min_chunk_size=[8, 8, 4], spatial_index=False),
    # sharded multi-LOD, exact marching cubes, open at the dataset edges, several shards, one id excluded
    "m_sh": dict(layer="sh", sharded=True, simplification=False, nlod=2, min_chunk_size=[8, 8, 4],
                 closed_dataset_edges=False, max_labels_per_shard=5, exclude_object_ids=[42]),
}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("mesh")
    seg = objects()
    layers = {s["layer"]: make_layer(root / s["layer"], seg, "segmentation", chunk=CHUNK, resolution=RES)
              for s in STEPS.values()}
    ids, counts = np.unique(seg, return_counts=True)
    counts_map = mapbuffer.IntMap({int(i): int(c) for i, c in zip(ids, counts) if i})
    CloudFiles(layers["leg"]).put("8_8_40/stats/voxel_counts.im", counts_map.tobytes(), compress=None)
    cfg = {"layers": layers, "steps": {n: dict(op="mesh", shape=TASK, **p) for n, p in STEPS.items()},
           "execution": {"tasks_per_job": 32, "threads": 2}}
    cfgfile = write_config(root / "mesh.yaml", cfg)
    work = root / "work"
    work.mkdir()
    snakemake(work, cfgfile)
    return {"root": root, "seg": seg, "layers": layers, "counts": dict(zip(ids.tolist(), counts.tolist())),
            "cfg": cfg}


# ---- helpers ----------------------------------------------------------------
def area(v, f) -> float:
    a, b, c = v[f[:, 0]], v[f[:, 1]], v[f[:, 2]]
    return float(0.5 * np.linalg.norm(np.cross(b - a, c - a), axis=1).sum())


def weld(v, f, tol=0.05):
    """Merge vertices closer than `tol` nm (seam vertices of neighbouring tasks or octree
    cells; Draco's integer lattice moves them by < 0.01 nm), drop faces that collapse."""
    v = np.asarray(v, dtype=np.float64)
    pairs = cKDTree(v).query_pairs(tol, output_type="ndarray")
    graph = coo_matrix((np.ones(len(pairs)), (pairs[:, 0], pairs[:, 1])), shape=(len(v), len(v)))
    _, rep = connected_components(graph, directed=False)
    u = np.zeros((rep.max() + 1, 3))
    u[rep] = v
    f = rep[f]
    f = f[(f[:, 0] != f[:, 1]) & (f[:, 1] != f[:, 2]) & (f[:, 0] != f[:, 2])]
    return u, f


def boundary_edges(f) -> int:
    e = np.sort(np.concatenate([f[:, [0, 1]], f[:, [1, 2]], f[:, [2, 0]]]), axis=1)
    _, c = np.unique(e, axis=0, return_counts=True)
    return int((c == 1).sum())


def whole_array_meshes(seg, simplification: bool, closed=True):
    labels = np.pad(seg, 1) if closed else seg
    mesher = zmesh.Mesher(RES)
    mesher.mesh(np.asfortranarray(labels))
    out = {}
    for i in mesher.ids():
        m = mesher.get(i, reduction_factor=100 if simplification else 0, max_error=40, voxel_centered=True)
        out[int(i)] = m
    return out


def get_mesh(layer, label, lod=0):
    cv = CloudVolume(layer, progress=False)
    kw = {} if cv.mesh.meta.info["@type"] == "neuroglancer_legacy_mesh" else {"lod": lod}
    m = cv.mesh.get(label, **kw)
    return m[label] if isinstance(m, dict) else m


def files(layer) -> list:
    return list(CloudFiles(layer).list(prefix=f"{MESH_DIR}/"))


def touches_edge(seg, label) -> bool:
    where = np.argwhere(seg == label)
    return bool(np.any(where.min(axis=0) == 0) or np.any(where.max(axis=0) == np.asarray(seg.shape) - 1))


# ---- an independent reader of the sharding spec (no cloud-volume code) --------
def _fmix(h):
    h ^= h >> 16
    h = (h * 0x85EBCA6B) & 0xFFFFFFFF
    h ^= h >> 13
    h = (h * 0xC2B2AE35) & 0xFFFFFFFF
    return h ^ (h >> 16)


def _rotl(x, r):
    return ((x << r) | (x >> (32 - r))) & 0xFFFFFFFF


def murmur3_x86_128_low64(key: int) -> int:
    """MurmurHash3_x86_128 (seed 0) of the 8-byte little-endian key; the low 64 bits."""
    data = struct.pack("<Q", key)
    c1, c2, c3 = 0x239B961B, 0xAB0E9789, 0x38B34AE5
    h = [0, 0, 0, 0]
    k2 = int.from_bytes(data[4:8], "little")
    k2 = (k2 * c2) & 0xFFFFFFFF
    k2 = (_rotl(k2, 16) * c3) & 0xFFFFFFFF
    h[1] ^= k2
    k1 = int.from_bytes(data[0:4], "little")
    k1 = (k1 * c1) & 0xFFFFFFFF
    k1 = (_rotl(k1, 15) * c2) & 0xFFFFFFFF
    h[0] ^= k1
    h = [x ^ 8 for x in h]
    h[0] = (h[0] + h[1] + h[2] + h[3]) & 0xFFFFFFFF
    h[1], h[2], h[3] = [(x + h[0]) & 0xFFFFFFFF for x in h[1:]]
    h = [_fmix(x) for x in h]
    h[0] = (h[0] + h[1] + h[2] + h[3]) & 0xFFFFFFFF
    h[1] = (h[1] + h[0]) & 0xFFFFFFFF
    return h[0] | (h[1] << 32)


def read_shards(mesh_path: Path, sharding: dict) -> dict:
    """label -> (shard file name, minishard number, manifest bytes, fragment bytes) from every shard."""
    mbits, sbits = sharding["minishard_bits"], sharding["shard_bits"]
    out = {}
    for path in sorted(mesh_path.glob("*.shard")):
        raw = path.read_bytes()
        index = np.frombuffer(raw[: 16 * 2**mbits], dtype="<u8").reshape(-1, 2)
        base = 16 * 2**mbits
        for minishard, (start, end) in enumerate(index):
            if start == end:
                continue
            block = raw[base + int(start): base + int(end)]
            if sharding["minishard_index_encoding"] == "gzip":
                block = gzip.decompress(block)
            table = np.frombuffer(block, dtype="<u8").reshape(3, -1)
            labels = np.cumsum(table[0])
            pos = 0
            for label, delta, size in zip(labels, table[1], table[2]):
                start_ = pos + int(delta)
                pos = start_ + int(size)
                manifest = raw[base + start_: base + pos]
                nfrag_bytes = sum(fragment_sizes(manifest))
                out[int(label)] = (path.name, minishard, manifest, raw[base + start_ - nfrag_bytes: base + start_])
        assert int(path.stem, 16) < 2**sbits
    return out


def parse_manifest(b: bytes) -> dict:
    chunk = struct.unpack_from("<3f", b, 0)
    origin = struct.unpack_from("<3f", b, 12)
    n = struct.unpack_from("<I", b, 24)[0]
    off = 28
    scales = struct.unpack_from(f"<{n}f", b, off)
    off += 4 * n
    voff = np.frombuffer(b, dtype="<f4", count=3 * n, offset=off).reshape(n, 3)
    off += 12 * n
    nfrag = struct.unpack_from(f"<{n}I", b, off)
    off += 4 * n
    positions, sizes = [], []
    for k in nfrag:
        positions.append(np.frombuffer(b, dtype="<u4", count=3 * k, offset=off).reshape(3, k).T)
        off += 12 * k
        sizes.append(np.frombuffer(b, dtype="<u4", count=k, offset=off))
        off += 4 * k
    assert off == len(b), "manifest has trailing bytes"
    return {"chunk": np.array(chunk), "origin": np.array(origin), "lods": n, "scales": scales,
            "vertex_offsets": voff, "positions": positions, "sizes": sizes}


def fragment_sizes(manifest: bytes) -> list:
    return [int(s) for lod in parse_manifest(manifest)["sizes"] for s in lod]


def morton(p) -> int:
    code = 0
    for bit in range(21):
        for axis in range(3):
            code |= ((int(p[axis]) >> bit) & 1) << (3 * bit + axis)
    return code


def decode_lod(manifest: bytes, data: bytes, lod: int, bits: int, resolution):
    """All fragments of one LOD as (vertices in nm, faces), decoded by hand + DracoPy."""
    m = parse_manifest(manifest)
    start = sum(int(s) for s in np.concatenate(m["sizes"][:lod])) if lod else 0
    verts, faces, n = [], [], 0
    for pos, size in zip(m["positions"][lod], m["sizes"][lod]):
        blob = data[start: start + int(size)]
        start += int(size)
        if not size:
            continue
        d = DracoPy.decode(blob)
        pts = np.asarray(d.points, dtype=np.float64)
        assert np.all(pts == np.round(pts)) and pts.min() >= 0 and pts.max() <= 2**bits - 1
        model = m["origin"] + m["vertex_offsets"][lod] + m["chunk"] * 2**lod * (pos + pts / (2**bits - 1))
        verts.append(model * np.asarray(resolution))
        faces.append(np.asarray(d.faces).reshape(-1, 3) + n)
        n += len(pts)
    return np.concatenate(verts), np.concatenate(faces)


# ---- tests --------------------------------------------------------------------
def meshed_labels(layer, kind) -> set:
    cf = CloudFiles(layer)
    if kind == "legacy":
        pat = re.compile(r"/(\d+):0$")
    elif kind == "multilod":
        pat = re.compile(r"/(\d+)\.index$")
    else:
        info = cf.get_json(f"{MESH_DIR}/info")
        return set(read_shards(Path(layer[len("file://"):]) / MESH_DIR, info["sharding"]))
    return {int(m.group(1)) for f in cf.list(prefix=f"{MESH_DIR}/") if (m := pat.search(f))}


def test_every_label_above_dust_has_a_mesh_and_no_other(run):
    counts = run["counts"]
    labels = {lab for lab in counts if lab}
    assert meshed_labels(run["layers"]["leg"], "legacy") == {lab for lab in labels if counts[lab] >= DUST}
    assert meshed_labels(run["layers"]["ml"], "multilod") == labels
    assert meshed_labels(run["layers"]["sh"], "sharded") == labels - {42}
    assert any(0 < c < DUST for c in counts.values()), "the data needs dust"


@pytest.mark.parametrize("layer,kind", [("leg", "legacy"), ("ml", "multilod"), ("sh", "sharded")])
def test_cloudvolume_reads_every_mesh(run, layer, kind):
    seg = run["seg"]
    for label in meshed_labels(run["layers"][layer], kind):
        m = get_mesh(run["layers"][layer], label)
        assert len(m.faces) > 0
        where = np.argwhere(seg == label)
        # simplification may move a vertex by max error; Draco's lattice by a fraction of a nm
        slack = {"leg": 41, "ml": 41, "sh": 1}[layer]
        lo, hi = (where.min(axis=0) - 1) * RES - slack, (where.max(axis=0) + 1) * RES + slack
        assert np.all(m.vertices.min(axis=0) >= lo) and np.all(m.vertices.max(axis=0) <= hi), label


def test_mesh_infos(run):
    layers = run["layers"]
    for layer in layers.values():
        assert CloudFiles(layer).get_json("info")["mesh"] == MESH_DIR
    leg = CloudFiles(layers["leg"]).get_json(f"{MESH_DIR}/info")
    assert leg == {"@type": "neuroglancer_legacy_mesh", "mip": 0, "chunk_size": TASK,
                   "spatial_index": {"resolution": list(RES), "chunk_size": [t * r for t, r in zip(TASK, RES)]}}
    sh = CloudFiles(layers["sh"]).get_json(f"{MESH_DIR}/info")
    assert sh["@type"] == "neuroglancer_multilod_draco" and sh["vertex_quantization_bits"] == 16
    assert sh["transform"] == [8, 0, 0, 0, 0, 8, 0, 0, 0, 0, 40, 0] and sh["lod_scale_multiplier"] == 1.0
    assert sh["sharding"]["hash"] == "murmurhash3_x86_128" and sh["sharding"]["data_encoding"] == "raw"
    assert sh["sharding"]["shard_bits"] >= 1, "max_labels_per_shard should force several shards"
    ml = CloudFiles(layers["ml"]).get_json(f"{MESH_DIR}/info")
    assert "sharding" not in ml and "spatial_index" not in ml
    ml_files = files(layers["ml"])
    assert not [f for f in ml_files if f.endswith((".spatial", ".spatial.gz")) and "/magma-work/" not in f]
    assert [f for f in ml_files if "/magma-work/forge/" in f], "forge's records stay for a later merge"
    assert not [f for layer in layers.values() for f in files(layer) if "/magma-work/labels" in f or "/shards/" in f]


def test_spatial_index_finds_labels(run):
    cv = CloudVolume(run["layers"]["leg"], progress=False)
    box = Bbox((0, 0, 0), SHAPE) * RES
    found = cv.mesh.spatial_index.query(box)
    assert {int(x) for x in found} == meshed_labels(run["layers"]["leg"], "legacy")
    corner = cv.mesh.spatial_index.query(Bbox((0, 0, 0), (32, 32, 16)) * RES)
    seg = run["seg"][:33, :33, :17]
    assert {int(x) for x in corner} == {int(x) for x in np.unique(seg) if x and run["counts"][x] >= DUST}


def test_forge_records_each_fragments_bounding_box(run):
    """A forge task's record (the spatial index file) holds, per label, the exact bounds of the
    fragment it stored: the spatial index must find every fragment it holds."""
    cf = CloudFiles(run["layers"]["leg"])
    checked = 0
    for name in cf.list(prefix=f"{MESH_DIR}/"):
        if not name.endswith(".frags"):
            continue
        task = Path(name).name[: -len(".frags")]
        lo, hi = Bbox.from_filename(task).minpt, Bbox.from_filename(task).maxpt
        record = cf.get_json(f"{MESH_DIR}/{Bbox(lo * RES, hi * RES).to_filename()}.spatial")
        frags = mapbuffer.MapBuffer(cf.get(name))
        for label, bbox in record.items():
            m = mesh_op._decode(frags[mesh_op.mapkey(int(label))])
            assert bbox == m.vertices.min(axis=0).tolist() + m.vertices.max(axis=0).tolist()
            checked += 1
    assert checked > 27


@pytest.mark.parametrize("layer", ["leg", "ml"])
def test_closed_after_welding(run, layer):
    kind = "legacy" if layer == "leg" else "multilod"
    for label in meshed_labels(run["layers"][layer], kind):
        m = get_mesh(run["layers"][layer], label)
        v, f = weld(m.vertices, m.faces)
        assert boundary_edges(f) == 0, f"label {label} has holes at task seams"


def test_open_dataset_edges(run):
    seg = run["seg"]
    open_, closed = 0, 0
    for label in meshed_labels(run["layers"]["sh"], "sharded"):
        m = get_mesh(run["layers"]["sh"], label)
        v, f = weld(m.vertices, m.faces)
        if touches_edge(seg, label):
            open_ += boundary_edges(f) > 0
        else:
            assert boundary_edges(f) == 0, label
            closed += 1
    assert open_ >= 3 and closed >= 1


def cut_like(ref: zmesh.Mesh, manifest: bytes) -> int:
    """Faces of `ref` (nm) once cut into the octree cells of a multi-LOD manifest, as LOD 0 is."""
    man = parse_manifest(manifest)
    vox = zmesh.Mesh(ref.vertices / np.asarray(RES, dtype=np.float32), ref.faces, None)
    cut = zmesh.chunk_mesh(vox, tuple(float(c) for c in man["chunk"]), tuple(float(o) for o in man["origin"]))
    return sum(len(c.faces) for c in cut.values())


def test_exact_marching_cubes_equals_whole_array(run):
    """Without simplification, tiling changes nothing: LOD 0 of the sharded meshes is the
    whole-array mesh cut into the manifest's octree cells (cutting adds the faces along
    cell planes, so the reference is cut the same way)."""
    ref = whole_array_meshes(run["seg"], simplification=False, closed=False)
    layer = run["layers"]["sh"]
    info = CloudFiles(layer).get_json(f"{MESH_DIR}/info")
    entries = read_shards(Path(layer[len("file://"):]) / MESH_DIR, info["sharding"])
    for label, (_, _, manifest, _) in entries.items():
        m = get_mesh(layer, label)
        r = ref[label]
        assert len(m.faces) == cut_like(r, manifest), label
        assert area(m.vertices, m.faces) == pytest.approx(area(r.vertices, r.faces), rel=1e-4), label


def test_simplified_meshes_match_whole_array(run):
    """Simplified, a label's merged mesh is zmesh's simplified mesh of the whole array, up to
    the order the simplifier meets ties in: area within 1%, faces within 5%. (Simplified per
    task, as Igneous does, seams keep every marching-cubes vertex: 4-5x the faces here.)"""
    ref = whole_array_meshes(run["seg"], simplification=True)
    checked = 0
    for label in meshed_labels(run["layers"]["leg"], "legacy"):
        m, r = get_mesh(run["layers"]["leg"], label), ref[label]
        assert area(m.vertices, m.faces) == pytest.approx(area(r.vertices, r.faces), rel=0.01), label
        if len(r.faces) < 100:
            continue  # a blob of a few voxels: a handful of faces either way
        assert len(m.faces) == pytest.approx(len(r.faces), rel=0.05), label
        checked += 1
    assert checked >= 8
    # multi-LOD: LOD 0 is the same merged mesh (simplification is deterministic), cut into octree cells
    layer = run["layers"]["ml"]
    for label in meshed_labels(layer, "multilod") & meshed_labels(run["layers"]["leg"], "legacy"):
        m, r = get_mesh(layer, label), ref[label]
        assert area(m.vertices, m.faces) == pytest.approx(area(r.vertices, r.faces), rel=0.01), label
        cut = cut_like(get_mesh(run["layers"]["leg"], label), CloudFiles(layer).get(f"{MESH_DIR}/{label}.index"))
        assert len(m.faces) == pytest.approx(cut, rel=0.03), label  # Draco drops slivers cutting made


def test_independent_shard_reader(run):
    layer = run["layers"]["sh"]
    info = CloudFiles(layer).get_json(f"{MESH_DIR}/info")
    sharding = info["sharding"]
    mbits, sbits = sharding["minishard_bits"], sharding["shard_bits"]
    entries = read_shards(Path(layer[len("file://"):]) / MESH_DIR, sharding)
    assert len({e[0] for e in entries.values()}) > 1
    assert sum(parse_manifest(e[2])["lods"] >= 2 for e in entries.values()) >= 5
    for label, (fname, minishard, manifest, data) in entries.items():
        h = murmur3_x86_128_low64(label) >> sharding["preshift_bits"]
        assert minishard == h & (2**mbits - 1), label
        assert int(fname.split(".")[0], 16) == (h >> mbits) & (2**sbits - 1), label
        m = parse_manifest(manifest)
        assert m["scales"] == tuple(float(2**i) for i in range(m["lods"]))
        for lod, pos in enumerate(m["positions"]):
            codes = [morton(p) for p in pos]
            assert codes == sorted(codes), "fragments must be in Z-curve order"
            assert np.all(pos < 2 ** (m["lods"] - 1 - lod)), "fragments lie inside the octree level"
        v, f = decode_lod(manifest, data, 0, info["vertex_quantization_bits"], RES)
        ref = get_mesh(layer, label, lod=0)
        assert len(f) == len(ref.faces)
        assert np.allclose(np.sort(v, axis=0), np.sort(ref.vertices, axis=0), atol=0.05)
        if m["lods"] >= 2:
            v1, f1 = decode_lod(manifest, data, 1, info["vertex_quantization_bits"], RES)
            assert 0 < len(f1) < len(f), "LOD 1 is a simplified LOD 0"


def test_merge_reads_fragments_in_task_order_whatever_storage_answers(run, monkeypatch):
    """Face order decides the simplifier's ties, so a label's parts come in task order
    even when storage (S3) returns the forge maps in another."""
    layer = run["layers"]["ml"]
    cf = CloudFiles(layer)
    work = {}
    for name in sorted(f for f in cf.list(prefix=f"{MESH_DIR}/") if f.endswith(".frags")):
        for label in mapbuffer.MapBuffer(cf.get(name)).keys():
            work.setdefault(int(label), []).append(name[len(MESH_DIR) + 1: -len(".frags")])
    params = {"mesh_dir": MESH_DIR}
    before = mesh_op._fragments(cf, params, work)
    get = CloudFiles.get
    monkeypatch.setattr(CloudFiles, "get", lambda self, *a, **k: list(reversed(list(get(self, *a, **k)))))
    after = mesh_op._fragments(cf, params, work)
    assert sum(len(v) > 1 for v in before.values()) >= 5
    for label, parts in before.items():
        assert [bytes(b) for b in parts] == [bytes(b) for b in after[label]], label
        assert all(len(mesh_op._decode(b).faces) for b in parts), label


def test_dust_global_without_counts_is_an_error(run, tmp_path):
    layer = make_layer(tmp_path / "nocounts", run["seg"], "segmentation", chunk=CHUNK, resolution=RES)
    plan = workflow.plan({"layers": {"s": layer}, "steps": {"m": {"op": "mesh", "layer": "s", "shape": TASK,
                                                                   "dust_threshold": 10, "dust_global": True}}})
    forge = plan.steps["m"].stages[0]
    with pytest.raises(MagmaError, match=r"steps\.m\.dust_global: .*voxel_counts\.im"):
        mesh_op.forge(forge.params, forge.grid.task(0), {"s": layer})
    assert not files(layer)


@pytest.mark.parametrize("step,needle", [
    ({"layer": "img"}, "steps.m.layer: meshes are made from a segmentation"),
    ({"layer": "s", "mip": 3}, "steps.m.mip"),
    ({"layer": "s", "object_ids": []}, "steps.m.object_ids"),
    ({"layer": "s", "fill_holes": 4}, "steps.m.fill_holes"),
    ({"layer": "s", "vertex_quantization_bits": 12}, "steps.m.vertex_quantization_bits"),
    ({"layer": "s", "shape": [0, 64, 64]}, "steps.m.shape"),
    ({"layer": "s", "mesh_dir": "../elsewhere"}, "steps.m.mesh_dir"),
    ({"layer": "s", "compress": "lzma"}, "steps.m.compress"),
])
def test_bad_config(tmp_path, step, needle):
    seg = objects((32, 32, 16))
    layers = {"s": make_layer(tmp_path / "s", seg, "segmentation", chunk=(16, 16, 16)),
              "img": make_layer(tmp_path / "img", seg.astype(np.uint8), "image", chunk=(16, 16, 16))}
    with pytest.raises(MagmaError) as err:
        workflow.plan({"layers": layers, "steps": {"m": {"op": "mesh", **step}}})
    assert needle in str(err.value)


def run_in_process(cfg: dict) -> None:
    """Every stage's tasks, in order, in this process: a clean run without Snakemake."""
    plan = workflow.plan(cfg)
    for sp in plan.steps.values():
        for layer, info in sp.infos.items():
            CloudVolume(cfg["layers"][layer], info=info, progress=False).commit_info()
        for st in sp.stages:
            for i in range(st.grid.n):
                mesh_op.run_task(st.params, st.grid.task(i), cfg["layers"])


def mesh_files(layer) -> dict:
    cf = CloudFiles(layer)
    names = sorted(cf.list(prefix=f"{MESH_DIR}/"))
    return {item["path"]: item["content"] for item in cf.get(names)}


def test_sigkill_during_forge_and_merge_then_rerun_gives_identical_output(tmp_path, workdir):
    from test_resume import kill_then_resume

    seg = objects((64, 64, 32), seed=3)
    step = dict(op="mesh", shape=TASK, sharded=True, nlod=1, min_chunk_size=[8, 8, 4], max_labels_per_shard=4)
    ref = {"layers": {"s": make_layer(tmp_path / "ref", seg, "segmentation", chunk=CHUNK, resolution=RES)},
           "steps": {"m": dict(step, layer="s")}}
    run_in_process(ref)
    layer = make_layer(tmp_path / "seg", seg, "segmentation", chunk=CHUNK, resolution=RES)
    cfg = {"layers": {"s": layer}, "steps": {"m": dict(step, layer="s")},
           "execution": {"tasks_per_job": 4, "threads": 1}}
    cfgfile = write_config(tmp_path / "k.yaml", cfg)
    stages = {st.name: st.jobs for st in workflow.plan(cfg).steps["m"].stages}
    assert stages["forge"] >= 2 and stages["merge"] >= 2

    kill_then_resume(workdir, cfgfile, (1, stages["forge"] + 1 + 1))  # inside forge, then inside merge
    got, want = mesh_files(layer), mesh_files(ref["layers"]["s"])
    assert sorted(got) == sorted(want)
    assert all(got[k] == want[k] for k in want)
    assert any(k.endswith(".shard") for k in got)


def test_forge_kernel_filters_and_fills():
    from magma.meshes import forge

    block = np.zeros((20, 20, 20), dtype=np.uint64)
    block[2:12, 2:12, 2:12] = 5          # 1000 voxels, hollow below
    block[5:9, 5:9, 5:9] = 0             # an enclosed hole
    block[14:16, 14:16, 14:16] = 6       # 8 voxels
    block[14:19, 2:7, 2:7] = 2**63 + 7   # 125 voxels
    kept = forge.keep_labels(block.copy(), dust_threshold=100)
    assert set(np.unique(kept).tolist()) == {0, 5, 2**63 + 7}
    counts = mapbuffer.IntMap(mapbuffer.IntMap({5: 10, 6: 500, 2**63 + 7: 500}).tobytes())
    kept = forge.keep_labels(block.copy(), dust_threshold=100, global_counts=counts)
    assert set(np.unique(kept).tolist()) == {0, 6, 2**63 + 7}
    kept = forge.keep_labels(block.copy(), object_ids=[5, 6], exclude_object_ids=[6])
    assert set(np.unique(kept).tolist()) == {0, 5}

    hollow = forge.mesh_labels(block, RES)
    filled = forge.mesh_labels(block, RES, fill_holes=1)
    solid = block.copy()
    solid[5:9, 5:9, 5:9] = 5
    ref = forge.mesh_labels(solid, RES)
    assert len(filled[5].faces) == len(ref[5].faces) < len(hollow[5].faces)
    assert area(filled[5].vertices, filled[5].faces) == pytest.approx(area(ref[5].vertices, ref[5].faces))
    for level in (2, 3):  # border filling and dilation run and keep every label
        assert set(forge.mesh_labels(block, RES, fill_holes=level)) == {5, 6, 2**63 + 7}

    # the forge task's own download may be renumbered in place: the same meshes, the block used up
    mine = block.copy()
    consumed = forge.mesh_labels(mine, RES, consume=True)
    assert not np.array_equal(mine, block) and set(consumed) == set(hollow)
    for label, m in hollow.items():
        assert np.array_equal(m.vertices, consumed[label].vertices) and np.array_equal(m.faces, consumed[label].faces)


def test_mesh_dir_follows_the_layer_info(tmp_path):
    seg = objects((32, 32, 16))
    layer = make_layer(tmp_path / "s", seg, "segmentation", chunk=(16, 16, 16))
    step = {"op": "mesh", "layer": "s", "max_simplification_error": 12.5}
    plan = workflow.plan({"layers": {"s": layer}, "steps": {"m": step}})
    assert plan.steps["m"].infos["s"]["mesh"] == "mesh_mip_0_err_12.5"
    info = CloudFiles(layer).get_json("info")
    CloudFiles(layer).put_json("info", dict(info, mesh="meshes"))
    plan = workflow.plan({"layers": {"s": layer}, "steps": {"m": step}})
    assert plan.steps["m"].stages[0].params["mesh_dir"] == "meshes"
    plan = workflow.plan({"layers": {"s": layer}, "steps": {"m": dict(step, mesh_dir="other")}})
    assert plan.steps["m"].infos["s"]["mesh"] == "other"


def test_welding_only_seam_vertices_gives_the_full_weld():
    """The merge sorts only the vertices on the planes where forge tasks meet: the welded
    mesh has the same vertices and triangles as welding every vertex, and is closed."""
    from magma.meshes import forge, multilod

    seg = objects((72, 72, 36), seed=3)
    lo = np.array([5, 5, 5])  # a voxel offset, so the planes are not at multiples of the task shape
    params = {"bounds": [lo.tolist(), (lo + seg.shape).tolist()], "shape": [24, 24, 12], "resolution": list(RES)}
    grid = mesh_op.core_boxes(params)
    parts = {}
    for i in range(grid.n):
        core = grid.task(i)
        a = core.minpt - lo
        b = np.minimum(core.maxpt - lo + 1, seg.shape)  # the forge's 1-voxel high-side overlap
        edges = forge.dataset_edges(a, b, (0, 0, 0), seg.shape)
        block = seg[a[0]:b[0], a[1]:b[1], a[2]:b[2]]
        for label, m in forge.mesh_labels(block, RES, edges=edges).items():
            m.vertices += ((core.minpt - edges[0]) * np.asarray(RES)).astype(np.float32)
            parts.setdefault(label, []).append(m)
    seams = mesh_op.seam_planes(params)
    assert [len(s) for s in seams] == [2, 2, 2]
    crossing = [label for label, p in parts.items() if len(p) > 1]
    assert len(crossing) >= 5
    for label in crossing:
        full = multilod.weld(parts[label], RES, label, distinct=True)
        seam = multilod.weld(parts[label], RES, label, distinct=True, seams=seams)
        assert len(seam.vertices) == len(full.vertices) < sum(len(p.vertices) for p in parts[label]), label
        tri = lambda m: sorted(map(tuple, np.sort(m.vertices[m.faces].reshape(-1, 9).round(3), axis=1)))  # noqa: E731
        assert tri(seam) == tri(full), label
        assert boundary_edges(seam.faces) == 0, label  # objects close at the dataset's edges too
