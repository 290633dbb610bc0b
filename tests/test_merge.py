"""`tallzip merge` and `info --agreement`, checked against the formulas written again in plain numpy."""
from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

import tallzip
from tallzip.cli.main import cli
from tallzip.errors import TallzipError
from tallzip.verification.info import layer_kind
from tallzip.merging.merge import merge_with_report
from tallzip.options import RunOptions, StoreOptions

F32 = np.float32
N_TASKS = 4
BASE_METADATA = {"source": "test base", "note": "kept by merge"}
# name -> (shape, dtype, task-vector scale); scales differ by 100x so that ranking over the whole task
# vector (TIES) and ranking tensor by tensor give different results
SPEC = {
    "blocks.0.attn.in_proj_weight": ((12, 8), np.float32, 1e-2),
    "blocks.0.ln_1.weight": ((8,), np.float32, 1e-3),
    "blocks.0.mlp.c_fc.weight": ((16, 8), np.float32, 1e-1),
    "blocks.0.mlp.c_fc.bias": ((16,), np.float16, 1e-2),
    "token_embedding.weight": ((6, 8), np.float32, 3e-2),
    "frozen.weight": ((4, 4), np.float32, 0.0),           # no task changes it
    "buffer.steps": ((1,), np.int64, None),               # an integer buffer: not mergeable
}
LAMBDAS = {"t0": 0.3, "*": 0.5}


def task_lambda(task):
    return LAMBDAS.get(task, LAMBDAS["*"])


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    """base.safetensors and tasks/t0..t3.safetensors (each task also has its own head), as numpy."""
    root = tmp_path_factory.mktemp("family")
    rng = np.random.default_rng(7)
    base = {}
    for name, (shape, dtype, _) in SPEC.items():
        base[name] = (np.arange(1, 2, dtype=dtype) if dtype == np.int64
                      else (rng.normal(size=shape) * 0.05 + (1.0 if "ln_" in name else 0.0)).astype(dtype))
    save_file(base, str(root / "base.safetensors"), metadata=BASE_METADATA)
    (root / "tasks").mkdir()
    tasks = []
    for t in range(N_TASKS):
        task = {}
        for name, (shape, dtype, scale) in SPEC.items():
            if scale is None:
                task[name] = base[name] + 100 * (t + 1)
            else:  # heavy-tailed updates, like fine-tuning's
                task[name] = (base[name].astype(F32) + scale * rng.laplace(size=shape)).astype(dtype)
        task["head.weight"] = rng.normal(size=(3, 8)).astype(F32)
        save_file(task, str(root / "tasks" / f"t{t}.safetensors"), metadata={"task": f"t{t}"})
        tasks.append(task)
    base = {n: base[n] for n in header_order(root / "base.safetensors")}  # the base file's order
    return {"root": root, "base_path": root / "base.safetensors", "tasks_dir": root / "tasks",
            "base": base, "tasks": tasks, "names": [f"t{t}" for t in range(N_TASKS)]}


def header_order(path):
    """Tensor names in the order a safetensors file's header lists them (the file's own order)."""
    with open(path, "rb") as fh:
        header = json.loads(fh.read(int.from_bytes(fh.read(8), "little")))
    return [n for n in header if n != "__metadata__"]


def mergeable(base):
    return [n for n, a in base.items() if a.dtype.kind == "f"]


# --- the formulas, in plain numpy ----------------------------------------------------------------

def np_taus(base, task):
    return {n: task[n].astype(F32) - base[n].astype(F32) for n in mergeable(base)}


def np_apply(base, vectors, alpha):
    """theta_0 + alpha * vector for the mergeable tensors, the base's own values for the rest."""
    out = dict(base)
    for n, v in vectors.items():
        out[n] = (base[n].astype(F32) + F32(alpha) * v).astype(base[n].dtype)
    return out


def np_sum(base, tasks):
    taus = [np_taus(base, t) for t in tasks]
    return {n: np.sum([tau[n] for tau in taus], axis=0, dtype=F32) for n in mergeable(base)}


def np_ties(base, tasks, density, reduce, whole_vector=True):
    """TIES: trim each task vector to its top `density` by magnitude, elect the sign of the summed
    trimmed vectors (zeros take the majority sign), then the disjoint sum or mean."""
    names = mergeable(base)
    sizes = [base[n].size for n in names]
    flats = [np.concatenate([tau[n].ravel() for n in names]) for tau in (np_taus(base, t) for t in tasks)]

    def trim(flat):
        def top(part):
            k = part.size - int(part.size * density)
            threshold = np.sort(np.abs(part))[k - 1] if k > 0 else 0.0
            return np.where(np.abs(part) >= threshold, part, 0)
        if whole_vector:
            return top(flat)
        return np.concatenate([top(p) for p in np.split(flat, np.cumsum(sizes)[:-1])])

    trimmed = np.stack([trim(f) for f in flats])
    sign = np.sign(trimmed.sum(axis=0))
    sign[sign == 0] = np.sign(sign.sum())
    agree = np.where(sign > 0, trimmed > 0, trimmed < 0)
    total = np.where(agree, trimmed, 0).sum(axis=0)
    merged = total if reduce == "sum" else total / np.maximum(agree.sum(axis=0), 1)
    parts = np.split(merged.astype(F32), np.cumsum(sizes)[:-1])
    return {n: p.reshape(base[n].shape) for n, p in zip(names, parts)}


def np_masks(base, tasks, mtv, names):
    """TALL masks: |theta_0 - theta_t| > lambda_t * |(theta_0 + mtv) - theta_t|."""
    masks = []
    for task_name, task in zip(names, tasks):
        masks.append({n: np.abs(base[n].astype(F32) - task[n].astype(F32))
                      > F32(task_lambda(task_name)) * np.abs(base[n].astype(F32) + mtv[n] - task[n].astype(F32))
                      for n in mtv})
    return masks


def np_consensus(base, tasks, names, mtv, k, alpha):
    masks = np_masks(base, tasks, mtv, names)
    kept = {n: np.where(np.sum([m[n] for m in masks], axis=0) >= k, mtv[n], F32(0)) for n in mtv}
    return np_apply(base, kept, alpha)


def assert_state(got, want, exact=False):
    assert list(got) == list(want)
    for name, expected in want.items():
        tensor = got[name]
        assert tensor.dtype == torch.from_numpy(np.asarray(expected)).dtype, name
        if exact or expected.dtype.kind != "f":
            np.testing.assert_array_equal(tensor.numpy(), expected, err_msg=name)
        else:
            tol = 1e-3 if expected.dtype == np.float16 else 1e-6
            np.testing.assert_allclose(tensor.numpy().astype(F32), expected.astype(F32), rtol=tol, atol=tol * 1e-1,
                                       err_msg=name)


def folder_merge(fam, method, **kw):
    return tallzip.merge(fam["tasks_dir"], base=fam["base_path"], method=method, run=RunOptions(device="cpu"), **kw)


# --- each method against numpy -------------------------------------------------------------------

def test_task_arithmetic(family):
    got = folder_merge(family, "task-arithmetic", alpha=0.4)
    assert_state(got, np_apply(family["base"], np_sum(family["base"], family["tasks"]), 0.4))


def test_average_is_mean_of_finetuned_weights(family):
    got = folder_merge(family, "average")
    base = family["base"]
    want = dict(base)
    for n in mergeable(base):
        want[n] = np.mean([t[n].astype(np.float64) for t in family["tasks"]], axis=0).astype(base[n].dtype)
    assert_state(got, want)


def test_ties_trims_over_the_whole_task_vector(family):
    base, tasks = family["base"], family["tasks"]
    got = folder_merge(family, "ties", alpha=0.9, density=0.2)
    assert_state(got, np_apply(base, np_ties(base, tasks, 0.2, "mean"), 0.9))
    # the test can tell: trimming tensor by tensor gives another model
    per_tensor = np_apply(base, np_ties(base, tasks, 0.2, "mean", whole_vector=False), 0.9)
    name = "blocks.0.attn.in_proj_weight"
    assert not np.allclose(got[name].numpy(), per_tensor[name], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("method", ["consensus-ta", "consensus-ties"])
@pytest.mark.parametrize("k", [1, 2, 3])
def test_consensus(family, method, k):
    base, tasks = family["base"], family["tasks"]
    mtv = np_sum(base, tasks) if method == "consensus-ta" else np_ties(base, tasks, 0.2, "sum")
    state, report = merge_with_report(family["tasks_dir"], base=family["base_path"], method=method, k=k, alpha=0.5, lambdas=LAMBDAS, run=RunOptions(device="cpu"))
    assert_state(state, np_consensus(base, tasks, family["names"], mtv, k, 0.5))
    counts = np.concatenate([np.sum([m[n] for m in np_masks(base, tasks, mtv, family["names"])], axis=0).ravel()
                             for n in mtv])
    assert report.consensus_kept == int((counts >= k).sum())
    assert report.consensus_total == counts.size


def test_consensus_k0_gives_back_the_plain_method(family):
    base, tasks = family["base"], family["tasks"]
    plain = folder_merge(family, "task-arithmetic", alpha=0.3)
    consensus = folder_merge(family, "consensus-ta", alpha=0.3, k=0)
    assert all(torch.equal(plain[n], consensus[n]) for n in plain)
    assert_state(folder_merge(family, "consensus-ties", alpha=0.3, k=0),
                 np_apply(base, np_ties(base, tasks, 0.2, "sum"), 0.3))


def test_consensus_k1_drops_only_weights_no_task_uses(family):
    base, tasks = family["base"], family["tasks"]
    mtv = np_sum(base, tasks)
    masks = np_masks(base, tasks, mtv, family["names"])
    unused = {n: ~np.any([m[n] for m in masks], axis=0) for n in mtv}
    assert sum(int(u.sum()) for u in unused.values()) > 0  # the family has some, so the test can fail
    got = folder_merge(family, "consensus-ta", alpha=1.0, k=1, lambdas=LAMBDAS)
    plain = folder_merge(family, "task-arithmetic", alpha=1.0)
    for n in mtv:
        assert torch.equal(got[n][torch.from_numpy(unused[n])], torch.from_numpy(base[n])[torch.from_numpy(unused[n])])
        assert torch.equal(got[n][torch.from_numpy(~unused[n])], plain[n][torch.from_numpy(~unused[n])])


@pytest.mark.parametrize("method", ["consensus-ta", "consensus-ties"])
def test_k_above_n_is_refused(family, method):
    with pytest.raises(TallzipError, match=f"k = {N_TASKS + 1} is more than the {N_TASKS} tasks"):
        merge_with_report(family["tasks_dir"], base=family["base_path"], method=method, k=N_TASKS + 1, run=RunOptions(device="cpu"))


def test_non_mergeable_tensors_keep_the_base_and_are_reported(family):
    state, report = merge_with_report(family["tasks_dir"], base=family["base_path"], method="task-arithmetic", run=RunOptions(device="cpu"))
    assert list(state) == list(family["base"])  # names and order of the base, no task head
    np.testing.assert_array_equal(state["buffer.steps"].numpy(), family["base"]["buffer.steps"])
    assert report.kept_base == ["buffer.steps"]
    assert report.task_only == ["head.weight"]
    assert state["blocks.0.mlp.c_fc.bias"].dtype == torch.float16


# --- the archive route ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def archives(family, tmp_path_factory):
    folder = tmp_path_factory.mktemp("archives")
    paths = {}
    for merge in ("sum", "ties"):
        paths[merge] = folder / f"{merge}.tallz"
        tallzip.pack(family["tasks_dir"], family["base_path"], paths[merge], store=StoreOptions(lambdas=LAMBDAS, merge=merge, mtv_dtype="float32"), run=RunOptions(device="cpu"))  # the mtv exactly as the folder route computes it
    paths["default"] = folder / "default.tallz"
    tallzip.pack(family["tasks_dir"], family["base_path"], paths["default"], store=StoreOptions(lambdas=LAMBDAS), run=RunOptions(device="cpu"))
    return paths


@pytest.mark.parametrize("method, packed, k", [("task-arithmetic", "sum", None), ("consensus-ta", "sum", 2),
                                               ("consensus-ta", "sum", 1), ("consensus-ta", "sum", 0),
                                               ("consensus-ties", "ties", 2)])
def test_archive_gives_the_same_tensors_as_the_folder(family, archives, method, packed, k):
    options = {"k": k} if k is not None else {}
    from_folder, folder_report = merge_with_report(
        family["tasks_dir"], base=family["base_path"], method=method, alpha=0.7, run=RunOptions(device="cpu"),
        **({"lambdas": LAMBDAS} if k is not None else {}), **options)
    from_archive, archive_report = merge_with_report(archives[packed], method=method, alpha=0.7, run=RunOptions(device="cpu"),
                                                     **options)
    assert archive_report.consensus_kept == folder_report.consensus_kept
    assert archive_report.consensus_total == folder_report.consensus_total
    assert archive_report.kept_base == folder_report.kept_base == ["buffer.steps"]
    assert archive_report.task_only == folder_report.task_only == ["head.weight"]
    assert list(from_archive) == list(from_folder)
    for name in from_folder:
        assert from_archive[name].dtype == from_folder[name].dtype
        assert torch.equal(from_archive[name], from_folder[name]), name


def test_archive_with_a_bfloat16_mtv_merges_within_its_rounding(family, archives):
    """The default archive stores the mtv as bfloat16: merging from it moves each weight by at most
    alpha * |mtv| * 2^-8 (bfloat16 keeps 8 significant bits) from the folder route's weight."""
    from_folder = tallzip.merge(family["tasks_dir"], base=family["base_path"], method="consensus-ta", alpha=0.7, k=2, lambdas=LAMBDAS, run=RunOptions(device="cpu"))
    from_archive = tallzip.merge(archives["default"], method="consensus-ta", alpha=0.7, k=2, run=RunOptions(device="cpu"))
    moved = False
    for name, want in from_folder.items():
        if not want.is_floating_point():
            continue
        got, want, base = from_archive[name].numpy(), want.numpy(), family["base"][name]
        step = np.abs(want.astype(np.float64) - base)  # alpha * |kept mtv|, up to the output's own rounding
        ulp = np.spacing(np.abs(want)).astype(np.float64)
        assert np.all(np.abs(got.astype(np.float64) - want) <= step * 2.0 ** -8 + 2 * ulp), name
        moved |= not np.array_equal(got, want)
    assert moved  # the rounding is really there


@pytest.mark.parametrize("method, packed, words", [
    ("ties", "sum", "needs each task's own task vector"),
    ("average", "ties", "needs each task's own task vector"),
    ("consensus-ties", "sum", "--merge ties"),
    ("consensus-ta", "ties", "--merge sum"),
    ("task-arithmetic", "ties", "supports consensus-ties"),
])
def test_archive_refuses_what_it_cannot_do(archives, method, packed, words):
    with pytest.raises(TallzipError, match=words):
        tallzip.merge(archives[packed], method=method)


def test_archive_refuses_other_lambdas_or_density(archives):
    with pytest.raises(TallzipError, match="lambda"):
        tallzip.merge(archives["sum"], method="consensus-ta", lambdas=0.2)
    with pytest.raises(TallzipError, match="density 0.2"):
        tallzip.merge(archives["ties"], method="consensus-ties", density=0.5)


# --- bad input -----------------------------------------------------------------------------------

@pytest.mark.parametrize("options, words", [
    ({"method": "fisher"}, "unknown merge method"),
    ({"method": "task-arithmetic", "alpha": 0.0}, r"alpha must be .* \(0, 2\]"),
    ({"method": "task-arithmetic", "alpha": 2.5}, r"alpha must be"),
    ({"method": "task-arithmetic", "alpha": float("nan")}, r"alpha must be"),
    ({"method": "consensus-ta", "k": -1}, "k must be"),
    ({"method": "ties", "k": 2}, "k applies only"),
    ({"method": "ties", "density": 1.5}, "density must be"),
])
def test_bad_options(family, options, words):
    with pytest.raises(TallzipError, match=words):
        tallzip.merge(family["tasks_dir"], base=family["base_path"], **options)


def test_folder_with_one_task(family, tmp_path):
    (tmp_path / "only.safetensors").write_bytes((family["tasks_dir"] / "t0.safetensors").read_bytes())
    with pytest.raises(TallzipError, match="at least 2 task"):
        tallzip.merge(tmp_path, base=family["base_path"], method="task-arithmetic")


# --- the command ---------------------------------------------------------------------------------

def test_cli_merge_keeps_names_order_dtypes_and_metadata(family, tmp_path):
    out = tmp_path / "merged.safetensors"
    result = CliRunner().invoke(cli, ["merge", str(family["tasks_dir"]), "--base", str(family["base_path"]),
                                      "-o", str(out), "--method", "consensus-ta", "--alpha", "0.5",
                                      "--lambda", "t0=0.3", "--lambda", "0.5"])
    assert result.exit_code == 0, result.output
    assert "buffer.steps" in result.output and "head.weight" in result.output
    with safe_open(str(out), framework="np") as fh:
        assert fh.metadata() == BASE_METADATA
    assert header_order(out) == list(family["base"])
    got = load_file(str(out))
    base, tasks = family["base"], family["tasks"]
    want = np_consensus(base, tasks, family["names"], np_sum(base, tasks), 2, 0.5)
    assert_state({n: torch.from_numpy(got[n]) for n in want}, want)

    pt = tmp_path / "merged.pt"
    result = CliRunner().invoke(cli, ["merge", str(family["tasks_dir"]), "--base", str(family["base_path"]),
                                      "-o", str(pt), "--method", "average"])
    assert result.exit_code == 0, result.output
    assert list(torch.load(pt, weights_only=True)) == list(base)  # a torch state dict keeps the base's order


@pytest.mark.parametrize("args, words", [
    (["--method", "task-arithmetic", "--alpha", "3"], "alpha must be"),
    (["--method", "consensus-ta", "--k", "-2"], "k must be"),
])
def test_cli_errors_are_one_line(family, tmp_path, args, words):
    result = CliRunner().invoke(cli, ["merge", str(family["tasks_dir"]), "--base", str(family["base_path"]),
                                      "-o", str(tmp_path / "m.safetensors"), *args])
    assert result.exit_code != 0
    assert result.output.strip().startswith("error:") and words in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "m.safetensors").exists()


def test_cli_refuses_a_file_where_its_folder_output_would_go(family, tmp_path):
    """-o with no checkpoint extension is a folder (as for extract): a file there is refused, untouched."""
    target = tmp_path / "m.bin.gz"
    target.write_bytes(b"someone's file")
    result = CliRunner().invoke(cli, ["merge", str(family["tasks_dir"]), "--base", str(family["base_path"]),
                                      "-o", str(target), "--method", "average"])
    assert result.exit_code == 1 and "not a folder" in result.output
    assert target.read_bytes() == b"someone's file"


# --- agreement -----------------------------------------------------------------------------------

def test_layer_kinds():
    assert layer_kind("visual.transformer.resblocks.3.attn.in_proj_weight") == "attn"
    assert layer_kind("visual.transformer.resblocks.3.mlp.c_fc.weight") == "mlp"
    assert layer_kind("visual.transformer.resblocks.3.ln_2.bias") == "ln"
    assert layer_kind("model.layers.0.post_attention_layernorm.weight") == "ln"
    assert layer_kind("visual.class_embedding") == "embedding"
    assert layer_kind("visual.conv1.weight") == "embedding"
    assert layer_kind("visual.proj") == "other"


def test_agreement_counts_tasks_per_weight(family, archives):
    base, tasks = family["base"], family["tasks"]
    mtv = np_sum(base, tasks)
    mtv.pop("frozen.weight")  # no task changes it: no masks in the archive
    masks = np_masks(base, tasks, mtv, family["names"])
    with tallzip.open(archives["sum"]) as archive:
        data = tallzip.agreement(archive)
    want = {}
    for n in mtv:
        counts = np.sum([m[n] for m in masks], axis=0).ravel()
        hist = np.bincount(counts, minlength=N_TASKS + 1)
        want[layer_kind(n)] = want.get(layer_kind(n), 0) + hist
    assert {k: v["histogram"] for k, v in data["kinds"].items()} == {k: list(v) for k, v in want.items()}
    total = sum(want.values())
    assert data["total"]["histogram"] == list(total)
    assert data["total"]["catastrophic"] == pytest.approx(total[0] / total.sum())
    assert data["total"]["selfish"] == pytest.approx(total[1] / total.sum())
    assert data["unchanged_params"] == base["frozen.weight"].size


def test_info_agreement_table_json_and_plot(archives, tmp_path):
    png = tmp_path / "agreement.png"
    result = CliRunner().invoke(cli, ["info", str(archives["sum"]), "--agreement", "--plot", str(png)])
    assert result.exit_code == 0, result.output
    assert "catastrophic (0)" in result.output and "selfish (1)" in result.output
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    result = CliRunner().invoke(cli, ["info", str(archives["sum"]), "--agreement", "--json"])
    assert json.loads(result.output)["agreement"]["n_tasks"] == N_TASKS


def test_plot_without_matplotlib_is_a_clear_error(archives, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # makes the import fail
    result = CliRunner().invoke(cli, ["info", str(archives["sum"]), "--plot", str(tmp_path / "a.png")])
    assert result.exit_code != 0
    assert "pip install 'tallzip[plot]'" in result.output
