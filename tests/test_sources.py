"""formats/sources.py: ranged reads of local files, of fsspec's memory filesystem and of a loopback HTTP
server (written here, with Range support, logging what it sends), checked against slices of the bytes."""
from __future__ import annotations

import http.server
import os
import pickle
import re
import sys
import threading
import time
import uuid

import numpy as np
import pytest

from tallzip.formats.checkpoints import sources
from tallzip.formats.errors import FormatError
from tallzip.errors import MissingExtraError
from tallzip.formats.checkpoints.sources import LocalSource, is_url, list_folder, open_source, require_local_output

RANGES = [(0, 1), (0, 0), (17, 1000), (4095, 2), (5000, 1), (0, 5001), (1234, 3767)]


def random_bytes(n, seed=0):
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8).tobytes()


@pytest.fixture
def data():
    return random_bytes(5001)


# --- local files --------------------------------------------------------------------------------

def test_local_pread_returns_the_slices(tmp_path, data):
    path = tmp_path / "blob.bin"
    path.write_bytes(data)
    with open_source(path) as src:
        assert isinstance(src, LocalSource) and src.size == len(data) and src.name == str(path)
        for offset, length in RANGES:
            assert src.pread(offset, length) == data[offset:offset + length]
        assert src.bytes_read == sum(length for _, length in RANGES)
    with open_source(f"file://{path}") as src:  # file:// is a local path, not a URL
        assert isinstance(src, LocalSource) and src.pread(10, 5) == data[10:15]


def test_local_pread_loops_past_the_per_call_cap(tmp_path, data, monkeypatch):
    path = tmp_path / "blob.bin"
    path.write_bytes(data)
    calls = []
    real_pread = os.pread

    def counting_pread(fd, n, offset):
        calls.append(n)
        return real_pread(fd, n, offset)

    monkeypatch.setattr(sources, "MAX_PREAD_BYTES", 1000)
    monkeypatch.setattr(sources.os, "pread", counting_pread)
    with open_source(path) as src:
        assert src.pread(3, 4500) == data[3:4503]
    assert calls == [1000, 1000, 1000, 1000, 500]


@pytest.mark.parametrize("offset,length", [(4990, 12), (5001, 1), (-1, 2), (0, -1), (10**12, 1)])
def test_local_range_outside_the_file_is_refused(tmp_path, data, offset, length):
    path = tmp_path / "blob.bin"
    path.write_bytes(data)
    with open_source(path) as src, pytest.raises(FormatError, match=re.escape(str(path))):
        src.pread(offset, length)


def test_local_file_that_shrinks_is_a_short_read(tmp_path, data):
    path = tmp_path / "blob.bin"
    path.write_bytes(data)
    with open_source(path) as src:
        os.truncate(path, 100)
        with pytest.raises(FormatError, match="short read"):
            src.pread(50, 200)


def test_local_missing_or_folder_is_refused(tmp_path):
    with pytest.raises(FormatError, match="no such file"):
        open_source(tmp_path / "nope.bin")
    with pytest.raises(FormatError, match="folder"):
        open_source(tmp_path)


def test_local_source_pickles_by_path(tmp_path, data):
    path = tmp_path / "blob.bin"
    path.write_bytes(data)
    with open_source(path) as src:
        copy = pickle.loads(pickle.dumps(src))
    assert copy.size == len(data) and copy.pread(100, 50) == data[100:150]
    copy.close()


def test_url_detection_and_local_outputs(tmp_path):
    assert is_url("s3://bucket/key") and is_url("https://host/a.tallz") and is_url("memory://x")
    assert not is_url("model.safetensors") and not is_url("C:\\models\\a.pt") and not is_url("file:///tmp/a")
    assert not is_url(tmp_path)
    assert require_local_output(tmp_path / "out.tallz") == tmp_path / "out.tallz"
    with pytest.raises(FormatError, match="local paths only"):
        require_local_output("s3://bucket/out.tallz")


def test_local_listing(tmp_path, data):
    (tmp_path / "b.safetensors").write_bytes(data[:10])
    (tmp_path / "a.safetensors").write_bytes(data[:20])
    (tmp_path / "sub").mkdir()
    got = [(e.name, e.is_dir, e.size) for e in list_folder(tmp_path)]
    assert got == [("a.safetensors", False, 20), ("b.safetensors", False, 10), ("sub", True, None)]
    with pytest.raises(FormatError, match="not a folder"):
        list_folder(tmp_path / "a.safetensors")


def test_url_without_fsspec_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "fsspec", None)  # import fsspec now fails as if not installed
    with pytest.raises(MissingExtraError, match=re.escape("pip install 'tallzip[remote]'")):
        open_source("https://example.invalid/family.tallz")
    with pytest.raises(MissingExtraError, match=re.escape("tallzip[remote]")):
        list_folder("s3://bucket/finetuned")


# --- fsspec's memory filesystem -------------------------------------------------------------------

@pytest.fixture
def memory_folder():
    fsspec = pytest.importorskip("fsspec", reason="fsspec not installed (pip install 'tallzip[remote]')")
    fs = fsspec.filesystem("memory")
    root = f"/tallzip-test-{uuid.uuid4().hex}"
    yield fs, root
    if fs.exists(root):
        fs.rm(root, recursive=True)


def test_memory_pread_returns_the_slices_and_counts_them(memory_folder, data):
    fs, root = memory_folder
    fs.pipe(f"{root}/blob.bin", data)
    with open_source(f"memory://{root}/blob.bin") as src:
        assert src.size == len(data)
        for offset, length in RANGES:
            assert src.pread(offset, length) == data[offset:offset + length]
        assert src.bytes_read == sum(length for _, length in RANGES)
        assert src.requests == sum(1 for _, length in RANGES if length)  # an empty range asks nothing
        with pytest.raises(FormatError, match="past the end"):
            src.pread(4990, 12)
        assert src.bytes_read == sum(length for _, length in RANGES)  # a refused range reads nothing


def test_memory_missing_file_and_unknown_scheme_are_refused(memory_folder):
    _, root = memory_folder
    with pytest.raises(FormatError, match="not found"):
        open_source(f"memory://{root}/nope.bin")
    with pytest.raises(FormatError, match="nosuchscheme"):
        open_source("nosuchscheme://bucket/key")


def test_memory_listing_gives_openable_locations(memory_folder, data):
    fs, root = memory_folder
    fs.pipe(f"{root}/fam/task_b.safetensors", data[:30])
    fs.pipe(f"{root}/fam/task_a.safetensors", data[:40])
    fs.pipe(f"{root}/fam/sharded/model-00001-of-00002.safetensors", data[:5])
    entries = list_folder(f"memory://{root}/fam")
    assert [(e.name, e.is_dir, e.size) for e in entries] == [
        ("sharded", True, None), ("task_a.safetensors", False, 40), ("task_b.safetensors", False, 30)]
    with open_source(entries[1].location) as src:
        assert src.pread(0, 40) == data[:40]
    assert [e.name for e in list_folder(entries[0].location)] == ["model-00001-of-00002.safetensors"]
    with pytest.raises(FormatError, match="not a folder"):
        list_folder(entries[1].location)


# --- a loopback HTTP server with Range support ------------------------------------------------------

class RangeHandler(http.server.BaseHTTPRequestHandler):
    """Serves server.files; honours 'Range: bytes=a-b' (mode "honest"), ignores it ("ignore-range") or sends
    one byte less than asked ("short"). Logs (method, path, range, body bytes sent) in server.log."""

    def _send(self, with_body):
        data = self.server.files.get(self.path)
        if data is None:
            self.send_error(404)
            self.server.log.append((self.command, self.path, None, 0))
            return
        wanted = self.headers.get("Range")
        status, body = 200, data
        match = re.fullmatch(r"bytes=(\d+)-(\d+)", wanted or "")
        if match and self.server.mode != "ignore-range":
            start, end = int(match[1]), int(match[2])
            status, body = 206, data[start:end + 1]
            if self.server.mode == "short":
                body = body[:-1]
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Accept-Ranges", "bytes")
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{start + len(body) - 1}/{len(data)}")
        self.end_headers()
        sent = 0
        if with_body:
            self.wfile.write(body)
            sent = len(body)
        self.server.log.append((self.command, self.path, wanted, sent))

    def do_GET(self):
        self._send(True)

    def do_HEAD(self):
        self._send(False)

    def log_message(self, *args):  # keep the test output quiet
        pass


@pytest.fixture
def http_server(data):
    pytest.importorskip("fsspec", reason="fsspec not installed (pip install 'tallzip[remote]')")
    pytest.importorskip("aiohttp", reason="fsspec's HTTP backend needs aiohttp (pip install 'tallzip[remote]')")
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), RangeHandler)
    server.files = {"/family.tallz": data}
    server.log = []
    server.mode = "honest"
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield server, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()
    thread.join()


def _settled(log, until=None, timeout=5.0):
    """Wait until the server's log stops growing (and `until(log)` holds): its handler thread appends
    an entry only after the body is sent, so the client can be done before the entry is there."""
    deadline, size = time.monotonic() + timeout, -1
    while time.monotonic() < deadline:
        if len(log) == size and (until is None or until(log)):
            return
        size = len(log)
        time.sleep(0.1)


def test_http_pread_reads_only_the_asked_bytes(http_server, data):
    server, base = http_server
    expected_gets = sum(1 for _, length in RANGES if length)
    with open_source(f"{base}/family.tallz") as src:
        assert src.size == len(data)
        _settled(server.log)  # the handler logs after sending: let the size request's entry land
        server.log.clear()
        for offset, length in RANGES:
            assert src.pread(offset, length) == data[offset:offset + length]
    asked = sum(length for _, length in RANGES)
    _settled(server.log, until=lambda log: sum(e[0] == "GET" for e in log) >= expected_gets)
    gets = [entry for entry in server.log if entry[0] == "GET"]
    assert sum(entry[3] for entry in server.log) == asked  # what the server sent, counted on its side
    assert len(gets) == expected_gets
    assert all(entry[2] is not None for entry in gets)  # every GET was a range request
    assert src.bytes_read == asked


def test_http_source_reopens_after_pickling(http_server, data):
    _, base = http_server
    with open_source(f"{base}/family.tallz") as src:
        copy = pickle.loads(pickle.dumps(src))
    assert copy.pread(4000, 1001) == data[4000:5001]


@pytest.mark.parametrize("mode", ["ignore-range", "short"])
def test_http_wrong_answer_to_a_range_is_an_error(http_server, mode):
    server, base = http_server
    url = f"{base}/family.tallz"
    with open_source(url) as src:
        server.mode = mode
        with pytest.raises(FormatError, match=re.escape(url) + r".*asked for 100 bytes at 10, got"):
            src.pread(10, 100)


def test_http_missing_file_is_refused(http_server):
    _, base = http_server
    with pytest.raises(FormatError, match=re.escape(f"{base}/nope.tallz") + ".*not found"):
        open_source(f"{base}/nope.tallz")
