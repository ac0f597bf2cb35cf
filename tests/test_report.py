"""The report: pictures drawn at the end of a run, `snakemake --report`, Neuroglancer
links, and the `magma serve` file server."""
import gzip
import json
import threading
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import read, snakemake, write_config
from magma import neuroglancer, report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def demo_config(workdir: Path, **execution) -> Path:
    return write_config(workdir / "small.yaml", {
        "layers": {"image": "file://data/image", "seg": "file://data/seg", "copy": "file://data/copy",
                   "image_eq": "file://data/image_eq", "cc": "file://data/cc"},
        "demo": {"image": "image", "segmentation": "seg", "size": [192, 160, 32], "chunk_size": [32, 32, 16],
                 "objects": 12},
        "steps": {
            "image_pyramid": {"op": "downsample", "layer": "image", "num_mips": 3},
            "seg_copy": {"op": "transfer", "src": "seg", "dest": "copy", "chunk_size": [64, 64, 16],
                         "sharded": True},
            "normalized": {"op": "contrast", "src": "image", "dest": "image_eq", "mip": 1, "shape": [96, 80, 16]},
            "meshes": {"op": "mesh", "layer": "seg", "shape": [96, 80, 32]},
            "components": {"op": "ccl", "src": "seg", "dest": "cc", "shape": [96, 96, 32]},
            "counts": {"op": "voxel_counts", "layer": "seg"},
        },
        "execution": {"threads": 2, "tasks_per_job": 4, **execution},
    })


def check_png(path: Path, size: tuple) -> Image.Image:
    assert path.read_bytes()[:8] == PNG_MAGIC, path
    with Image.open(path) as img:
        img.verify()  # checksums and structure
    img = Image.open(path)
    assert img.size == size, (path, img.size, size)
    return img


def test_report_pictures_tables_and_html(workdir):
    cfg = demo_config(workdir)
    proc = snakemake(workdir, cfg)
    out = proc.stdout + proc.stderr
    # the end of the run prints a Neuroglancer link per layer and how to serve local ones
    assert "Neuroglancer" in out and "magma serve --configfile" in out
    assert "precomputed%3A%2F%2Fhttp%3A%2F%2Flocalhost%3A8080%2Fcopy" in out

    rep = workdir / "results" / "small" / "report"
    image_info = json.loads((workdir / "data" / "image" / "info").read_text())
    assert len(image_info["scales"]) == 4
    for mip in range(4):  # a slice at every mip of the pyramid, at the expected size
        png = rep / "image_pyramid" / f"image.mip{mip}.png"
        img = check_png(png, report.slice_size(image_info, mip))
        assert img.mode == "L"
    # mip 0 is the middle z-slice itself (rows = y), enlarged 2x (192 px -> 384 >= 512/2)
    img = np.asarray(Image.open(rep / "image_pyramid" / "image.mip0.png"))
    data = read("file://" + str(workdir / "data" / "image"))
    assert report.slice_size(image_info, 0) == (384, 320)
    assert np.array_equal(img[::2, ::2], data[:, :, 16].T)

    # segmentation slices: RGB, one colour per label, the same label the same colour at every mip
    copy_info = json.loads((workdir / "data" / "copy" / "info").read_text())
    seg0 = check_png(rep / "seg_copy" / "copy.mip0.png", report.slice_size(copy_info, 0))
    assert seg0.mode == "RGB"
    seg = read("file://" + str(workdir / "data" / "copy"))[:, :, 16].T
    px = np.asarray(seg0)[::2, ::2]
    for label in np.unique(seg)[:5]:
        colours = np.unique(px[seg == label].reshape(-1, 3), axis=0)
        assert len(colours) == 1 and (label != 0 or not colours.any())
    assert sorted(p.name for p in (rep / "demo").glob("*.png")) == ["image.mip0.png", "seg.mip0.png"]

    # contrast: histograms before/after, and slices of the new layer from its mip up
    check_png(rep / "normalized" / "image_eq.histograms.png", report.PLOT_SIZE)
    assert sorted(p.name for p in (rep / "normalized").glob("*.mip*.png"))[0] == "image_eq.mip1.png"

    # statistics of the mesh, ccl and voxel_counts steps, read back from what they stored
    seg = read("file://" + str(workdir / "data" / "seg"))
    for picture in ("meshes/seg.meshes.png", "components/cc.component-sizes.png", "counts/seg.top-labels.png"):
        check_png(rep / picture, report.PLOT_SIZE)
    assert report.mesh_stats_png(f"file://{workdir}/data/seg", str(workdir / "m.png"))["labels"] == \
        len(np.unique(seg)) - 1
    assert sorted(p.name for p in (rep / "components").glob("*.png"))[0] == "cc.component-sizes.png"

    steps = (rep / "steps.html").read_text()
    for name in ("demo", "image_pyramid", "seg_copy", "mip0-3", "memory_target", "wall time"):
        assert name in steps
    layers_page = (rep / "layers.html").read_text()
    assert "precomputed://http://localhost:8080/image" in layers_page and "magma serve" in layers_page

    # `magma serve`'s server: CloudVolume reads the chunked (gzip) and sharded layers over HTTP
    srv = neuroglancer.make_server({n: str(workdir / "data" / n) for n in ("image", "copy")}, port=0)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        base = f"http://127.0.0.1:{srv.server_address[1]}"
        assert np.array_equal(read(f"{base}/image", 1), read("file://" + str(workdir / "data" / "image"), 1))
        assert np.array_equal(read(f"{base}/copy"), read("file://" + str(workdir / "data" / "seg")))
    finally:
        srv.shutdown()
        srv.server_close()

    # the Snakemake report embeds every picture and both tables
    snakemake(workdir, cfg, "--report", "report.html")
    html = (workdir / "report.html").read_text()
    for name in ("image.mip3.png", "copy.mip0.png", "steps.html", "layers.html", "image_pyramid", "seg_copy"):
        assert name in html, name


def test_report_can_be_turned_off(workdir):
    cfg = demo_config(workdir, report=False)
    proc = snakemake(workdir, cfg, "-n")
    assert "report_figures" not in proc.stdout
    assert not (workdir / "results" / "small" / "report").exists()


def test_plots_have_the_fixed_size(tmp_path):
    # statistics plots: matplotlib at PLOT_SIZE whatever the data
    fig, axes = report._figure(2)
    report._hist(axes[0], [1, 10, 1000, 5], "x", "t")
    report._hist(axes[1], [], "x", "empty")
    out = tmp_path / "p.png"
    report._save_fig(fig, str(out))
    check_png(out, report.PLOT_SIZE)


def test_neuroglancer_sources_and_state():
    assert neuroglancer.source_url("gs://bucket/em/image") == "precomputed://gs://bucket/em/image"
    assert neuroglancer.source_url("s3://b/seg/") == "precomputed://s3://b/seg"
    assert neuroglancer.source_url("https://h/x") == "precomputed://https://h/x"
    assert neuroglancer.source_url("file:///d/seg", 9000, "seg") == "precomputed://http://localhost:9000/seg"
    assert neuroglancer.source_url("mem://x") is None
    info = {"type": "segmentation", "scales": [{"resolution": [4, 4, 40], "voxel_offset": [10, 0, 0],
                                                "size": [100, 50, 20]}]}
    st = neuroglancer.state([("seg", "precomputed://gs://b/seg", "segmentation")], {"seg": info})
    assert st["layers"] == [{"type": "segmentation", "source": "precomputed://gs://b/seg", "name": "seg"}]
    assert st["position"] == [60.0, 25.0, 10.0] and st["dimensions"]["z"] == [40e-9, "m"]
    link = neuroglancer.url(st)
    assert link.startswith(neuroglancer.NEUROGLANCER + "#!")
    assert json.loads(urllib.request.unquote(link.split("#!", 1)[1])) == st


@pytest.fixture
def server(tmp_path):
    layer = tmp_path / "layer"
    (layer / "8_8_40").mkdir(parents=True)
    (layer / "info").write_text('{"type": "image"}')
    (layer / "8_8_40" / "0-64_0-64_0-64.gz").write_bytes(gzip.compress(b"chunk bytes"))
    (layer / "8_8_40" / "0.shard").write_bytes(bytes(range(100)))
    (tmp_path / "secret").write_text("outside")
    srv = neuroglancer.make_server({"layer": str(layer)}, port=0)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()
    srv.server_close()


def fetch(url, **headers):
    req = urllib.request.Request(url, headers=headers)
    try:
        with urllib.request.urlopen(req) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), b""


def test_serve_cors_compression_and_ranges(server):
    status, headers, body = fetch(f"{server}/layer/info")
    assert status == 200 and headers["Access-Control-Allow-Origin"] == "*" and body == b'{"type": "image"}'
    # a chunk stored as <name>.gz is served under <name> with Content-Encoding (the browser inflates it)
    status, headers, body = fetch(f"{server}/layer/8_8_40/0-64_0-64_0-64")
    assert status == 200 and headers["Content-Encoding"] == "gzip" and gzip.decompress(body) == b"chunk bytes"
    # shards are read by byte range
    status, headers, body = fetch(f"{server}/layer/8_8_40/0.shard", Range="bytes=10-19")
    assert status == 206 and body == bytes(range(10, 20)) and headers["Content-Range"] == "bytes 10-19/100"
    status, _, body = fetch(f"{server}/layer/8_8_40/0.shard", Range="bytes=-5")
    assert status == 206 and body == bytes(range(95, 100))
    assert fetch(f"{server}/layer/8_8_40/0.shard", Range="bytes=200-")[0] == 416
    # nothing outside the layer directories
    assert fetch(f"{server}/layer/../secret")[0] == 404
    assert fetch(f"{server}/layer/%2e%2e/secret")[0] == 404
    assert fetch(f"{server}/other/info")[0] == 404


def test_statistics_pictures_read_what_was_stored(tmp_path):
    """Mesh, skeleton, component-size and voxel-count pictures from objects stored
    through CloudVolume (legacy meshes, precomputed skeletons, an IntMap)."""
    from cloudfiles import CloudFiles
    from cloudvolume import CloudVolume, Mesh, Skeleton
    from mapbuffer import IntMap

    path = f"file://{tmp_path}/seg"
    info = CloudVolume.create_new_info(1, "segmentation", "uint64", "raw", [8, 8, 40], [0, 0, 0], [64, 48, 16],
                                       chunk_size=[32, 32, 16])
    info["mesh"], info["skeletons"] = "mesh", "skeletons"
    vol = CloudVolume(path, info=info, progress=False)
    vol.commit_info()
    labels = np.zeros((64, 48, 16), dtype=np.uint64)
    labels[:10], labels[20:50, :30], labels[55:] = 3, 2**60 + 1, 9
    vol[:, :, :] = labels
    tri = np.array([[0, 0, 0], [1000, 0, 0], [0, 1000, 0]], dtype=np.float32)  # 0.5 um^2
    vol.mesh.put([Mesh(tri, np.array([[0, 1, 2]], dtype=np.uint32), None, segid=s) for s in (3, 9)])
    vol.skeleton.upload(Skeleton([[0, 0, 0], [3000, 0, 0], [3000, 4000, 0]], [[0, 1], [1, 2]], segid=3))
    counts = dict(zip(*np.unique(labels, return_counts=True)))
    CloudFiles(path).put(f"{vol.meta.key(0)}/stats/voxel_counts.im",
                         IntMap({int(k): int(v) for k, v in counts.items()}).tobytes())

    out = tmp_path / "p.png"
    assert report.mesh_stats_png(path, str(out)) == {"labels": 2, "read": 2, "triangles": 2, "area_um2": 1.0}
    check_png(out, report.PLOT_SIZE)
    stats = report.skeleton_stats_png(path, str(out))
    assert stats["labels"] == 1 and stats["cable_um"] == pytest.approx(7.0) and stats["vertices"] == 3
    check_png(out, report.PLOT_SIZE)
    stats = report.ccl_sizes_png(path, 0, str(out))
    assert stats == {"components": 3, "largest": 30 * 30 * 16, "whole": True}
    check_png(out, report.PLOT_SIZE)
    stats = report.voxel_counts_png(path, 0, str(out))
    assert stats["labels"] == 4 and stats["top"][0] == (2**60 + 1, 30 * 30 * 16)
    check_png(out, report.PLOT_SIZE)


def test_magma_serve_command(tmp_path):
    """`magma serve` serves a config's local layers and prints their links."""
    import re
    import subprocess
    import sys

    from conftest import image_data, make_layer

    make_layer(tmp_path / "em", image_data((64, 64, 16)), "image", chunk=(32, 32, 16))
    cfg = write_config(tmp_path / "c.yaml", {"layers": {"em": f"file://{tmp_path}/em", "gone": "gs://b/x"},
                                             "steps": {}})
    proc = subprocess.Popen([sys.executable, "-m", "magma.cli", "serve", "--configfile", str(cfg), "--port", "0"],
                            stdout=subprocess.PIPE, text=True)
    try:
        lines = [proc.stdout.readline() for _ in range(4)]
        text = "".join(lines)
        assert "Neuroglancer" in text and "localhost%3A0" not in text
        port = int(re.search(r"http://127\.0\.0\.1:(\d+)/<layer>/", text).group(1))
        assert f"localhost%3A{port}%2Fem" in text  # the links point at this server
        status, headers, body = fetch(f"http://127.0.0.1:{port}/em/info")
        assert status == 200 and json.loads(body)["type"] == "image"
        assert headers["Access-Control-Allow-Origin"] == "*"
    finally:
        proc.terminate()
        proc.wait(timeout=10)
