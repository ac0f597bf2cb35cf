"""The pictures and tables of `snakemake --report`: what each step made, read back
through CloudVolume after the step finished.

`figures(step_plan)` says at plan time which pictures a step gets; the report
jobs (workflow/rules/report.smk) draw them. Slices are PNGs at the data's own
pixels (PIL); statistics are matplotlib plots of a fixed size (PLOT_SIZE).
Every reader is bounded, so a petavoxel layer costs the same as the demo: a
slice is at most MAX_SIDE pixels across, histograms and sizes read samples.
"""
from __future__ import annotations

import html
import json
import os
import time
from glob import glob

import numpy as np
from cloudvolume import Bbox, CloudVolume

from . import layers, neuroglancer, storage

MAX_SIDE = 1024  # largest slice read, per side (a central crop beyond that)
MIN_SIDE = 512  # small slices are enlarged (nearest neighbour) to about this
PLOT_SIZE = (800, 450)  # pixels of every plot
SLICE_OPS = {"demo", "downsample", "transfer", "contrast", "quantize", "ccl", "remap", "reorder", "create"}


# ---- what a step gets -------------------------------------------------------------
def figures(sp) -> list:
    """[(file name, kind, args)] for step plan `sp`; file names are `<layer>.<picture>.png`."""
    out = []
    p = sp.params
    if sp.op in SLICE_OPS:
        first = p.get("mip", 0) if "dest" in p else 0  # a new layer has data from its `mip` up
        for layer in sp.writes:
            info = sp.infos.get(layer)
            if info is not None:
                for mip in range(first, len(info["scales"])):
                    out.append((f"{layer}.mip{mip}.png", "slice", {"layer": layer, "mip": mip}))
    if sp.op == "contrast":
        out.append((f"{p['dest']}.histograms.png", "histograms",
                    {"before": p["src"], "after": p["dest"], "mip": p.get("mip", 0)}))
    if sp.op == "mesh":
        out.append((f"{p['layer']}.meshes.png", "mesh_stats", {"layer": p["layer"]}))
    if sp.op == "skeleton":
        out.append((f"{p['layer']}.skeletons.png", "skeleton_stats", {"layer": p["layer"]}))
    if sp.op == "ccl":
        out.append((f"{p['dest']}.component-sizes.png", "ccl_sizes", {"layer": p["dest"], "mip": p.get("mip", 0)}))
    if sp.op == "voxel_counts":
        out.append((f"{p['layer']}.top-labels.png", "voxel_counts", {"layer": p["layer"], "mip": p.get("mip", 0)}))
    return out


def slice_size(info: dict, mip: int) -> tuple:
    """(width, height) in pixels of the PNG `slice_png` writes for this mip."""
    w, h = (min(int(s), MAX_SIDE) for s in info["scales"][mip]["size"][:2])
    k = max(1, MIN_SIDE // max(w, h))
    return w * k, h * k


# ---- slices -------------------------------------------------------------------
def _label_colors(labels: np.ndarray) -> np.ndarray:
    """A fixed colour per label id (the same at every mip and in every run); 0 is black."""
    h = labels.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)
    h ^= h >> np.uint64(29)
    rgb = np.stack([(h >> np.uint64(s)) & np.uint64(0xFF) for s in (0, 8, 16)], axis=-1).astype(np.uint8)
    rgb = rgb // 2 + 96  # bright, never black
    rgb[labels == 0] = 0
    return rgb


def _to_pixels(arr: np.ndarray, layer_type: str) -> np.ndarray:
    """(x, y, c) data -> (rows=y, cols=x[, rgb]) uint8 pixels."""
    if layer_type == "segmentation":
        ids, inverse = np.unique(arr[..., 0], return_inverse=True)
        return _label_colors(ids)[inverse.reshape(arr.shape[:2])].transpose(1, 0, 2)
    data = arr[..., :3] if arr.shape[-1] == 3 else arr[..., :1]
    if data.dtype != np.uint8:  # stretch to the 0.5-99.5 percentiles
        lo, hi = np.percentile(data, [0.5, 99.5]) if data.size else (0, 1)
        data = np.clip((data.astype(np.float64) - lo) / max(hi - lo, 1e-12) * 255, 0, 255).astype(np.uint8)
    data = data.transpose(1, 0, 2)
    return data[..., 0] if data.shape[-1] == 1 else data


def slice_box(info: dict, mip: int) -> Bbox:
    """The z-slice drawn at `mip`: the middle of the layer (same physical z at every
    mip), at most MAX_SIDE across in x and y around the centre."""
    s0, s = info["scales"][0], info["scales"][mip]
    z_nm = (s0["voxel_offset"][2] + s0["size"][2] / 2) * s0["resolution"][2]
    off, size = np.asarray(s["voxel_offset"]), np.asarray(s["size"])
    z = int(np.clip(z_nm // s["resolution"][2], off[2], off[2] + size[2] - 1))
    lo, hi = off.copy(), off + size
    for ax in (0, 1):
        if size[ax] > MAX_SIDE:
            lo[ax] = off[ax] + (size[ax] - MAX_SIDE) // 2
            hi[ax] = lo[ax] + MAX_SIDE
    lo[2], hi[2] = z, z + 1
    return Bbox(lo, hi)


def slice_png(path: str, mip: int, out: str) -> dict:
    from PIL import Image

    vol = CloudVolume(path, mip=mip, fill_missing=True, progress=False)
    box = slice_box(vol.info, mip)
    arr = np.asarray(vol.download(box, mip=mip))[:, :, 0, :]
    img = Image.fromarray(_to_pixels(arr, vol.layer_type))
    k = max(1, MIN_SIDE // max(img.size))
    if k > 1:
        img = img.resize((img.size[0] * k, img.size[1] * k), Image.NEAREST)
    _save(img, out)
    return {"z": int(box.minpt[2]), "box": [box.minpt.tolist(), box.maxpt.tolist()]}


def _save(img, out: str) -> None:
    tmp = f"{out}.tmp.png"
    img.save(tmp, format="PNG")
    os.replace(tmp, out)


# ---- plots -------------------------------------------------------------------
def _figure(ncols=1):
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    dpi = 100
    fig, axes = plt.subplots(1, ncols, figsize=(PLOT_SIZE[0] / dpi, PLOT_SIZE[1] / dpi), dpi=dpi)
    return fig, np.atleast_1d(axes)


def _save_fig(fig, out: str) -> None:
    from matplotlib import pyplot as plt

    fig.tight_layout()
    tmp = f"{out}.tmp.png"
    fig.savefig(tmp, format="png", dpi=fig.dpi)  # no bbox "tight": the size stays PLOT_SIZE
    plt.close(fig)
    os.replace(tmp, out)


def sample_slices(path: str, mip: int, n: int = 16) -> np.ndarray:
    """Up to n evenly spaced z-slices (central crops of at most MAX_SIDE) as one array."""
    vol = CloudVolume(path, mip=mip, fill_missing=True, progress=False)
    b = vol.meta.bounds(mip)
    box = slice_box(vol.info, mip)
    zs = np.unique(np.linspace(b.minpt[2], b.maxpt[2] - 1, min(n, int(b.size3()[2]))).astype(int))
    return np.stack([np.asarray(vol.download(Bbox((box.minpt[0], box.minpt[1], z), (box.maxpt[0], box.maxpt[1], z + 1)),
                                             mip=mip))[..., 0, 0] for z in zs])


def histograms_png(before: str, after: str, mip: int, out: str) -> dict:
    fig, (ax,) = _figure()
    stats = {}
    for name, path, color in (("before", before, "0.4"), ("after", after, "tab:red")):
        data = sample_slices(path, mip)
        if data.dtype == np.uint8:  # one bin per grey level (fractional bins alias into combs)
            counts, edges = np.bincount(data.ravel(), minlength=256), np.arange(257)
        else:
            counts, edges = np.histogram(data, bins=1024)
        ax.stairs(counts, edges, color=color, label=f"{name} ({os.path.basename(path.rstrip('/'))})")
        stats[name] = {"mean": float(data.mean()), "std": float(data.std())}
    ax.set_yscale("log")
    ax.set_xlabel("luminance")
    ax.set_ylabel("voxels (sampled z-slices)")
    ax.set_title(f"luminance histograms at mip {mip}, before and after contrast normalization")
    ax.legend()
    _save_fig(fig, out)
    return stats


def _hist(ax, values, xlabel, title):
    values = np.asarray(values, dtype=np.float64)
    if values.size:
        lo, hi = max(values.min(), 1e-9), max(values.max(), 1e-9)
        bins = np.geomspace(lo, hi * 1.0001, 30) if hi / lo > 20 else 30
        ax.hist(values, bins=bins, color="tab:blue")
        if hi / lo > 20:
            ax.set_xscale("log")
    from matplotlib.ticker import MaxNLocator

    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel(xlabel)
    ax.set_ylabel("objects")
    ax.set_title(title, fontsize=10)


MAX_OBJECTS = 2000  # mesh/skeleton statistics read at most this many objects


def _stored_labels(path: str, folder: str, sharded_reader=None) -> list:
    """Label ids with a stored mesh/skeleton: names like `123`, `123:0`, `123.index`
    (unsharded), or every label of every shard (sharded)."""
    cf = storage.files(path)
    labels = set()
    if sharded_reader is not None:
        for name in cf.list(prefix=f"{folder}/"):
            base = name.split("/")[-1]
            if base.endswith(".shard"):
                labels.update(int(x) for x in sharded_reader.list_labels(base, path=folder))
        return sorted(labels)
    for name in cf.list(prefix=f"{folder}/"):
        base = name.split("/")[-1]
        for suffix in (".gz", ".br", ".zstd"):
            base = base.removesuffix(suffix)
        head = base.removesuffix(":0").removesuffix(".index")
        if head.isdigit() and (base == head or base in (f"{head}:0", f"{head}.index")):
            labels.add(int(head))
    return sorted(labels)


def mesh_stats_png(path: str, out: str) -> dict:
    vol = CloudVolume(path, progress=False)
    src = vol.mesh
    folder = vol.info.get("mesh") or "mesh"
    reader = getattr(src, "reader", None) if "sharding" in (src.meta.info or {}) else None
    labels = _stored_labels(path, folder, reader)
    chosen = labels[:: max(1, len(labels) // MAX_OBJECTS)][:MAX_OBJECTS]
    faces, areas = [], []
    for label in chosen:
        legacy = (src.meta.info or {}).get("@type") == "neuroglancer_legacy_mesh"
        mesh = src.get(label, fuse=True) if legacy else src.get(label)  # multi-LOD: LOD 0
        if isinstance(mesh, dict):
            mesh = mesh.get(label)
        if mesh is None or len(mesh.faces) == 0:
            continue
        v = mesh.vertices[mesh.faces]
        areas.append(0.5 * np.linalg.norm(np.cross(v[:, 1] - v[:, 0], v[:, 2] - v[:, 0]), axis=1).sum() / 1e6)
        faces.append(len(mesh.faces))
    fig, axes = _figure(2)
    _hist(axes[0], faces, "triangles per object", f"{len(labels)} meshes ({len(faces)} read)")
    _hist(axes[1], areas, "surface area per object (µm²)", f"total {sum(areas):.1f} µm²")
    _save_fig(fig, out)
    return {"labels": len(labels), "read": len(faces), "triangles": int(sum(faces)), "area_um2": float(sum(areas))}


def skeleton_stats_png(path: str, out: str) -> dict:
    vol = CloudVolume(path, progress=False)
    src = vol.skeleton
    folder = vol.info.get("skeletons") or "skeletons"
    reader = getattr(src, "reader", None) if "sharding" in (src.meta.info or {}) else None
    labels = _stored_labels(path, folder, reader)
    chosen = labels[:: max(1, len(labels) // MAX_OBJECTS)][:MAX_OBJECTS]
    cables, verts = [], []
    for label in chosen:
        skel = src.get(label)
        if skel is None or len(skel.vertices) == 0:
            continue
        cables.append(skel.cable_length() / 1000.0)
        verts.append(len(skel.vertices))
    fig, axes = _figure(2)
    _hist(axes[0], cables, "cable length per object (µm)", f"{len(labels)} skeletons, total {sum(cables):.1f} µm")
    _hist(axes[1], verts, "vertices per object", f"{len(verts)} read")
    _save_fig(fig, out)
    return {"labels": len(labels), "read": len(verts), "cable_um": float(sum(cables)), "vertices": int(sum(verts))}


MAX_CCL_VOXELS = 2**27  # component sizes are counted on at most this many voxels


def ccl_sizes_png(path: str, mip: int, out: str) -> dict:
    import fastremap

    vol = CloudVolume(path, mip=mip, fill_missing=True, progress=False)
    b = vol.meta.bounds(mip)
    size = b.size3()
    # a central box of at most MAX_CCL_VOXELS, whole z-slices kept when possible
    keep_z = max(1, min(int(size[2]), MAX_CCL_VOXELS // max(1, int(size[0] * size[1]))))
    side = [int(s) for s in size]
    while side[0] * side[1] * keep_z > MAX_CCL_VOXELS:
        side[0], side[1] = max(1, side[0] // 2), max(1, side[1] // 2)
    lo = b.minpt + (size - np.asarray([side[0], side[1], keep_z])) // 2
    box = Bbox(lo, lo + np.asarray([side[0], side[1], keep_z]))
    labels, counts = fastremap.unique(np.asarray(vol.download(box, mip=mip))[..., 0], return_counts=True)
    sizes = counts[labels != 0]
    fig, (ax,) = _figure()
    whole = box == b
    _hist(ax, sizes, f"voxels per component at mip {mip}",
          f"{len(sizes)} components" + ("" if whole else f" in the central {box.size3().tolist()} voxels"))
    _save_fig(fig, out)
    return {"components": int(len(sizes)), "largest": int(sizes.max()) if len(sizes) else 0, "whole": bool(whole)}


def voxel_counts_png(path: str, mip: int, out: str, top: int = 20) -> dict:
    from mapbuffer import IntMap

    vol = CloudVolume(path, mip=mip, progress=False)
    raw = storage.files(path).get(f"{vol.meta.key(mip)}/stats/voxel_counts.im")
    imap = IntMap(raw)
    # items(), not imap[k]: IntMap's lookup takes a signed index and fails on ids >= 2**63
    items = sorted(((int(k), int(v)) for k, v in imap.items()), key=lambda kv: -kv[1])
    shown = [kv for kv in items if kv[0] != 0][:top]
    fig, (ax,) = _figure()
    ax.barh([str(k) for k, _ in shown][::-1], [v for _, v in shown][::-1], color="tab:green")
    ax.set_xlabel(f"voxels at mip {mip}")
    ax.tick_params(axis="y", labelsize=7)
    ax.set_title(f"top {len(shown)} of {len(items)} labels by voxel count", fontsize=10)
    _save_fig(fig, out)
    return {"labels": len(items), "top": shown[:5]}


def draw(kind: str, args: dict, paths: dict, out: str) -> dict:
    if kind == "slice":
        return slice_png(paths[args["layer"]], args["mip"], out)
    if kind == "histograms":
        return histograms_png(paths[args["before"]], paths[args["after"]], args["mip"], out)
    if kind == "mesh_stats":
        return mesh_stats_png(paths[args["layer"]], out)
    if kind == "skeleton_stats":
        return skeleton_stats_png(paths[args["layer"]], out)
    if kind == "ccl_sizes":
        return ccl_sizes_png(paths[args["layer"]], args["mip"], out)
    if kind == "voxel_counts":
        return voxel_counts_png(paths[args["layer"]], args["mip"], out)
    raise ValueError(f"unknown figure kind {kind!r}")


# ---- tables ---------------------------------------------------------------------
CSS = ("body{font-family:sans-serif;font-size:13px}table{border-collapse:collapse;margin:6px 0}"
       "td,th{border:1px solid #ccc;padding:3px 6px;text-align:left;vertical-align:top}"
       "th{background:#eee}pre{background:#f6f6f6;padding:6px;white-space:pre-wrap;word-break:break-all}")


def _table(rows: list, head: list) -> str:
    cells = "".join(f"<th>{html.escape(str(h))}</th>" for h in head)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><tr>{cells}</tr>{body}</table>"


def step_times(run: str, step: str) -> dict:
    """Wall time and summed job time of a finished step, from its markers
    (a marker's mtime is when its job ended; its `seconds`, how long it ran)."""
    spans, job_seconds, jobs = [], 0.0, 0
    for path in [f"{run}/markers/{step}/setup.json", f"{run}/markers/{step}/done.json",
                 *glob(f"{run}/markers/{step}/jobs/*/*.json")]:
        if not os.path.exists(path):
            continue
        with open(path) as f:
            m = json.load(f)
        end = os.path.getmtime(path)
        secs = float(m.get("seconds", 0.0)) if "/jobs/" in path else 0.0
        spans.append((end - secs, end))
        if "/jobs/" in path:
            job_seconds += secs
            jobs += 1
    if not spans:
        return {"wall": None, "job_seconds": 0.0, "jobs": 0}
    return {"wall": max(e for _, e in spans) - min(s for s, _ in spans), "job_seconds": job_seconds, "jobs": jobs,
            "ended": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(max(e for _, e in spans)))}


def steps_html(spec: dict, out: str) -> None:
    rows, details = [], []
    for s in spec["steps"]:
        t = step_times(spec["run"], s["name"])
        wall = f"{t['wall']:.1f} s" if t["wall"] is not None else "-"
        stages = "<br>".join(html.escape(f"{st['name']}: {st['tasks']} tasks of {st['shape']} in {st['jobs']} jobs")
                             for st in s["stages"])
        rows.append([html.escape(s["name"]), html.escape(s["op"]), html.escape(", ".join(s["reads"])),
                     html.escape(", ".join(s["writes"])), stages, wall, f"{t['job_seconds']:.1f} s",
                     html.escape(t.get("ended", "-"))])
        params = [[html.escape(k), f"<code>{html.escape(json.dumps(v, default=str))}</code>"]
                  for k, v in sorted(s["params"].items())]
        details.append(f"<h3>{html.escape(s['name'])} ({html.escape(s['op'])})</h3>{_table(params, ['key', 'value'])}")
    head = ["step", "op", "reads", "writes", "stages", "wall time", "job time (sum)", "finished"]
    doc = (f"<html><head><meta charset='utf-8'><style>{CSS}</style></head><body>"
           f"<h2>Steps of {html.escape(spec['configfile'])}</h2>{_table(rows, head)}"
           "<p>Wall time: from the first job of the step starting to its last job ending. Job time: the sum of"
           " the wall times of its task jobs (each uses its step's <code>threads</code>).</p>"
           "<h2>Parameters (defaults filled in)</h2>" + "".join(details) + "</body></html>")
    _write_text(out, doc)


def layers_html(spec: dict, out: str) -> None:
    rows, infos, names = [], {}, []
    for name in spec["layers"]:
        path = spec["paths"][name]
        try:
            info = layers.read_info(name, path)
        except Exception:  # a layer a failed step never created: listed, not linked
            rows.append([html.escape(name), html.escape(path), "(no info file)", "", ""])
            continue
        infos[name] = info
        names.append(name)
        scales = "<br>".join(
            html.escape(f"mip {i}: {s['size']} @ {s['resolution']} nm, chunks {s['chunk_sizes'][0]}, {s['encoding']}"
                        + (", sharded" if "sharding" in s else ""))
            for i, s in enumerate(info["scales"]))
        extra = ", ".join(f"{k}: {info[k]}" for k in ("mesh", "skeletons") if k in info)
        rows.append([html.escape(name), html.escape(path), html.escape(f"{info['type']} {info['data_type']}"),
                     scales, html.escape(extra)])
    links = neuroglancer.layer_links({n: spec["paths"][n] for n in names},
                                     {n: infos[n]["type"] for n in names}, infos)
    link_rows = [[html.escape(n), html.escape(src), f"<a href='{html.escape(u)}' target='_blank'>open</a>"]
                 for n, src, u in links]
    together = neuroglancer.state([(n, s, infos[n]["type"]) for n, s, _ in links], infos)
    serve = ""
    if any(neuroglancer.local_dir(spec["paths"][n]) for n in names):
        serve = ("<p>Local (file://) layers are read by Neuroglancer through a small CORS server:"
                 f" run <code>magma serve --configfile {html.escape(spec['configfile'])}</code> (port"
                 f" {neuroglancer.DEFAULT_PORT}) from the project directory, then open the links.</p>")
    doc = (f"<html><head><meta charset='utf-8'><style>{CSS}</style></head><body>"
           f"<h2>Layers</h2>{_table(rows, ['layer', 'path', 'type', 'scales', 'meshes / skeletons'])}"
           f"<h2>Neuroglancer</h2>{serve}{_table(link_rows, ['layer', 'source', 'link'])}"
           f"<p><a href='{html.escape(neuroglancer.url(together))}' target='_blank'>all layers in one view</a></p>"
           f"<h3>JSON state (paste into Neuroglancer)</h3><pre>{html.escape(json.dumps(together, indent=1))}</pre>"
           "</body></html>")
    _write_text(out, doc)


def _write_text(out: str, text: str) -> None:
    tmp = f"{out}.tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, out)


# ---- the report jobs ----------------------------------------------------------
def targets(plan, run: str) -> list:
    """What `rule all` adds for the report: a picture folder per step that has
    pictures, and the two tables. Nothing when execution.report is off."""
    if not plan.config["execution"]["report"]:
        return []
    dirs = [f"{run}/report/{name}" for name, sp in plan.steps.items() if figures(sp)]
    return dirs + [f"{run}/report/steps.html", f"{run}/report/layers.html"]


def figures_spec(plan, step: str) -> dict:
    return {"kind": "figures", "paths": plan.paths, "figures": figures(plan.steps[step])}


def tables_spec(plan, run: str, configfile) -> dict:
    steps, written = [], []
    for sp in plan.steps.values():
        steps.append({
            "name": sp.name, "op": sp.op, "reads": list(sp.sources), "writes": list(sp.writes),
            "params": {k: v for k, v in sp.params.items() if k != "op"},
            "stages": [{"name": st.name, "tasks": st.grid.n, "shape": "x".join(map(str, st.grid.shape)),
                        "jobs": st.jobs} for st in sp.stages],
        })
        written += [layer for layer in sp.writes if layer not in written]
    return {"kind": "tables", "run": run, "configfile": str(configfile), "steps": steps,
            "layers": written, "paths": plan.paths}


def run_figures(spec: dict, outdir: str) -> dict:
    os.makedirs(outdir, exist_ok=True)
    notes = {}
    for name, kind, args in spec["figures"]:
        notes[name] = draw(kind, args, spec["paths"], os.path.join(outdir, name))
    return notes


def main(smk) -> None:
    """Draw a step's pictures or write the tables: `smk` is a magma.jobs.JobArgs."""
    spec = smk.params.spec
    if spec["kind"] == "figures":
        run_figures(spec, smk.output[0])
    else:
        steps_html(spec, smk.output[0])
        layers_html(spec, smk.output[1])
