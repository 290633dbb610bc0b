"""Corruption, interruption and hostile input: tested, not promised.

- 1,000 random corruptions of a small archive: each refused or decoded exactly, none silently wrong;
- hostile manifests with valid checksums (bombs, negative offsets, deep JSON, escaping names):
  refused before any large allocation (measured with tracemalloc);
- kill -9 at random points of pack and extract: nothing at the target, no temporary left after the
  next run;
- NaN/Inf inputs refused by default, naming the tensor; two processes extracting at once; a full
  disk (a small tmpfs where mounting is allowed, RLIMIT_FSIZE everywhere) gives one line and leaves
  nothing behind.
"""
from __future__ import annotations

import fcntl
import hashlib

import blake3
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch
import zstandard
from click.testing import CliRunner
from safetensors.numpy import load_file as np_load_file

import tallzip
from tallzip.cli.main import cli
from tallzip.formats.checkpoints.outputs import atomic_output, remove_stale_temporaries
from tallzip.formats.container.constants import HEADER_SIZE, HEADER_STRUCT
from tallzip.formats.errors import FormatError

from conftest import np_rebuilt, numpy_family, write_family

import fuzz
from tallzip.options import RunOptions

REPO = Path(__file__).resolve().parents[1]


def expected_models(base_path: Path, tasks_dir: Path, lam=0.4) -> dict:
    """Every task rebuilt by the TALL formula in numpy; tensors the base lacks come back as they were."""
    base = np_load_file(str(base_path))
    tasks = {p.stem: np_load_file(str(p)) for p in sorted(tasks_dir.glob("*.safetensors"))}
    out = {}
    for task, state in tasks.items():
        out[task] = {}
        for name, value in state.items():
            if name in base and np.issubdtype(value.dtype, np.floating):
                out[task][name] = np_rebuilt(base, tasks, task, name, lam)
            else:
                out[task][name] = value
    return out


def assert_models_equal(got: dict, expected: dict):
    assert sorted(got) == sorted(expected)
    for task, state in expected.items():
        assert sorted(got[task]) == sorted(state), task
        for name, value in state.items():
            mine = got[task][name]
            mine = mine.numpy() if isinstance(mine, torch.Tensor) else mine
            assert mine.dtype == value.dtype and mine.shape == value.shape, (task, name)
            assert np.array_equal(mine, value, equal_nan=True), (task, name)


def stray_files(folder: Path, target_name: str) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(f".{target_name}."))


# --- 1,000 random corruptions ---------------------------------------------------------------------------

def test_fuzz_1000_corruptions_refused_or_exact_never_wrong(tmp_path):
    archive = fuzz.build_archive(tmp_path / "family")
    family = tmp_path / "family"
    # the undamaged archive itself is right, by the formula
    assert_models_equal(fuzz.load_all(archive), expected_models(family / "base.safetensors", family / "finetuned"))

    counts, crashes = fuzz.run_damage(archive, 1000, seed=6, workdir=tmp_path)
    assert crashes == []
    outcomes = {o: sum(v for (_, out), v in counts.items() if out == o) for o in ("refused", "exact", "wrong")}
    assert outcomes["wrong"] == 0 and sum(outcomes.values()) == 1000
    for kind in fuzz.DAMAGE_KINDS:
        assert counts[kind, "refused"] + counts[kind, "exact"] > 20, kind
    # damage no checksum covers (padding, the reserved header field) is exactly the harmless kind
    assert counts["unprotected", "refused"] == 0 and counts["unprotected", "exact"] > 0
    assert counts["truncation", "exact"] == 0 and counts["header", "exact"] == 0


@pytest.mark.parametrize("codecs", [None, {"float": "planes+ans", "mask": "bits+zstd", "other": "raw"}],
                         ids=["default codecs", "other codecs"])
def test_hostile_manifests_never_crash(tmp_path, codecs):
    """Edited manifests with recomputed checksums (codec params included): refused, or decoded (to
    whatever they say), never a crash and never a file written outside the output folder."""
    archive = fuzz.build_archive(tmp_path / "family", codecs=codecs)
    counts, crashes = fuzz.run_hostile(archive, 200, seed=7, workdir=tmp_path)
    assert crashes == []
    assert counts["refused"] > 100 and sum(counts.values()) == 200


# --- bombs: valid checksums, refused before any large allocation -------------------------------------------

@pytest.fixture(scope="module")
def small_archive(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bomb")
    base, tasks = numpy_family()
    base_path, tasks_dir = write_family(folder, base, tasks)
    archive = folder / "f.tallz"
    tallzip.pack(tasks_dir, base_path, archive, run=RunOptions(device="cpu"))
    with tallzip.open(archive) as opened:
        return archive.read_bytes(), opened.manifest


def refused_cheaply(path: Path, match: str, budget: int = 8 << 20):
    """Opening (and, if that passes, loading every task) fails with `match`, and Python allocates at
    most the file's size plus `budget` meanwhile."""
    tracemalloc.start()
    try:
        with pytest.raises(FormatError, match=match):
            with tallzip.open(path) as archive:
                for task in archive.tasks:
                    archive.load(task)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < path.stat().st_size + budget, f"peak {peak:,} bytes"


def edited(manifest, edit):
    copy = json.loads(json.dumps(manifest))
    edit(copy)
    return copy


def first(manifest, role, **where):
    return next(s for s in manifest["sections"] if s["role"] == role and all(s[k] == v for k, v in where.items()))


@pytest.mark.parametrize("what, edit, match", [
    ("huge shape", lambda m: first(m, "mtv").update(shape=[1 << 40]), "bad entry for section mtv"),
    ("huge 2-d shape", lambda m: first(m, "base").update(shape=[1 << 20, 1 << 20]), "bad entry for section base"),
    ("negative offset", lambda m: first(m, "mask")["chunks"][0].update(offset=-64), "bad entry for section mask"),
    ("offset past the data", lambda m: first(m, "base")["chunks"][0].update(offset=1 << 62), "bad entry for section base"),
    ("huge length", lambda m: first(m, "mtv")["chunks"][0].update(length=1 << 62), "bad entry for section mtv"),
    ("lengths that do not add up", lambda m: first(m, "mtv").update(length=first(m, "mtv")["length"] + 1),
     "bad entry for section mtv"),
    ("more chunks than the plan", lambda m: first(m, "base")["chunks"].append(first(m, "base")["chunks"][0]),
     "bad entry for section base"),
    ("ones that do not add up", lambda m: first(m, "mask").update(ones=first(m, "mask")["ones"] + 1),
     "bad entry for section mask"),
    ("a chunk plan of zero", lambda m: m.update(chunk_elements=0), "bad chunk_elements"),
    ("shape the table does not know", lambda m: first(m, "mtv").update(shape=[2]), "does not fit"),
    ("a task escaping the folder", lambda m: m["tasks"][0].update(name="../../escaped"), "bad or repeated task name"),
    ("a side file escaping the folder", lambda m: m["tasks"][0].update(files=["../x"]), "bad entry for task"),
    ("a shard escaping the folder",
     lambda m: m["tasks"][0].update(sharding={"files": {"/tmp/x.safetensors": ["enc.w"]}}), "bad entry for task"),
    ("the same task twice", lambda m: m["tasks"].append(m["tasks"][0]), "bad or repeated task name"),
])
def test_manifest_bombs_refused(tmp_path, small_archive, what, edit, match):
    data, manifest = small_archive
    fuzz.write_with_manifest(data, edited(manifest, edit), tmp_path / "bomb.tallz")
    refused_cheaply(tmp_path / "bomb.tallz", match)


@pytest.mark.parametrize("compress", [False, True], ids=["plain", "zstd"])
def test_deep_json_refused(tmp_path, small_archive, compress):
    data, _ = small_archive
    for depth, match in [(17, "nested deeper than 16"), (100_000, "not valid JSON")]:
        blob = b'{"sections":[],"x":' + b"[" * depth + b"]" * depth + b"}"
        fuzz.write_with_manifest(data, None, tmp_path / "deep.tallz", blob=blob, compress=compress)
        refused_cheaply(tmp_path / "deep.tallz", match)


@pytest.mark.parametrize("compress", [False, True], ids=["plain", "zstd"])
def test_manifest_of_millions_of_values_refused_before_parsing(tmp_path, small_archive, compress):
    """17M empty objects (51 MB) would take ~1.3 GB once parsed; refused on a count of the bytes
    (compressed: of the decompressed bytes, which cost their own size and no more)."""
    data, _ = small_archive
    blob = b'{"sections":[' + b"{}," * 17_000_000 + b'{}]}'
    fuzz.write_with_manifest(data, None, tmp_path / "values.tallz", blob=blob, compress=compress)
    budget = (4 << 20) + (len(blob) * 5 // 4 if compress else 0)
    refused_cheaply(tmp_path / "values.tallz", "more than 16,000,000 values", budget=budget)


def test_zstd_frame_declaring_more_than_the_section_refused_before_decoding(tmp_path, small_archive):
    """An 8 KB section whose zstd frame holds 256 MB (honestly: zeros) for a tensor of 252 bytes: the
    frame is refused from its header, as decompressing it would allocate the 256 MB first."""
    data, manifest = small_archive
    frame = zstandard.ZstdCompressor(write_content_size=True).compress(bytes(256 << 20))
    assert len(frame) < 16 << 10 and zstandard.frame_content_size(frame) == 256 << 20
    offset = struct.unpack(HEADER_STRUCT, data[:HEADER_SIZE])[3]  # the frame goes where the manifest was

    def replace_mtv(m):
        entry = first(m, "mtv", tensor="blk.0.w")
        entry.update(length=len(frame), codec="zstd")
        entry["chunks"][0].update(offset=offset, length=len(frame), blake3=blake3.blake3(frame).hexdigest())

    fuzz.write_with_manifest(data, edited(manifest, replace_mtv), tmp_path / "zbomb.tallz", extra=frame)
    refused_cheaply(tmp_path / "zbomb.tallz", "frame declares 268435456 bytes")


# --- a fork server: the CLI in fresh processes without paying for `import torch` each time ----------------

FORK_SERVER = r'''
import json, os, resource, signal, sys
from tallzip.cli.main import cli

print("ready", flush=True)
for line in sys.stdin:
    request = json.loads(line)
    if "wait" in request:
        print(os.waitpid(request["wait"], 0)[1], flush=True)
        continue
    pid = os.fork()
    if pid == 0:
        log = os.open(request["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(log, 1)
        os.dup2(log, 2)
        if request.get("fsize"):
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # then writes past the limit fail with EFBIG
            resource.setrlimit(resource.RLIMIT_FSIZE, (request["fsize"], request["fsize"]))
        code = 0
        try:
            cli.main(request["args"], prog_name="tallzip")
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    print(pid, flush=True)
'''


class ForkServer:
    """One Python that has imported tallzip forks a child per CLI command (the child has run no torch
    code before, so forking it is safe); the test can kill -9 the child mid-way."""

    def __init__(self, workdir: Path):
        self.workdir = workdir
        self.proc = subprocess.Popen([sys.executable, "-c", FORK_SERVER], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, cwd=REPO)
        assert self.proc.stdout.readline() == "ready\n"  # imports done: what follows is timed fairly
        self.count = 0

    def start(self, *args, fsize=None) -> tuple[int, Path]:
        self.count += 1
        log = self.workdir / f"run{self.count}.log"
        request = {"args": [str(a) for a in args], "log": str(log), "fsize": fsize}
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        return int(self.proc.stdout.readline()), log

    def wait(self, pid: int) -> int:
        """The raw wait status (os.WIFSIGNALED / os.WEXITSTATUS read it)."""
        self.proc.stdin.write(json.dumps({"wait": pid}) + "\n")
        self.proc.stdin.flush()
        return int(self.proc.stdout.readline())

    def run(self, *args, fsize=None) -> tuple[int, str]:
        pid, log = self.start(*args, fsize=fsize)
        status = self.wait(pid)
        return os.waitstatus_to_exitcode(status), log.read_text()

    def close(self):
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


@pytest.fixture(scope="module")
def forks(tmp_path_factory):
    server = ForkServer(tmp_path_factory.mktemp("logs"))
    yield server
    server.close()


@pytest.fixture(scope="module")
def medium_family(tmp_path_factory):
    """Big enough (3 x 14 MB) that packing takes a while, so kills land in the middle of it."""
    shapes = {"enc.w": (1024, 1024), "enc.b": (1024,), "blk.0.w": (768, 1024), "blk.1.w": (1024, 768),
              "frozen.emb": (512, 256)}
    base, tasks = numpy_family(3, seed=11, shapes=shapes)
    return write_family(tmp_path_factory.mktemp("medium"), base, tasks)


def kill_at_random_points(forks, args, target: Path, kills: int, seed: int) -> dict:
    """Run `args` once to time it, then `kills` times, each killed (-9) after a random share of that time."""
    begin = time.perf_counter()
    code, log = forks.run(*args)
    duration = time.perf_counter() - begin
    assert code == 0, log
    reference = target.read_bytes() if target.is_file() else None
    (target.unlink() if target.is_file() else shutil.rmtree(target))
    rng = np.random.default_rng(seed)
    seen = {"killed": 0, "finished first": 0, "left a temporary": 0}
    for _ in range(kills):
        pid, _ = forks.start(*args)
        # Kill while the write is under way: once its temporary exists, after a random share of the
        # run. Timing from the start alone was flaky on a loaded machine (runs finished first).
        deadline = time.perf_counter() + 5 * duration + 5
        while not stray_files(target.parent, target.name) and time.perf_counter() < deadline:
            time.sleep(0.002)
        time.sleep(rng.uniform(0.0, 0.3) * duration)
        os.kill(pid, signal.SIGKILL)
        status = forks.wait(pid)
        if os.WIFSIGNALED(status):
            seen["killed"] += 1
            assert not target.exists(), "a killed run left something at the target"
            seen["left a temporary"] += bool(stray_files(target.parent, target.name))
        else:  # it was faster than the kill
            assert os.WEXITSTATUS(status) == 0
            seen["finished first"] += 1
            (target.unlink() if target.is_file() else shutil.rmtree(target))
    code, log = forks.run(*args)  # the next run completes and sweeps what the killed ones left
    assert code == 0, log
    assert stray_files(target.parent, target.name) == []
    if reference is not None:
        assert target.read_bytes() == reference
    return seen


def test_kill_9_during_pack_leaves_nothing_at_the_target(tmp_path, forks, medium_family):
    base, tasks_dir = medium_family
    target = tmp_path / "f.tallz"
    seen = kill_at_random_points(forks, ["pack", tasks_dir, "--base", base, "-o", target, "--device", "cpu"],
                                 target, kills=6, seed=1)
    assert seen["killed"] >= 3 and seen["left a temporary"] >= 1, seen
    with tallzip.open(target) as archive:
        assert_models_equal({t: archive.load(t) for t in archive.tasks}, expected_models(base, tasks_dir))


def test_kill_9_during_extract_leaves_nothing_at_the_target(tmp_path, forks, medium_family):
    base, tasks_dir = medium_family
    archive = tmp_path / "f.tallz"
    tallzip.pack(tasks_dir, base, archive, run=RunOptions(device="cpu"))
    expected = expected_models(base, tasks_dir)
    seen = kill_at_random_points(forks, ["extract", archive, "--all", "-o", tmp_path / "all", "--device", "cpu"],
                                 tmp_path / "all", kills=5, seed=2)
    assert seen["killed"] >= 2, seen
    assert_models_equal({p.stem: np_load_file(str(p)) for p in (tmp_path / "all").iterdir()}, expected)
    single = tmp_path / "one.pt"
    kill_at_random_points(forks, ["extract", archive, "--task", "task1", "--format", "pt", "-o", single,
                                  "--device", "cpu"], single, kills=3, seed=3)
    got = torch.load(single, weights_only=True)
    assert_models_equal({"task1": got}, {"task1": expected["task1"]})


def test_stale_temporaries_are_removed_only_when_their_writer_is_gone(tmp_path):
    dead = subprocess.Popen(["true"])  # once reaped, its pid belongs to no process
    dead.wait()
    target = tmp_path / "out.safetensors"
    gone = tmp_path / f".out.safetensors.{dead.pid}.abc123.tmp"
    gone_folder = tmp_path / f".out.safetensors.{dead.pid}.def456.tmp"
    alive = tmp_path / f".out.safetensors.{os.getpid()}.ghi789.tmp"
    locked = tmp_path / f".out.safetensors.{dead.pid}.jkl012.tmp"  # a writer in another pid namespace, say
    other = tmp_path / f".out.safetensors.bak.{dead.pid}.x.tmp"  # another target's name
    for path in (gone, alive, locked, other):
        path.write_bytes(b"partial")
    gone_folder.mkdir()
    (gone_folder / "shard.safetensors").write_bytes(b"partial")
    holder = os.open(locked, os.O_RDONLY)
    fcntl.flock(holder, fcntl.LOCK_EX)
    try:
        with atomic_output(target) as tmp:
            assert tmp.name.startswith(f".out.safetensors.{os.getpid()}.")
            tmp.write_bytes(b"done")
    finally:
        os.close(holder)
    assert target.read_bytes() == b"done"
    assert not gone.exists() and not gone_folder.exists()
    assert alive.exists() and locked.exists() and other.exists()
    assert remove_stale_temporaries(tmp_path, target.name) == [locked]  # its lock is released now


def test_outputs_get_the_permissions_of_any_new_file(tmp_path):
    """Not the owner-only mode of a temporary file: others can read an archive if the umask says so."""
    before = os.umask(0o027)
    try:
        with atomic_output(tmp_path / "f.tallz") as tmp:
            tmp.write_bytes(b"x")
        with atomic_output(tmp_path / "all", folder=True) as tmp:
            (tmp / "a").write_bytes(b"x")
    finally:
        os.umask(before)
    assert (tmp_path / "f.tallz").stat().st_mode & 0o777 == 0o640
    assert (tmp_path / "all").stat().st_mode & 0o777 == 0o750


# --- NaN / Inf --------------------------------------------------------------------------------------------

def cli_run(*args):
    result = CliRunner().invoke(cli, [str(a) for a in args])
    return result.exit_code, result.output


def one_line_error(code, output, *words):
    lines = [line for line in output.strip().splitlines() if line]
    assert code != 0 and len(lines) == 1 and lines[0].startswith("error: "), output
    for word in words:
        assert word in lines[0], (word, lines[0])


@pytest.mark.parametrize("where, name, merge, words", [
    ("base", "enc.w", "sum", ["base", "'enc.w'", "NaN or Inf"]),
    ("task1", "blk.0.w", "sum", ["task 'task1'", "'blk.0.w'"]),
    ("task1", "blk.0.w", "ties", ["task 'task1'", "'blk.0.w'"]),
    ("task2", "head.weight", "sum", ["task 'task2'", "'head.weight'"]),  # a tensor of the task's own
    ("base", "frozen.emb", "sum", ["base", "'frozen.emb'"]),  # unchanged in every task: stored once
])
def test_nonfinite_refused_naming_the_tensor_unless_allowed(tmp_path, where, name, merge, words):
    base, tasks = numpy_family()
    value = np.inf if where == "base" else np.nan
    if where == "base":
        base[name][1, 2] = value
        if name == "frozen.emb":
            for state in tasks.values():
                state[name][1, 2] = value
    else:
        tasks[where][name][0, 1] = value
    base_path, tasks_dir = write_family(tmp_path / "fam", base, tasks)
    target = tmp_path / "f.tallz"
    one_line_error(*cli_run("pack", tasks_dir, "--base", base_path, "-o", target, "--merge", merge), *words,
                   "--allow-nonfinite")
    assert not target.exists() and stray_files(tmp_path, target.name) == []

    code, output = cli_run("pack", tasks_dir, "--base", base_path, "-o", target, "--merge", merge, "--allow-nonfinite")
    assert code == 0, output
    if merge == "sum":  # the formula, NaN and Inf included (a comparison with NaN is False)
        with np.errstate(invalid="ignore"), tallzip.open(target) as archive:
            got = {t: archive.load(t) for t in archive.tasks}
            for task, state in tasks.items():
                for tensor in ["enc.w", "blk.0.w", "frozen.emb", "head.weight"]:
                    if tensor in base:
                        want = np_rebuilt(base, tasks, task, tensor, 0.4)
                    else:
                        want = state[tensor]
                    assert np.array_equal(got[task][tensor].numpy(), want, equal_nan=True), (task, tensor)


# --- two processes extracting from one archive at once ------------------------------------------------------

def test_two_processes_extract_at_once(tmp_path, forks, medium_family):
    base, tasks_dir = medium_family
    archive = tmp_path / "f.tallz"
    tallzip.pack(tasks_dir, base, archive, run=RunOptions(device="cpu"))
    expected = expected_models(base, tasks_dir)
    runs = [forks.start("extract", archive, "--all", "-o", tmp_path / "a", "--device", "cpu"),
            forks.start("extract", archive, "--all", "-o", tmp_path / "b", "--device", "cpu"),
            forks.start("extract", archive, "--task", "task2", "-o", tmp_path / "same.safetensors", "--force"),
            forks.start("extract", archive, "--task", "task2", "-o", tmp_path / "same.safetensors", "--force")]
    for pid, log in runs:
        assert os.waitstatus_to_exitcode(forks.wait(pid)) == 0, log.read_text()
    for folder in ("a", "b"):
        assert_models_equal({p.stem: np_load_file(str(p)) for p in (tmp_path / folder).iterdir()}, expected)
    assert_models_equal({"task2": np_load_file(str(tmp_path / "same.safetensors"))}, {"task2": expected["task2"]})
    assert stray_files(tmp_path, "same.safetensors") == []


# --- a full disk ----------------------------------------------------------------------------------------

def test_file_size_limit_during_pack_and_extract(tmp_path, forks, medium_family):
    """RLIMIT_FSIZE (with SIGXFSZ ignored) makes writes past the limit fail with EFBIG, as a full disk
    fails them with ENOSPC: the same error path, available without root."""
    base, tasks_dir = medium_family
    archive = tmp_path / "f.tallz"
    code, output = forks.run("pack", tasks_dir, "--base", base, "-o", archive, "--device", "cpu", fsize=1 << 20)
    one_line_error(code, output, str(archive), "File too large", "nothing was written")
    assert not archive.exists() and stray_files(tmp_path, archive.name) == []

    tallzip.pack(tasks_dir, base, archive, run=RunOptions(device="cpu"))
    for args in (["--task", "task0", "-o", tmp_path / "t.safetensors"],
                 ["--task", "task0", "--format", "pt", "-o", tmp_path / "t.pt"],
                 ["--all", "-o", tmp_path / "all"]):
        code, output = forks.run("extract", archive, *args, "--device", "cpu", fsize=1 << 20)
        target = args[-1]
        one_line_error(code, output, "File too large", "nothing was written")
        assert not target.exists() and stray_files(tmp_path, target.name) == []


@pytest.fixture
def small_disk(tmp_path):
    """A 512 KiB tmpfs, where this process may mount one (root, no seccomp veto); else skipped."""
    mount = tmp_path / "small"
    mount.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=512k", "tmpfs", str(mount)], capture_output=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def test_full_disk_during_pack_and_extract(tmp_path, small_disk, medium_family):
    base, tasks_dir = medium_family
    code, output = cli_run("pack", tasks_dir, "--base", base, "-o", small_disk / "f.tallz", "--device", "cpu")
    one_line_error(code, output, "No space left on device", "nothing was written")
    assert list(small_disk.iterdir()) == []

    archive = tmp_path / "f.tallz"
    tallzip.pack(tasks_dir, base, archive, run=RunOptions(device="cpu"))
    for args in (["--task", "task0", "-o", small_disk / "t.safetensors"],
                 ["--task", "task0", "--format", "pt", "-o", small_disk / "t.pt"],
                 ["--all", "-o", small_disk / "all"]):
        code, output = cli_run("extract", archive, *args, "--device", "cpu")
        one_line_error(code, output, "No space left on device", "nothing was written")
        assert list(small_disk.iterdir()) == []
    # and the library raises the OSError itself, naming the target
    with tallzip.open(archive) as opened, pytest.raises(OSError, match="No space left") as caught:
        opened.extract("task1", small_disk / "x.safetensors")
    assert caught.value.filename == str(small_disk / "x.safetensors")
