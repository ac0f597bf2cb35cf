"""Shared helpers: small synthetic layers and real snakemake runs in a temp directory."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from cloudvolume import CloudVolume

REPO = Path(__file__).resolve().parents[1]
SNAKEFILE = REPO / "workflow" / "Snakefile"


def make_layer(path: Path, data: np.ndarray, layer_type: str, chunk=(64, 64, 64), resolution=(8, 8, 40),
               offset=(0, 0, 0), encoding="raw") -> str:
    url = f"file://{path}"
    info = CloudVolume.create_new_info(
        num_channels=1 if data.ndim == 3 else data.shape[3], layer_type=layer_type, data_type=str(data.dtype),
        encoding=encoding, resolution=list(resolution), voxel_offset=list(offset), volume_size=list(data.shape[:3]),
        chunk_size=list(chunk),
    )
    vol = CloudVolume(url, info=info, progress=False)
    vol.commit_info()
    vol[:, :, :] = data
    return url


def read(url: str, mip: int = 0) -> np.ndarray:
    vol = CloudVolume(url, mip=mip, progress=False)
    return vol[vol.bounds][..., 0]


def image_data(shape, seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, size=shape, dtype=np.uint8)


def seg_data(shape, seed=0) -> np.ndarray:
    """Blocky labels with a few large 64-bit ids, so mode pooling has real work."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 6, size=tuple(-(-s // 3) for s in shape)).astype(np.uint64)
    ids = np.array([0, 7, 2**40 + 3, 2**63 + 11, 18446744073709551557, 99], dtype=np.uint64)
    arr = ids[small].repeat(3, 0).repeat(3, 1).repeat(3, 2)
    return np.ascontiguousarray(arr[: shape[0], : shape[1], : shape[2]])


def write_config(path: Path, cfg: dict) -> Path:
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def snakemake(workdir: Path, configfile: Path | None, *args, check=True, timeout=900, **kw):
    """Run the real snakemake CLI on magma's Snakefile with `workdir` as working directory."""
    cmd = [sys.executable, "-m", "snakemake", "-s", str(SNAKEFILE), "-d", str(workdir), "--cores", "2"]
    if configfile is not None:
        cmd += ["--configfile", str(configfile)]
    cmd += list(args)
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, **kw)
    if check and proc.returncode != 0:
        raise AssertionError(f"snakemake failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}")
    return proc


@pytest.fixture
def workdir(tmp_path):
    d = tmp_path / "work"
    d.mkdir()
    return d
