"""The command line: the documented commands work, bad input gives one line and a non-zero exit."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from click.testing import CliRunner
from safetensors.numpy import load_file as np_load_file

from tallzip.cli.main import cli

from conftest import np_rebuilt


def run(*args):
    result = CliRunner().invoke(cli, [str(a) for a in args])
    return result.exit_code, result.output


def assert_one_line_error(code, output, pattern):
    assert code != 0
    lines = [line for line in output.strip().splitlines() if line]
    assert len(lines) == 1 and lines[0].startswith("error: "), output
    assert "Traceback" not in output
    import re
    assert re.search(pattern, lines[0]), lines[0]


def test_pack_info_extract_verify(family, tmp_path):
    base, tasks, base_path, tasks_dir = family
    out = tmp_path / "f.tallz"
    code, output = run("pack", tasks_dir, "--base", base_path, "-o", out, "--lambda", "0.3", "--lambda", "task2=0.5")
    assert code == 0, output
    code, output = run("info", out, "--json")
    info = json.loads(output)
    assert {t: r["lambda"] for t, r in info["tasks"].items()} == {"task0": 0.3, "task1": 0.3, "task2": 0.5}
    code, output = run("info", out)
    assert code == 0 and "task2" in output and "ratio" in output
    code, output = run("extract", out, "--task", "task2", "-o", tmp_path / "t2.safetensors")
    assert code == 0, output
    got = np_load_file(str(tmp_path / "t2.safetensors"))
    expected = np_rebuilt(base, tasks, "task2", "blk.0.w", 0.5)
    assert np.array_equal(got["blk.0.w"], expected)
    code, output = run("extract", out, "--all", "-o", tmp_path / "all")
    assert code == 0 and sorted(p.name for p in (tmp_path / "all").iterdir()) == [f"task{i}.safetensors" for i in range(3)]
    code, output = run("verify", out, "--against", tasks_dir, "--json")
    report = json.loads(output)
    assert code == 0 and all(r["mask_bits_differing"] == 0 for r in report["tasks"].values())


def test_bad_input_one_line_errors(family, tmp_path):
    base, tasks, base_path, tasks_dir = family
    out = tmp_path / "f.tallz"
    assert_one_line_error(*run("pack", tasks_dir, "-o", out), "missing base")
    assert_one_line_error(*run("pack", tmp_path / "nowhere", "--base", base_path, "-o", out), "not a folder")
    assert not out.exists()
    assert run("pack", tasks_dir, "--base", base_path, "-o", out)[0] == 0
    assert_one_line_error(*run("pack", tasks_dir, "--base", base_path, "-o", out), "already exists")
    assert_one_line_error(*run("extract", out, "--task", "cars", "-o", tmp_path / "c.safetensors"),
                          "no task 'cars'.*task0, task1, task2")
    assert not (tmp_path / "c.safetensors").exists()
    assert_one_line_error(*run("info", tmp_path / "missing.tallz"), "no such archive")
    (tmp_path / "junk.tallz").write_bytes(b"\0" * 200)
    assert_one_line_error(*run("info", tmp_path / "junk.tallz"), "not a tallzip archive")
    assert_one_line_error(*run("pack", tasks_dir, "--base", base_path, "-o", tmp_path / "g.tallz", "--lambda", "x=y"),
                          "neither a number nor TASK=NUMBER")
    # a pickle that needs code to load is refused
    (tasks_dir / "evil.pt").write_bytes(b"\x80\x04\x95\x1d\x00\x00\x00\x00\x00\x00\x00\x8c\x05posix\x94\x8c\x06system\x94\x93\x94\x8c\x04true\x94\x85\x94R\x94.")
    code, output = run("pack", tasks_dir, "--base", base_path, "-o", tmp_path / "h.tallz")
    assert code != 0 and "Traceback" not in output and "system" in output
    assert not (tmp_path / "h.tallz").exists()


def test_installed_entry_point_runs(tmp_path):
    result = subprocess.run([sys.executable, "-m", "tallzip.cli.main", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "pack" in result.stdout and "extract" in result.stdout
