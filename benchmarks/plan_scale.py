"""How long does planning a petavoxel layer take?

Writes only an info file for a virtual 100000^3 voxel uint8 image layer
(chunk 64^3, resolution 4,4,40) under a temporary directory -- no chunk is
ever written -- and a config with one downsample step (default parameters,
num_mips 10: with the default 3.5 GB memory target one task builds 6 mips, so
the step is planned as two passes, mip0-6 and mip6-10). Then:

  1. runs `snakemake -n --cores 2 --configfile <cfg>` from the project root and
     prints wall seconds, peak RSS and the number of jobs (the `total` line of
     Snakemake's "Job stats" table);
  2. times magma.workflow.plan() alone, in this process.

    python benchmarks/plan_scale.py [--num-mips 10] [--repeat 5] [--plan-only] [--keep]
"""
from __future__ import annotations

import argparse
import os
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
SIZE = [100000, 100000, 100000]
CHUNK = [64, 64, 64]
RESOLUTION = [4, 4, 40]


def write_layer(path: str) -> None:
    """Only the info file: the layer is virtual."""
    from cloudvolume import CloudVolume

    info = CloudVolume.create_new_info(
        num_channels=1, layer_type="image", data_type="uint8", encoding="raw",
        resolution=RESOLUTION, voxel_offset=[0, 0, 0], volume_size=SIZE, chunk_size=CHUNK,
    )
    CloudVolume(path, info=info).commit_info()


def make_config(tmp: Path, num_mips: int) -> dict:
    path = f"file://{tmp}/image"
    write_layer(path)
    return {
        "layers": {"image": path},
        "steps": {"pyramid": {"op": "downsample", "layer": "image", "num_mips": num_mips}},
        "execution": {"run_dir": str(tmp / "run")},
    }


def snakemake_cmd() -> list:
    exe = Path(sys.executable).with_name("snakemake")
    if exe.exists():
        return [str(exe)]
    found = shutil.which("snakemake")
    return [found] if found else [sys.executable, "-m", "snakemake"]


def job_total(text: str) -> int | None:
    """The `total` row of Snakemake's "Job stats" table."""
    if "Job stats" not in text:
        return None
    stats = text[text.rindex("Job stats"):]
    m = re.search(r"^\s*total\s+(\d+)\s*$", stats, re.MULTILINE)
    return int(m.group(1)) if m else None


def run_snakemake(cfgfile: Path, tmp: Path) -> dict:
    cmd = snakemake_cmd() + ["-n", "--cores", "2", "--configfile", str(cfgfile)]
    timefile = tmp / "time.txt"
    gnu_time = Path("/usr/bin/time")
    use_time = gnu_time.exists()
    if use_time:
        cmd = [str(gnu_time), "-v", "-o", str(timefile)] + cmd
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    out = proc.stdout + "\n" + proc.stderr
    if proc.returncode != 0:
        sys.stderr.write(out[-4000:])
        raise SystemExit(f"snakemake failed with exit code {proc.returncode}")
    peak_kb = None
    if use_time and timefile.exists():
        m = re.search(r"Maximum resident set size \(kbytes\):\s*(\d+)", timefile.read_text())
        peak_kb = int(m.group(1)) if m else None
    if peak_kb is None:  # Linux: kilobytes, largest of the children waited for
        peak_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return {"wall": wall, "peak_mb": peak_kb / 1024, "jobs": job_total(out), "output": out,
            "rss_source": "/usr/bin/time -v" if use_time else "getrusage(RUSAGE_CHILDREN)"}


def time_plan(cfg: dict, repeat: int) -> dict:
    from magma import workflow

    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        plan = workflow.plan(cfg)
        times.append(time.perf_counter() - t0)
    return {"times": times, "plan": plan,
            "self_peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--num-mips", type=int, default=10, help="num_mips of the downsample step (default 10)")
    ap.add_argument("--repeat", type=int, default=5, help="in-process plan() repetitions (default 5)")
    ap.add_argument("--plan-only", action="store_true", help="skip the snakemake dry run")
    ap.add_argument("--keep", action="store_true", help="keep the temporary directory")
    ap.add_argument("--show-output", action="store_true", help="print Snakemake's output")
    args = ap.parse_args(argv)

    tmp = Path(tempfile.mkdtemp(prefix="magma-plan-scale-"))
    try:
        cfg = make_config(tmp, args.num_mips)
        cfgfile = tmp / "petavoxel.yaml"
        cfgfile.write_text(yaml.safe_dump(cfg, sort_keys=False))
        voxels = SIZE[0] * SIZE[1] * SIZE[2]
        print(f"layer: {'x'.join(map(str, SIZE))} uint8 ({voxels:.2e} voxels), chunk {'x'.join(map(str, CHUNK))},"
              f" info only at {cfg['layers']['image']}")
        print(f"step: downsample, num_mips {args.num_mips}, default parameters")

        if not args.plan_only:
            r = run_snakemake(cfgfile, tmp)
            if args.show_output:
                print(r["output"])
            print("\n== snakemake -n --cores 2 ==")
            print(f"wall:     {r['wall']:.2f} s")
            print(f"peak RSS: {r['peak_mb']:.0f} MB ({r['rss_source']})")
            print(f"jobs:     {r['jobs']} (Job stats total)")

        p = time_plan(cfg, args.repeat)
        plan = p["plan"]
        times = p["times"]
        print(f"\n== magma.workflow.plan() in-process, {len(times)} runs ==")
        print(f"min {min(times) * 1e3:.1f} ms, median {statistics.median(times) * 1e3:.1f} ms,"
              f" max {max(times) * 1e3:.1f} ms (first run {times[0] * 1e3:.1f} ms)")
        print(f"process peak RSS: {p['self_peak_mb']:.0f} MB")
        tasks = sum(s.tasks for s in plan.steps.values())
        jobs = sum(s.jobs for s in plan.steps.values())
        print(f"tasks: {tasks}, task jobs: {jobs}")
        print(plan.table())
    finally:
        if args.keep:
            print(f"\nkept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
