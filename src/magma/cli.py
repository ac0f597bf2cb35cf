"""The `magma` command: task design helpers and the plan of a config.

    magma design ds-memory PATH MEMORY_BYTES [--mip 0] [--factor 2,2,1] [--max-mips 5] [--verbose]
    magma design ds-shape PATH SHAPE [--mip 0] [--factor 2,2,1]
    magma plan [--configfile config/config.yaml]
    magma serve [--configfile config/config.yaml] [--port 8080] [--host 127.0.0.1]
    magma spatial-index db PATH DATABASE [--kind mesh|skeleton] [--allow-missing]
    magma spatial-index query DATABASE MIN MAX [--voxels]

`design` mirrors Igneous's `igneous design ds-memory` / `ds-shape` (same
formulas, magma.design); `plan` prints the table the Snakefile prints, without
starting Snakemake; `serve` serves the config's local (file://) layers to
Neuroglancer and prints the links; `spatial-index db` writes an SQLite database of
a layer's mesh or skeleton spatial index and `spatial-index query` lists the labels
whose bounding boxes intersect a box (magma.spatial_db). Bad input prints `magma: <what is wrong>` and exits 1.
"""
from __future__ import annotations

import argparse
import math
import os
import sys

from . import design, layers
from .errors import MagmaError
from .ops.common import dtype_width

DEFAULT_CONFIG = "config/config.yaml"


def _vec3(text: str) -> tuple:
    """'2,2,1' -> (2, 2, 1); argparse reports anything else as a usage error."""
    parts = [p.strip() for p in str(text).split(",")]
    try:
        values = tuple(int(p) for p in parts)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected three integers like 2,2,1, got {text!r}") from None
    if len(values) != 3:
        raise argparse.ArgumentTypeError(f"expected three integers like 2,2,1, got {text!r}")
    return values


def _positive_vec3(text: str) -> tuple:
    values = _vec3(text)
    if any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected three positive integers, got {text!r}")
    return values


def _factor(text: str) -> tuple:
    values = _vec3(text)
    if values not in ((1, 1, 1), (2, 2, 1), (2, 2, 2)):
        raise argparse.ArgumentTypeError(f"factor must be 2,2,1 or 2,2,2 (or 1,1,1), got {text!r}")
    return values


def _bytes(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of bytes like 3.5e9, got {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"memory must be a positive number of bytes, got {text!r}")
    return value


def _layer(path: str, mip: int):
    """(metadata, data width in bytes, channels, chunk size) of the layer at `path`, `mip`."""
    name = path.rstrip("/").rsplit("/", 1)[-1] or path
    info = layers.read_info(name, path)
    layers.check_mip(name, info, mip, key="--mip")
    meta = layers.meta(info)
    return meta, dtype_width(info), int(info["num_channels"]), [int(c) for c in meta.chunk_size(mip)]


def cmd_ds_memory(args) -> int:
    meta, width, channels, chunk = _layer(args.path, args.mip)
    memory = int(args.memory_bytes)
    try:
        shape = design.shape_from_memory_target(width * channels, chunk, args.factor, memory, args.max_mips)
    except ValueError as exc:
        raise MagmaError(str(exc)) from exc
    num_downsamples = int(math.log2(max(s / c for s, c in zip(shape, chunk))))
    used = design.memory_for_shape(width, shape, args.factor, channels)
    text = ",".join(str(int(s)) for s in shape)
    if not args.verbose:
        print(text)
        return 0
    print(f"Data Width: {width} B")
    if channels != 1:
        print(f"Channels: {channels}")
    print(f"Factor: {args.factor}")
    print(f"Chunk Size: {chunk[0]}, {chunk[1]}, {chunk[2]} voxels")
    print(f"Memory Limit: {design.format_bytes(memory)}")
    print("-----")
    print(f"Optimized Shape: {text}")
    print(f"Downsamples: {num_downsamples}")
    print(f"Memory Used*: {design.format_bytes(used)}")
    print("\n* memory used is for retaining the image and all downsamples.\n"
          "Additional costs may be incurred from processing.")
    return 0


def cmd_ds_shape(args) -> int:
    _, width, channels, _ = _layer(args.path, args.mip)
    print(design.format_bytes(design.memory_for_shape(width, args.shape, args.factor, channels)))
    return 0


def cmd_plan(args) -> int:
    from . import config, workflow

    cfg = config.load(args.configfile)
    print(workflow.plan(cfg).table())
    return 0


def cmd_serve(args) -> int:
    from . import config, neuroglancer

    cfg = config.load(args.configfile)
    roots, infos = {}, {}
    for name, path in cfg["layers"].items():
        folder = neuroglancer.local_dir(path)
        if folder and os.path.isfile(os.path.join(folder, "info")):
            roots[name] = folder
            infos[name] = layers.read_info(name, path)
    if not roots:
        raise MagmaError(f"{args.configfile}: no local (file://) layer with an info file to serve; run the workflow first")
    server = neuroglancer.make_server(roots, args.host, args.port)
    port = server.server_address[1]
    print(neuroglancer.summary(list(roots), cfg["layers"], infos, port=port, serve_hint=False))
    print(f"serving {', '.join(roots)} on http://{args.host}:{port}/<layer>/ (Ctrl-C stops)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


def cmd_spatial_db(args) -> int:
    from . import spatial_db

    counts = spatial_db.build(args.path, args.kind, args.database, allow_missing=args.allow_missing)
    print(f"{args.database}: {counts['labels']} labels, {counts['boxes']} boxes from {counts['index_files']} index files")
    return 0


def cmd_spatial_query(args) -> int:
    from cloudvolume import Bbox

    from . import spatial_db

    lo, hi = args.min, args.max
    if args.voxels:
        res = spatial_db.resolution(args.database)
        lo, hi = [a * r for a, r in zip(lo, res)], [a * r for a, r in zip(hi, res)]
    if any(a >= b for a, b in zip(lo, hi)):
        raise MagmaError(f"spatial-index query: MIN {list(args.min)} must be below MAX {list(args.max)} on every axis")
    for label in spatial_db.query(args.database, Bbox(lo, hi)):
        print(label)
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="magma", description="Neuroglancer Precomputed volumes with Snakemake.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    d = sub.add_parser("design", help="task shape and memory calculators (like `igneous design`)")
    dsub = d.add_subparsers(dest="design_command", metavar="COMMAND")
    dsub.required = True

    m = dsub.add_parser("ds-memory", help="task shape with the most downsamples for a memory budget")
    m.add_argument("path", metavar="PATH", help="CloudVolume layer path (file://, gs://, s3://, ...)")
    m.add_argument("memory_bytes", metavar="MEMORY_BYTES", type=_bytes, help="bytes one task may use, e.g. 3.5e9")
    m.add_argument("--mip", type=int, default=0, help="mip to read (default: 0)")
    m.add_argument("--factor", type=_factor, default=(2, 2, 1), help="downsample factor (default: 2,2,1)")
    m.add_argument("--max-mips", type=int, default=5, help="most downsamples one task builds (default: 5)")
    m.add_argument("--verbose", action="store_true", help="also print the inputs and the memory used")
    m.set_defaults(func=cmd_ds_memory)

    s = dsub.add_parser("ds-shape", help="memory a task of SHAPE needs, with all its downsamples")
    s.add_argument("path", metavar="PATH", help="CloudVolume layer path (file://, gs://, s3://, ...)")
    s.add_argument("shape", metavar="SHAPE", type=_positive_vec3, help="task shape in voxels, e.g. 1024,1024,64")
    s.add_argument("--mip", type=int, default=0, help="mip to read (default: 0)")
    s.add_argument("--factor", type=_factor, default=(2, 2, 1), help="downsample factor (default: 2,2,1)")
    s.set_defaults(func=cmd_ds_shape)

    pl = sub.add_parser("plan", help="print the plan (stages, tasks, jobs) of a config; runs nothing")
    pl.add_argument("--configfile", default=DEFAULT_CONFIG, help=f"config file (default: {DEFAULT_CONFIG})")
    pl.set_defaults(func=cmd_plan)

    sv = sub.add_parser("serve", help="serve the config's local layers to Neuroglancer (CORS) and print links")
    sv.add_argument("--configfile", default=DEFAULT_CONFIG, help=f"config file (default: {DEFAULT_CONFIG})")
    sv.add_argument("--port", type=int, default=8080, help="port (default: 8080; 0 picks a free one)")
    sv.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    sv.set_defaults(func=cmd_serve)

    si = sub.add_parser("spatial-index", help="an SQLite database of a mesh/skeleton spatial index, and box queries")
    sisub = si.add_subparsers(dest="spatial_command", metavar="COMMAND")
    sisub.required = True
    db = sisub.add_parser("db", help="build DATABASE from the .spatial files of PATH's meshes or skeletons")
    db.add_argument("path", metavar="PATH", help="CloudVolume layer path of the segmentation")
    db.add_argument("database", metavar="DATABASE", help="SQLite file to write (replaced if it exists)")
    db.add_argument("--kind", choices=("mesh", "skeleton"), default="mesh", help="whose index (default: mesh)")
    db.add_argument("--allow-missing", action="store_true", help="skip index files that are missing")
    db.set_defaults(func=cmd_spatial_db)
    q = sisub.add_parser("query", help="labels whose bounding boxes intersect the box [MIN, MAX)")
    q.add_argument("database", metavar="DATABASE", help="a database made by `magma spatial-index db`")
    q.add_argument("min", metavar="MIN", type=_vec3, help="low corner x,y,z (nm; voxels with --voxels)")
    q.add_argument("max", metavar="MAX", type=_vec3, help="high corner x,y,z, exclusive")
    q.add_argument("--voxels", action="store_true", help="MIN and MAX are voxels of the index resolution")
    q.set_defaults(func=cmd_spatial_query)
    return p


def main(argv=None) -> int:
    from . import storage

    args = parser().parse_args(argv)
    storage.install()
    try:
        return args.func(args)
    except MagmaError as exc:
        print(f"magma: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
