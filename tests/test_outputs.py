"""What extract (and demo) write, and what they leave alone: user files survive --force, the
extension decides the format, outputs get a new file's mode, errors name the target."""
from __future__ import annotations

import errno
import json
import os
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.numpy import load_file as np_load_file
from safetensors.numpy import save_file as np_save_file

import tallzip
from tallzip.cli.main import cli
from tallzip.formats.checkpoints import outputs
from tallzip.formats.checkpoints.folders import SHARD_INDEX
from tallzip.formats.checkpoints.outputs import atomic_output

from conftest import np_rebuilt, numpy_family, write_family
from tallzip.options import RunOptions

MASKED = ("enc.w", "enc.b", "blk.0.w")
SHARDS = {"model-00001-of-00002.safetensors": ["enc.w", "enc.b"],
          "model-00002-of-00002.safetensors": ["blk.0.w", "frozen.emb", "head.weight", "steps"]}
CONFIG = '{"model_type": "tiny"}'


def run(*args):
    result = CliRunner().invoke(cli, [str(a) for a in args])
    return result.exit_code, result.output


def one_line_error(code, output, *words):
    lines = [line for line in output.strip().splitlines() if line]
    assert code == 1 and len(lines) == 1 and lines[0].startswith("error: "), (code, output)
    for word in words:
        assert word in lines[0], (word, lines[0])
    return lines[0]


def expected(base, tasks, task) -> dict:
    """The task as the archive must rebuild it, computed in plain numpy (default lambda 0.4)."""
    out = {n: np_rebuilt(base, tasks, task, n, 0.4) for n in MASKED}
    out.update({n: tasks[task][n] for n in ("frozen.emb", "head.weight", "steps")})
    return out


def assert_task(got: dict, base, tasks, task):
    want = expected(base, tasks, task)
    assert set(got) == set(want)
    for name, value in want.items():
        value_got = got[name].numpy() if isinstance(got[name], torch.Tensor) else got[name]
        assert np.array_equal(value_got, value), (task, name)


def load_sharded(folder: Path) -> dict:
    index = json.loads((folder / SHARD_INDEX).read_text())
    got = {}
    for file in set(index["weight_map"].values()):
        got.update(np_load_file(str(folder / file)))
    return got


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    """task0, task1 are safetensors files; task2 is a sharded folder with a config.json."""
    root = tmp_path_factory.mktemp("outputs")
    base, tasks = numpy_family(n_tasks=3)
    base_path, tasks_dir = write_family(root / "fam", base, tasks)
    (tasks_dir / "task2.safetensors").unlink()
    sharded = tasks_dir / "task2"
    sharded.mkdir()
    for file, names in SHARDS.items():
        np_save_file({n: tasks["task2"][n] for n in names}, str(sharded / file))
    (sharded / SHARD_INDEX).write_text(json.dumps(
        {"metadata": {}, "weight_map": {n: f for f, names in SHARDS.items() for n in names}}))
    (sharded / "config.json").write_text(CONFIG)
    archive = root / "f.tallz"
    tallzip.pack(tasks_dir, base_path, archive, run=RunOptions(device="cpu"))
    return base, tasks, archive


def listing(folder: Path) -> dict:
    """Every file under `folder` with its bytes (hidden temporaries included: none may be left)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# --- 1. --force replaces only what extract writes ---------------------------------------------------------

def test_extract_all_force_keeps_the_users_files(packed, tmp_path):
    base, tasks, archive = packed
    out = tmp_path / "all"
    assert run("extract", archive, "--all", "-o", out)[0] == 0
    (out / "notes.txt").write_text("mine")
    (out / "task2" / "mine.txt").write_text("mine too")
    (out / "task0.safetensors").write_bytes(b"stale")  # an earlier output: --force replaces it
    code, output = run("extract", archive, "--all", "-o", out, "--force")
    assert code == 0, output
    assert (out / "notes.txt").read_text() == "mine"
    assert (out / "task2" / "mine.txt").read_text() == "mine too"
    for task in ("task0", "task1"):
        assert_task(np_load_file(str(out / f"{task}.safetensors")), base, tasks, task)
    assert_task(load_sharded(out / "task2"), base, tasks, "task2")
    assert (out / "task2" / "config.json").read_text() == CONFIG
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt", "task0.safetensors", "task1.safetensors", "task2"]


def test_sharded_task_force_keeps_the_users_files(packed, tmp_path):
    base, tasks, archive = packed
    out = tmp_path / "task2"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    (out / "config.json").write_text("old")
    code, output = run("extract", archive, "--task", "task2", "-o", out, "--force")
    assert code == 0, output
    assert (out / "notes.txt").read_text() == "mine"
    assert (out / "config.json").read_text() == CONFIG
    assert_task(load_sharded(out), base, tasks, "task2")
    assert sorted(p.name for p in out.iterdir()) == sorted([*SHARDS, SHARD_INDEX, "config.json", "notes.txt"])


def test_a_clash_without_force_names_the_file_and_changes_nothing(packed, tmp_path):
    _, _, archive = packed
    out = tmp_path / "all"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    (out / "task1.safetensors").write_text("my own file of that name")
    before = listing(out)
    one_line_error(*run("extract", archive, "--all", "-o", out), str(out / "task1.safetensors"), "--force")
    assert listing(out) == before
    (out / "task2").mkdir()
    (out / "task2" / "config.json").write_text("mine")
    before = listing(out)
    one_line_error(*run("extract", archive, "--task", "task2", "-o", out / "task2"), str(out / "task2" / "config.json"))
    assert listing(out) == before


def test_an_empty_folder_is_a_fine_target(packed, tmp_path):
    base, tasks, archive = packed
    (tmp_path / "empty").mkdir()
    code, output = run("extract", archive, "--all", "-o", tmp_path / "empty")
    assert code == 0, output
    assert sorted(p.name for p in (tmp_path / "empty").iterdir()) == ["task0.safetensors", "task1.safetensors", "task2"]
    (tmp_path / "empty2").mkdir()
    code, output = run("extract", archive, "--task", "task0", "-o", tmp_path / "empty2", "--force")
    assert code == 0, output
    assert_task(np_load_file(str(tmp_path / "empty2" / "task0.safetensors")), base, tasks, "task0")
    assert [p.name for p in (tmp_path / "empty2").iterdir()] == ["task0.safetensors"]


def test_a_failure_while_moving_in_puts_the_folder_back(packed, tmp_path, monkeypatch):
    """The last file fails to go in: the files replaced before it come back, the new ones go."""
    _, _, archive = packed
    out = tmp_path / "all"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    (out / "task0.safetensors").write_bytes(b"an earlier output")
    before = listing(out)
    real = outputs._rename_no_replace
    def failing(src, dest):
        if Path(dest).parent.name == "task2":  # after task0 (replaced) and task1 (new) went in
            raise OSError(errno.EIO, "Input/output error", str(src))
        real(src, dest)
    monkeypatch.setattr(outputs, "_rename_no_replace", failing)
    line = one_line_error(*run("extract", archive, "--all", "-o", out, "--force"), "Input/output error")
    assert ".tmp" not in line and str(out / "task2") in line
    assert listing(out) == before


# --- 2. the extension decides ---------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["t.pt", "t.pth", "t.bin"])
def test_a_torch_extension_gives_a_torch_state_dict(packed, tmp_path, name):
    base, tasks, archive = packed
    code, output = run("extract", archive, "--task", "task1", "-o", tmp_path / name)
    assert code == 0, output
    state = torch.load(tmp_path / name, weights_only=True)
    assert type(state) is dict
    assert_task(state, base, tasks, "task1")


@pytest.mark.parametrize("name", ["big.pt", "big.safetensors"])
def test_a_sharded_task_to_a_file_name_is_one_file(packed, tmp_path, name):
    base, tasks, archive = packed
    code, output = run("extract", archive, "--task", "task2", "-o", tmp_path / name)
    assert code == 0, output
    target = tmp_path / name
    assert target.is_file() and [p.name for p in tmp_path.iterdir()] == [name]
    got = torch.load(target, weights_only=True) if name.endswith(".pt") else np_load_file(str(target))
    assert_task(got, base, tasks, "task2")


@pytest.mark.parametrize("name, fmt", [("x.safetensors", "pt"), ("x.pt", "safetensors"), ("x.bin", "safetensors")])
def test_a_format_contradicting_the_extension_is_an_error(packed, tmp_path, name, fmt):
    _, _, archive = packed
    one_line_error(*run("extract", archive, "--task", "task0", "-o", tmp_path / name, "--format", fmt),
                   "contradicts", name)
    assert list(tmp_path.iterdir()) == []


def test_a_name_without_a_checkpoint_extension_is_a_folder(packed, tmp_path):
    base, tasks, archive = packed
    assert run("extract", archive, "--task", "task0", "-o", tmp_path / "t0")[0] == 0
    assert_task(np_load_file(str(tmp_path / "t0" / "task0.safetensors")), base, tasks, "task0")
    assert run("extract", archive, "--task", "task2", "-o", tmp_path / "t2", "--format", "pt")[0] == 0
    assert sorted(p.name for p in (tmp_path / "t2").iterdir()) == ["config.json", "model.pt"]
    assert_task(torch.load(tmp_path / "t2" / "model.pt", weights_only=True), base, tasks, "task2")
    one_line_error(*run("extract", archive, "--all", "-o", tmp_path / "all.safetensors"), "--all writes a folder")
    (tmp_path / "d.pt").mkdir()
    one_line_error(*run("extract", archive, "--task", "task0", "-o", tmp_path / "d.pt", "--force"), "is a folder")


def test_help_says_what_force_replaces_and_what_the_extension_decides():
    code, output = run("extract", "--help")
    assert code == 0
    text = " ".join(output.split())
    for words in ("NAME.safetensors", "weights_only=True", "only in a folder", "--force",
                  "replaces just those files"):
        assert words in text, words


# --- 3. demo --------------------------------------------------------------------------------------------

def test_demo_refuses_a_folder_that_is_not_empty(tmp_path):
    folder = tmp_path / "demo"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")
    (folder / "family.tallz").write_text("my own file of that name")
    one_line_error(*run("demo", "--folder", folder, "--tasks", "2"), str(folder), "--force")
    assert sorted(p.name for p in folder.iterdir()) == ["family.tallz", "notes.txt"]
    assert (folder / "family.tallz").read_text() == "my own file of that name"
    code, output = run("demo", "--folder", folder, "--tasks", "2", "--force")
    assert code == 0, output
    assert (folder / "notes.txt").read_text() == "mine"
    assert tallzip.open(folder / "family.tallz").tasks == ["task00", "task01"]


# --- 4. modes -------------------------------------------------------------------------------------------

def test_every_output_gets_the_mode_of_a_new_file(packed, tmp_path):
    base, tasks, archive = packed
    before = os.umask(0o002)  # 0664: neither tempfile's 0600 nor a fixed 0644
    try:
        assert run("extract", archive, "--all", "-o", tmp_path / "all")[0] == 0
        assert run("extract", archive, "--task", "task2", "-o", tmp_path / "t2")[0] == 0
        assert run("extract", archive, "--task", "task0", "-o", tmp_path / "t0.pt")[0] == 0
        assert run("extract", archive, "--task", "task0", "-o", tmp_path / "t0.safetensors")[0] == 0
        assert run("merge", archive, "-o", tmp_path / "m.safetensors", "--method", "task-arithmetic")[0] == 0
    finally:
        os.umask(before)
    paths = sorted(tmp_path.rglob("*"))
    assert len([p for p in paths if p.is_file()]) == 6 + 4 + 3
    for path in paths:
        assert path.stat().st_mode & 0o777 == (0o775 if path.is_dir() else 0o664), path


# --- 5. errors name the target --------------------------------------------------------------------------

@pytest.fixture
def read_only(tmp_path):
    """A folder nothing can be written in: a read-only tmpfs for root (which ignores modes), else mode 0555."""
    folder = tmp_path / "ro"
    folder.mkdir()
    if os.geteuid() != 0:
        folder.chmod(0o555)
        yield folder
        folder.chmod(0o755)
        return
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(folder)], capture_output=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a read-only tmpfs: {result.stderr.decode().strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], check=True)


def test_a_read_only_target_is_named_not_the_temporary(packed, read_only):
    base, tasks, archive = packed
    for args, target in ((["extract", archive, "--task", "task0", "-o"], "t0.safetensors"),
                         (["extract", archive, "--all", "-o"], "all"),
                         (["pack", base_dir(archive), "--base", base_dir(archive).parent / "base.safetensors", "-o"],
                          "f.tallz")):
        line = one_line_error(*run(*args, read_only / target))
        assert re.match(rf"error: {re.escape(str(read_only / target))}: (Read-only file system|Permission denied)",
                        line), line
        assert ".tmp" not in line


def base_dir(archive: Path) -> Path:
    return archive.parent / "fam" / "tasks"


def test_any_error_while_writing_names_the_target(tmp_path):
    """Not only a full disk: every OSError about the temporary, or a file inside it, names the target."""
    for folder, inner in ((False, ""), (True, "/sub/x.safetensors")):
        target = tmp_path / ("out" if folder else "out.safetensors")
        with pytest.raises(OSError) as caught:
            with atomic_output(target, folder=folder) as tmp:
                raise OSError(errno.EIO, "Input/output error", str(tmp) + inner)
        assert caught.value.filename == str(target) + inner
        assert not target.exists() and list(tmp_path.iterdir()) == []


# --- 6. progress and --json -----------------------------------------------------------------------------

def test_extract_reports_progress_and_json(packed, tmp_path):
    _, tasks, archive = packed
    calls = []
    with tallzip.open(archive) as opened:
        opened.extract(None, tmp_path / "all", progress=lambda *call: calls.append(call))
        total = sum(len(opened.task_entry(t)["tensors"]) for t in opened.tasks)
    assert calls and {label for label, _, _ in calls} == {"extracting"}
    assert [done for _, done, _ in calls] == sorted(done for _, done, _ in calls)
    assert calls[-1] == ("extracting", total, total) and total == sum(len(sd) for sd in tasks.values())

    code, output = run("extract", archive, "--all", "-o", tmp_path / "json", "--json")
    assert code == 0, output
    report = json.loads(output)
    on_disk = sorted(p for p in (tmp_path / "json").rglob("*") if p.is_file())
    assert sorted(Path(f["path"]) for f in report["files"]) == on_disk
    assert report["bytes"] == sum(p.stat().st_size for p in on_disk)
    assert all(f["bytes"] == Path(f["path"]).stat().st_size for f in report["files"])
    assert report["tasks"] == ["task0", "task1", "task2"] and report["seconds"] >= 0
    code, output = run("extract", archive, "--task", "task0", "-o", tmp_path / "t0.pt", "--json")
    assert json.loads(output)["files"] == [{"path": str(tmp_path / "t0.pt"), "bytes": (tmp_path / "t0.pt").stat().st_size}]


def test_a_killed_extract_into_an_existing_folder_is_swept_by_the_next(packed, tmp_path):
    """A staging folder left inside the target by a killed writer goes; the user's files stay."""
    _, _, archive = packed
    dead = subprocess.Popen(["true"])
    dead.wait()
    out = tmp_path / "all"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    stale = out / f".all.{dead.pid}.abc123.tmp"
    stale.mkdir()
    (stale / "task0.safetensors").write_bytes(b"partial")
    assert run("extract", archive, "--all", "-o", out)[0] == 0
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt", "task0.safetensors", "task1.safetensors", "task2"]
