"""The command line: the documented commands work, bad input gives one line and a non-zero exit."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from safetensors.numpy import load_file as np_load_file

from tallzip.cli.main import cli

from conftest import np_rebuilt


def run(*args):
    result = CliRunner().invoke(cli, [str(a) for a in args])
    return result.exit_code, result.output


def assert_one_line_error(code, output, pattern, exit_code=None):
    assert code != 0
    if exit_code is not None:
        assert code == exit_code, (code, output)
    lines = [line for line in output.strip().splitlines() if line]
    assert len(lines) == 1 and lines[0].startswith("error: "), output
    assert "Traceback" not in output and not re.search(r"^(Usage|Error):", output, re.M)
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
    assert_one_line_error(*run("pack", tasks_dir, "-o", out), "Missing option '--base'", exit_code=2)
    assert_one_line_error(*run("pack", tmp_path / "nowhere", "--base", base_path, "-o", out), "not a folder")
    assert not out.exists()
    assert run("pack", tasks_dir, "--base", base_path, "-o", out)[0] == 0
    assert_one_line_error(*run("pack", tasks_dir, "--base", base_path, "-o", out), "already exists")
    assert_one_line_error(*run("extract", out, "--task", "cars", "-o", tmp_path / "c.safetensors"),
                          "no task 'cars'.*task0, task1, task2")
    assert not (tmp_path / "c.safetensors").exists()
    assert_one_line_error(*run("info", tmp_path / "missing.tallz"),
                          "missing.tallz: no such file, expected a .tallz archive file", exit_code=1)
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


# --- one error style, one exit-code scheme ----------------------------------------------------------

USAGE_ERRORS = [  # (arguments, what the one line must say); each must exit 2
    ([], None),  # no command: the group's help, exit 0 (checked below)
    (["frobnicate"], r"No such command 'frobnicate'\. Try 'tallzip --help'\.$"),
    (["pack"], r"Missing argument 'CHECKPOINTS_DIR'\. Try 'tallzip pack --help'\.$"),
    (["pack", "{tasks}", "-o", "{tmp}/a.tallz"], r"Missing option '--base'"),
    (["pack", "{tasks}", "--base", "{base}", "-o", "{tmp}/a.tallz", "--mask-codec", "bits"],
     r"Invalid value for '--mask-codec': 'bits' is not one of"),
    (["pack", "{tasks}", "--base", "{base}", "-o", "{tmp}/a.tallz", "--lambda", "x=y"], r"neither a number"),
    (["info", "--bogus", "x.tallz"], r"No such option '--bogus'"),
    (["extract", "{tmp}/a.tallz", "-o", "{tmp}/out"], r"give exactly one of --task NAME or --all\. Try 'tallzip extract --help'"),
    (["merge", "{tasks}", "-o", "{tmp}/m.safetensors", "--method", "ties"],
     r"Missing option '--base': .*tasks is a folder of checkpoints"),
    (["merge", "{tasks}", "--base", "{base}", "-o", "{tmp}/m.safetensors"], r"Missing option '--method'"),
]


@pytest.mark.parametrize("args,pattern", USAGE_ERRORS[1:])
def test_usage_errors_are_one_line_and_exit_2(family, tmp_path, args, pattern):
    """click's own errors (it prints a Usage: block and `Error: ...`) come out in tallzip's style."""
    base, tasks, base_path, tasks_dir = family
    filled = [a.format(tasks=tasks_dir, base=base_path, tmp=tmp_path) for a in args]
    assert_one_line_error(*run(*filled), pattern, exit_code=2)
    assert not [p for p in tmp_path.iterdir() if p.name != "fam"]  # nothing written


def test_usage_errors_from_the_installed_command(tmp_path):
    """The same through the entry point: stderr holds the one line, stdout nothing, exit 2."""
    result = subprocess.run([sys.executable, "-m", "tallzip.cli.main", "pack", str(tmp_path), "-o", "x.tallz"],
                            capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr == "error: Missing option '--base'. Try 'tallzip pack --help'.\n"


def test_refusals_exit_1_naming_the_path_and_what_was_expected(family, tmp_path):
    base, tasks, base_path, tasks_dir = family
    folder = tmp_path / "SOMEDIR"
    folder.mkdir()
    for command in (["info"], ["verify"], ["extract", "--all", "-o", str(tmp_path / "out")]):
        assert_one_line_error(*run(command[0], folder, *command[1:]),
                              f"^error: {re.escape(str(folder))}: is a folder, expected a .tallz archive file$",
                              exit_code=1)
        assert_one_line_error(*run(command[0], tmp_path / "gone.tallz", *command[1:]),
                              f"^error: {re.escape(str(tmp_path / 'gone.tallz'))}: no such file, expected a .tallz",
                              exit_code=1)
    assert not (tmp_path / "out").exists()
    # merge reads an archive the same way
    assert_one_line_error(*run("merge", tmp_path / "gone.tallz", "-o", tmp_path / "m.safetensors",
                               "--method", "consensus-ta"), "gone.tallz", exit_code=1)
    out = tmp_path / "a.tallz"
    assert run("pack", tasks_dir, "--base", base_path, "-o", out)[0] == 0
    assert_one_line_error(*run("pack", tasks_dir, "--base", base_path, "-o", out), "already exists", exit_code=1)


def test_a_bug_is_one_line_and_exit_1(family, tmp_path, monkeypatch):
    base, tasks, base_path, tasks_dir = family
    out = tmp_path / "a.tallz"
    assert run("pack", tasks_dir, "--base", base_path, "-o", out)[0] == 0

    def broken(archive):
        raise RuntimeError("boom")

    monkeypatch.setattr("tallzip.inspect.summary", broken)  # the command imports it when run
    assert_one_line_error(*run("info", out), r"internal error: RuntimeError: boom \(set TALLZIP_DEBUG=1", exit_code=1)


def test_help_documents_the_exit_codes_and_required_options():
    code, output = run("--help")
    assert code == 0
    flat = " ".join(output.split())
    assert re.search(r"Exit codes: 0 done .*; 1 refused or failed .*; 2 usage .*; 130 interrupted", flat), flat
    code, output = run()  # bare `tallzip`: the help, not an error line
    assert code == 2 and output.startswith("Usage: tallzip") and "Exit codes:" in output and not output.startswith("error:")
    code, output = run("pack", "--help")
    assert code == 0 and re.search(r"--base PATH .*\[required\]", " ".join(output.split()))
    code, output = run("merge", "--help")
    assert code == 0 and "[required when SOURCE is a folder" in " ".join(output.split())
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    flat = " ".join(readme.split())
    assert re.search(r"0 done .*1 refused or failed .*2 usage .*130 interrupted", flat)
