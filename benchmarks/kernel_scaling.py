"""How much a kernel itself gains from a second core on this machine.

    python benchmarks/kernel_scaling.py [--kernel skeleton|mesh] [--scale 0.06] [--work DIR]

Splits the segmentation's labels into two sets of equal volume (as a skeleton
forge task does when its job lends it a core) and runs the kernel on each set:
first one after the other, then side by side in two forks. skeleton: kimimaro
traces each set. mesh: zmesh meshes the whole array (padded, so objects close at
its edges, as the benchmark's floor) once, and each set's meshes are simplified
(`Mesher.get`, the settings of a mesh step), each set in a fork of that process
both times, as the simplifier keeps state from one call to the next. If the
side-by-side sets take longer than they did alone, the cores share something the
kernel waits on (memory bandwidth, cache), and no scheduling gets the 2-core
speed-up past the throughput ratio printed last.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from magma import config, cores, malloc, skeletonize  # noqa: E402
from vs_igneous import make_dataset  # noqa: E402


def trace(labels, resolution, step: dict, ids) -> float:
    """Seconds kimimaro takes on the labels `ids` with the skeleton step's settings."""
    import kimimaro

    teasar = {k: v for k, v in step["teasar_params"].items() if v is not None}
    t = time.perf_counter()
    kimimaro.skeletonize(labels, teasar, object_ids=ids, anisotropy=tuple(resolution),
                         dust_threshold=step["dust_threshold"], progress=False, fix_branching=step["fix_branching"],
                         fix_borders=step["fix_borders"], parallel=1)
    return time.perf_counter() - t


def simplifier(labels, resolution):
    """fn(ids) -> seconds zmesh takes to simplify the meshes of `ids` (as a mesh step's
    merge does, as Mesher.get does on the whole array), from one marching-cubes pass."""
    import zmesh

    padded = np.pad(labels, 1)
    mesher = zmesh.Mesher(tuple(float(r) for r in resolution))
    mesher.mesh(np.asfortranarray(padded))

    def run(ids):
        t = time.perf_counter()
        for i in ids:
            mesher.get(int(i), reduction_factor=100, max_error=40, voxel_centered=True)
        return time.perf_counter() - t
    return run


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kernel", choices=("skeleton", "mesh"), default="skeleton", help="which kernel (default skeleton)")
    ap.add_argument("--scale", type=float, default=0.06, help="dataset scale, as vs_igneous.py (default 0.06)")
    ap.add_argument("--work", default=str(ROOT / "benchmarks" / "work"), help="scratch directory")
    args = ap.parse_args(argv)
    from cloudvolume import CloudVolume

    malloc.keep_freed_memory()  # as batch jobs run
    data = make_dataset(Path(args.work).resolve(), args.scale, 2)
    cv = CloudVolume(data["paths"]["seg"], progress=False)
    # the settings a skeleton step gets by default (Igneous's CLI defaults)
    step = config.validate({"layers": {"seg": data["paths"]["seg"]},
                            "steps": {"sk": {"op": "skeleton", "layer": "seg"}}})["steps"]["sk"]
    labels = np.asfortranarray(cv[:, :, :][..., 0])
    sets = skeletonize.label_sets(labels, 2)
    print(f"{'x'.join(map(str, labels.shape))} voxels, {sum(map(len, sets))} labels in 2 sets of equal volume",
          flush=True)
    if args.kernel == "skeleton":
        run = lambda ids: trace(labels, cv.resolution, step, ids)  # noqa: E731
        alone = [run(ids) for ids in sets]
    else:
        run = simplifier(labels, cv.resolution)
        alone = cores.fork_each(run, sets)  # no spare cores yet: one fork after the other
    name = {"skeleton": "kimimaro", "mesh": "zmesh simplifying"}[args.kernel]
    print(f"{name}, one set after the other: {alone[0]:.1f} + {alone[1]:.1f} s", flush=True)
    cores.start(len(sets) - 1)  # as a batch job lends its idle cores: every set in a fork, all at once
    try:
        together = cores.fork_each(run, sets)
    finally:
        cores.stop()
    print(f"{name}, side by side:{' ' * (20 - len(name))}{together[0]:.1f} and {together[1]:.1f} s", flush=True)
    print(f"throughput of two processes against one: {sum(alone) / max(together):.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
