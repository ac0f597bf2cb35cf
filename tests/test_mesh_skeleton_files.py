"""mesh_transfer / skeleton_transfer (copy, unsharded -> sharded), mesh_delete /
skeleton_delete (everything, or `clean: true` for forge leftovers), in one real
snakemake run. Meshes and skeletons read back through CloudVolume equal the source.

Skeletons are written with CloudVolume's upload; multi-LOD meshes with DracoPy
fragments and CloudVolume's manifest class; forge leftovers with the names the
mesh/skeleton forges use (`<label>:0:<box>`, `.frags`, `.labels`, work dirs).
"""
import DracoPy
import numpy as np
import pytest
from cloudfiles import CloudFiles
from cloudvolume import CloudVolume, Mesh, Skeleton
from cloudvolume.datasource.precomputed.mesh.multilod import MultiLevelPrecomputedMeshManifest

from conftest import make_layer, seg_data, snakemake, write_config
from magma import object_dirs
from magma.errors import MagmaError

LABELS = [3, 12, 77, 404, 5123, 2**40 + 1, 2**63 + 9]
SPATIAL = "0-512_0-512_0-640.spatial"
LEFTOVERS_MESH = ["12:0:0-64_0-64_0-16", "0-64_0-64_0-16.frags", "magma-work/labels/0.json"]
LEFTOVERS_SKEL = ["frags/0/0-64_0-64_0-16.frags", "frags/labels/0-64_0-64_0-16.labels"]


def skeleton(label, seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(3, 20))
    verts = (rng.random((n, 3)) * 500).astype(np.float32)
    edges = np.array([[int(rng.integers(0, i)), i] for i in range(1, n)], dtype=np.uint32)
    return Skeleton(verts, edges, radii=(rng.random(n) * 9).astype(np.float32), segid=label)


def draco_fragment(rng) -> bytes:
    verts = rng.integers(0, 1023, size=(12, 3)).astype(np.float32)
    faces = rng.integers(0, 12, size=(10, 3)).astype(np.uint32)
    return DracoPy.encode(verts, faces, quantization_bits=10)


def multires_mesh(label, seed) -> tuple:
    """(data, manifest) of a 1-LOD, 2-fragment multi-LOD Draco mesh."""
    rng = np.random.default_rng(seed)
    frags = [draco_fragment(rng), draco_fragment(rng)]
    manifest = MultiLevelPrecomputedMeshManifest(
        label, chunk_shape=[64, 64, 64], grid_origin=[0, 0, 0], num_lods=1, lod_scales=[1],
        vertex_offsets=[[0, 0, 0]], num_fragments_per_lod=[2],
        fragment_positions=[np.array([[0, 0, 0], [1, 0, 0]])], fragment_offsets=[[len(f) for f in frags]])
    return b"".join(frags), manifest.to_binary()


def with_objects(root, name) -> str:
    url = make_layer(root / name, seg_data((32, 32, 16)), "segmentation", chunk=(32, 32, 16))
    vol = CloudVolume(url, progress=False)
    vol.info.update(mesh="mesh", skeletons="skeletons")
    vol.commit_info()
    skel = CloudFiles(f"{url}/skeletons")
    skel.put_json("info", {"@type": "neuroglancer_skeletons", "transform": [1, 0, 0, 0, 0, 1, 0, 0, 0, 0, 1, 0],
                           "vertex_attributes": [{"id": "radius", "data_type": "float32", "num_components": 1}],
                           "spatial_index": {"resolution": [8, 8, 40], "chunk_size": [512, 512, 640]}})
    CloudVolume(url, progress=False).skeleton.upload([skeleton(label, i) for i, label in enumerate(LABELS)])
    skel.puts([(SPATIAL, b"{}")] + [(n, b"x") for n in LEFTOVERS_SKEL])
    mesh = CloudFiles(f"{url}/mesh")
    mesh.put_json("info", {"@type": "neuroglancer_multilod_draco", "vertex_quantization_bits": 10,
                           "transform": [8, 0, 0, 0, 0, 8, 0, 0, 0, 0, 40, 0], "lod_scale_multiplier": 1,
                           "spatial_index": {"resolution": [8, 8, 40], "chunk_size": [512, 512, 640]}})
    files = [(SPATIAL, b"{}")] + [(n, b"x") for n in LEFTOVERS_MESH]
    for i, label in enumerate(LABELS):
        data, manifest = multires_mesh(label, 100 + i)
        files += [(str(label), data), (f"{label}.index", manifest)]
    mesh.puts(files, compress="gzip")
    return url


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("objs")
    layers = {"seg": with_objects(root, "seg"), "doomed": with_objects(root, "doomed"),
              "copy": make_layer(root / "copy", seg_data((32, 32, 16)), "segmentation"),
              "sharded": make_layer(root / "sharded", seg_data((32, 32, 16)), "segmentation")}
    sharding = dict(sharded=True, shard_tasks=3, min_shards=4)
    cfg = {"layers": layers, "steps": {
        "skel_copy": dict(op="skeleton_transfer", src="seg", dest="copy"),
        "mesh_copy": dict(op="mesh_transfer", src="seg", dest="copy", dir="meshes_copy", magnitude=1),
        "skel_shard": dict(op="skeleton_transfer", src="seg", dest="sharded", **sharding),
        "mesh_shard": dict(op="mesh_transfer", src="seg", dest="sharded", **sharding),
        "mesh_clean": dict(op="mesh_delete", layer="seg", clean=True),
        "skel_rm": dict(op="skeleton_delete", layer="doomed", magnitude=1),
    }, "execution": {"tasks_per_job": 64, "threads": 2}}
    work = root / "work"
    work.mkdir()
    snakemake(work, write_config(root / "objs.yaml", cfg))
    return root, layers


def files(url, d):
    return sorted(CloudFiles(f"{url}/{d}").list())


def same_skeletons(a: CloudVolume, b: CloudVolume):
    sb_by_id = {s.id: s for s in b.skeleton.get(LABELS)}
    assert sorted(sb_by_id) == sorted(LABELS)
    for sa in a.skeleton.get(LABELS):
        sb = sb_by_id[sa.id]
        assert np.array_equal(sa.vertices, sb.vertices) and np.array_equal(sa.edges, sb.edges)
        assert np.array_equal(sa.radius, sb.radius)


def same_meshes(a: CloudVolume, b: CloudVolume):
    ma, mb = a.mesh.get(LABELS), b.mesh.get(LABELS)
    assert sorted(ma) == sorted(mb) == sorted(LABELS)
    for label in LABELS:
        assert len(ma[label].vertices) > 0 and len(ma[label].faces) > 0
        assert np.array_equal(ma[label].vertices, mb[label].vertices)
        assert np.array_equal(ma[label].faces, mb[label].faces)


def test_copy(run):
    root, layers = run
    src, dst = CloudVolume(layers["seg"], progress=False), CloudVolume(layers["copy"], progress=False)
    assert dst.info["skeletons"] == "skeletons" and dst.info["mesh"] == "meshes_copy"
    same_skeletons(src, dst)
    same_meshes(src, dst)
    assert not any(n.startswith("frags/") for n in files(layers["copy"], "skeletons")), "leftovers are not copied"
    assert SPATIAL in files(layers["copy"], "meshes_copy")


def test_unsharded_to_sharded(run):
    root, layers = run
    src, dst = CloudVolume(layers["seg"], progress=False), CloudVolume(layers["sharded"], progress=False)
    for kind, d in (("skeleton", "skeletons"), ("mesh", "mesh")):
        names = files(layers["sharded"], d)
        assert "sharding" in CloudFiles(f"{layers['sharded']}/{d}").get_json("info")
        assert len([n for n in names if n.endswith(".shard")]) >= 2, f"{kind}: test needs several shards"
        assert not [n for n in names if n.startswith(object_dirs.WORK)], "work lists are removed"
    assert getattr(dst.skeleton.meta, "is_sharded")() and dst.mesh.meta.is_sharded()
    same_skeletons(src, dst)
    same_meshes(src, dst)


def test_clean_removes_only_leftovers(run):
    root, layers = run
    mesh, skel = files(layers["seg"], "mesh"), files(layers["seg"], "skeletons")
    assert set(mesh) == {"info", SPATIAL} | {str(x) for x in LABELS} | {f"{x}.index" for x in LABELS}
    assert set(LEFTOVERS_SKEL) <= set(skel), "a mesh clean leaves the skeletons alone"
    skel_dir = CloudFiles(f"{layers['seg']}/skeletons")
    assert [n for n in skel if object_dirs.intermediate(n, False)] == sorted(LEFTOVERS_SKEL)
    assert not [n for n in skel_dir.list() if n not in LEFTOVERS_SKEL and object_dirs.intermediate(n, False)]


def test_delete_removes_everything(run):
    root, layers = run
    assert files(layers["doomed"], "skeletons") == []
    assert len(files(layers["doomed"], "mesh")) == 2 * len(LABELS) + 2 + len(LEFTOVERS_MESH), "other dirs untouched"
    assert CloudVolume(layers["doomed"], progress=False).info["skeletons"] == "skeletons"  # as Igneous: info kept


def test_legacy_labels_are_their_manifests(tmp_path):
    cf = CloudFiles(f"file://{tmp_path}/mesh")
    cf.puts([("5:0", b"{}"), ("5:0:0-8_0-8_0-8", b"x"), ("123:0", b"{}"), ("info", b"{}"), ("0-8_0-8_0-8.spatial", b"{}")])
    assert object_dirs._unsharded_labels(cf, {"@type": "neuroglancer_legacy_mesh"}, "mesh") == [5, 123]


def test_layer_without_meshes(tmp_path):
    from magma import workflow

    url = make_layer(tmp_path / "seg", seg_data((8, 8, 8)), "segmentation")
    cfg = {"layers": {"a": url, "b": url}, "steps": {"x": dict(op="mesh_delete", layer="a")}}
    with pytest.raises(MagmaError, match="steps.x: layer 'a' has no meshes"):
        workflow.plan(cfg)
    vol = CloudVolume(url, progress=False)
    vol.info["skeletons"] = "skeletons"
    vol.commit_info()
    cfg["steps"] = {"x": dict(op="skeleton_transfer", src="a", dest="b")}
    with pytest.raises(MagmaError, match="steps.x: src and dest are the same layer"):
        workflow.plan(cfg)
    cfg["steps"]["x"]["dir"] = "skeletons_copy"  # another directory of the same layer is fine
    assert workflow.plan(cfg).steps["x"].infos["b"]["skeletons"] == "skeletons_copy"
