"""extract on a CPU writes each chunk from the pool thread that rebuilt it, at its offset in the output file (issue
21): the file's bytes against an independent write of the formula's tensors, the writer's refusals, and a failure
mid-way leaving nothing at the target."""
from __future__ import annotations

import os
import threading

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

import tallzip
from tallzip.archive import extract as extract_module
from tallzip.formats.checkpoints.outputs import SafetensorsStream
from tallzip.formats.errors import FormatError
from tallzip.options import RunOptions, StoreOptions

from conftest import np_rebuilt, numpy_family, write_family

MASKED = ("enc.w", "enc.b", "blk.0.w")


@pytest.fixture
def archive_path(tmp_path):
    base, tasks = numpy_family(n_tasks=3, seed=5)
    base_path, tasks_dir = write_family(tmp_path / "fam", base, tasks)
    out = tmp_path / "f.tallz"
    # small chunks: every tensor in several chunks, written by both pool threads in any order
    tallzip.pack(tasks_dir, base_path, out, StoreOptions(chunk_elements=1024), RunOptions(device="cpu"))
    return base, tasks, out


def expected_file(path, archive, task, tensors: dict):
    """The same file written by the writer alone from tensors computed here (numpy), tensor by tensor."""
    entry = archive.task_entry(task)
    specs = [(n, d, archive.task_shape(task, n)) for n, d in entry["tensors"]]
    with SafetensorsStream(path, specs, entry.get("metadata")) as stream:
        for name, _, _ in specs:
            stream.write(name, torch.from_numpy(np.ascontiguousarray(tensors[name])))
    return path.read_bytes()


@pytest.mark.parametrize("task", ["task0", "task2"])
def test_extract_bytes_are_an_independent_write_of_the_formula(archive_path, tmp_path, task):
    base, tasks, path = archive_path
    target = tmp_path / "out" / f"{task}.safetensors"
    target.parent.mkdir()
    with tallzip.open(path) as archive:
        archive.extract(task, target)
        tensors = {n: (np_rebuilt(base, tasks, task, n, 0.4) if n in MASKED else tasks[task][n]) for n in tasks[task]}
        expected = expected_file(tmp_path / "expected.safetensors", archive, task, tensors)
    assert target.read_bytes() == expected
    got = load_file(str(target))
    assert set(got) == set(tensors) and all(np.array_equal(got[n], tensors[n]) for n in tensors)
    assert sorted(os.listdir(target.parent)) == [target.name]  # no temporary left


def test_write_part_here_refuses_what_does_not_fit(tmp_path):
    stream = SafetensorsStream(tmp_path / "a.safetensors", [("x", "F32", (10,)), ("y", "BF16", (4,))])
    stream.write_part_here("x", 0, torch.zeros(6))
    with pytest.raises(FormatError, match="does not fit"):
        stream.write_part_here("x", 6, torch.zeros(5))          # past the end
    with pytest.raises(FormatError, match="does not fit"):
        stream.write_part_here("y", 0, torch.zeros(4))          # float32 into a bfloat16 tensor
    with pytest.raises(FormatError, match="not expected"):
        stream.write_part_here("z", 0, torch.zeros(1))          # unknown
    stream.write_part_here("x", 6, torch.zeros(4))
    with pytest.raises(FormatError, match="not expected"):
        stream.write_part_here("x", 0, torch.zeros(1))          # complete already
    with pytest.raises(FormatError, match="never written"):
        stream.close()                                          # y missing


def test_write_part_here_from_many_threads(tmp_path):
    values = torch.arange(100_000, dtype=torch.float32)
    path = tmp_path / "a.safetensors"
    stream = SafetensorsStream(path, [("v", "F32", (100_000,))])
    parts = [(s, values[s:s + 997]) for s in range(0, 100_000, 997)]
    threads = [threading.Thread(target=lambda ps: [stream.write_part_here("v", s, p) for s, p in ps],
                                args=(parts[k::4],)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    stream.close()
    assert np.array_equal(load_file(str(path))["v"], values.numpy())


def test_a_failure_mid_extract_leaves_nothing_at_the_target(archive_path, tmp_path, monkeypatch):
    _, _, path = archive_path
    target = tmp_path / "out" / "task1.safetensors"
    target.parent.mkdir()
    calls = []
    with tallzip.open(path) as archive:
        real = archive.chunk_into

        def failing(*args):
            calls.append(args[1])
            if len(calls) == 5:
                raise OSError(28, "No space left on device")
            return real(*args)
        monkeypatch.setattr(archive, "chunk_into", failing)
        with pytest.raises(OSError):
            archive.extract("task1", target)
    assert len(calls) >= 5 and os.listdir(target.parent) == []


def test_an_existing_file_is_not_overwritten_without_force(archive_path, tmp_path):
    _, _, path = archive_path
    target = tmp_path / "mine.safetensors"
    target.write_bytes(b"not tallzip's")
    with tallzip.open(path) as archive, pytest.raises(Exception, match="exists"):
        archive.extract("task1", target)
    assert target.read_bytes() == b"not tallzip's"
