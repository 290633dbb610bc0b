"""`tallzip add` / `remove`: the other tasks' sections stay byte for byte (every chunk's stored bytes
and digest compared before and after), each other task still extracts bit-identical, the new task
rebuilds as its representation's numpy formula says, and kill -9 at any stage leaves the old or the
new archive, never a broken one."""
from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from safetensors.numpy import load_file as np_load, save_file as np_save

import tallzip
from tallzip.cli.main import cli
from tallzip.errors import TallzipError

from test_representations import ROWS, np_quant_rebuild
from tallzip.options import StoreOptions

CHUNK = 1024
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def packed(tmp_path):
    rng = np.random.default_rng(3)
    base = {"w": rng.standard_normal((40, 300)).astype(np.float32), "v": rng.standard_normal(3000).astype(np.float32),
            "b": rng.standard_normal(300).astype(np.float32), "same": rng.standard_normal(20).astype(np.float32),
            "step": np.arange(4, dtype=np.int64)}
    np_save(base, str(tmp_path / "base.safetensors"))
    (tmp_path / "tasks").mkdir()
    tasks = {}
    for k in range(3):
        t = {n: (v + (0.02 * rng.standard_normal(v.shape)).astype(np.float32) if v.dtype == np.float32 and n != "same"
                 else v.copy()) for n, v in base.items()}
        t["step"] = t["step"] + k
        tasks[f"t{k}"] = t
        np_save(t, str(tmp_path / "tasks" / f"t{k}.safetensors"))
    new = {n: (v + (0.02 * rng.standard_normal(v.shape)).astype(np.float32) if v.dtype == np.float32 else v + 9)
           for n, v in base.items()}  # changes "same" too, which the packed tasks share with the base
    new["head"] = rng.standard_normal((2, 3)).astype(np.float32)
    (tmp_path / "new").mkdir()
    np_save(new, str(tmp_path / "new" / "n.safetensors"))
    out = tmp_path / "a.tallz"
    tallzip.pack(tmp_path / "tasks", tmp_path / "base.safetensors", out, store=StoreOptions(keep={"t0": "tall", "t1": "tall", "*": "q4"}, chunk_elements=CHUNK))
    return tmp_path, base, tasks, new, out


def chunk_bytes(path) -> dict:
    """(role, tensor, task) -> [(sha256 of the stored bytes, blake3 listed, params)] per chunk, read raw."""
    with tallzip.open(path) as arc:
        out = {}
        data = Path(path).read_bytes()
        for s in arc.manifest["sections"]:
            out[(s["role"], s["tensor"], s["task"])] = [
                (hashlib.sha256(data[c["offset"]:c["offset"] + c["length"]]).hexdigest(), c["blake3"], c["params"])
                for c in s["chunks"]]
        return out


def extracted_bits(path, tasks) -> dict:
    with tallzip.open(path) as arc:
        return {t: {n: v.numpy().tobytes() for n, v in arc.load(t).items()} for t in tasks}


def test_add_keeps_neighbours_byte_for_byte(packed):
    tmp_path, base, tasks, new, out = packed
    before, rebuilt = chunk_bytes(out), extracted_bits(out, tasks)
    tallzip.add(out, tmp_path / "new" / "n.safetensors", "n", keep="q4")
    after = chunk_bytes(out)
    assert all(after[key] == value for key, value in before.items())  # every old chunk, same bytes
    assert {k for k in after if k[2] == "n"} >= {("qcodes", "w", "n"), ("qscales", "v", "n"), ("qcodes", "same", "n"),
                                                 ("own", "step", "n"), ("own", "head", "n")}
    assert extracted_bits(out, tasks) == rebuilt
    with tallzip.open(out) as arc:
        assert arc.tasks == ["t0", "t1", "t2", "n"] and arc.representation("n") == "q4"
        got = arc.load("n")
        for name in ("w", "v", "b"):
            assert np.array_equal(got[name].numpy(), np_quant_rebuild(base[name], new[name], 4, ROWS[name]))
        assert np.array_equal(got["same"].numpy(), np_quant_rebuild(base["same"], new["same"], 4, (1, 20)))
        assert np.array_equal(got["step"].numpy(), new["step"]) and np.array_equal(got["head"].numpy(), new["head"])
        (tmp_path / "tasks" / "n.safetensors").write_bytes((tmp_path / "new" / "n.safetensors").read_bytes())
        report = tallzip.verify(arc, tmp_path / "tasks")
        assert report["verdict"] == "matches", report


def test_add_exact_and_refusals(packed):
    tmp_path, _, tasks, new, out = packed
    with pytest.raises(TallzipError, match="cannot be kept tall"):
        tallzip.add(out, tmp_path / "new" / "n.safetensors", "n", keep="tall")
    with pytest.raises(TallzipError, match="already has a task 't1'"):
        tallzip.add(out, tmp_path / "new" / "n.safetensors", "t1", keep="q4")
    before = out.read_bytes()
    result = CliRunner().invoke(cli, ["add", str(out), str(tmp_path / "new" / "n.safetensors"), "--task", "n",
                                      "--keep", "tall"])
    assert result.exit_code == 1 and "not in the stored mtv" in result.output and "Traceback" not in result.output
    assert out.read_bytes() == before
    result = CliRunner().invoke(cli, ["add", str(out), str(tmp_path / "new" / "n.safetensors"), "--task", "n",
                                      "--keep", "exact"])
    assert result.exit_code == 0, result.output
    got = extracted_bits(out, ["n"])["n"]
    assert all(got[name] == value.tobytes() for name, value in new.items())


def test_remove_keeps_neighbours_and_drops_the_task(packed):
    tmp_path, _, tasks, _, out = packed
    before, rebuilt = chunk_bytes(out), extracted_bits(out, tasks)
    result = CliRunner().invoke(cli, ["remove", str(out), "--task", "t1"])
    assert result.exit_code == 0, result.output
    after = chunk_bytes(out)
    assert set(after) == {k for k in before if k[2] != "t1"}  # the mtv stays: t0 is tall
    assert all(after[k] == before[k] for k in after)
    with tallzip.open(out) as arc:
        assert arc.tasks == ["t0", "t2"] and arc.manifest["merge"]["mtv_tasks"] == ["t0", "t1", "t2"]
        report = tallzip.verify(arc, tmp_path / "tasks")
        assert report["verdict"] == "matches" and "t1" not in report["tasks"]
    assert extracted_bits(out, ["t0", "t2"]) == {t: rebuilt[t] for t in ("t0", "t2")}
    tallzip.remove(out, "t0")  # the last tall task: the mtv and masks go too
    with tallzip.open(out) as arc:
        assert not {s["role"] for s in arc.manifest["sections"]} & {"mtv", "mask"}
    assert extracted_bits(out, ["t2"]) == {"t2": rebuilt["t2"]}
    result = CliRunner().invoke(cli, ["remove", str(out), "--task", "t2"])
    assert result.exit_code == 1 and "only task" in result.output


ADD = ("import sys; from tallzip import editing; "
       "editing.add(sys.argv[1], sys.argv[2], 'n', keep='q3') if sys.argv[3] == 'add' else editing.remove(sys.argv[1], 't2')")


@pytest.mark.parametrize("command,stage", [("add", "copied"), ("add", "added"), ("add", "written"),
                                           ("remove", "copied"), ("remove", "written")])
def test_kill_9_leaves_old_or_new(packed, command, stage):
    tmp_path, _, tasks, _, out = packed
    old_bytes = out.read_bytes()
    marker = tmp_path / "reached"
    env = dict(os.environ, TALLZIP_EDIT_PAUSE=f"{stage}:{marker}")
    proc = subprocess.Popen([sys.executable, "-c", ADD, str(out), str(tmp_path / "new" / "n.safetensors"), command],
                            env=env, cwd=ROOT)
    try:
        deadline = time.time() + 60
        while not marker.exists():
            assert proc.poll() is None, "the edit ended before its pause"
            assert time.time() < deadline
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
    with tallzip.open(out) as arc:  # a valid archive, whatever the moment
        names = arc.tasks
        if stage == "written":
            assert names == (["t0", "t1", "t2", "n"] if command == "add" else ["t0", "t1"])
        else:
            assert out.read_bytes() == old_bytes and names == ["t0", "t1", "t2"]
        tallzip.verify(arc)
    tallzip.remove(out, "t1")  # and the next edit works (the stale temporary is removed)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".a.tallz")]


def test_base_by_reference_add_needs_the_base_remove_does_not(packed):
    tmp_path, base, _, new, _ = packed
    out = tmp_path / "ref.tallz"
    tallzip.pack(tmp_path / "tasks", tmp_path / "base.safetensors", out, store=StoreOptions(keep="q3", base_ref=True, chunk_elements=CHUNK))
    with pytest.raises(TallzipError, match="--base"):
        tallzip.add(out, tmp_path / "new" / "n.safetensors", "n", keep="exact")
    tallzip.add(out, tmp_path / "new" / "n.safetensors", "n", keep="exact", base=tmp_path / "base.safetensors")
    tallzip.remove(out, "t0")
    with tallzip.open(out, base=tmp_path / "base.safetensors") as arc:
        assert arc.tasks == ["t1", "t2", "n"]
        assert all(arc.load("n")[k].numpy().tobytes() == v.tobytes() for k, v in new.items())


@pytest.mark.parametrize("command", ["add", "remove"])
def test_every_write_of_an_edit_leaves_the_old_or_the_new_archive(packed, monkeypatch, command):
    """kill -9 at any moment: the disk is then as it is between two system calls of the edit. At
    each call that writes, syncs or renames, the target holds the old archive's bytes or the new
    one's, all of them (the switch happens once, at the rename), and nothing else is ever there."""
    tmp_path, _, _, _, out = packed
    old = hashlib.sha256(out.read_bytes()).hexdigest()
    seen = []

    def look():
        seen.append(hashlib.sha256(out.read_bytes()).hexdigest())

    for name in ("pwrite", "ftruncate", "fsync", "replace"):
        real = getattr(os, name)

        def spy(*args, _real=real):
            look()
            result = _real(*args)
            look()
            return result
        monkeypatch.setattr(os, name, spy)
    if command == "add":
        tallzip.add(out, tmp_path / "new" / "n.safetensors", "n", keep="q4")
    else:
        tallzip.remove(out, "t1")
    monkeypatch.undo()
    new = hashlib.sha256(out.read_bytes()).hexdigest()
    assert new != old and len(seen) > 40  # many moments: one per chunk written, at least
    switch = seen.index(new)
    assert set(seen[:switch]) == {old} and set(seen[switch:]) == {new}
    with tallzip.open(out) as arc:
        tallzip.verify(arc)  # every checksum and decoding (raises on damage)
        report = tallzip.verify(arc, tmp_path / "tasks")
        assert all(report["tasks"][t]["verdict"] == "matches" for t in report["tasks"]), report
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".a.tallz")]


def test_a_removed_tasks_space_is_gone(packed):
    """README/SPEC: remove rewrites the file, so no byte of the removed task is left (no dead bytes
    to compact): after the header, the file is the listed chunks, each 64-byte aligned with at most
    63 zero bytes before it, then the manifest; and the file shrank by at least the task's bytes."""
    _, _, _, _, out = packed
    with tallzip.open(out) as arc:
        gone = sum(s["length"] for s in arc.manifest["sections"] if s["task"] == "t1")
    before = out.stat().st_size
    tallzip.remove(out, "t1")
    data = out.read_bytes()
    manifest_at = int.from_bytes(data[16:24], "little")
    with tallzip.open(out) as arc:
        chunks = sorted((c["offset"], c["length"]) for s in arc.manifest["sections"] for c in s["chunks"])
    position = 72
    for offset, length in chunks:
        assert position <= offset < position + 64 and not any(data[position:offset])
        position = offset + length
    assert position <= manifest_at < position + 64 and not any(data[position:manifest_at])
    assert before - len(data) >= gone - 64 * 4  # (the manifest shrinks too; padding may move)
