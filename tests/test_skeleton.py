"""skeleton: forge on overlapping tasks + merge, unsharded and sharded, read back with CloudVolume
and compared with kimimaro on the whole array in memory."""
import gzip
import json
import re

import kimimaro
import numpy as np
import pytest
from cloudvolume import CloudVolume
from cloudvolume.datasource.precomputed.sharding import ShardingSpecification

from conftest import make_layer, snakemake, write_config
from magma import cores, skeletonize
from magma.errors import MagmaError
from magma.jobs import setup
from magma.ops import OPS
from magma.workflow import plan

RES = (16, 16, 40)
BIG = 2**63 + 5  # ids >= 2**63 break signed lookups
# the Igneous CLI defaults (`igneous skeleton forge` / `merge`)
TEASAR = {"scale": 4, "const": 10, "pdrf_exponent": 4, "pdrf_scale": 100000, "soma_detection_threshold": 1100,
          "soma_acceptance_threshold": 3500, "soma_invalidation_scale": 1.0, "soma_invalidation_const": 300}


def tubes(shape=(128, 128, 64), r=4) -> np.ndarray:
    """Straight tubes and one branching object (a 64-bit id) whose arms cross the x, y and z
    task borders of a 64x64x32 grid, so it spans 4 tasks."""
    x, y, z = np.ogrid[: shape[0], : shape[1], : shape[2]]
    out = np.zeros(shape, dtype=np.uint64)

    def tube(label, axis, c1, c2, lo, hi):
        a, b, along = [(y, z, x), (x, z, y), (x, y, z)][axis]
        mask = ((a - c1) ** 2 + (b - c2) ** 2 <= r * r) & (along >= lo) & (along < hi)
        out[np.broadcast_to(mask, shape)] = label

    tube(1, 0, 30, 20, 3, 124)
    tube(BIG, 0, 90, 40, 10, 120)
    tube(BIG, 1, 70, 40, 30, 122)
    tube(BIG, 2, 30, 90, 8, 60)
    tube(3, 2, 100, 20, 2, 62)
    return out


def whole_array(labels, min_cable_length=1000, tick_threshold=0):
    skels = kimimaro.skeletonize(labels, TEASAR, anisotropy=RES, dust_threshold=1000, progress=False,
                                 fix_branching=True, fix_borders=True, parallel=1)
    return {k: kimimaro.postprocess(s, min_cable_length, tick_threshold) for k, s in skels.items()}


def check_tree(skel, ref, attrs=("radius",)):
    assert len(skel.vertices) > 0
    assert len(skel.components()) == 1, "one connected skeleton per object"
    assert len(skel.edges) == len(skel.vertices) - 1, "a tree: edges = vertices - 1"
    for name in attrs:
        values = getattr(skel, "radii" if name == "radius" else name)
        assert len(values) == len(skel.vertices) and values.dtype == np.float32
        assert np.all(values > 0), f"{name} on every vertex"
    assert skel.cable_length() == pytest.approx(ref.cable_length(), rel=0.05)


@pytest.fixture(scope="module")
def data():
    return tubes()


def test_unsharded_and_sharded(tmp_path, workdir, data):
    url = make_layer(tmp_path / "seg", data, "segmentation", chunk=(32, 32, 32), resolution=RES)
    cfg = {"layers": {"seg": url},
           "steps": {"pyramid": {"op": "downsample", "layer": "seg", "num_mips": 1},
                     "plain": {"op": "skeleton", "layer": "seg", "shape": [64, 64, 32]},
                     "shards": {"op": "skeleton", "layer": "seg", "shape": [64, 64, 32], "sharded": True,
                                "skel_dir": "skeletons_sharded", "cross_sectional_area": True,
                                "max_labels_per_shard": 1, "merge_tasks": 2, "delete_fragments": True}},
           "execution": {"tasks_per_job": 4}}
    cfgfile = write_config(tmp_path / "s.yaml", cfg)
    snakemake(workdir, cfgfile)
    # the `skeletons` key the steps added does not change the pyramid step's plan: nothing to redo
    dry = snakemake(workdir, cfgfile, "-n")
    assert "Nothing to be done" in dry.stdout + dry.stderr
    ref = whole_array(data)
    assert sorted(ref) == [1, 3, BIG]

    vol = CloudVolume(url, skel_dir="skeletons_mip_0", progress=False)
    info = vol.skeleton.meta.info
    assert info["@type"] == "neuroglancer_skeletons" and info["mip"] == 0
    assert info["vertex_attributes"] == [{"id": "radius", "data_type": "float32", "num_components": 1}]
    assert info["spatial_index"] == {"resolution": list(RES), "chunk_size": [64 * 16, 64 * 16, 32 * 40]}
    assert "sharding" not in info
    for label in ref:
        check_tree(vol.skeleton.get(label), ref[label])
    assert set(vol.skeleton.spatial_index.query(vol.bounds * vol.resolution)) == {1, 3, BIG}
    # the branching object's fragments came from 4 tasks
    assert len(vol.skeleton.spatial_index.file_locations_per_label([BIG])[BIG]) == 4

    # sharded + cross sections; the last step's dir is the layer's `skeletons`
    assert json.loads((tmp_path / "seg" / "info").read_text())["skeletons"] == "skeletons_sharded"
    svol = CloudVolume(url, progress=False)
    sinfo = svol.skeleton.meta.info
    assert [a["id"] for a in sinfo["vertex_attributes"]] == ["radius", "cross_sectional_area"]
    spec = ShardingSpecification.from_dict(sinfo["sharding"])
    assert spec.shard_bits == 2 and spec.data_encoding == "gzip" and spec.minishard_index_encoding == "gzip"
    assert spec.hash == "murmurhash3_x86_128"
    shards = sorted(p.name for p in (tmp_path / "seg" / "skeletons_sharded").glob("*.shard"))
    assert len(shards) == len({spec.compute_shard_location(k).shard_number for k in ref})
    for label in ref:
        skel = svol.skeleton.get(label)
        check_tree(skel, ref[label], attrs=("radius", "cross_sectional_area"))
        plain = vol.skeleton.get(label)
        assert np.allclose(skel.vertices, plain.vertices) and np.allclose(skel.radii, plain.radii)
    assert not list((tmp_path / "seg" / "skeletons_sharded").rglob("*.frags")), "delete_fragments"


def test_buckets_follow_shards():
    """A merge task's buckets hold exactly the labels of the shards it writes, whatever the shard count."""
    rng = np.random.default_rng(0)
    labels = np.unique(rng.integers(1, 2**63, size=3000, dtype=np.uint64))
    msb = skeletonize.minishard_bits_for(2000, 8192, 32768)
    assert msb == 1
    for bucket_bits in (0, 2, 3):
        buckets = skeletonize.buckets_of(labels, bucket_bits, msb)
        for shard_bits in (0, 1, 3, 5):
            spec = ShardingSpecification("neuroglancer_uint64_sharded_v1", preshift_bits=0,
                                         hash="murmurhash3_x86_128", minishard_bits=msb, shard_bits=shard_bits)
            for b, members in buckets.items():
                for label in members[:50]:
                    shard = int(spec.compute_shard_location(label).shard_number, 16)
                    k = min(bucket_bits, shard_bits)
                    assert shard % 2**k == b % 2**k
    assert skeletonize.shard_bits_for(0, 2000) == 0
    assert skeletonize.shard_bits_for(2001, 2000) == 1
    assert skeletonize.shard_bits_for(10, 2000, min_shards=5) == 3


@pytest.mark.parametrize("step, message", [
    ({"layer": "img"}, "steps.sk.layer: skeletons are made from a segmentation"),
    ({"mip": 3}, "steps.sk.mip: layer 'seg' has mips 0..0"),
    ({"fill_holes": 104}, "steps.sk.fill_holes"),
    ({"teasar_params": {"scael": 4}}, "steps.sk.teasar_params: unknown key 'scael' (did you mean 'scale'?)"),
    ({"object_ids": [5], "mask_ids": [5, 6]}, "steps.sk.mask_ids: every id in object_ids is masked out"),
    ({"shape": [64, 0, 64]}, "steps.sk.shape"),
    ({"data_encoding": "br"}, "steps.sk.data_encoding"),
])
def test_bad_config(tmp_path, step, message):
    seg = make_layer(tmp_path / "seg", np.zeros((16, 16, 8), np.uint64), "segmentation", chunk=(16, 16, 8))
    img = make_layer(tmp_path / "img", np.zeros((16, 16, 8), np.uint8), "image", chunk=(16, 16, 8))
    cfg = {"layers": {"seg": seg, "img": img}, "steps": {"sk": {"op": "skeleton", "layer": "seg", **step}}}
    with pytest.raises(MagmaError, match=re.escape(message)):
        plan(cfg)
    assert not (tmp_path / "seg" / "skeletons_mip_0").exists()


def _tree(root):
    """path -> content (decompressed: gzip headers carry a time) of every file under root."""
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_file():
            data = p.read_bytes()
            out[str(p.relative_to(root)).removesuffix(".gz")] = gzip.decompress(data) if p.suffix == ".gz" else data
    return out


def _setup_spec(wp, sp):
    return {"step": sp.name, "op": sp.op, "paths": wp.paths, "infos": sp.infos, "files": sp.files, "checks": [],
            "preflight": sp.preflight, "preflight_chunk_limit": 0}


def _run_in_process(cfg, markers):
    """Every task of every stage called directly, in order: the output of a clean run."""
    wp = plan(cfg)
    for sp in wp.steps.values():
        setup(_setup_spec(wp, sp), str(markers / f"{sp.name}.setup.json"))
        for st in sp.stages:
            for i in range(st.grid.n):
                getattr(OPS["skeleton"], st.params["task"])(st.params, st.grid.task(i), wp.paths)


def test_kill_and_resume(tmp_path, workdir, data):
    """SIGKILL the run during forge and during merge, re-run: the same files as a clean run."""
    from test_resume import kill_then_resume

    steps = {"plain": {"op": "skeleton", "layer": "seg", "shape": [64, 64, 32], "merge_tasks": 4},
             "shards": {"op": "skeleton", "layer": "seg", "shape": [64, 64, 32], "merge_tasks": 4, "sharded": True,
                        "skel_dir": "skeletons_sharded", "max_labels_per_shard": 2}}
    ref = make_layer(tmp_path / "ref", data, "segmentation", chunk=(32, 32, 32), resolution=RES)
    _run_in_process({"layers": {"seg": ref}, "steps": steps}, tmp_path)

    url = make_layer(tmp_path / "seg", data, "segmentation", chunk=(32, 32, 32), resolution=RES)
    cfgfile = write_config(tmp_path / "k.yaml", {"layers": {"seg": url}, "steps": steps,
                                                  "execution": {"tasks_per_job": 2, "threads": 1}})
    kill_then_resume(workdir, cfgfile, (2, 5, 8))  # plain forge, plain merge / shards forge, shards merge
    for d in ("skeletons_mip_0", "skeletons_sharded"):
        got, want = _tree(tmp_path / "seg" / d), _tree(tmp_path / "ref" / d)
        assert sorted(got) == sorted(want)
        assert all(got[k] == want[k] for k in want), d
    assert any(k.endswith(".shard") for k in _tree(tmp_path / "seg" / "skeletons_sharded"))


def test_forge_options_in_process(tmp_path, data):
    """dust_global reads the voxel_counts IntMap; fix_branching can be turned off; object/mask ids."""
    from mapbuffer import IntMap, MapBuffer

    url = make_layer(tmp_path / "seg", data, "segmentation", chunk=(32, 32, 32), resolution=RES)

    def forged(**kw):
        step = {"op": "skeleton", "layer": "seg", "shape": [64, 64, 32], "merge_tasks": 1, **kw}
        wp = plan({"layers": {"seg": url}, "steps": {"sk": step}})
        st = wp.steps["sk"].stages[0]
        labels = set()
        for i in range(st.grid.n):
            OPS["skeleton"].forge(st.params, st.grid.task(i), wp.paths)
        for p in (tmp_path / "seg" / "skeletons_mip_0" / "frags" / "0").glob("*.frags"):
            labels |= {int(k) for k in MapBuffer(p.read_bytes()).keys()}
            p.unlink()
        return labels

    assert forged() == {1, 3, BIG}
    assert forged(fix_branching=False) == {1, 3, BIG}
    assert forged(object_ids=[3, BIG], mask_ids=[BIG]) == {3}
    with pytest.raises(MagmaError, match=r"steps\.sk\.dust_global: .*voxel_counts\.im does not exist"):
        forged(dust_global=True)
    # the setup job finds it missing before writing anything
    wp = plan({"layers": {"seg": url}, "steps": {"sk": {"op": "skeleton", "layer": "seg", "dust_global": True}}})
    (tmp_path / "seg" / "skeletons_mip_0" / "info").unlink(missing_ok=True)
    with pytest.raises(MagmaError, match=r"steps\.sk\.dust_global: .*voxel_counts\.im does not exist"):
        setup(_setup_spec(wp, wp.steps["sk"]), str(tmp_path / "marker.json"))
    assert not (tmp_path / "seg" / "skeletons_mip_0" / "info").exists() and not (tmp_path / "marker.json").exists()
    assert "skeletons" not in json.loads((tmp_path / "seg" / "info").read_text())
    # label 3 is big enough in every task it touches but small in the whole layer's counts;
    # ids >= 2**63 are looked up too (IntMap's own lookup overflows on them)
    counts = {1: 10**6, 3: 999, BIG: 10**6, 2**63 + 11: 5}
    key = json.loads((tmp_path / "seg" / "info").read_text())["scales"][0]["key"]
    (tmp_path / "seg" / key / "stats").mkdir(parents=True)
    (tmp_path / "seg" / key / "stats" / "voxel_counts.im").write_bytes(IntMap(counts).tobytes())
    assert forged(dust_global=True) == {1, BIG}
    assert forged(dust_global=True, dust_threshold=0) == {1, 3, BIG}


def test_tracing_label_sets_in_forks_gives_the_same_skeletons():
    """What a forge task gets when its job lends it idle cores: its labels split into sets
    of about equal volume, each traced in a fork with the other labels masked out;
    skeletons equal to one process's, labels that come in pieces too."""
    labels = tubes()
    labels[60:64, :, :] = 0  # cut the tubes along x: labels 1 and BIG come in pieces
    assert labels.size >= skeletonize.PARALLEL_MIN_VOXELS
    calls = []

    def forks(fn, sets):
        calls.append(sets)
        return cores.fork_each(fn, sets, inline=True)

    one = skeletonize.forge(labels.copy(), RES, TEASAR, 1000, parallel=1, map_fn=forks)
    assert calls == []
    cores.start(1)  # one idle core: one set runs in this process, the other in a fork
    try:
        two = skeletonize.forge(labels.copy(), RES, TEASAR, 1000, parallel=2, map_fn=forks)
        assert cores.spare(4) == 1  # the fork's core came back
    finally:
        cores.stop()
    assert len(calls) == 1 and len(calls[0]) == 2 and sorted(sum(calls[0], [])) == sorted(one)
    assert sorted(one) == sorted(two) and len(one) == 3
    for label in one:
        a, b = one[label], two[label]
        assert np.array_equal(a.vertices, b.vertices), label
        assert np.array_equal(a.edges, b.edges), label
        assert np.array_equal(a.radii, b.radii), label


def test_label_sets_balance_volume():
    labels = np.zeros((10, 10, 10), dtype=np.uint64, order="F")
    labels.flat[:500] = 7
    labels.flat[500:700] = 3
    labels.flat[700:850] = 9
    labels.flat[850:900] = 2**64 - 1
    assert skeletonize.label_sets(labels, 2) == [[7], [3, 9, 2**64 - 1]]
    assert skeletonize.label_sets(labels, 8) == [[7], [3], [9], [2**64 - 1]]
    assert skeletonize.label_sets(np.zeros((4, 4, 4), dtype=np.uint64), 2) == []


