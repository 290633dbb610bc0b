"""Format version 2: chunk plans and boundaries, a version-1 archive still read, a damaged chunk
refused by name, archives independent of the machine and budget, and pack within a memory budget.

Every rebuilt tensor is compared with plain numpy (conftest.np_rebuilt: base + mask * mtv with the
mask from the float32 mtv and the stored mtv rounded to bfloat16)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from safetensors.numpy import load_file as np_load_file

import tallzip
from tallzip.run.chunks import ordered_map, parse_memory
from tallzip.cli.main import cli
from tallzip.errors import TallzipError
from tallzip.formats.container.chunking import chunk_plan
from tallzip.formats.checkpoints.checkpoint import open_checkpoint
from tallzip.formats.errors import CorruptArchiveError

from conftest import np_rebuilt, write_big_family, write_family
from tallzip.options import RunOptions, StoreOptions

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = Path(__file__).resolve().parent / "fixtures"
CHUNK = 1024
# name -> (shape, chunks expected with CHUNK = 1024 elements, by the SPEC's rule)
SHAPES = {
    "smaller": ((10, 50), 1),        # 500 elements: one chunk
    "equal": ((32, 32), 1),          # exactly one chunk
    "over.flat": ((1025,), 2),       # 1-D, one element over: 1024 + 1
    "over.rows": ((41, 25), 2),      # rows of 25 fit: 40 rows (1000) + 1 row (25)
    "long.rows": ((3, 2000), 6),     # rows longer than a chunk: cut flat, 5 x 1024 + 880
    "scalar": ((), 1),               # 0-d
    "empty": ((0, 8), 1),            # no elements
}


def chunk_family(n_tasks=3, seed=5):
    rng = np.random.default_rng(seed)
    base = OrderedDict((n, np.asarray(rng.normal(0, 0.05, s), dtype=np.float32)) for n, (s, _) in SHAPES.items())
    tasks = OrderedDict()
    for t in range(n_tasks):
        sd = OrderedDict((n, np.asarray(x + rng.laplace(0, 0.01, x.shape) * rng.random(x.shape), dtype=np.float32))
                         for n, x in base.items())
        sd["head"] = rng.normal(0, 1, (2, 1500)).astype(np.float32)  # a task's own tensor of 3 chunks
        tasks[f"task{t}"] = sd
    return base, tasks


@pytest.fixture
def chunked(tmp_path):
    base, tasks = chunk_family()
    base_path, tasks_dir = write_family(tmp_path / "fam", base, tasks)
    out = tmp_path / "c.tallz"
    manifest = tallzip.pack(tasks_dir, base_path, out, store=StoreOptions(chunk_elements=CHUNK))
    return base, tasks, base_path, tasks_dir, out, manifest


def test_chunk_plan_follows_the_spec():
    # whole rows when a row fits, else flat; covers the tensor exactly, in order
    for shape, chunk in [((10, 50), 1024), ((41, 25), 1024), ((3, 2000), 1024), ((1025,), 1024), ((), 8),
                         ((0, 8), 8), ((7, 3, 5), 32), ((100,), 100)]:
        plan = chunk_plan(shape, chunk)
        count = int(np.prod(shape))
        assert plan[0][0] == 0 and sum(c for _, c in plan) == count
        assert all(a + n == b for (a, n), (b, _) in zip(plan, plan[1:]))
        row = int(np.prod(shape[1:])) if len(shape) >= 2 else 1
        if count > chunk and row <= chunk:
            assert all(n % row == 0 and n <= chunk for _, n in plan)
            assert plan[0][1] == chunk // row * row
        elif count > chunk:
            assert all(n == chunk for _, n in plan[:-1])
        else:
            assert plan == [(0, count)]


def test_chunk_boundaries_rebuild_bit_identical(chunked):
    base, tasks, _, _, out, manifest = chunked
    assert manifest["version"] == 2 and manifest["chunk_elements"] == CHUNK
    sections = {(s["role"], s["tensor"], s["task"]): s for s in manifest["sections"]}
    assert manifest["tensors"]["empty"]["kind"] == "shared"  # no element differs: stored once
    assert [k for k in sections if k[1] == "empty"] == [("base", "empty", None)]
    for name, (_, n_chunks) in SHAPES.items():
        for role, task in [("base", None), *([("mtv", None), *[("mask", t) for t in tasks]] if name != "empty" else [])]:
            assert len(sections[(role, name, task)]["chunks"]) == n_chunks, (role, name)
    assert len(sections[("own", "head", "task0")]["chunks"]) == 3
    with tallzip.open(out) as archive:
        for task in tasks:
            got = archive.load(task)
            for name in SHAPES:
                expected = np_rebuilt(base, tasks, task, name, 0.4)
                assert got[name].shape == expected.shape
                assert np.array_equal(got[name].numpy().view(np.uint32), expected.view(np.uint32)), (task, name)
            assert np.array_equal(got["head"].numpy(), tasks[task]["head"])
            # the mask's ones, per chunk and in all, are the numpy mask's
            for name in SHAPES:
                if name == "empty":
                    continue
                s = sections[("mask", name, task)]
                assert s["ones"] == sum(c["ones"] for c in s["chunks"])
        # several tasks at once (each chunk's base and mtv decoded once): the same bits, chunk by chunk
        seen = {t: {} for t in tasks}
        for name, start, parts in archive.iter_tasks_chunks(list(tasks)):
            for task, flat in parts.items():
                seen[task][name] = seen[task].get(name, 0) + flat.numel()
                expected = (tasks[task][name] if name == "head"
                            else np_rebuilt(base, tasks, task, name, 0.4)).reshape(-1)[start:start + flat.numel()]
                assert np.array_equal(flat.numpy(), expected), (task, name, start)
        assert all(seen[t][n] == tasks[t][n].size for t in tasks for n in tasks[t])
    # extract streams chunks into place: the same bits, through the file format
    runner = CliRunner()
    result = runner.invoke(cli, ["extract", str(out), "--task", "task1", "-o", str(out.parent / "t1.safetensors"),
                                 "--memory", "64M"])
    assert result.exit_code == 0, result.output
    saved = np_load_file(str(out.parent / "t1.safetensors"))
    for name in SHAPES:
        assert np.array_equal(saved[name].view(np.uint32), np_rebuilt(base, tasks, "task1", name, 0.4).view(np.uint32))


def test_archive_bytes_do_not_depend_on_workers_or_budget(chunked, tmp_path):
    _, _, base_path, tasks_dir, out, _ = chunked
    other = tmp_path / "other.tallz"
    tallzip.pack(tasks_dir, base_path, other, store=StoreOptions(chunk_elements=CHUNK), run=RunOptions(workers=1, memory="64M"))
    assert other.read_bytes() == out.read_bytes()
    third = tmp_path / "third.tallz"
    tallzip.pack(tasks_dir, base_path, third, store=StoreOptions(chunk_elements=2048))
    assert third.read_bytes() != out.read_bytes()  # the chunk size is part of the archive


def _flip(path, offset, target):
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x5A
    target.write_bytes(bytes(data))
    return target


def test_one_damaged_chunk_is_refused_naming_the_tensor(chunked, tmp_path):
    _, tasks, _, _, out, manifest = chunked
    mask = next(s for s in manifest["sections"] if s["role"] == "mask" and s["tensor"] == "long.rows"
                and s["task"] == "task1")
    bad = _flip(out, mask["chunks"][3]["offset"] + 1, tmp_path / "bad.tallz")
    with tallzip.open(bad) as archive:
        archive.load("task0")  # other tasks do not read that chunk
        with pytest.raises(CorruptArchiveError, match=r"section mask task 'task1' tensor 'long.rows' chunk 4 of 6"):
            archive.load("task1")
    result = CliRunner().invoke(cli, ["extract", str(bad), "--task", "task1", "-o", str(tmp_path / "x.safetensors")])
    assert result.exit_code != 0 and "tensor 'long.rows'" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "x.safetensors").exists()
    result = CliRunner().invoke(cli, ["verify", str(bad)])
    assert result.exit_code != 0 and "tensor 'long.rows'" in result.output
    # a damaged base chunk: every task refuses
    base_entry = next(s for s in manifest["sections"] if s["role"] == "base" and s["tensor"] == "over.rows")
    bad_base = _flip(out, base_entry["chunks"][1]["offset"], tmp_path / "bad_base.tallz")
    with tallzip.open(bad_base) as archive:
        for task in tasks:
            with pytest.raises(CorruptArchiveError, match=r"base tensor 'over.rows' chunk 2 of 2"):
                archive.load(task)


def test_bytes_no_section_names_are_ignored(chunked, tmp_path):
    """Room for add/remove: chunks no longer listed may stay in the file."""
    import fuzz
    base, tasks, _, _, out, manifest = chunked
    data = out.read_bytes()
    fuzz.write_with_manifest(data, manifest, tmp_path / "junk.tallz", extra=os.urandom(5000))
    with tallzip.open(tmp_path / "junk.tallz") as archive:
        got = archive.load("task2")
    assert np.array_equal(got["over.rows"].numpy(), np_rebuilt(base, tasks, "task2", "over.rows", 0.4))


def test_unknown_representation_is_refused(chunked, tmp_path):
    import fuzz
    from tallzip.formats.errors import UnsupportedVersionError
    _, _, _, _, out, manifest = chunked
    manifest = json.loads(json.dumps(manifest))
    assert all(t["representation"] == "tall" for t in manifest["tasks"])
    manifest["tasks"][0]["representation"] = "q9"
    fuzz.write_with_manifest(out.read_bytes(), manifest, tmp_path / "q.tallz")
    with pytest.raises(UnsupportedVersionError, match="'q9'"):
        tallzip.open(tmp_path / "q.tallz")


# --- a version-1 archive -----------------------------------------------------------------------

def test_v1_fixture_still_extracts_bit_identical(tmp_path):
    sys.path.insert(0, str(FIXTURES))
    try:
        from make_v1_fixture import LAMBDA, fixture_family
    finally:
        sys.path.remove(str(FIXTURES))
    base, tasks = fixture_family()
    with tallzip.open(FIXTURES / "v1-family.tallz") as archive:
        assert archive.reader.version == 1 and archive.manifest["version"] == 1
        for task in tasks:
            out = archive.extract(task, tmp_path / f"{task}.safetensors").output
            got = np_load_file(str(out))
            assert set(got) == set(tasks[task])
            for name, original in tasks[task].items():
                if name in ("head.weight", "steps") or name.startswith("frozen"):
                    expected = original
                else:
                    expected = np_rebuilt(base, tasks, task, name, LAMBDA)
                assert got[name].dtype == expected.dtype and np.array_equal(got[name], expected), (task, name)
    # damage in a v1 section is still refused by its sha256
    manifest = tallzip.open(FIXTURES / "v1-family.tallz").manifest
    mask = next(s for s in manifest["sections"] if s["role"] == "mask" and s["task"] == "task2")
    bad = _flip(FIXTURES / "v1-family.tallz", mask["offset"], tmp_path / "bad.tallz")
    with pytest.raises(CorruptArchiveError, match="checksum mismatch in section mask task 'task2'"):
        tallzip.open(bad).load("task2")


def test_v2_fixture_from_before_representations_still_reads(tmp_path):
    """tests/fixtures/v2-family.tallz was written by the format-2 writer before per-task
    representations (make_v2_fixture.py): every task tall, rebuilt as the numpy formula says."""
    sys.path.insert(0, str(FIXTURES))
    try:
        from make_v1_fixture import LAMBDA, fixture_family
    finally:
        sys.path.remove(str(FIXTURES))
    base, tasks = fixture_family()
    with tallzip.open(FIXTURES / "v2-family.tallz") as archive:
        assert archive.reader.version == 2 and "qcodes" not in {s["role"] for s in archive.manifest["sections"]}
        assert [archive.representation(t) for t in archive.tasks] == ["tall"] * 3
        for task in tasks:
            got = {n: v.numpy() for n, v in archive.load(task).items()}
            for name, original in tasks[task].items():
                expected = original if name in ("head.weight", "steps") or name.startswith("frozen") else \
                    np_rebuilt(base, tasks, task, name, LAMBDA)
                assert np.array_equal(got[name], expected), (task, name)


# --- the pipeline and the budget --------------------------------------------------------------

def test_ordered_map_keeps_order_and_budget():
    running, peak, lock = [0], [0], threading.Lock()

    def job(item):
        with lock:
            running[0] += item[1]
            peak[0] = max(peak[0], running[0])
        time.sleep(0.002 * (item[0] % 3))  # out-of-order finishing
        with lock:
            running[0] -= item[1]
        return item[0]

    items = [(i, 10 + (i % 4) * 10) for i in range(40)]
    assert list(ordered_map(job, items, cost=lambda it: it[1], budget=60, workers=4)) == list(range(40))
    assert 0 < peak[0] <= 60
    # one job costlier than the budget still runs, alone
    assert list(ordered_map(lambda x: x, [100, 1], cost=lambda x: x, budget=50, workers=2)) == [100, 1]


def test_memory_sizes_parse_and_bad_ones_are_refused():
    assert parse_memory("1.5G") == 3 << 29 and parse_memory("256M") == 256 << 20 and parse_memory("512MiB") == 512 << 20
    for bad in ("lots", "-1G", "1X", "10M"):
        with pytest.raises(TallzipError):
            parse_memory(bad)
    result = CliRunner().invoke(cli, ["pack", "nowhere", "--base", "b", "-o", "x.tallz", "--memory", "lots"])
    assert result.exit_code != 0 and "memory budget" in result.output and "Traceback" not in result.output


def test_read_range_matches_the_tensor_and_loops_short_reads(tmp_path, monkeypatch):
    base, tasks = chunk_family(n_tasks=2)
    base_path, _ = write_family(tmp_path / "fam", base, tasks)
    ckpt = open_checkpoint(base_path)
    flat = base["long.rows"].reshape(-1)
    assert np.array_equal(ckpt.read_range("long.rows", 1000, 2500).numpy(), flat[1000:3500])
    real = os.preadv
    monkeypatch.setattr(os, "preadv", lambda fd, bufs, off: real(fd, [bufs[0][:7]], off))  # 7 bytes per call
    assert np.array_equal(ckpt.read_range("long.rows", 3, 1001).numpy(), flat[3:1004])
    with pytest.raises(Exception, match="outside"):
        ckpt.read_range("long.rows", 5990, 20)


MEASURE = r'''
import resource, sys, tallzip
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
tallzip.pack(sys.argv[1], sys.argv[2], sys.argv[3], memory=sys.argv[4], chunk_elements=int(sys.argv[5]))
print(base * 1024, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
'''


@pytest.mark.slow
def test_pack_holds_a_small_memory_budget(tmp_path):
    """Tensors of 128 MiB each (base + 3 tasks: 512 MiB of inputs) packed under a 96 MiB budget: the
    process grows by at most the budget (plus 16 MiB the allocator may keep), less than one input
    tensor (a whole-tensor pack held N + 2 of them)."""
    fam = tmp_path / "big"
    tensor_bytes = write_big_family(fam)
    out = tmp_path / "big.tallz"
    proc = subprocess.run([sys.executable, "-c", MEASURE, str(fam / "tasks"), str(fam / "base.safetensors"), str(out),
                           "96M", str(1 << 20)], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr
    before, peak = map(int, proc.stdout.split())
    grown = peak - before
    assert grown < (96 + 16) * 2**20 < tensor_bytes, f"grew {grown / 2**20:.0f} MiB over the interpreter"
    with tallzip.open(out) as archive:
        assert len(archive.reader.chunks(archive.reader.section("mask", "w", "t0"))) == 32


def test_ties_statistics_are_found_chunk_by_chunk_and_recorded(tmp_path):
    base, tasks = chunk_family()
    base_path, tasks_dir = write_family(tmp_path / "fam", base, tasks)
    manifest = tallzip.pack(tasks_dir, base_path, tmp_path / "t.tallz", store=StoreOptions(merge="ties", density=0.3, chunk_elements=CHUNK))
    names = list(SHAPES)
    for t, got in zip(tasks, manifest["merge"]["thresholds"]):
        magnitudes = np.sort(np.concatenate([np.abs(tasks[t][n] - base[n]).reshape(-1) for n in names]))
        kth = magnitudes.size - int(magnitudes.size * 0.3)
        assert got == float(magnitudes[kth - 1])
    trimmed = {n: [np.where(np.abs(tasks[t][n] - base[n]) >= thr, tasks[t][n] - base[n], 0)
                   for t, thr in zip(tasks, manifest["merge"]["thresholds"])] for n in names}
    total = sum(int(np.sign(sum(trimmed[n])).sum()) for n in names)
    assert manifest["merge"]["majority"] == (1.0 if total > 0 else -1.0 if total < 0 else 0.0)


def test_whole_tensor_readers_work_on_chunked_archives(chunked):
    """verify --against, the resident switcher and merging read tensors whole: from chunks too."""
    from tallzip.verification.verify import verify
    base, tasks, _, tasks_dir, out, _ = chunked
    with tallzip.open(out) as archive:
        report = verify(archive, tasks_dir)
        assert report["ok"] and all(r["mask_bits_differing"] == 0 for r in report["tasks"].values())
        resident = archive.resident(device="cpu")
        state = resident.switch("task2").state_dict()
        for name in SHAPES:
            assert np.array_equal(state[name].numpy(), np_rebuilt(base, tasks, "task2", name, 0.4)), name


def test_mask_context_widens_the_stored_mtv_exactly():
    import torch
    from tallzip.formats.container.chunking import mask_context
    from tallzip.formats.tensors import to_bits
    values = torch.tensor([0.0, -0.0, 1e-30, -3.5, 65000.0, float("inf"), 1e-8, 0.1], dtype=torch.float32)
    for dtype, name in ((torch.bfloat16, "BF16"), (torch.float16, "F16"), (torch.float32, "F32"), (torch.float64, "F64")):
        stored = values.to(dtype)
        context = mask_context(to_bits(stored), name, (2, 4))
        expected = stored.to(torch.float32).numpy()  # torch's own widening, independently of numpy's bit shifts
        assert context["mtv"].dtype == np.float32 and np.array_equal(context["mtv"].view(np.uint32), expected.view(np.uint32))
        assert context["shape"] == (2, 4) and context["mtv_dtype"] == name
