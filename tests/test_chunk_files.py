"""Reading one channel of a raw layer from the chunk files equals CloudVolume's download
of that channel: gzip and uncompressed files, boxes that cut chunks, edge chunks, missing
chunks (an error naming the chunk, or zeros with fill_missing)."""
import numpy as np
import pytest
from cloudvolume import Bbox, CloudVolume

from conftest import make_layer
from magma import chunk_files
from magma.errors import MagmaError


@pytest.fixture(scope="module", params=["gzip", "none"])
def layer(request, tmp_path_factory):
    root = tmp_path_factory.mktemp("chunks")
    data = np.random.default_rng(3).random((70, 50, 21, 3), dtype=np.float32)
    url = make_layer(root / "aff", data, "image", chunk=(32, 32, 8), offset=(5, 0, 3))
    if request.param == "none":
        vol = CloudVolume(url, progress=False, compress=False)
        vol[vol.bounds] = data  # rewritten uncompressed
        for f in (root / "aff" / "8_8_40").glob("*.gz"):
            f.unlink()
    return url, data, root


@pytest.mark.parametrize("box", [((5, 0, 3), (75, 50, 24)), ((17, 9, 4), (60, 41, 20)), ((36, 31, 10), (38, 33, 12))])
@pytest.mark.parametrize("channel", [0, 2])
def test_a_channel_equals_cloudvolume(layer, box, channel):
    url, data, _ = layer
    vol = CloudVolume(url, progress=False)
    got = chunk_files.read_channel(url, vol.meta, 0, Bbox(*box), channel)
    want = vol.download(Bbox(*box))[..., channel]
    assert got.dtype == np.float32 and got.flags.f_contiguous
    np.testing.assert_array_equal(got, want)


def test_a_missing_chunk_is_named_or_zero(tmp_path):
    data = np.random.default_rng(4).random((64, 64, 8, 2), dtype=np.float32)
    url = make_layer(tmp_path / "a", data, "image", chunk=(32, 32, 8))
    (tmp_path / "a" / "8_8_40" / "32-64_0-32_0-8.gz").unlink()
    vol = CloudVolume(url, progress=False)
    with pytest.raises(MagmaError, match="32-64_0-32_0-8"):
        chunk_files.read_channel(url, vol.meta, 0, vol.bounds)
    got = chunk_files.read_channel(url, vol.meta, 0, vol.bounds, fill_missing=True)
    want = data[..., 0].copy()
    want[32:64, 0:32] = 0
    np.testing.assert_array_equal(got, want)


def test_a_short_prefix_is_read_again_whole(layer, monkeypatch):
    """Only the start of each file is read; if that start ever holds too little (a codec
    that expands more than deflate), the chunk is read whole instead."""
    url, data, _ = layer
    vol = CloudVolume(url, progress=False)
    monkeypatch.setattr(chunk_files, "prefix_budget", lambda n: 100)
    got = chunk_files.read_channel(url, vol.meta, 0, vol.bounds, 1)
    np.testing.assert_array_equal(got, data[..., 1])


def test_files_arriving_in_any_order(layer, monkeypatch):
    """CloudFiles returns files as its threads finish (on S3, in any order): every chunk
    still lands at its own place."""
    from cloudfiles import CloudFiles

    url, data, _ = layer
    vol = CloudVolume(url, progress=False)
    get = CloudFiles.get
    monkeypatch.setattr(CloudFiles, "get", lambda self, *a, **k: list(reversed(list(get(self, *a, **k)))))
    np.testing.assert_array_equal(chunk_files.read_channel(url, vol.meta, 0, vol.bounds, 2), data[..., 2])
    for chunk, image in chunk_files.read_chunks(url, vol.meta, 0, vol.bounds):
        lo, hi = chunk.minpt - vol.bounds.minpt, chunk.maxpt - vol.bounds.minpt
        np.testing.assert_array_equal(image, data[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]])


def test_local_files_are_read_and_written_without_a_thread_pool(tmp_path, monkeypatch):
    """storage.files on file:// does many-file reads and writes in the calling thread:
    cloud-files' pool polls for completion every 0.1 s, which a local disk never needs."""
    import threading

    from cloudfiles import CloudFiles

    from magma import storage

    started = []
    start = threading.Thread.start

    def counted(thread):  # tqdm's progress monitor is not a worker
        if type(thread).__name__ != "TMonitor":
            started.append(thread)
        return start(thread)

    monkeypatch.setattr(threading.Thread, "start", counted)
    names = [f"f{i}" for i in range(20)]
    cf = storage.files(f"file://{tmp_path}")
    cf.puts([(n, n.encode()) for n in names], compress=None)
    assert [f["content"] for f in chunk_files.fetch(cf, names)] == [n.encode() for n in names]
    assert started == []
    CloudFiles(f"file://{tmp_path}").get(names)  # cloud-files' default: a thread pool
    assert started
