"""create: layers made from TIFF stacks, multi-page TIFF, .npy, HDF5, NIfTI and NRRD
equal the arrays written to those files; a pyramid chains after it in the same run;
bad inputs are rejected naming the file before anything is written.

One real snakemake run ingests every format (several tasks per step, some split
in x/y by a small memory_target) and downsamples one of the new layers.
"""
import h5py
import nibabel
import nrrd
import numpy as np
import pytest
import tifffile
import tinybrain
from cloudvolume import CloudVolume

from conftest import make_layer, read, seg_data, snakemake, write_config
from magma import workflow
from magma.errors import MagmaError

SHAPE = (70, 50, 20)  # x, y, z: not a multiple of the chunk size, so edge tasks are partial
CHUNK = [16, 16, 8]


def volume(seed, dtype=np.uint16):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 60000 if dtype == np.uint16 else 250, size=SHAPE).astype(dtype)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("create")
    data = {}
    # a stack of single-page TIFFs numbered from 7, names padded unevenly
    stack = volume(1, np.uint8)
    (root / "stack").mkdir()
    for z in range(SHAPE[2]):
        tifffile.imwrite(root / "stack" / f"em_{z + 7:0{2 if z < 5 else 3}d}.tif", stack[:, :, z].T)
    data["stack"] = stack
    # one multi-page TIFF, RGB pages
    rgb = np.stack([volume(s, np.uint8) for s in (2, 3, 4)], axis=3)
    tifffile.imwrite(root / "rgb.tif", rgb.transpose(2, 1, 0, 3), photometric="rgb")
    data["rgb"] = rgb
    # .npy in z, y, x order (as tifffile.imread of a stack gives it)
    seg = seg_data(SHAPE, 5)
    np.save(root / "seg.npy", np.ascontiguousarray(seg.transpose(2, 1, 0)))
    data["seg"] = seg
    # HDF5 with two datasets, one chosen by path
    h5 = volume(6)
    with h5py.File(root / "vol.h5", "w") as f:
        f.create_dataset("volumes/raw", data=h5, chunks=(16, 16, 4))
        f.create_dataset("volumes/other", data=np.zeros((2, 2, 2)))
    data["h5"] = h5
    # NIfTI (gzipped) with 0.004 x 0.004 x 0.04 mm voxels
    nii = volume(7).astype(np.int16)
    img = nibabel.Nifti1Image(nii, np.diag([0.004, 0.004, 0.04, 1.0]))
    img.header.set_xyzt_units("mm")
    nibabel.save(img, root / "vol.nii.gz")
    data["nii"] = nii
    # NRRD raw (memory-mapped) and gzip (decoded whole), float32
    fl = np.random.default_rng(8).normal(size=SHAPE).astype(np.float32)
    nrrd.write(str(root / "raw.nrrd"), fl, {"encoding": "raw", "spacings": [4.0, 4.0, 40.0]})
    nrrd.write(str(root / "gz.nrrd"), fl, {"encoding": "gzip", "space units": ["microns"] * 3,
                                           "space directions": np.diag([0.5, 0.5, 2.0]), "space": "left-posterior-superior"})
    data["raw"] = data["gz"] = fl

    common = {"chunk_size": CHUNK}
    steps = {
        "stack": dict(src=str(root / "stack"), resolution=[8, 8, 40], memory_target=2e4,  # x/y split tasks
                      encoding="png"),
        "rgb": dict(src=str(root / "rgb.tif"), compress="br"),
        "seg": dict(src=str(root / "seg.npy"), axes="zyx", layer_type="segmentation",
                    encoding="compressed_segmentation", voxel_offset=[100, 200, 30]),
        "h5": dict(src=str(root / "vol.h5"), dataset="volumes/raw"),
        "nii": dict(src=str(root / "vol.nii.gz")),
        "raw": dict(src=str(root / "raw.nrrd")),
        "gz": dict(src=str(root / "gz.nrrd"), format="nrrd"),
    }
    cfg = {
        "layers": {name: f"file://{root}/out_{name}" for name in steps},
        "steps": {f"make_{n}": dict(op="create", dest=n, **common, **p) for n, p in steps.items()},
        "execution": {"tasks_per_job": 64, "threads": 2},
    }
    cfg["steps"]["stack_pyramid"] = dict(op="downsample", layer="stack", num_mips=1)
    cfgfile = write_config(root / "create.yaml", cfg)
    work = root / "work"
    work.mkdir()
    snakemake(work, cfgfile)
    return root, cfg, data


@pytest.mark.parametrize("name", ["stack", "rgb", "seg", "h5", "nii", "raw", "gz"])
def test_layer_equals_the_files(run, name):
    root, cfg, data = run
    vol = CloudVolume(cfg["layers"][name], progress=False)
    got = vol[vol.bounds]
    want = data[name] if data[name].ndim == 4 else data[name][..., np.newaxis]
    assert got.dtype == want.dtype
    assert got.shape == want.shape
    assert np.array_equal(got, want)


def test_info_from_config_and_headers(run):
    root, cfg, data = run
    info = {n: CloudVolume(cfg["layers"][n], progress=False).info for n in cfg["layers"]}
    assert info["seg"]["type"] == "segmentation" and info["seg"]["data_type"] == "uint64"
    assert info["seg"]["scales"][0]["encoding"] == "compressed_segmentation"
    assert info["seg"]["scales"][0]["voxel_offset"] == [100, 200, 30]
    assert info["rgb"]["num_channels"] == 3 and info["stack"]["scales"][0]["encoding"] == "png"
    assert info["stack"]["scales"][0]["resolution"] == [8, 8, 40]
    assert info["stack"]["scales"][0]["chunk_sizes"] == [CHUNK]
    assert info["nii"]["scales"][0]["resolution"] == [4000, 4000, 40000]  # mm -> nm from the header
    assert info["raw"]["scales"][0]["resolution"] == [4, 4, 40]  # NRRD spacings, no units: taken as nm
    assert info["gz"]["scales"][0]["resolution"] == [500, 500, 2000]  # microns -> nm
    assert info["h5"]["scales"][0]["resolution"] == [1, 1, 1]
    prov = CloudVolume(cfg["layers"]["stack"], progress=False).provenance.processing
    assert [p["method"]["task"] for p in prov] == ["magma.create", "magma.downsample"]
    assert list((root / "out_rgb" / "1_1_1").glob("*.br")), "compress: br was not applied"


def test_pyramid_chains_after_create(run):
    root, cfg, data = run
    plan = workflow.plan(cfg)
    assert plan.steps["stack_pyramid"].after == ["make_stack"]
    assert plan.steps["make_stack"].stages[0].grid.shape[0] < SHAPE[0], "test needs x/y-split tasks"
    want = tinybrain.downsample_with_averaging(data["stack"], (2, 2, 1))[0]
    assert np.array_equal(read(cfg["layers"]["stack"], 1), want)


# ---- bad input -----------------------------------------------------------------
def plan_error(tmp_path, **step) -> str:
    cfg = {"layers": {"out": f"file://{tmp_path}/out"}, "steps": {"make": dict(op="create", dest="out", **step)}}
    with pytest.raises(MagmaError) as err:
        workflow.plan(cfg)
    assert not (tmp_path / "out").exists()
    return str(err.value)


def tiff_stack(d, n=4, shape=(20, 30), skip=(), dtype=np.uint8):
    d.mkdir()
    for z in range(n):
        if z not in skip:
            tifffile.imwrite(d / f"z{z:04d}.tif", np.full(shape, z, dtype=dtype))
    return d


def test_missing_slice_number(tmp_path):
    tiff_stack(tmp_path / "s", n=6, skip=(3,))
    msg = plan_error(tmp_path, src=str(tmp_path / "s" / "*.tif"))
    assert "steps.make.src" in msg and "slice number 3 is missing" in msg and "z0002.tif" in msg and "z0004.tif" in msg


def test_unreadable_file(tmp_path):
    (tmp_path / "broken.tif").write_bytes(b"not a tiff at all")
    msg = plan_error(tmp_path, src=str(tmp_path / "broken.tif"))
    assert "cannot read" in msg and "broken.tif" in msg
    (tmp_path / "broken.npy").write_bytes(b"\x93NUMPY garbage")
    assert "broken.npy" in plan_error(tmp_path, src=str(tmp_path / "broken.npy"))


def test_dtype_must_fit_layer_type(tmp_path):
    np.save(tmp_path / "f64.npy", np.zeros((4, 4, 4)))
    msg = plan_error(tmp_path, src=str(tmp_path / "f64.npy"))
    assert "steps.make.layer_type" in msg and "f64.npy" in msg and "float64" in msg and "float32" in msg
    np.save(tmp_path / "i16.npy", np.zeros((4, 4, 4), dtype=np.int16))
    msg = plan_error(tmp_path, src=str(tmp_path / "i16.npy"), layer_type="segmentation")
    assert "i16.npy" in msg and "int16" in msg and "segmentation" in msg
    np.save(tmp_path / "u16.npy", np.zeros((4, 4, 4), dtype=np.uint16))
    msg = plan_error(tmp_path, src=str(tmp_path / "u16.npy"), encoding="jpeg")
    assert "steps.make.encoding" in msg and "uint16" in msg
    np.save(tmp_path / "rgb.npy", np.zeros((4, 4, 4, 3), dtype=np.uint8))
    msg = plan_error(tmp_path, src=str(tmp_path / "rgb.npy"), encoding="png")
    assert "steps.make.encoding" in msg and "3" in msg  # CloudVolume's png codec is single-channel here


def test_other_bad_sources(tmp_path):
    assert "no file matches" in plan_error(tmp_path, src=str(tmp_path / "none*.tif"))
    assert "does not exist" in plan_error(tmp_path, src=str(tmp_path / "gone.npy"))
    with h5py.File(tmp_path / "two.h5", "w") as f:
        f["a"] = np.zeros((2, 2, 2))
        f["b"] = np.zeros((2, 2, 2))
    msg = plan_error(tmp_path, src=str(tmp_path / "two.h5"))
    assert "steps.make.dataset" in msg and "a, b" in msg
    assert "no dataset 'c'" in plan_error(tmp_path, src=str(tmp_path / "two.h5"), dataset="c")
    np.save(tmp_path / "v.npy", np.zeros((4, 4, 4), dtype=np.uint8))
    assert "steps.make.axes" in plan_error(tmp_path, src=str(tmp_path / "v.npy"), axes="xyzc")
    (tmp_path / "v.dat").write_bytes(b"")
    assert "steps.make.format" in plan_error(tmp_path, src=str(tmp_path / "v.dat"))
    with pytest.raises(MagmaError, match="steps.make.axes"):  # the schema: not a permutation of x, y, z
        workflow.plan({"layers": {"o": "file:///x"}, "steps": {"make": dict(op="create", src="v.npy", dest="o", axes="xxz")}})


def test_slices_of_different_shapes_stop_before_any_write(tmp_path, workdir):
    d = tiff_stack(tmp_path / "s", n=5)
    tifffile.imwrite(d / "z0003.tif", np.zeros((20, 31), dtype=np.uint8))
    cfg = {"layers": {"out": f"file://{tmp_path}/out"}, "steps": {"make": dict(op="create", src=str(d), dest="out")}}
    proc = snakemake(workdir, write_config(tmp_path / "c.yaml", cfg), check=False)
    assert proc.returncode != 0
    assert "z0003.tif is a 31x20 uint8 slice" in proc.stderr and "every slice must match" in proc.stderr
    assert not (tmp_path / "out").exists(), "nothing may be written before the slices are checked"


def test_existing_dest_must_match(tmp_path):
    np.save(tmp_path / "v.npy", np.zeros((16, 16, 8), dtype=np.uint8))
    url = make_layer(tmp_path / "out", np.zeros((16, 16, 9), dtype=np.uint8), "image", resolution=(1, 1, 1))
    cfg = {"layers": {"out": url}, "steps": {"make": dict(op="create", src=str(tmp_path / "v.npy"), dest="out")}}
    with pytest.raises(MagmaError, match=r"steps.make.dest: layer 'out' already exists with a different scales\[0\].size"):
        workflow.plan(cfg)


def test_masks_and_multipage_slices(tmp_path):
    np.save(tmp_path / "mask.npy", np.zeros((4, 4, 4), dtype=bool))
    cfg = {"layers": {"out": f"file://{tmp_path}/out"},
           "steps": {"make": dict(op="create", src=str(tmp_path / "mask.npy"), dest="out", layer_type="segmentation")}}
    assert workflow.plan(cfg).steps["make"].infos["out"]["data_type"] == "uint8"  # a mask is stored as 0/1 bytes
    d = tiff_stack(tmp_path / "s", n=3)
    tifffile.imwrite(d / "z0000.tif", np.zeros((2, 20, 30), dtype=np.uint8))  # two pages where one belongs
    msg = plan_error(tmp_path, src=str(d))
    assert "z0000.tif" in msg and "one 2-D page" in msg


def test_tiff_tasks_count_a_whole_page(tmp_path):
    d = tiff_stack(tmp_path / "s", n=4, shape=(200, 300), dtype=np.uint16)  # pages of 300 x 200 x 2 bytes
    cfg = {"layers": {"out": f"file://{tmp_path}/out"},
           "steps": {"make": dict(op="create", src=str(d), dest="out", chunk_size=[32, 32, 4], memory_target=1.5e5)}}
    stage = workflow.plan(cfg).steps["make"].stages[0]
    page = 300 * 200 * 2
    assert stage.grid.shape[0] * stage.grid.shape[1] * 4 * 2 * 2 <= 1.5e5 - page  # the slab fits beside the page
    assert stage.task_bytes >= page
