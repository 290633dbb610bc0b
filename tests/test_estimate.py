"""The data-free rebuild estimate (issue 20): recorded by pack per task, reported by info and verify, pack's
warning, --keep auto and --keep-by; checked against numpy computations of the same quantities."""
import json
import shutil
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from safetensors.numpy import load_file

import tallzip
from tallzip.cli.main import cli
from tallzip.ops.quality import POOR_COSINE

from conftest import np_rebuilt, numpy_family, write_family

MASKED = ("enc.w", "enc.b", "blk.0.w")  # numpy_family's tensors the tasks change ("frozen.emb" is shared)
FIXTURES = Path(__file__).parent / "fixtures"


def np_estimate(base, tuned, rebuilt_of):
    """(rel_error, cosine) from the tensors, in float64: sum over MASKED of the rebuild's error and direction."""
    tau_sq = err_sq = dot = rebuilt_sq = 0.0
    for name in MASKED:
        b, t, r = (x.astype(np.float64) for x in (base[name], tuned[name], rebuilt_of(name)))
        tau_sq += np.sum((t - b) ** 2)
        err_sq += np.sum((r - t) ** 2)
        dot += np.sum((r - b) * (t - b))
        rebuilt_sq += np.sum((r - b) ** 2)
    return err_sq / tau_sq, dot / np.sqrt(tau_sq * rebuilt_sq)


def disjoint_family(n_tasks=3, seed=1):
    """Tasks that change disjoint blocks of every tensor, as TALL assumes: the tall rebuild is exact there."""
    rng = np.random.default_rng(seed)
    base, tasks = numpy_family(n_tasks, seed)
    for i, sd in enumerate(tasks.values()):
        for name in MASKED:
            delta = np.zeros(base[name].size, np.float32)
            part = np.array_split(np.arange(base[name].size), n_tasks)[i]
            delta[part] = rng.normal(0, 0.05, part.size)
            sd[name] = (base[name] + delta.reshape(base[name].shape)).astype(np.float32)
    return base, tasks


def dense_family(n_tasks=6, seed=2):
    """Every task moves every weight by independent noise (dense, overlapping updates): the sum mtv at a task's
    masked weights is mostly the other tasks' vectors, so tall's rebuild points elsewhere."""
    rng = np.random.default_rng(seed)
    base, tasks = numpy_family(n_tasks, seed)
    for sd in tasks.values():
        for name in MASKED:
            sd[name] = (base[name] + rng.normal(0, 0.01, base[name].shape)).astype(np.float32)
    return base, tasks


@pytest.fixture
def dense(tmp_path):
    base, tasks = dense_family()
    return (base, tasks, *write_family(tmp_path / "dense", base, tasks))


def test_tall_estimate_matches_numpy(family, tmp_path):
    base, tasks, base_path, tasks_dir = family
    manifest = tallzip.pack(tasks_dir, base_path, tmp_path / "a.tallz")
    for entry in manifest["tasks"]:
        t = entry["name"]
        rel, cos = np_estimate(base, tasks[t], lambda n: np_rebuilt(base, tasks, t, n, 0.4))
        assert entry["estimate"]["rel_error"] == pytest.approx(rel, rel=1e-5)
        assert entry["estimate"]["cosine"] == pytest.approx(cos, rel=1e-5)


@pytest.mark.parametrize("rep", ["q2", "q4", "exact"])
def test_quantized_and_exact_estimates_match_the_rebuilt_model(family, tmp_path, rep):
    base, tasks, base_path, tasks_dir = family
    manifest = tallzip.pack(tasks_dir, base_path, tmp_path / "a.tallz", keep=rep)
    with tallzip.open(tmp_path / "a.tallz") as archive:
        for entry in manifest["tasks"]:
            t = entry["name"]
            loaded = {n: v.numpy() for n, v in archive.load(t).items()}
            rel, cos = np_estimate(base, tasks[t], lambda n: loaded[n])
            assert entry["estimate"]["rel_error"] == pytest.approx(rel, rel=1e-5, abs=1e-12)
            assert entry["estimate"]["cosine"] == pytest.approx(cos, rel=1e-5)
            if rep == "exact":
                assert entry["estimate"] == {"rel_error": 0.0, "cosine": 1.0}
            if rep == "q4":  # a 4-bit grid keeps the direction: far above the warning's threshold
                assert entry["estimate"]["cosine"] > 0.98


def test_pack_warns_naming_each_poor_task(dense, tmp_path):
    """Dense overlapping task vectors: tall's rebuild points elsewhere, pack must warn for each task."""
    base, tasks, base_path, tasks_dir = dense
    out = tmp_path / "a.tallz"
    result = CliRunner().invoke(cli, ["pack", str(tasks_dir), "--base", str(base_path), "-o", str(out)])
    assert result.exit_code == 0, result.output
    manifest = tallzip.open(out).manifest
    poor = []
    for t in tasks:  # poor by the numpy computation, not by the code's own output
        _, cos = np_estimate(base, tasks[t], lambda n: np_rebuilt(base, tasks, t, n, 0.4))
        if cos < POOR_COSINE:
            poor.append(t)
    assert poor == list(tasks)
    warned = [line for line in result.stderr.splitlines() if line.startswith("warning: task ")]
    assert [line.split()[2].rstrip(":") for line in warned] == poor
    as_json = CliRunner().invoke(cli, ["pack", str(tasks_dir), "--base", str(base_path), "-o", str(out), "--force",
                                       "--json"])
    data = json.loads(as_json.stdout)  # stdout stays JSON; the warnings are in it too
    assert len(data["warnings"]) == len(poor) and all(p in w for p, w in zip(poor, data["warnings"]))
    assert "warning: task task0:" in as_json.stderr
    info = CliRunner().invoke(cli, ["info", str(out)])
    assert "(poor)" in info.stdout
    verify = CliRunner().invoke(cli, ["verify", str(out), "--json"])
    report = json.loads(verify.stdout)
    assert report["estimates_poor"] == poor and report["estimates"]["task0"]["cosine"] < POOR_COSINE


def test_pack_does_not_warn_on_disjoint_tasks(tmp_path):
    base, tasks = disjoint_family()
    base_path, tasks_dir = write_family(tmp_path / "fam", base, tasks)
    out = tmp_path / "a.tallz"
    result = CliRunner().invoke(cli, ["pack", str(tasks_dir), "--base", str(base_path), "-o", str(out), "--json"])
    assert result.exit_code == 0, result.output
    assert "warning" not in result.stderr and json.loads(result.stdout)["warnings"] == []
    for entry in tallzip.open(out).manifest["tasks"]:
        t = entry["name"]
        rel, cos = np_estimate(base, tasks[t], lambda n: np_rebuilt(base, tasks, t, n, 0.4))
        assert cos > 0.99 and entry["estimate"]["cosine"] == pytest.approx(cos, rel=1e-5)


def test_keep_auto_takes_the_smallest_good_representation(dense, tmp_path):
    base, tasks, base_path, tasks_dir = dense
    noisy = tallzip.pack(tasks_dir, base_path, tmp_path / "noisy.tallz", keep="auto")
    choice = noisy["representation_choice"]
    order = choice["candidates"]
    for entry in noisy["tasks"]:
        estimates = choice["estimates"][entry["name"]]
        rep = entry["representation"]
        assert rep != "tall"  # the dense family's tall estimate is poor (test above)
        assert estimates[rep]["cosine"] >= POOR_COSINE
        assert all(estimates[smaller]["cosine"] < POOR_COSINE for smaller in order[:order.index(rep)])
        assert entry["estimate"] == estimates[rep]  # what was packed is what was estimated
    base2, tasks2 = disjoint_family()
    base_path2, tasks_dir2 = write_family(tmp_path / "disjoint", base2, tasks2)
    clean = tallzip.pack(tasks_dir2, base_path2, tmp_path / "clean.tallz", keep="auto")
    assert {e["representation"] for e in clean["tasks"]} == {"tall"}


def test_keep_by_module_function(family, tmp_path, monkeypatch):
    base, tasks, base_path, tasks_dir = family
    monkeypatch.setenv("KEEP_BY_FAMILY", str(base_path.parent))
    monkeypatch.syspath_prepend(str(Path(__file__).parent.parent))
    out = tmp_path / "a.tallz"
    result = CliRunner().invoke(cli, ["pack", str(tasks_dir), "--base", str(base_path), "-o", str(out),
                                      "--keep-by", "tests.keep_by_eval:closeness", "--keep-tolerance", "0.01"])
    assert result.exit_code == 0, result.output
    manifest = tallzip.open(out).manifest
    scores = manifest["representation_choice"]["scores"]
    for entry in manifest["tasks"]:
        t, rep = entry["name"], entry["representation"]
        assert scores[t]["finetuned"] == pytest.approx(1.0)
        # the score of what was chosen, recomputed here from the rebuilt model: within 1% of the fine-tuned one
        rebuilt = tallzip.open(out).load(t)["enc.w"].double().numpy()
        tuned, b = tasks[t]["enc.w"].astype(np.float64), base["enc.w"].astype(np.float64)
        assert 1 - np.sum((rebuilt - tuned) ** 2) / np.sum((tuned - b) ** 2) >= 0.99 - 1e-9
        if rep != "exact":
            assert scores[t][rep] >= 0.99


@pytest.mark.parametrize("spec, says", [("nosuchmodule_xyz:f", "cannot import"), ("tests.keep_by_eval:nope", "no function"),
                                        ("justaname", "MODULE:FUNCTION")])
def test_keep_by_refuses_a_bad_function(family, tmp_path, monkeypatch, spec, says):
    _, _, base_path, tasks_dir = family
    monkeypatch.syspath_prepend(str(Path(__file__).parent.parent))
    result = CliRunner().invoke(cli, ["pack", str(tasks_dir), "--base", str(base_path), "-o", str(tmp_path / "a.tallz"),
                                      "--keep-by", spec])
    assert result.exit_code == 2 and says in result.output and not (tmp_path / "a.tallz").exists()


def test_archives_without_estimates_say_not_recorded(tmp_path):
    for fixture in ("v1-family.tallz", "reps-family.tallz"):
        path = tmp_path / fixture
        shutil.copy(FIXTURES / fixture, path)
        info = CliRunner().invoke(cli, ["info", str(path)])
        assert info.exit_code == 0 and "not recorded" in info.stdout
        report = json.loads(CliRunner().invoke(cli, ["verify", str(path), "--json"]).stdout)
        assert set(report["estimates"].values()) == {None} and report["estimates_poor"] == []


def test_bfloat16_tall_estimate_matches_the_rebuilt_model(tmp_path):
    """A bfloat16 family (as LLMs ship): the estimate is the one of the model extract gives back (base + mask *
    mtv, cast to bfloat16), recomputed here in float64 from the loaded tensors."""
    import torch
    from safetensors.torch import save_file
    base, tasks = dense_family(4)
    to_bf16 = lambda sd: {n: torch.from_numpy(v).to(torch.bfloat16) for n, v in sd.items() if v.dtype == np.float32}  # noqa: E731
    (tmp_path / "tasks").mkdir()
    save_file(to_bf16(base), str(tmp_path / "base.safetensors"))
    for t, sd in tasks.items():
        save_file(to_bf16(sd), str(tmp_path / "tasks" / f"{t}.safetensors"))
    manifest = tallzip.pack(tmp_path / "tasks", tmp_path / "base.safetensors", tmp_path / "a.tallz")
    widen = lambda x: x.float().numpy()  # noqa: E731
    with tallzip.open(tmp_path / "a.tallz") as archive:
        for entry in manifest["tasks"]:
            loaded = {n: widen(v) for n, v in archive.load(entry["name"]).items()}
            b = {n: widen(v) for n, v in to_bf16(base).items()}
            tuned = {n: widen(v) for n, v in to_bf16(tasks[entry["name"]]).items()}
            rel, cos = np_estimate(b, tuned, lambda n: loaded[n])
            assert entry["estimate"]["rel_error"] == pytest.approx(rel, rel=1e-5)
            assert entry["estimate"]["cosine"] == pytest.approx(cos, rel=1e-5)
