"""magma.design against Igneous 4.37, and the `magma design` / `magma plan` CLI.

The expected values below were produced once by running Igneous 4.37.0
(igneous.downsample_scales.downsample_shape_from_memory_target and
compute_factors, igneous.task_creation.image.num_mips_from_memory_target) on the
same inputs; Igneous is not needed to run these tests. compute_factors was given
the task shape clipped to the volume (min2), as Igneous's compute_scales does.
"""
from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from magma import design

INF = math.inf
ROOT = Path(__file__).resolve().parents[1]

# (data width, chunk size, factor, memory target, volume size, channels, max_mips,
#  Igneous downsample_shape_from_memory_target(width * channels, *chunk, factor, memory, max_mips)
#      (None: Igneous raises ValueError, too little memory for one chunk),
#  Igneous num_mips_from_memory_target(memory, dtype, chunk, channels, factor),
#  Igneous len(compute_factors(min2(volume, that shape), factor, chunk, volume)),
#  the downsample op's task shape chunk * factor ** num_mips,
#  Igneous len(compute_factors(min2(volume, op shape), factor, chunk, volume)))
IGNEOUS = [
    (1, (64, 64, 64), (2, 2, 1), 3500000000.0, (100000, 100000, 100000), 1, 5, (2048, 2048, 64), 6, 5, (4096, 4096, 64), 6),
    (1, (64, 64, 64), (2, 2, 2), 3500000000.0, (100000, 100000, 100000), 1, 5, (1024, 1024, 1024), 4, 4, (1024, 1024, 1024), 4),
    (8, (512, 512, 16), (2, 2, 1), 3500000000.0, (2048, 2048, 64), 1, 5, (4096, 4096, 16), 3, 2, (4096, 4096, 16), 2),
    (8, (512, 512, 16), (2, 2, 1), 3500000000.0, (10000, 10000, 1000), 1, INF, (4096, 4096, 16), 3, 3, (4096, 4096, 16), 3),
    (1, (128, 128, 64), (2, 2, 1), 1000000.0, (1024, 1024, 128), 1, 5, (128, 128, 64), 1, 0, (256, 256, 64), 1),
    (1, (128, 128, 64), (2, 2, 1), 10000000.0, (1024, 1024, 128), 1, 5, (256, 256, 64), 1, 1, (256, 256, 64), 1),
    (2, (128, 128, 64), (2, 2, 1), 100000000.0, (5000, 3000, 700), 1, 5, (512, 512, 64), 2, 2, (512, 512, 64), 2),
    (4, (128, 128, 64), (2, 2, 2), 1000000000.0, (5000, 3000, 700), 1, 5, (512, 512, 256), 2, 2, (512, 512, 256), 2),
    (8, (128, 128, 64), (2, 2, 2), 10000000000.0, (40000, 40000, 20000), 1, 3, (1024, 1024, 512), 3, 3, (1024, 1024, 512), 3),
    (1, (1024, 1024, 1), (2, 2, 1), 100000000.0, (20000, 20000, 500), 1, 5, (8192, 8192, 1), 3, 3, (8192, 8192, 1), 3),
    (1, (1024, 1024, 1), (2, 2, 1), 100000000000.0, (200000, 200000, 5000), 1, INF, (262144, 262144, 1), 8, 8, (262144, 262144, 1), 8),
    (2, (1024, 1024, 1), (2, 2, 1), 4000000000.0, (3000, 3000, 10), 1, 5, (32768, 32768, 1), 5, 2, (32768, 32768, 1), 2),
    (4, (1024, 1024, 1), (2, 2, 2), 5000000000.0, (8192, 8192, 1024), 1, 5, (32768, 32768, 1), 3, 0, (8192, 8192, 8), 3),
    (1, (64, 64, 64), (2, 2, 1), 1000000.0, (512, 512, 128), 1, 5, (64, 64, 64), 1, 0, (128, 128, 64), 1),
    (1, (64, 64, 64), (2, 2, 1), 8000000.0, (512, 512, 128), 1, 5, (256, 256, 64), 2, 2, (256, 256, 64), 2),
    (8, (64, 64, 64), (2, 2, 1), 64000000.0, (512, 512, 128), 1, 5, (256, 256, 64), 2, 2, (256, 256, 64), 2),
    (8, (64, 64, 64), (2, 2, 2), 64000000.0, (512, 512, 128), 1, 5, (128, 128, 128), 1, 1, (128, 128, 128), 1),
    (2, (64, 64, 64), (2, 2, 2), 100000000000.0, (100000, 100000, 100000), 1, INF, (2048, 2048, 2048), 5, 5, (2048, 2048, 2048), 5),
    (4, (256, 256, 32), (2, 2, 1), 2000000000.0, (30000, 20000, 4000), 1, 5, (2048, 2048, 32), 3, 3, (2048, 2048, 32), 3),
    (4, (256, 256, 32), (2, 2, 1), 2000000000.0, (300, 200, 40), 1, 5, (2048, 2048, 32), 3, 0, (2048, 2048, 32), 0),
    (1, (256, 256, 32), (2, 2, 2), 10000000.0, (4096, 4096, 4096), 1, 5, (256, 256, 32), 1, 0, (512, 512, 64), 1),
    (1, (32, 32, 32), (2, 2, 1), 1000000.0, (1000, 1000, 100), 1, 5, (128, 128, 32), 2, 2, (128, 128, 32), 2),
    (8, (32, 32, 32), (2, 2, 2), 300000000.0, (1000, 1000, 100), 1, 5, (256, 256, 256), 3, 1, (256, 256, 256), 1),
    (1, (128, 128, 16), (2, 2, 1), 3500000000.0, (65536, 65536, 2048), 3, 5, (4096, 4096, 16), 5, 5, (4096, 4096, 16), 5),
    (1, (128, 128, 16), (2, 2, 2), 3500000000.0, (65536, 65536, 2048), 3, 2, (512, 512, 64), 3, 2, (1024, 1024, 128), 3),
    (2, (512, 512, 16), (2, 2, 1), 500000000.0, (1500, 1500, 64), 1, 5, (2048, 2048, 16), 2, 2, (2048, 2048, 16), 2),
    (4, (512, 512, 16), (2, 2, 2), 7000000000.0, (100000, 80000, 30000), 1, 5, (4096, 4096, 32), 2, 1, (2048, 2048, 64), 2),
    (1, (1, 1, 1), (2, 2, 1), 1000000.0, (300, 300, 10), 1, 5, (512, 512, 1), 9, 9, (512, 512, 1), 9),
    (1, (1, 1, 1), (2, 2, 2), 1000000000.0, (3000, 3000, 3000), 1, 5, (512, 512, 512), 9, 9, (512, 512, 512), 9),
    (8, (1024, 1024, 1), (2, 2, 1), 1000000.0, (4096, 4096, 10), 1, 5, None, 1, None, (2048, 2048, 1), 1),
    (1, (64, 64, 64), (2, 2, 1), 100000000000.0, (20000, 20000, 64), 2, INF, (16384, 16384, 64), 8, 8, (16384, 16384, 64), 8),
    (2, (96, 96, 48), (2, 2, 1), 3000000000.0, (9000, 7000, 4800), 1, 5, (3072, 3072, 48), 5, 5, (3072, 3072, 48), 5),
]

# (task shape, factor, chunk size, volume size, Igneous len(compute_factors(min2(volume, shape), ...)))
# edge cases: volumes smaller than the task or a chunk (partial last mip), non-power-of-two sizes
IGNEOUS_MIPS = [
    ((1024, 1024, 64), (2, 2, 1), (64, 64, 64), (100, 100, 64), 1),
    ((512, 512, 64), (2, 2, 1), (64, 64, 64), (300, 300, 64), 3),
    ((256, 256, 256), (2, 2, 2), (64, 64, 64), (200, 70, 30), 0),
    ((1000, 1000, 1), (2, 2, 1), (1024, 1024, 1), (1000, 1000, 1), 0),
    ((96, 96, 48), (2, 2, 1), (64, 64, 64), (96, 96, 48), 1),
    ((2048, 2048, 16), (2, 2, 1), (128, 128, 16), (2048, 2048, 16), 4),
    ((4096, 1024, 16), (2, 2, 1), (512, 512, 16), (5000, 5000, 16), 1),
    ((4096, 4096, 64), (2, 2, 1), (64, 64, 64), (100000, 100000, 100000), 6),
    ((1024, 1024, 1024), (2, 2, 2), (64, 64, 64), (100000, 100000, 100000), 4),
    ((8192, 8192, 64), (2, 2, 1), (64, 64, 64), (130, 9000, 64), 1),
    ((512, 512, 512), (2, 2, 2), (128, 128, 128), (520, 520, 140), 0),
    ((256, 256, 16), (2, 2, 1), (128, 128, 16), (70, 70, 16), 0),
]


def _id(case):
    w, chunk, factor, mem, vol, ch = case[:6]
    return f"w{w}-c{'x'.join(map(str, chunk))}-f{''.join(map(str, factor))}-m{mem:.0e}-ch{ch}"


@pytest.mark.parametrize("case", IGNEOUS, ids=[_id(c) for c in IGNEOUS])
def test_shape_from_memory_target_matches_igneous(case):
    width, chunk, factor, memory, _vol, channels, max_mips, shape = case[:8]
    if shape is None:
        with pytest.raises(ValueError):
            design.shape_from_memory_target(width * channels, chunk, factor, memory, max_mips)
    else:
        got = design.shape_from_memory_target(width * channels, chunk, factor, memory, max_mips)
        assert tuple(got) == shape


@pytest.mark.parametrize("case", IGNEOUS, ids=[_id(c) for c in IGNEOUS])
def test_num_mips_from_memory_target_matches_igneous(case):
    width, chunk, factor, memory, _vol, channels, _max_mips, _shape, num_mips = case[:9]
    assert design.num_mips_from_memory_target(memory, width, chunk, channels, factor) == num_mips


@pytest.mark.parametrize("case", IGNEOUS, ids=[_id(c) for c in IGNEOUS])
def test_mips_for_shape_matches_igneous(case):
    _w, chunk, factor, _mem, vol, _ch, _mm, shape, num_mips, ds_mips, op_shape, op_mips = case
    if shape is not None:
        assert design.mips_for_shape(shape, factor, chunk, vol) == ds_mips
    assert tuple(int(c * f ** num_mips) for c, f in zip(chunk, factor)) == op_shape
    assert design.mips_for_shape(op_shape, factor, chunk, vol) == op_mips


@pytest.mark.parametrize("shape,factor,chunk,volume,expected", IGNEOUS_MIPS)
def test_mips_for_shape_edges_match_igneous(shape, factor, chunk, volume, expected):
    assert design.mips_for_shape(shape, factor, chunk, volume) == expected


def test_memory_for_shape():
    # Igneous `design ds-shape`: width * voxels * f / (f - 1)
    assert design.memory_for_shape(8, (1024, 1024, 64), (2, 2, 1)) == pytest.approx(8 * 2**26 * 4 / 3)
    assert design.memory_for_shape(1, (512, 512, 512), (2, 2, 2)) == pytest.approx(2**27 * 8 / 7)
    assert design.memory_for_shape(2, (10, 10, 10), (1, 1, 1)) == 2000
    assert design.memory_for_shape(1, (64, 64, 64), (2, 2, 1), num_channels=3) == pytest.approx(3 * 64**3 * 4 / 3)


def test_shape_fits_memory_target():
    # Like Igneous, a single chunk is returned even when it alone exceeds the target
    # (128x128x64 uint8 with 1e6 B); every larger shape fits.
    for width, chunk, factor, memory, _vol, channels, max_mips, shape, *_ in IGNEOUS:
        if shape is not None and min(chunk) > 1 and tuple(shape) != tuple(chunk):
            assert design.memory_for_shape(width * channels, shape, factor) <= memory


def test_shape_from_memory_target_rejects_bad_input():
    with pytest.raises(ValueError):
        design.shape_from_memory_target(1, (64, 64, 64), (2, 2, 1), 0)
    with pytest.raises(ValueError):
        design.shape_from_memory_target(1, (0, 64, 64), (2, 2, 1), 1e9)
    with pytest.raises(ValueError):
        design.shape_from_memory_target(1, (64, 64, 64), (3, 3, 1), 1e9)


def test_format_bytes():
    assert design.format_bytes(512) == "512 B"
    assert design.format_bytes(8 * 2**26 * 4 / 3) == "715.8 MB"
    assert design.format_bytes(3.5e9) == "3.5 GB"
    assert design.format_bytes(2e18) == "2000.0 PB"


# ---- CLI --------------------------------------------------------------------
def _make_layer(path: str, dtype: str, chunk, size, layer_type="segmentation", channels=1) -> str:
    from cloudvolume import CloudVolume

    info = CloudVolume.create_new_info(
        num_channels=channels, layer_type=layer_type, data_type=dtype, encoding="raw",
        resolution=[4, 4, 40], voxel_offset=[0, 0, 0], chunk_size=list(chunk), volume_size=list(size),
    )
    CloudVolume(path, info=info).commit_info()
    return path


def magma(*args, cwd=ROOT):
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    return subprocess.run([sys.executable, "-m", "magma.cli", *map(str, args)],
                          capture_output=True, text=True, cwd=cwd, env=env, timeout=120)


@pytest.fixture
def seg_layer(tmp_path):
    return _make_layer(f"file://{tmp_path}/seg", "uint64", (512, 512, 16), (2048, 2048, 64))


def test_cli_ds_memory(seg_layer):
    r = magma("design", "ds-memory", seg_layer, "3.5e9")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "4096,4096,16"


def test_cli_ds_memory_verbose(seg_layer):
    r = magma("design", "ds-memory", seg_layer, "3.5e9", "--verbose")
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "Data Width: 8 B" in out
    assert "Chunk Size: 512, 512, 16 voxels" in out
    assert "Memory Limit: 3.5 GB" in out
    assert "Optimized Shape: 4096,4096,16" in out
    assert "Downsamples: 3" in out
    assert "Memory Used*: 2.9 GB" in out  # 8 * 4096 * 4096 * 16 * 4/3


def test_cli_ds_memory_options(seg_layer):
    r = magma("design", "ds-memory", seg_layer, "3.5e9", "--max-mips", "1")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "1024,1024,16"
    r = magma("design", "ds-memory", seg_layer, "7e9", "--factor", "2,2,2")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == ",".join(map(str, design.shape_from_memory_target(8, (512, 512, 16), (2, 2, 2), 7e9, 5)))


def test_cli_ds_memory_too_small(seg_layer):
    r = magma("design", "ds-memory", seg_layer, "1e6")
    assert r.returncode == 1
    assert r.stderr.startswith("magma: ") and "too small" in r.stderr
    assert "Traceback" not in r.stderr


def test_cli_ds_shape(seg_layer):
    r = magma("design", "ds-shape", seg_layer, "1024,1024,64")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "715.8 MB"
    r = magma("design", "ds-shape", seg_layer, "1024,1024,64", "--factor", "2,2,2")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == design.format_bytes(8 * 2**26 * 8 / 7)


def test_cli_missing_layer(tmp_path):
    for args in (("ds-memory", f"file://{tmp_path}/nothing", "3.5e9"), ("ds-shape", f"file://{tmp_path}/nothing", "64,64,64")):
        r = magma("design", *args)
        assert r.returncode == 1
        assert r.stdout == ""
        assert r.stderr.startswith("magma: ")
        assert "no info file" in r.stderr and f"{tmp_path}/nothing/info" in r.stderr
        assert "Traceback" not in r.stderr


def test_cli_bad_mip(seg_layer):
    r = magma("design", "ds-memory", seg_layer, "3.5e9", "--mip", "3")
    assert r.returncode == 1
    assert r.stderr.startswith("magma: ") and "mip 3 does not exist" in r.stderr


def test_cli_bad_arguments(seg_layer):
    r = magma("design", "ds-shape", seg_layer, "64,64")
    assert r.returncode == 2 and "three integers" in r.stderr
    r = magma("design", "ds-memory", seg_layer, "lots")
    assert r.returncode == 2 and "bytes" in r.stderr


def test_cli_plan(tmp_path):
    path = _make_layer(f"file://{tmp_path}/img", "uint8", (64, 64, 64), (1024, 1024, 128), layer_type="image")
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"layers:\n  img: {path}\nsteps:\n  pyr:\n    op: downsample\n    layer: img\n    num_mips: 2\n")
    r = magma("plan", "--configfile", cfg)
    assert r.returncode == 0, r.stderr
    assert "pyr" in r.stdout and "downsample" in r.stdout and "total: 1 steps" in r.stdout


def test_cli_plan_errors(tmp_path):
    r = magma("plan", "--configfile", tmp_path / "missing.yaml")
    assert r.returncode == 1 and r.stderr.startswith("magma: config: cannot read")
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"layers:\n  img: file://{tmp_path}/img\nsteps:\n  pyr:\n    op: downsample\n    layer: img\n")
    r = magma("plan", "--configfile", cfg)
    assert r.returncode == 1 and r.stderr.startswith("magma: layer 'img': no info file")
    assert "Traceback" not in r.stderr


def test_console_script_installed():
    exe = Path(sys.executable).with_name("magma")
    if not exe.exists():
        pytest.skip("console script not installed (pip install -e .)")
    r = subprocess.run([str(exe), "--help"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "design" in r.stdout and "plan" in r.stdout
