"""The command line's errors (issue 18): with --json a script gets {"error", "exit_code"} on stdout (the one
`error:` line stays on stderr); `tallzip --help` and usage errors import no torch; a Ctrl-C while torch is
being imported is the one line "interrupted" and exit 130, never a traceback."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
from click.testing import CliRunner

from tallzip.cli.main import cli


def invoke(args):
    return CliRunner().invoke(cli, [str(a) for a in args])


@pytest.mark.parametrize("command", [
    ["pack", "{missing}", "--base", "{missing}", "-o", "{tmp}/a.tallz"],
    ["extract", "{missing}.tallz", "--task", "t", "-o", "{tmp}/t"],
    ["info", "{missing}.tallz"],
    ["merge", "{missing}.tallz", "--method", "task-arithmetic", "-o", "{tmp}/m.safetensors"],
    ["verify", "{missing}.tallz"],
    ["add", "{missing}.tallz", "{missing}.safetensors", "--task", "t"],
    ["remove", "{missing}.tallz", "--task", "t"],
], ids=lambda c: c[0])
def test_json_errors_are_json_on_stdout(tmp_path, command):
    args = [a.format(missing=tmp_path / "nothing", tmp=tmp_path) for a in command] + ["--json"]
    result = invoke(args)
    assert result.exit_code == 1
    stderr = result.stderr.strip().splitlines()
    assert len(stderr) == 1 and stderr[0].startswith("error: ")
    stdout = result.stdout.strip().splitlines()
    assert len(stdout) == 1, result.stdout
    error = json.loads(stdout[0])
    assert error == {"error": stderr[0][len("error: "):], "exit_code": 1}
    assert "nothing" in error["error"]


def test_json_usage_errors_are_json_too(tmp_path):
    result = invoke(["info", tmp_path / "a.tallz", "--json", "--no-such-option"])
    assert result.exit_code == 2
    error = json.loads(result.stdout)
    assert error["exit_code"] == 2 and "--no-such-option" in error["error"]
    assert result.stderr.strip() == f"error: {error['error']}"


def test_without_json_stdout_stays_empty(tmp_path):
    result = invoke(["info", tmp_path / "a.tallz"])
    assert result.exit_code == 1 and result.stdout == "" and result.stderr.startswith("error: ")


def run_python(code: str, *args, timeout=120):
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code), *map(str, args)],
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("argv", [["--help"], ["pack"], ["no-such-command"], ["merge", "x", "-o", "y"], ["--version"]])
def test_help_and_usage_errors_import_no_torch(argv):
    result = run_python("""
        import sys
        from tallzip.cli.main import main
        sys.argv = ["tallzip", *sys.argv[1:]]
        try:
            main()
        except SystemExit as exc:
            print("TORCH" if "torch" in sys.modules else "NO-TORCH", exc.code, file=sys.stderr)
        """, *argv)
    assert result.stderr.strip().splitlines()[-1].split()[0] == "NO-TORCH", result.stderr


def test_ctrl_c_while_torch_is_imported_is_one_line(tmp_path):
    """KeyboardInterrupt raised by the import of torch itself (where a Ctrl-C in the first second lands)."""
    result = run_python("""
        import sys

        class CtrlC:
            def find_spec(self, name, path=None, target=None):
                if name == "torch":
                    raise KeyboardInterrupt
                return None

        sys.meta_path.insert(0, CtrlC())
        sys.argv = ["tallzip", *sys.argv[1:]]
        from tallzip.cli.main import main
        main()
        """, "info", tmp_path / "a.tallz")
    assert result.returncode == 130
    assert result.stderr == "error: interrupted\n" and result.stdout == ""
