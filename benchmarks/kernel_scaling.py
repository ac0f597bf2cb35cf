"""How much a kernel itself gains from a second core on this machine.

    python benchmarks/kernel_scaling.py [--scale 0.06] [--work DIR]

Splits the segmentation's labels into two sets of equal volume (as a skeleton
forge task does when its job lends it a core) and traces each set with kimimaro:
first one after the other in one process, then side by side in two forks. If the
side-by-side sets take longer than they did alone, the cores share something the
kernel waits on (memory bandwidth, cache), and no scheduling gets the 2-core
speed-up past the throughput ratio printed last.
"""
from __future__ import annotations

import argparse
import os
import pickle
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from magma import malloc, skeletonize  # noqa: E402
from vs_igneous import make_dataset  # noqa: E402

TEASAR = dict(scale=4, const=10, pdrf_exponent=4, pdrf_scale=100000, soma_detection_threshold=1100,
              soma_acceptance_threshold=3500, soma_invalidation_scale=1.0, soma_invalidation_const=300)


def trace(labels, resolution, ids) -> float:
    import kimimaro

    t = time.perf_counter()
    kimimaro.skeletonize(labels, TEASAR, object_ids=ids, anisotropy=tuple(resolution), dust_threshold=1000,
                         progress=False, fix_branching=True, fix_borders=True, parallel=1)
    return time.perf_counter() - t


def side_by_side(fn, items) -> list:
    """fn(item) for every item, each in its own fork, all at once; their own durations."""
    pids = []
    for item in items:
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(r)
            os.write(w, pickle.dumps(fn(item)))
            os._exit(0)
        os.close(w)
        pids.append((pid, r))
    out = []
    for pid, r in pids:
        with os.fdopen(r, "rb") as f:
            out.append(pickle.loads(f.read()))
        os.waitpid(pid, 0)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--scale", type=float, default=0.06, help="dataset scale, as vs_igneous.py (default 0.06)")
    ap.add_argument("--work", default=str(ROOT / "benchmarks" / "work"), help="scratch directory")
    args = ap.parse_args(argv)
    from cloudvolume import CloudVolume

    malloc.keep_freed_memory()  # as batch jobs run
    data = make_dataset(Path(args.work).resolve(), args.scale, 2)
    cv = CloudVolume(data["paths"]["seg"], progress=False)
    labels = np.asfortranarray(cv[:, :, :][..., 0])
    sets = skeletonize.label_sets(labels, 2)
    print(f"{'x'.join(map(str, labels.shape))} voxels, {sum(map(len, sets))} labels in 2 sets of equal volume",
          flush=True)
    alone = [trace(labels, cv.resolution, ids) for ids in sets]
    print(f"kimimaro, one set after the other: {alone[0]:.1f} + {alone[1]:.1f} s", flush=True)
    together = side_by_side(lambda ids: trace(labels, cv.resolution, ids), sets)
    print(f"kimimaro, side by side:            {together[0]:.1f} and {together[1]:.1f} s", flush=True)
    print(f"throughput of two processes against one: {sum(alone) / max(together):.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
