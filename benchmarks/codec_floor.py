"""The gzip work under an image downsample, alone: libdeflate (what cloud-files uses in
both magma and Igneous) inflating every chunk of a layer's mip 0, then deflating as many
bytes as the mips a 2x2x1 pyramid of `--num-mips` adds, at each `--levels`, in one process.

    python benchmarks/codec_floor.py [--layer benchmarks/work/data-2048x2048x256/image]

No CloudVolume and no pooling: what is left when a tool does nothing but the codec.
Prints seconds; compare with the read+write floor of vs_igneous.py.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import time

import deflate


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layer", default=os.path.join(os.path.dirname(__file__), "work", "data-2048x2048x256", "image"),
                    help="a local Precomputed layer with gzip chunks (the benchmark's dataset)")
    ap.add_argument("--num-mips", type=int, default=3)
    ap.add_argument("--levels", default="9,6", help="deflate levels to time (9: cloud-files' default)")
    args = ap.parse_args()

    info = json.load(open(os.path.join(args.layer, "info")))
    key = info["scales"][0]["key"]
    files = sorted(glob.glob(os.path.join(args.layer, key, "*.gz")))
    if not files:
        raise SystemExit(f"no gzip chunks under {args.layer}/{key} (make the dataset with vs_igneous.py)")

    t0 = time.perf_counter()
    chunks, total = [], 0
    for i, name in enumerate(files):
        with open(name, "rb") as f:
            data = deflate.gzip_decompress(f.read())
        total += len(data)
        if i % 8 == 0:
            chunks.append(bytes(data))  # every 8th chunk stands in for the output's content
    inflate_s = time.perf_counter() - t0
    print(f"inflate: {len(files)} chunks, {total / 1e9:.2f} GB of voxels in {inflate_s:.1f} s")

    need = total * sum(0.25 ** m for m in range(1, args.num_mips + 1))
    for level in (int(v) for v in args.levels.split(",")):
        t0, done, out = time.perf_counter(), 0, 0
        while done < need:
            for c in chunks:
                out += len(deflate.gzip_compress(c, level))
                done += len(c)
                if done >= need:
                    break
        print(f"deflate level {level}: {done / 1e9:.3f} GB (mips 1-{args.num_mips}) in"
              f" {time.perf_counter() - t0:.1f} s, {out / done:.3f} of the raw size")


if __name__ == "__main__":
    main()
