"""The options of the verbs as objects (tallzip/options.py): one place checks them, the old keyword
arguments still work (with a DeprecationWarning) and give the same archive, and the CLI builds them."""
import dataclasses
import warnings

import pytest

import tallzip
from tallzip.errors import TallzipError
from tallzip.options import DEFAULT_CODECS, RunOptions, StoreOptions


@pytest.mark.parametrize("store, message", [
    (dict(merge="mean"), "unknown merge 'mean'"),
    (dict(density=0.0), "density must be in"),
    (dict(density=1.5), "density must be in"),
    (dict(mtv_dtype="float8"), "unknown mtv dtype"),
    (dict(codecs={"mask": "zstd"}), "mask codec 'zstd' is not one of"),
    (dict(level=0), "level must be"),
    (dict(level=23), "level must be"),
    (dict(chunk_elements=3), "chunk elements must be"),
])
def test_store_options_refuse_bad_values(store, message):
    with pytest.raises(TallzipError, match=message):
        StoreOptions(**store)


@pytest.mark.parametrize("run, message", [
    (dict(memory="lots"), "memory budget 'lots'"),
    (dict(memory="1M"), "below the minimum"),
    (dict(workers=0), "workers must be"),
    (dict(workers=2.5), "workers must be"),
    (dict(engine="dask"), "unknown engine 'dask'"),
    (dict(progress="yes"), "progress must be a callable"),
])
def test_run_options_refuse_bad_values(run, message):
    with pytest.raises(TallzipError, match=message):
        RunOptions(**run)


def test_options_are_frozen_and_codecs_completed():
    store = StoreOptions(codecs={"mask": "bits-ctx"})
    assert store.codecs == {**DEFAULT_CODECS, "mask": "bits-ctx"} and set(store.codecs) == {"float", "mask", "other"}
    with pytest.raises(dataclasses.FrozenInstanceError):
        store.level = 3
    with pytest.raises(dataclasses.FrozenInstanceError):
        RunOptions().memory = "4G"


def test_old_keywords_warn_and_give_the_same_archive(tmp_path, family):
    _, _, base_path, tasks_dir = family
    new, old = tmp_path / "new.tallz", tmp_path / "old.tallz"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the object form warns nothing
        tallzip.pack(tasks_dir, base_path, new, StoreOptions(lambdas=0.3, mtv_dtype="float32", level=3),
                     RunOptions(device="cpu", memory="256M"))
    with pytest.warns(DeprecationWarning, match=r"pack\(\): the keyword arguments .*lambdas.*memory"):
        tallzip.pack(tasks_dir, base_path, old, lambdas=0.3, mtv_dtype="float32", level=3, device="cpu",
                     memory="256M")
    assert new.read_bytes() == old.read_bytes()
    with pytest.raises(TypeError, match="unexpected keyword argument 'lamdba'"):
        tallzip.pack(tasks_dir, base_path, tmp_path / "x.tallz", lamdba=0.3)
    assert not (tmp_path / "x.tallz").exists()
    with pytest.warns(DeprecationWarning, match=r"merge\(\): the keyword arguments device"):
        old_state = tallzip.merge(tasks_dir, base=base_path, method="task-arithmetic", device="cpu")
    new_state = tallzip.merge(tasks_dir, base=base_path, method="task-arithmetic", run=RunOptions(device="cpu"))
    assert old_state.keys() == new_state.keys()
    assert all(old_state[n].equal(new_state[n]) for n in new_state)
    with pytest.warns(DeprecationWarning, match=r"verify\(\)"):
        assert tallzip.verify(new, tasks_dir, workers=1)["verdict"] == "matches"


def test_a_bad_option_is_refused_before_any_output(tmp_path, family):
    _, _, base_path, tasks_dir = family
    out = tmp_path / "f.tallz"
    with pytest.raises(TallzipError, match="level must be"):
        tallzip.pack(tasks_dir, base_path, out, StoreOptions(level=99))
    assert not out.exists()


def test_cli_builds_the_options(tmp_path, family, monkeypatch):
    from click.testing import CliRunner
    from tallzip.cli.main import cli
    _, _, base_path, tasks_dir = family
    seen = {}

    def fake_pack(tasks, base, output, store=None, run=None, *, force=False, **deprecated):
        seen.update(store=store, run=run, force=force, deprecated=deprecated)
        raise TallzipError("stop here")
    monkeypatch.setattr(tallzip, "pack", fake_pack)
    result = CliRunner().invoke(cli, ["pack", str(tasks_dir), "--base", str(base_path), "-o", str(tmp_path / "a.tallz"),
                                      "--level", "5", "--mask-codec", "bits-lvl", "--memory", "256M", "--lambda", "0.3",
                                      "--device", "cpu", "--force"])
    assert result.exit_code != 0 and "stop here" in result.output
    assert seen["deprecated"] == {} and seen["force"] is True
    assert seen["store"] == StoreOptions(lambdas=0.3, level=5, codecs={"mask": "bits-lvl"})
    assert (seen["run"].memory, seen["run"].device, seen["run"].engine) == ("256M", "cpu", "local")


def test_options_are_top_level_names():
    import tallzip.options as options
    assert tallzip.StoreOptions is options.StoreOptions and tallzip.RunOptions is options.RunOptions
