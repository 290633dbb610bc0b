"""The top-level verbs (tallzip/verbs.py), the deprecated aliases, and a torch-free `import tallzip` / `--help`."""
import subprocess
import sys
import warnings

import numpy as np
import pytest
from safetensors.numpy import load_file as np_load_file

import tallzip
from tallzip.options import RunOptions, StoreOptions

VERBS = ("pack", "open", "extract", "verify", "info", "merge", "add", "remove")


@pytest.mark.parametrize("verb", VERBS)
def test_each_verb_is_documented_in_args_returns_example_shape(verb):
    doc = getattr(tallzip, verb).__doc__
    assert all(section in doc for section in ("Args:", "Returns:", "Example:")), verb


def _modules_loaded(code: str) -> set:
    out = subprocess.run([sys.executable, "-c", code + "\nimport sys; print(' '.join(sys.modules))"],
                         capture_output=True, text=True, check=True).stdout
    return set(out.split())


def test_import_tallzip_and_help_load_no_torch():
    assert "torch" not in _modules_loaded("import tallzip")
    loaded = _modules_loaded("import sys\nsys.argv = ['tallzip', '--help']\nfrom tallzip.cli.main import main\n"
                             "try:\n    main()\nexcept SystemExit:\n    pass")
    assert "torch" not in loaded and "click" in loaded
    # and a verb, once used, does load it
    assert "torch" in _modules_loaded("import tallzip\ntallzip.pack")


def test_verbs_extract_verify_info_on_a_path(tmp_path, family):
    base, tasks, base_path, tasks_dir = family
    out = tmp_path / "f.tallz"
    tallzip.pack(tasks_dir, base_path, out, store=StoreOptions(mtv_dtype="float32"), run=RunOptions(device="cpu"))
    report = tallzip.extract(out, "task0", tmp_path / "t0.safetensors")
    assert report.output == tmp_path / "t0.safetensors" and report.bytes == report.output.stat().st_size
    got = np_load_file(str(report.output))
    assert set(got) == set(tasks["task0"])
    info = tallzip.info(out)
    assert sorted(info["tasks"]) == sorted(tasks)
    assert tallzip.verify(out, tasks_dir)["verdict"] == "matches"
    first = "enc.w"
    changed = dict(tasks["task1"])
    changed[first] = changed[first] + np.float32(1.0)  # a checkpoint that is not the one packed
    from safetensors.numpy import save_file
    save_file(changed, str(tasks_dir / "task1.safetensors"))
    assert tallzip.verify(out, tasks_dir)["verdict"] == "differs"


def test_deprecated_aliases_still_work_and_warn(tmp_path, family):
    _, _, base_path, tasks_dir = family
    out = tmp_path / "f.tallz"
    tallzip.pack(tasks_dir, base_path, out, run=RunOptions(device="cpu"))
    sys.modules.pop("tallzip.inspect", None)
    with pytest.warns(DeprecationWarning, match="tallzip.inspect"):
        import tallzip.inspect as old_inspect
    with tallzip.open(out) as arc:
        assert old_inspect.verify(arc)["ok"]
        with pytest.warns(DeprecationWarning, match="extract_with_report"):
            report = arc.extract_with_report("task0", tmp_path / "a.safetensors")
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            new = arc.extract("task0", tmp_path / "b.safetensors")
    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "b.safetensors").read_bytes()
    assert report.output.name == "a.safetensors" and new.output.name == "b.safetensors"
