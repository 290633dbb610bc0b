"""Inputs and archives by URL (issue 14): pack from fsspec's memory filesystem gives the same coded sections
as the local pack; `tallzip.open(url)` and `tallzip extract URL` over a loopback HTTP server with Range support
fetch only the header, the manifest, and the base, mtv, mask and own sections that task needs (counted on the
server's side), and the tensors extracted equal the local extract's."""
from __future__ import annotations

import http.server
import struct
import sys
import threading
import uuid
from pathlib import Path

import pytest
from click.testing import CliRunner
from safetensors.numpy import load_file

import tallzip
from tallzip.cli.main import cli
from tallzip.demo import make_family
from tallzip.formats.container.constants import HEADER_SIZE, HEADER_STRUCT
from tallzip.formats.container.reader import ArchiveReader
from tallzip.errors import MissingExtraError

from test_sources import RangeHandler  # tests/ is on sys.path (rootdir conftest)

fsspec = pytest.importorskip("fsspec", reason="fsspec not installed (pip install 'tallzip[remote]')")

OPTIONS = dict(chunk_elements=1024, device="cpu")
TINY_LLM = dict(vocab=96, hidden=32, layers=2, mlp=48, heads=4, kv_heads=2, attention=True, tie=False)


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    folder = tmp_path_factory.mktemp("vit")
    base, tasks = make_family(folder, n_tasks=3, width=32, layers=1, frozen_width=16)
    archive = folder / "family.tallz"
    tallzip.pack(tasks, base, archive, **OPTIONS)
    return base, tasks, archive


@pytest.fixture
def memory_root():
    fs = fsspec.filesystem("memory")
    root = f"/tallzip-remote-{uuid.uuid4().hex}"
    yield fs, root
    if fs.exists(root):
        fs.rm(root, recursive=True)


def _upload(fs, local: Path, remote: str):
    for path in sorted(local.rglob("*")):
        if path.is_file():
            fs.pipe(f"{remote}/{path.relative_to(local).as_posix()}", path.read_bytes())


def _sections_blob(path) -> bytes:
    """The archive's coded chunks (everything between the header and the manifest)."""
    data = Path(path).read_bytes()
    offset = struct.unpack(HEADER_STRUCT, data[:HEADER_SIZE])[3]
    return data[HEADER_SIZE:offset]


def test_pack_from_memory_urls_codes_the_same_sections(family, memory_root, tmp_path):
    base, tasks, archive = family
    fs, root = memory_root
    _upload(fs, tasks, f"{root}/finetuned")
    fs.pipe(f"{root}/base.safetensors", base.read_bytes())
    out = tmp_path / "remote.tallz"
    result = CliRunner().invoke(cli, ["pack", f"memory://{root}/finetuned", "--base", f"memory://{root}/base.safetensors",
                                      "-o", str(out), "--chunk-elements", "1024", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert _sections_blob(out) == _sections_blob(archive)
    with tallzip.open(out) as remote_arc, tallzip.open(archive) as local_arc:
        assert remote_arc.tasks == local_arc.tasks
        assert remote_arc.reader.manifest["base"]["source"] == f"memory://{root}/base.safetensors"


def test_pack_from_a_sharded_memory_family_with_side_files(memory_root, tmp_path):
    from benchmarks.fixtures import generate
    fs, root = memory_root
    local = tmp_path / "llm"
    generate(local, TINY_LLM, n_tasks=2, dtype="bf16", threads=1, shard_bytes=16 << 10, log=lambda *a, **k: None)
    _upload(fs, local, f"{root}/llm")
    here, there = tmp_path / "local.tallz", tmp_path / "remote.tallz"
    tallzip.pack(local / "tasks", local / "base", here, **OPTIONS)
    tallzip.pack(f"memory://{root}/llm/tasks", f"memory://{root}/llm/base", there, **OPTIONS)
    assert _sections_blob(here) == _sections_blob(there)  # shards, config.json and tokenizer.json alike
    with tallzip.open(there) as arc:
        entry = arc.reader.manifest["tasks"][0]
        assert entry["layout"] == "folder" and "config.json" in entry["files"] and entry["sharding"]


def test_missing_remote_input_is_one_line(memory_root, tmp_path):
    _, root = memory_root
    result = CliRunner().invoke(cli, ["pack", f"memory://{root}/nope", "--base", f"memory://{root}/base.safetensors",
                                      "-o", str(tmp_path / "x.tallz")])
    assert result.exit_code != 0 and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1 and "memory://" in result.output
    assert not (tmp_path / "x.tallz").exists()


@pytest.fixture
def http_archive(family):
    pytest.importorskip("aiohttp", reason="fsspec's HTTP backend needs aiohttp (pip install 'tallzip[remote]')")
    _, _, archive = family
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), RangeHandler)
    server.files = {"/family.tallz": archive.read_bytes()}
    server.log = []
    server.mode = "honest"
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield server, f"http://127.0.0.1:{server.server_address[1]}/family.tallz"
    server.shutdown()
    server.server_close()
    thread.join()


def _needed_bytes(archive: Path, task: str) -> int:
    """What extracting `task` must read, from the local archive's own tables: header, manifest, and every
    chunk of the base, mtv, this task's mask and own sections (of this task's side files too)."""
    reader = ArchiveReader(archive)
    total = HEADER_SIZE + (reader.size - reader._data_end)
    for entry in reader.manifest["sections"]:
        if entry["role"] in ("base", "mtv") or entry["task"] == task:
            total += sum(chunk.length for chunk in reader.chunks(entry))
    reader.close()
    return total


def test_extract_over_http_reads_only_what_the_task_needs(family, http_archive, tmp_path):
    _, _, archive = family
    server, url = http_archive
    task = "task01"
    local_out, remote_out = tmp_path / "local.safetensors", tmp_path / "remote.safetensors"
    with tallzip.open(archive) as arc:
        arc.extract(task, local_out)
    server.log.clear()
    result = CliRunner().invoke(cli, ["extract", url, "--task", task, "-o", str(remote_out)])
    assert result.exit_code == 0, result.output
    sent = sum(entry[3] for entry in server.log)
    needed = _needed_bytes(archive, task)
    everything = archive.stat().st_size
    print("http extract: sent", sent, "needed", needed, "archive", everything)
    assert sent <= needed + 64, (sent, needed, everything)
    assert sent < everything - 1000  # the other tasks' masks were left on the server
    want, got = load_file(local_out), load_file(remote_out)
    assert want.keys() == got.keys() and all((want[k] == got[k]).all() for k in want)


def test_open_url_lists_the_tasks_reading_header_and_manifest_only(family, http_archive):
    _, _, archive = family
    server, url = http_archive
    with tallzip.open(url) as arc:
        assert arc.tasks == ["task00", "task01", "task02"]
        assert arc.path == url and arc.path.name == "family.tallz"
    reader = ArchiveReader(archive)
    manifest_bytes = reader.size - reader._data_end
    reader.close()
    assert sum(entry[3] for entry in server.log) <= HEADER_SIZE + manifest_bytes


def test_missing_fsspec_names_the_extra(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "fsspec", None)
    with pytest.raises(MissingExtraError, match=r"pip install 'tallzip\[remote\]'"):
        tallzip.open("https://127.0.0.1:9/family.tallz")
    result = CliRunner().invoke(cli, ["extract", "https://127.0.0.1:9/family.tallz", "--task", "a",
                                      "-o", str(tmp_path / "a.safetensors")])
    assert result.exit_code != 0 and "tallzip[remote]" in result.output
    assert len(result.output.strip().splitlines()) == 1
