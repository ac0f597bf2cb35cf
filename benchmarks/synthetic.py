"""A realistic synthetic EM dataset for benchmarks, generated block by block.

The segmentation is dense and neuron-like: a coarse grid (1/8 in x and y, 1/2
in z) is split among neurites, random-walk centrelines running mostly along z,
each voxel going to its nearest centreline (so territories are long tubes that
cross every task boundary). Full resolution reads that grid through a smooth
displacement, so boundaries wiggle instead of following the coarse grid. A few
percent of territories are 0 (extracellular space). Labels are random 64-bit ids.

The image darkens membranes (label changes in x or y), gives each neurite its
own grey level, brightens extracellular space, blurs, adds noise and varies the
brightness from section to section (so contrast normalization has work to do).

Everything is deterministic in the seed; blocks can be made in any order and in
parallel, and memory stays at a few hundred MB per worker whatever the size.
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage

COARSE = (8, 8, 2)  # full-resolution voxels per coarse voxel
BLOCK = (512, 512, 64)
HALO = 4


def coarse_labels(size, seed: int) -> np.ndarray:
    """The coarse territory grid (uint64 labels) for a volume of `size` voxels."""
    rng = np.random.default_rng(seed)
    csize = np.asarray([-(-s // c) for s, c in zip(size, COARSE)])
    # one neurite per ~48x48 voxel cross-section (about 380 nm at 8 nm), at least 8
    n = max(8, int(size[0] * size[1] / 48**2))
    centre = np.zeros(csize, dtype=np.uint32)
    for obj in range(1, n + 1):
        pos = rng.uniform(0, 1, 3) * csize
        d = np.array([rng.normal(0, 0.4), rng.normal(0, 0.4), 1.0])
        for sign in (1, -1):
            p, v = pos.copy(), d / np.linalg.norm(d) * sign
            for _ in range(int(csize.max() * 3)):
                v += rng.normal(0, 0.15, 3)
                v /= np.linalg.norm(v)
                p += v
                if np.any(p < 0) or np.any(p >= csize):
                    break
                centre[tuple(p.astype(int))] = obj
    _, nearest = ndimage.distance_transform_edt(centre == 0, return_indices=True)
    owner = centre[tuple(nearest)]
    del nearest
    ids = np.unique(rng.integers(1, np.iinfo(np.uint64).max, size=n * 2, dtype=np.uint64))[:n]
    rng.shuffle(ids)
    lut = np.concatenate([[0], ids]).astype(np.uint64)
    lut[1:][rng.random(n) < 0.03] = 0  # extracellular space
    return lut[owner]


def _displacement(a, b, seed, amp=5.0):
    """A smooth wiggle (voxels) as a function of two coordinates, via a few sinusoids."""
    rng = np.random.default_rng(seed)
    out = 0.0
    for _ in range(3):
        ka, kb = rng.uniform(1 / 80, 1 / 25, 2)
        out = out + amp / 3 * np.sin(2 * np.pi * (a * ka + b * kb) + rng.uniform(0, 2 * np.pi))
    return out


def labels_block(coarse: np.ndarray, lo, hi, seed: int) -> np.ndarray:
    """Full-resolution labels of the box [lo, hi)."""
    x = np.arange(lo[0], hi[0])[:, None, None]
    y = np.arange(lo[1], hi[1])[None, :, None]
    z = np.arange(lo[2], hi[2])[None, None, :]
    cx = np.clip(((x + _displacement(y, z, seed + 1)) // COARSE[0]).astype(np.int64), 0, coarse.shape[0] - 1)
    cy = np.clip(((y + _displacement(x, z, seed + 2)) // COARSE[1]).astype(np.int64), 0, coarse.shape[1] - 1)
    cz = np.clip(z // COARSE[2], 0, coarse.shape[2] - 1)
    return coarse[cx, cy, cz]


def make_block(coarse: np.ndarray, lo, hi, seed: int) -> tuple:
    """(EM-like uint8 image, uint64 labels) of the box [lo, hi). The image is
    computed on a halo of labels so that blocks join seamlessly."""
    hlo = [lo[0] - HALO, lo[1] - HALO, lo[2]]
    hhi = [hi[0] + HALO, hi[1] + HALO, hi[2]]
    lab = labels_block(coarse, hlo, hhi, seed)
    return _image(lab, lo, hi, seed), np.ascontiguousarray(lab[HALO:-HALO, HALO:-HALO])


def _image(lab, lo, hi, seed):
    grey = 110 + (lab * np.uint64(0x9E3779B97F4A7C15) >> np.uint64(58)).astype(np.float32) * 1.0  # 110..173
    grey[lab == 0] = 205
    edge = np.zeros(lab.shape, dtype=bool)
    edge[1:] |= lab[1:] != lab[:-1]
    edge[:, 1:] |= lab[:, 1:] != lab[:, :-1]
    grey[edge] = 40
    grey = ndimage.gaussian_filter(grey, sigma=(1.0, 1.0, 0.0), truncate=HALO - 0.5)
    grey = grey[HALO:-HALO, HALO:-HALO]
    z = np.arange(lo[2], hi[2])
    gain = 1.0 + 0.12 * np.sin(z * 0.37 + seed) + 0.05 * np.sin(z * 1.91)  # section-to-section brightness
    grey = grey * gain[None, None, :]
    # noise from a generator seeded by the block position: the same pixels every run
    rng = np.random.default_rng([seed, *lo])
    grey += rng.normal(0, 9, grey.shape).astype(np.float32)
    return np.clip(grey, 0, 255).astype(np.uint8)


def blocks(size):
    for z in range(0, size[2], BLOCK[2]):
        for y in range(0, size[1], BLOCK[1]):
            for x in range(0, size[0], BLOCK[0]):
                lo = (x, y, z)
                yield lo, tuple(min(a + b, s) for a, b, s in zip(lo, BLOCK, size))
