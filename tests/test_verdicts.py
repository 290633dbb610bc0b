"""Verdicts that must be able to say no: `verify --against`, `info`, and `merge`'s refusals and warnings.

Every figure is checked against the TALL formula written again in numpy (conftest), never against the
code's own output; every verdict has a case where it must say "differs" (or refuse, or warn).
"""
from __future__ import annotations

import json
import shutil
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.numpy import load_file, save_file

import tallzip
from tallzip.options import DEFAULT_CODECS
from tallzip.cli.main import cli
from tallzip.errors import TallzipError
from tallzip.verification.info import summary
from tallzip.verification.verify import verify
from tallzip.merging.merge import merge_with_report
from tallzip.verification.compare import mask_check

from conftest import np_mask, np_mtv, np_rebuild, np_round_mtv, numpy_family, write_family
from tallzip.options import RunOptions, StoreOptions

F32 = np.float32
LAMBDAS = {"task0": 0.3, "task1": 0.4, "task2": 0.5}
MASKED = ("enc.w", "enc.b", "blk.0.w")


def run(*args):
    result = CliRunner().invoke(cli, [str(a) for a in args])
    return result.exit_code, result.stdout, result.stderr


def with_buffer(base, tasks):
    """Add an integer buffer that the base has and every task changes: a 'per-task' tensor."""
    base["buf.count"] = np.array([1, 2, 3], dtype=np.int64)
    for i, sd in enumerate(tasks.values()):
        sd["buf.count"] = base["buf.count"] + 10 * (i + 1)
    return base, tasks


@pytest.fixture(scope="module")
def fam(tmp_path_factory):
    """One family on disk and its archives: default (bfloat16 mtv), float32 mtv, float16 mtv, TIES."""
    root = tmp_path_factory.mktemp("verdicts")
    base, tasks = with_buffer(*numpy_family())
    base_path, tasks_dir = write_family(root / "fam", base, tasks)
    archives = {}
    for key, options in {"bfloat16": {}, "float32": {"mtv_dtype": "float32"}, "float16": {"mtv_dtype": "float16"},
                         "ties": {"merge": "ties"}}.items():
        archives[key] = root / f"{key}.tallz"
        tallzip.pack(tasks_dir, base_path, archives[key], lambdas=LAMBDAS, **options)
    return {"root": root, "base": base, "tasks": tasks, "base_path": base_path, "tasks_dir": tasks_dir,
            "archives": archives}


def folder(fam, tmp_path, changed=None, drop=()):
    """A copy of the family's tasks folder with some tasks rewritten ({task: state dict}) or left out."""
    out = tmp_path / "against"
    shutil.copytree(fam["tasks_dir"], out)
    for task, sd in (changed or {}).items():
        save_file(dict(sd), str(out / f"{task}.safetensors"), metadata={"task": task})
    for task in drop:
        (out / f"{task}.safetensors").unlink()
    return out


def with_change(fam, task, name, fn):
    sd = OrderedDict((n, a.copy()) for n, a in fam["tasks"][task].items())
    sd[name] = fn(sd[name]).astype(sd[name].dtype)
    return sd


def verify_json(archive, against):
    code, out, _ = run("verify", archive, "--against", against, "--json")
    return code, json.loads(out)


def np_rel_l2(fam, task, mtv_dtype, tasks=None):
    """rel L2 of the archive's rebuilt task against `tasks[task]` (the folder's checkpoint), float tensors."""
    base, packed = fam["base"], fam["tasks"]
    tasks = tasks or packed
    diff = ref = 0.0
    for name, original in tasks[task].items():
        if original.dtype.kind != "f":
            continue
        if name in MASKED:
            mtv = np_mtv(base, packed, name)
            rebuilt = np_rebuild(base[name], np_mask(base[name], packed[task][name], mtv, LAMBDAS[task]),
                                 np_round_mtv(mtv, mtv_dtype))
        else:  # unchanged tensors and heads come back as they were packed
            rebuilt = packed[task][name]
        diff += float(np.sum((rebuilt.astype(np.float64) - original) ** 2))
        ref += float(np.sum(original.astype(np.float64) ** 2))
    return (diff / ref) ** 0.5


# --- verify --against: the unmodified folder matches ----------------------------------------------

@pytest.mark.parametrize("key", ["bfloat16", "float32", "float16", "ties"])
def test_the_packed_folder_matches(fam, key):
    code, report = verify_json(fam["archives"][key], fam["tasks_dir"])
    assert code == 0, report
    assert report["verdict"] == "matches"
    assert report["family"]["mtv_recomputed"] and report["family"]["mtv_tensors_differing"] == {}
    assert report["family"]["masks_unlike_recomputed_mtv"] == {}
    n_bits = sum(fam["base"][n].size for n in MASKED)
    for task, row in report["tasks"].items():
        assert row["verdict"] == "matches" and row["differences"] == []
        assert row["mask_bits"] == n_bits and row["mask_bits_differing"] == 0
        if key != "ties":
            assert row["rebuilt_vs_original"]["rel_l2"] == pytest.approx(np_rel_l2(fam, task, key), rel=1e-4)
            assert row["rebuilt_vs_original"]["rel_l2"] > 0  # the TALL approximation is reported


def test_the_packed_folder_matches_with_tasks_missing(fam, tmp_path):
    against = folder(fam, tmp_path, drop=["task2"])
    code, report = verify_json(fam["archives"]["bfloat16"], against)
    assert code == 0 and report["verdict"] == "matches"
    assert report["tasks_missing"] == ["task2"] and list(report["tasks"]) == ["task0", "task1"]
    assert not report["family"]["mtv_recomputed"] and "lacks 1 of the 3" in report["family"]["why_not"]


# --- verify --against: what must say "differs" ----------------------------------------------------

@pytest.mark.parametrize("key", ["bfloat16", "float32", "ties"])
@pytest.mark.parametrize("complete", [True, False], ids=["all-tasks", "some-tasks"])
def test_one_tensor_off_by_one_percent_differs(fam, tmp_path, key, complete):
    changed = with_change(fam, "task1", "enc.w", lambda a: a * F32(1.01))
    against = folder(fam, tmp_path, {"task1": changed}, drop=() if complete else ["task2"])
    code, report = verify_json(fam["archives"][key], against)
    assert code == 1 and report["verdict"] == "differs"
    row = report["tasks"]["task1"]
    assert row["verdict"] == "differs" and row["tensors_differing"] == ["enc.w"]
    assert report["tasks"]["task0"]["verdict"] == "matches"  # the task that did not change is not blamed
    if key == "ties":
        return
    base, packed = fam["base"], fam["tasks"]
    mtv = np_mtv(base, packed, "enc.w")
    stored_mtv = np_round_mtv(mtv, key)
    stored_mask = np_mask(base["enc.w"], packed["task1"]["enc.w"], mtv, LAMBDAS["task1"])
    recomputed = np_mask(base["enc.w"], changed["enc.w"], stored_mtv, LAMBDAS["task1"])
    disagree = recomputed != stored_mask
    if key == "float32":  # no margin: every disagreement is a difference
        assert row["mask_bits_differing"] == int(disagree.sum()) > 0
    else:  # between: the disagreements beyond twice the rounding margin, and all of them
        own = np.abs(base["enc.w"] - changed["enc.w"])
        gap = np.abs(own - F32(LAMBDAS["task1"]) * np.abs(base["enc.w"] + stored_mtv - changed["enc.w"]))
        far = disagree & (gap > 2 * LAMBDAS["task1"] * np.abs(stored_mtv) * 2.0 ** -8 + 1e-9)
        assert 0 < int(far.sum()) <= row["mask_bits_differing"] <= int(disagree.sum())
        assert row["mask_bits_differing"] + row["mask_bits_within_mtv_rounding"] == int(disagree.sum())
    if complete:  # the stored mtv is not the mtv of this folder, in that tensor only
        changed_tasks = dict(packed, task1=changed)
        new_stored = np_round_mtv(np_mtv(base, changed_tasks, "enc.w"), key)
        expected = int((new_stored.view(np.uint32) != stored_mtv.view(np.uint32)).sum())
        assert report["family"]["mtv_tensors_differing"] == {"enc.w": expected}
    code, text, _ = run("verify", fam["archives"][key], "--against", against)
    assert code == 1 and "DIFFERS" in text and "task1: enc.w: mask" in text


@pytest.mark.parametrize("complete", [True, False], ids=["all-tasks", "some-tasks"])
def test_noise_on_a_whole_task_differs(fam, tmp_path, complete):
    rng = np.random.default_rng(5)
    noisy = OrderedDict((n, (a + rng.normal(0, 0.9 * np.sqrt(np.mean(a ** 2)), a.shape)).astype(a.dtype)
                            if a.dtype.kind == "f" else a) for n, a in fam["tasks"]["task0"].items())
    against = folder(fam, tmp_path, {"task0": noisy}, drop=() if complete else ["task2"])
    code, report = verify_json(fam["archives"]["bfloat16"], against)
    assert code == 1 and report["verdict"] == "differs"
    row = report["tasks"]["task0"]
    expected = np_rel_l2(fam, "task0", "bfloat16", dict(fam["tasks"], task0=noisy))
    assert expected > 0.5 and row["rebuilt_vs_original"]["rel_l2"] == pytest.approx(expected, rel=1e-4)
    assert row["tensors_differing"] == sorted([*MASKED, "frozen.emb", "head.weight"])
    assert row["mask_bits_differing"] > row["mask_bits"] // 10
    assert report["tasks"]["task1"]["verdict"] == "matches"


def test_kept_tensors_must_be_equal_to_the_bit(fam, tmp_path):
    one_ulp = lambda a: np.concatenate([np.nextafter(a.ravel()[:1], F32(1)), a.ravel()[1:]]).reshape(a.shape)
    changed = {
        "task0": with_change(fam, "task0", "head.weight", one_ulp),           # a head: task-only
        "task1": with_change(fam, "task1", "frozen.emb", one_ulp),            # unchanged by every task: shared
        "task2": with_change(fam, "task2", "buf.count", lambda a: a + [1, 0, 0]),  # an integer buffer: per-task
    }
    code, report = verify_json(fam["archives"]["bfloat16"], folder(fam, tmp_path, changed))
    assert code == 1
    assert {t: r["tensors_differing"] for t, r in report["tasks"].items()} == {
        "task0": ["head.weight"], "task1": ["frozen.emb"], "task2": ["buf.count"]}
    assert report["tasks"]["task2"]["differences"] == [{"tensor": "buf.count", "what": "values: 1 of 3 differ"}]
    assert report["tasks"]["task0"]["differences"] == [{"tensor": "head.weight", "what": "values: 1 of 36 differ"}]


def test_a_checkpoint_with_other_tensors_differs(fam, tmp_path):
    t0 = OrderedDict(fam["tasks"]["task0"])
    del t0["enc.b"]
    t1 = OrderedDict(fam["tasks"]["task1"], extra=np.zeros(3, F32))
    t2 = OrderedDict(fam["tasks"]["task2"], **{"enc.b": fam["tasks"]["task2"]["enc.b"].astype(np.float16)})
    against = folder(fam, tmp_path, {"task0": t0, "task1": t1, "task2": t2})
    save_file(dict(fam["tasks"]["task0"]), str(against / "stranger.safetensors"))
    code, report = verify_json(fam["archives"]["float32"], against)
    assert code == 1
    what = {t: [(d["tensor"], d["what"]) for d in r["differences"]] for t, r in report["tasks"].items()}
    assert what["task0"] == [("enc.b", "missing from the checkpoint")]
    assert what["task1"] == [("extra", "not in the archive")]
    assert what["task2"] == [("enc.b", "dtype F16, packed F32")]
    assert report["checkpoints_not_in_archive"] == ["stranger"]
    assert not report["family"]["mtv_recomputed"]  # a task lacks a tensor: no mtv can be recomputed


def test_side_files_and_metadata_must_be_equal(tmp_path):
    base, tasks = numpy_family()
    base_path, tasks_dir = write_family(tmp_path / "fam", base, tasks)
    folder_task = tasks_dir / "task0"
    folder_task.mkdir()
    (tasks_dir / "task0.safetensors").rename(folder_task / "model.safetensors")
    (folder_task / "config.json").write_text('{"classes": 10}')
    out = tmp_path / "f.tallz"
    tallzip.pack(tasks_dir, base_path, out)
    assert run("verify", out, "--against", tasks_dir)[0] == 0
    (folder_task / "config.json").write_text('{"classes": 11}')
    save_file(dict(tasks["task1"]), str(tasks_dir / "task1.safetensors"), metadata={"task": "another"})
    code, report = verify_json(out, tasks_dir)
    assert code == 1
    assert report["tasks"]["task0"]["differences"] == [{"file": "config.json", "what": "side file bytes differ"}]
    assert report["tasks"]["task1"]["differences"] == [{"file": "metadata", "what": "safetensors metadata differs"}]
    (folder_task / "config.json").unlink()
    code, report = verify_json(out, tasks_dir)
    assert {"file": "config.json", "what": "side file missing from the folder"} in report["tasks"]["task0"]["differences"]


def test_a_change_below_the_mtv_precision_is_caught_by_the_recomputed_family(fam, tmp_path):
    """Two tasks changed by +-eps at one weight: the bfloat16 mtv stays the same and no mask moves beyond its
    rounding, so only the whole-folder check can see it: the masks recomputed with the recomputed mtv."""
    base, packed, lam = fam["base"], fam["tasks"], LAMBDAS["task1"]
    name = "enc.w"
    mtv = np_mtv(base, packed, name)
    own = np.abs(base[name] - packed["task1"][name])
    gap = own - F32(lam) * np.abs(base[name] + mtv - packed["task1"][name])
    i = np.unravel_index(np.argmin(np.abs(gap)), gap.shape)
    stored_mask = np_mask(base[name], packed["task1"][name], mtv, lam)

    def family_with(eps):
        t1 = OrderedDict((n, a.copy()) for n, a in packed["task1"].items())
        t2 = OrderedDict((n, a.copy()) for n, a in packed["task2"].items())
        t1[name][i] = F32(t1[name][i] + eps)
        t2[name][i] = F32(t2[name][i] - eps)
        return t1, t2

    def flips(eps):
        t1, t2 = family_with(eps)
        new_mtv = np_mtv(base, dict(packed, task1=t1, task2=t2), name)
        return np_mask(base[name], t1[name], new_mtv, lam)[i] != stored_mask[i]

    # the smallest step that flips task1's mask at weight i, by bisection over its size
    direction = 1.0 if (packed["task1"][name][i] - base[name][i]) * (1 if stored_mask[i] else -1) < 0 else -1.0
    lo, hi = 0.0, 1e-2
    assert flips(direction * hi)
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if flips(direction * mid) else (mid, hi)
    t1, t2 = family_with(direction * hi)
    new_mtv = np_mtv(base, dict(packed, task1=t1, task2=t2), name)
    assert np.array_equal(np_round_mtv(new_mtv), np_round_mtv(mtv))  # the stored mtv cannot tell
    against = folder(fam, tmp_path, {"task1": t1, "task2": t2})
    code, report = verify_json(fam["archives"]["bfloat16"], against)
    assert code == 1 and report["verdict"] == "differs"
    assert report["family"]["mtv_tensors_differing"] == {}
    assert report["family"]["masks_unlike_recomputed_mtv"].get("task1", 0) >= 1
    assert report["tasks"]["task1"]["mask_bits_differing"] == 0  # within the rounding: not blamed on task1 alone
    # with task0 missing the folder can only be checked within the mtv's precision: it matches
    (against / "task0.safetensors").unlink()
    assert verify_json(fam["archives"]["bfloat16"], against)[0] == 0


def test_a_folder_without_any_of_the_tasks_is_refused(fam, tmp_path):
    (tmp_path / "other").mkdir()
    save_file(dict(fam["tasks"]["task0"]), str(tmp_path / "other" / "cars.safetensors"))
    code, out, err = run("verify", fam["archives"]["bfloat16"], "--against", tmp_path / "other")
    assert code == 1 and err.startswith("error: ") and "no checkpoint of this archive's tasks" in err


# --- the rounding margin ------------------------------------------------------------------------

def _random_rule_inputs(n, seed=1):
    rng = np.random.default_rng(seed)
    base = rng.normal(0, 0.05, n).astype(F32)
    task = (base + rng.laplace(0, 0.01, n)).astype(F32)
    mtv = (task - base + rng.laplace(0, 0.02, n)).astype(F32)
    return base, task, mtv


@pytest.mark.parametrize("dtype, name", [("bfloat16", "BF16"), ("float16", "F16")])
def test_mask_margin_covers_exactly_the_rounding(dtype, name):
    base, task, mtv = _random_rule_inputs(400_000)
    mtv[:2000] *= F32(1e-4)  # tiny entries: float16 subnormals
    lam = 0.4
    stored_mtv = np_round_mtv(mtv, dtype)
    stored_mask = np_mask(base, task, mtv, lam)  # the masks come from the full-precision mtv
    rounding_flips = np_mask(base, task, stored_mtv, lam) != stored_mask
    assert rounding_flips.sum() > 10  # there are some: the margin is needed
    outside, within = mask_check(*map(torch.from_numpy, (base, task, stored_mask, stored_mtv)), lam, name)
    assert int(outside.sum()) == 0  # rounding is never called a difference ...
    assert np.array_equal(within.numpy(), rounding_flips)
    # ... and a change of the task by 1% is, outside the margin
    moved = (task * F32(1.01)).astype(F32)
    outside, within = mask_check(*map(torch.from_numpy, (base, moved, stored_mask, stored_mtv)), lam, name)
    disagree = np_mask(base, moved, stored_mtv, lam) != stored_mask
    assert np.array_equal((outside | within).numpy(), disagree)
    gap = np.abs(np.abs(base - moved) - F32(lam) * np.abs(base + stored_mtv - moved))
    u = 2.0 ** -8 if dtype == "bfloat16" else 2.0 ** -11
    far = disagree & (gap > 2 * lam * np.abs(stored_mtv) * u + 1e-9)  # beyond twice the rounding
    assert far.sum() > 1000 and np.all(outside.numpy()[far])


def test_mask_margin_is_zero_for_a_float32_mtv():
    base, task, mtv = _random_rule_inputs(100_000)
    lam = 0.4
    stored_mask = np_mask(base, task, mtv, lam)
    outside, within = mask_check(*map(torch.from_numpy, (base, task, stored_mask, mtv)), lam, "F32")
    assert int(outside.sum()) == 0 and int(within.sum()) == 0
    nudged = (task * F32(1 + 1e-4)).astype(F32)  # a change far below bfloat16's precision
    disagree = np_mask(base, nudged, mtv, lam) != stored_mask
    assert disagree.sum() > 0
    outside, within = mask_check(*map(torch.from_numpy, (base, nudged, stored_mask, mtv)), lam, "F32")
    assert np.array_equal(outside.numpy(), disagree) and int(within.sum()) == 0


# --- verify: integrity, speed-up path and progress ------------------------------------------------

def test_a_flipped_byte_is_refused_by_verify_and_info_says_it_did_not_check(fam, tmp_path):
    damaged = tmp_path / "d.tallz"
    shutil.copy(fam["archives"]["bfloat16"], damaged)
    entry = next(s for s in tallzip.open(damaged).manifest["sections"] if s["role"] == "mask" and s["chunks"][0]["length"] > 8)
    data = bytearray(damaged.read_bytes())
    chunk = entry["chunks"][0]  # format v2: each chunk has its own offset, length and digest
    data[chunk["offset"] + chunk["length"] // 2] ^= 0x10
    damaged.write_bytes(bytes(data))
    code, out, err = run("verify", damaged)
    assert code == 1 and "checksum mismatch" in err and entry["tensor"] in err
    code, out, err = run("verify", damaged, "--against", fam["tasks_dir"])
    assert code == 1 and "checksum mismatch" in err
    code, out, _ = run("info", damaged)
    assert code == 0 and "sections not checked: run `tallzip verify`" in out


def test_verify_is_the_same_on_one_thread_and_many_and_reports_progress(fam):
    calls = []
    with tallzip.open(fam["archives"]["bfloat16"]) as arc:
        one = verify(arc, fam["tasks_dir"], workers=1)
        many = verify(arc, fam["tasks_dir"], workers=4, progress=lambda *a: calls.append(a))
    assert one == many
    labels = [c[0] for c in calls]
    assert labels[0] == "opening checkpoints" and labels[-1] == "comparing with the checkpoints"
    done = [c[1] for c in calls if c[0] == "comparing with the checkpoints"]
    total = calls[-1][2]
    with tallzip.open(fam["archives"]["bfloat16"]) as arc:
        assert total == sum(s["length"] for s in arc.manifest["sections"])
        n_groups = len(arc.tensors) + sum(1 for s in arc.manifest["sections"] if s["tensor"] not in arc.tensors)
    # one call per unit of work, a unit being one chunk: at least one per tensor or side file
    assert done == sorted(done) and done[-1] == total and len(done) >= n_groups


# --- info ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("key, dtype, lossless", [("bfloat16", "BF16", False), ("float16", "F16", False),
                                                  ("float32", "F32", True)])
def test_info_says_what_the_archive_is(fam, key, dtype, lossless):
    code, out, _ = run("info", fam["archives"][key], "--json")
    info = json.loads(out)
    assert code == 0
    assert info["mtv_dtype"] == [dtype] and info["lossless"] is lossless
    assert info["lambdas"] == LAMBDAS
    mask_codec = DEFAULT_CODECS["mask"]  # the fixture packs with the defaults
    assert info["codecs"] == {"base": ["blosc2+zstd", "zstd"], "mask": [mask_codec], "mtv": ["blosc2+zstd"],
                              "own": ["blosc2+zstd", "zstd"]}
    assert info["checked"] is False and "run `tallzip verify`" in info["not_checked"]
    code, text, _ = run("info", fam["archives"][key])
    assert f"lossless: {'yes' if lossless else 'no'}" in text
    assert "lambdas 0.3: task0; 0.4: task1; 0.5: task2" in text
    assert f"mask {mask_codec}" in text and "sections not checked: run `tallzip verify`" in text


def test_info_names_other_codecs(fam, tmp_path):
    out = tmp_path / "fast.tallz"
    tallzip.pack(fam["tasks_dir"], fam["base_path"], out, store=StoreOptions(lambdas=0.4, codecs={"float": "zstd", "mask": "bits+zstd"}))
    info = summary(tallzip.open(out))
    assert info["codecs"]["mask"] == ["bits+zstd"] and info["codecs"]["mtv"] == ["zstd"]
    code, text, _ = run("info", out)
    assert "lambdas 0.4 (all 3 tasks)" in text


# --- merge: refusals and warnings ----------------------------------------------------------------

def test_merge_refuses_nonfinite_inputs_unless_allowed(tmp_path):
    base, tasks = numpy_family()
    tasks["task1"]["blk.0.w"][2, 3] = np.nan
    base_path, tasks_dir = write_family(tmp_path / "fam", base, tasks)
    out = tmp_path / "m.safetensors"
    code, _, err = run("merge", tasks_dir, "--base", base_path, "-o", out, "--method", "task-arithmetic")
    assert code == 1 and "task 'task1'" in err and "'blk.0.w'" in err and "--allow-nonfinite" in err
    assert not out.exists()
    code, _, err = run("merge", tasks_dir, "--base", base_path, "-o", out, "--method", "ties", "--allow-nonfinite")
    assert code == 0, err
    code, _, err = run("merge", tasks_dir, "--base", base_path, "-o", out, "--method", "task-arithmetic",
                       "--allow-nonfinite", "--force")
    assert code == 0 and np.isnan(load_file(str(out))["blk.0.w"][2, 3])
    # an archive packed with --allow-nonfinite holds a NaN mtv there: merging from it is refused too
    archive = tmp_path / "nan.tallz"
    tallzip.pack(tasks_dir, base_path, archive, store=StoreOptions(allow_nonfinite=True))
    code, _, err = run("merge", archive, "-o", tmp_path / "a.safetensors", "--method", "consensus-ta")
    assert code == 1 and "mtv" in err and "'blk.0.w'" in err and not (tmp_path / "a.safetensors").exists()
    code, _, err = run("merge", archive, "-o", tmp_path / "a.safetensors", "--method", "consensus-ta",
                       "--allow-nonfinite")
    assert code == 0, err


def test_merge_refuses_an_output_that_overflows(tmp_path):
    base = {"w": np.full((4,), 60000, np.float16)}
    tasks = {f"t{i}": {"w": np.full((4,), 65000, np.float16)} for i in range(2)}
    save_file(base, str(tmp_path / "base.safetensors"))
    (tmp_path / "tasks").mkdir()
    for t, sd in tasks.items():
        save_file(sd, str(tmp_path / "tasks" / f"{t}.safetensors"))
    args = ["merge", tmp_path / "tasks", "--base", tmp_path / "base.safetensors", "-o", tmp_path / "m.safetensors",
            "--method", "task-arithmetic", "--alpha", "1"]
    code, _, err = run(*args)
    assert code == 1 and "'w'" in err and "overflows float16" in err and not (tmp_path / "m.safetensors").exists()
    assert run(*args[:-2], "--alpha", "0.1")[0] == 0  # 60000 + 0.1 * 10000: fits


@pytest.mark.parametrize("source", ["folder", "archive"])
def test_merge_k_above_the_number_of_tasks_is_an_error(fam, tmp_path, source):
    src = ["merge", fam["tasks_dir"], "--base", fam["base_path"]] if source == "folder" else \
        ["merge", fam["archives"]["bfloat16"]]
    code, _, err = run(*src, "-o", tmp_path / "m.safetensors", "--method", "consensus-ta", "--k", "4")
    assert code == 1 and "k = 4 is more than the 3 tasks" in err and not (tmp_path / "m.safetensors").exists()
    code, _, err = run(*src, "-o", tmp_path / "m.safetensors", "--method", "consensus-ta", "--k", "3")
    assert code == 0 and "warning" not in err  # k = N is a real setting on this family


def disjoint_family(tmp_path, n_tasks=3):
    """Each task changes its own third of the weights: no weight is used by two tasks' masks."""
    rng = np.random.default_rng(3)
    base = {"w": rng.normal(0, 0.05, (6, 9)).astype(F32), "b": rng.normal(0, 0.05, (9,)).astype(F32)}
    tasks = {}
    for t in range(n_tasks):
        sd = {}
        for n, a in base.items():
            own = (np.arange(a.size) % n_tasks == t).reshape(a.shape)
            sd[n] = np.where(own, a + rng.laplace(0, 0.01, a.shape), a).astype(F32)
        tasks[f"t{t}"] = sd
    save_file(base, str(tmp_path / "base.safetensors"))
    (tmp_path / "tasks").mkdir()
    for t, sd in tasks.items():
        save_file(sd, str(tmp_path / "tasks" / f"{t}.safetensors"))
    return base, tasks


def test_merge_that_keeps_no_weight_warns_loudly(tmp_path):
    base, tasks = disjoint_family(tmp_path)
    masks = [{n: np_mask(base[n], sd[n], np_mtv(base, tasks, n), 0.4) for n in base} for sd in tasks.values()]
    counts = {n: np.sum([m[n] for m in masks], axis=0) for n in base}
    assert max(int(c.max()) for c in counts.values()) == 1 and sum(int(c.sum()) for c in counts.values()) > 0
    out = tmp_path / "m.safetensors"
    args = ["merge", tmp_path / "tasks", "--base", tmp_path / "base.safetensors", "-o", out, "--method",
            "consensus-ta", "--force"]
    code, stdout, err = run(*args, "--k", "2")
    assert code == 0
    assert err.startswith("warning: the consensus kept 0 of 63 weights (0.0%)") and "PLAIN BASE" in err
    merged = load_file(str(out))
    assert all(np.array_equal(merged[n], base[n]) for n in base)
    code, stdout, err = run(*args, "--k", "1", "--json")
    assert code == 0 and err == "" and json.loads(stdout)["warnings"] == []  # k = 1 keeps the used weights
    state, report = merge_with_report(tmp_path / "tasks", base=tmp_path / "base.safetensors", method="consensus-ta", k=2, run=RunOptions(device="cpu"))
    assert report.warnings and report.consensus_kept == 0
    with pytest.warns(UserWarning, match="PLAIN BASE"):
        tallzip.merge(tmp_path / "tasks", base=tmp_path / "base.safetensors", method="consensus-ta", k=2, run=RunOptions(device="cpu"))


# --- what pack --allow-nonfinite gives back (the README says it) -----------------------------------

def test_pack_allow_nonfinite_gives_back_the_base_value_where_a_task_had_nan(tmp_path):
    base, tasks = numpy_family()
    tasks["task1"]["enc.w"][0, 0] = np.nan
    tasks["task2"]["enc.w"][1, 1] = np.inf
    base["enc.b"][3] = np.nan
    tasks["task0"]["head.weight"][0, 0] = np.nan
    base_path, tasks_dir = write_family(tmp_path / "fam", base, tasks)
    out = tmp_path / "f.tallz"
    tallzip.pack(tasks_dir, base_path, out, store=StoreOptions(allow_nonfinite=True))
    archive = tallzip.open(out)
    for task in tasks:
        got = archive.load(task)
        assert got["enc.w"][0, 0].item() == base["enc.w"][0, 0]  # the base's value, in every task
        assert got["enc.w"][1, 1].item() == base["enc.w"][1, 1]
        assert np.isnan(got["enc.b"][3].item())  # the base's NaN
        for name in MASKED:  # everywhere else, the formula (numpy's NaN rules: every comparison false)
            with np.errstate(invalid="ignore"):
                mtv = np_mtv(base, tasks, name)
                want = np_rebuild(base[name], np_mask(base[name], tasks[task][name], mtv, 0.4), np_round_mtv(mtv))
            np.testing.assert_array_equal(got[name].numpy(), want)
    assert np.isnan(archive.load("task0")["head.weight"][0, 0].item())  # stored as it was
