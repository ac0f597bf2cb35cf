"""The README's first command: `snakemake --cores all` with no config runs the demo end to end."""
import json

import numpy as np

from conftest import read, snakemake
from magma.ops.demo import synthesize
from magma.ops.downsample import pyramid


def test_demo_runs_end_to_end(workdir):
    proc = snakemake(workdir, None)
    assert "magma: finished. Layers written:" in proc.stdout + proc.stderr
    data = workdir / "demo-data"
    img, seg = read(f"file://{data / 'image'}"), read(f"file://{data / 'seg'}")
    assert img.dtype == np.uint8 and seg.dtype == np.uint64 and img.shape == (512, 512, 128)

    # the data the issue asks for: a few dozen objects, ids over the 64-bit range, crossing tasks
    ids = np.unique(seg)
    ids = ids[ids != 0]
    assert 20 <= len(ids) <= 60
    assert ids.max() > 2**62 and ids.min() < 2**63
    crossing = 0
    for label in ids[:20]:
        xs, ys, zs = np.nonzero(seg == label)
        tasks = {(x // 256, y // 256, z // 64) for x, y, z in zip(xs[::50], ys[::50], zs[::50])}
        crossing += len(tasks) >= 2
    assert crossing >= 10, "objects should cross task boundaries"
    assert img[seg == 0].mean() > img[seg != 0].mean(), "background brighter than cells, like EM"

    # deterministic by seed
    again_img, again_seg = synthesize((512, 512, 128), seed=1, objects=40)
    assert np.array_equal(again_seg, seg) and np.array_equal(again_img, img)

    # the steps of config/config.yaml
    info = json.loads((data / "image" / "info").read_text())
    assert len(info["scales"]) == 4
    assert np.array_equal(read(f"file://{data / 'image'}", 3),
                          pyramid(pyramid(img, "avg", (2, 2, 1), 2)[1], "avg", (2, 2, 1), 1)[0])
    assert np.array_equal(read(f"file://{data / 'seg_rechunked'}"), seg)
    assert np.array_equal(read(f"file://{data / 'image_sharded'}"), img)
    assert np.array_equal(read(f"file://{data / 'seg'}", 2), pyramid(seg, "mode", (2, 2, 1), 2)[1])
    assert (workdir / "results" / "config" / "markers" / "image_shards" / "done.json").exists()
    eq = read(f"file://{data / 'image_contrast'}")
    assert eq.shape == img.shape and int(eq.max()) - int(eq.min()) > int(img.max()) - int(img.min())
