"""pack / extract / info / verify against the TALL formula computed independently in numpy."""
from __future__ import annotations

import json
import shutil
from collections import OrderedDict

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.numpy import load_file as np_load_file, save_file as np_save_file

import tallzip
from tallzip.verification.info import summary
from tallzip.verification.verify import verify
from tallzip.errors import TallzipError
from tallzip.formats.errors import CorruptArchiveError, FormatError, UnsupportedVersionError

from conftest import DEFAULT_MTV_DTYPE, np_mask, np_mtv, np_rebuild, np_rebuilt, np_round_mtv, numpy_family, write_family
from tallzip.options import StoreOptions


def _np(t):
    return t.numpy() if isinstance(t, torch.Tensor) else t


@pytest.mark.parametrize("mtv_dtype", [None, "float32"])  # the default (bfloat16 mtv) and the lossless archive
def test_extract_matches_numpy_formula_bit_for_bit(family, tmp_path, mtv_dtype):
    base, tasks, base_path, tasks_dir = family
    lambdas = {"task0": 0.2, "task1": 0.4, "task2": 0.6}
    out = tmp_path / "f.tallz"
    tallzip.pack(tasks_dir, base_path, out, StoreOptions(lambdas=lambdas, **({"mtv_dtype": mtv_dtype} if mtv_dtype else {})))
    archive = tallzip.open(out)
    assert archive.tasks == list(tasks)
    for task, sd in tasks.items():
        got = archive.load(task)
        assert set(got) == set(sd)  # (order: see the .pt round trip; safetensors keeps its own)
        for name in ("enc.w", "enc.b", "blk.0.w"):
            expected = np_rebuilt(base, tasks, task, name, lambdas[task], mtv_dtype or DEFAULT_MTV_DTYPE)
            assert np.array_equal(_np(got[name]), expected), (task, name)
        # unchanged, head and integer tensors come back exactly
        for name in ("frozen.emb", "head.weight", "steps"):
            assert got[name].dtype == torch.from_numpy(sd[name]).dtype
            assert np.array_equal(_np(got[name]), sd[name])


def test_tensor_kinds_are_stored_on_purpose(family, tmp_path):
    base, tasks, base_path, tasks_dir = family
    out = tmp_path / "f.tallz"
    manifest = tallzip.pack(tasks_dir, base_path, out)
    kinds = {n: t["kind"] for n, t in manifest["tensors"].items()}
    assert kinds == {"enc.w": "masked", "enc.b": "masked", "blk.0.w": "masked", "frozen.emb": "shared"}
    roles = {}
    for s in manifest["sections"]:
        roles.setdefault((s["role"], s["tensor"]), []).append(s["task"])
    assert ("mask", "frozen.emb") not in roles and ("mtv", "frozen.emb") not in roles
    assert roles[("base", "frozen.emb")] == [None]  # stored once
    assert sorted(roles[("mask", "enc.w")]) == sorted(tasks)
    assert sorted(roles[("own", "head.weight")]) == sorted(tasks)  # not in the base: per task
    assert sorted(roles[("own", "steps")]) == sorted(tasks)


def test_mask_density_in_info_matches_numpy(family, tmp_path):
    base, tasks, base_path, tasks_dir = family
    out = tmp_path / "f.tallz"
    tallzip.pack(tasks_dir, base_path, out, store=StoreOptions(lambdas=0.3))
    info = summary(tallzip.open(out))
    for task, sd in tasks.items():
        ones = total = 0
        for name in ("enc.w", "enc.b", "blk.0.w"):
            m = np_mask(base[name], sd[name], np_mtv(base, tasks, name), 0.3)
            ones, total = ones + m.sum(), total + m.size
        assert info["tasks"][task]["density"] == pytest.approx(ones / total)
    assert info["archive_bytes"] == out.stat().st_size
    assert info["inputs"]["tasks_bytes"] == sum(p.stat().st_size for p in tasks_dir.iterdir())


def _np_ties(base, tasks, names, density):
    """TIES with the whole-vector trim, sign election and disjoint sum, in numpy."""
    taus = {t: {n: sd[n] - base[n] for n in names} for t, sd in tasks.items()}
    trimmed = {}
    for t, tv in taus.items():
        flat = np.abs(np.concatenate([tv[n].ravel() for n in names]))
        k = flat.size - int(flat.size * density)
        thr = np.partition(flat, k - 1)[k - 1]
        trimmed[t] = {n: np.where(np.abs(tv[n]) >= thr, tv[n], 0) for n in names}
    mass = {n: sum(trimmed[t][n] for t in tasks) for n in names}
    majority = np.sign(sum(np.sign(mass[n]).sum() for n in names))
    out = {}
    for n in names:
        sign = np.sign(mass[n])
        sign[sign == 0] = majority
        stack = np.stack([trimmed[t][n] for t in tasks])
        agree = np.where(sign > 0, stack > 0, stack < 0)
        out[n] = np.where(agree, stack, 0).sum(0)
    return out


def test_ties_mtv_matches_numpy(family, tmp_path):
    base, tasks, base_path, tasks_dir = family
    out = tmp_path / "f.tallz"
    tallzip.pack(tasks_dir, base_path, out, store=StoreOptions(merge="ties", density=0.2, mtv_dtype="float32"))  # the mtv as computed
    archive = tallzip.open(out)
    names = ["enc.w", "enc.b", "blk.0.w", "frozen.emb"]  # ranked over the whole vector, unchanged tensors included
    expected = _np_ties(base, tasks, names, 0.2)
    for n in ("enc.w", "enc.b", "blk.0.w"):
        np.testing.assert_allclose(archive.mtv(n).numpy(), expected[n], rtol=1e-6, atol=1e-9)
        task0 = archive.load("task0")[n].numpy()
        mask = np_mask(base[n], tasks["task0"][n], archive.mtv(n).numpy(), 0.4)
        assert np.array_equal(task0, np_rebuild(base[n], mask, archive.mtv(n).numpy()))


@pytest.mark.parametrize("fmt", ["safetensors", "pt"])
def test_formats_round_trip_with_metadata(tmp_path, fmt):
    base, tasks = numpy_family(seed=3)
    base_path, tasks_dir = write_family(tmp_path, base, tasks, fmt=fmt)
    out = tmp_path / "f.tallz"
    tallzip.pack(tasks_dir, base_path, out)
    target = tmp_path / f"task1.{'safetensors' if fmt == 'safetensors' else 'pt'}"
    tallzip.open(out).extract("task1", target)
    if fmt == "safetensors":
        with safe_open(str(target), "np") as fh:
            assert fh.metadata() == {"task": "task1"}
        got = np_load_file(str(target))
    else:
        got = torch.load(target, weights_only=True)
        assert list(got) == list(tasks["task1"])  # order kept
        got = {k: v.numpy() for k, v in got.items()}
    assert np.array_equal(got["enc.w"], np_rebuilt(base, tasks, "task1", "enc.w", 0.4))
    assert np.array_equal(got["head.weight"], tasks["task1"]["head.weight"])


def test_sharded_folders_and_side_files(tmp_path):
    base, tasks = numpy_family(seed=5)
    base_path, _ = write_family(tmp_path, base, {}, fmt="safetensors")
    tasks_dir = tmp_path / "hf"
    for name, sd in tasks.items():
        folder = tasks_dir / name
        folder.mkdir(parents=True)
        names = list(sd)
        shards = {"model-00001-of-00002.safetensors": names[:3], "model-00002-of-00002.safetensors": names[3:]}
        for file, part in shards.items():
            np_save_file({n: sd[n] for n in part}, str(folder / file), metadata={"format": "pt"})
        index = {"metadata": {"total_size": 1}, "weight_map": {n: f for f, p in shards.items() for n in p}}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index))
        (folder / "config.json").write_text(json.dumps({"task": name}))
    out = tmp_path / "f.tallz"
    tallzip.pack(tasks_dir, base_path, out)
    target = tmp_path / "restored"
    tallzip.open(out).extract("task2", target)
    assert json.loads((target / "config.json").read_text()) == {"task": "task2"}
    index = json.loads((target / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {"model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"}
    got = {}
    for f in set(index["weight_map"].values()):
        got.update(np_load_file(str(target / f)))
    assert set(got) == set(tasks["task2"])
    assert np.array_equal(got["steps"], tasks["task2"]["steps"])


def test_extract_reads_only_its_own_sections(family, tmp_path, monkeypatch):
    _, tasks, base_path, tasks_dir = family
    out = tmp_path / "f.tallz"
    tallzip.pack(tasks_dir, base_path, out)
    archive = tallzip.open(out)
    seen = []
    original = archive.reader.read_chunk_bytes
    monkeypatch.setattr(archive.reader, "read_chunk_bytes", lambda e, c: seen.append(e) or original(e, c))
    archive.load("task1")
    assert seen and all(s["task"] in (None, "task1") for s in seen)
    assert {s["role"] for s in seen} == {"base", "mtv", "mask", "own"}
    seen.clear()
    summary(archive)
    assert seen == []  # info reads the manifest only


def test_lambda_selection_api_picks_best_score(family, tmp_path):
    base, tasks, base_path, tasks_dir = family
    wanted = {"task0": 0.2, "task1": 0.5, "task2": 0.6}
    calls = []

    def evaluate(task, state):
        # score = -distance of the rebuilt enc.w to the numpy rebuild at the wanted lambda
        target = np_rebuilt(base, tasks, task, "enc.w", wanted[task])
        calls.append(task)
        return -float(np.abs(state["enc.w"].numpy() - target).sum())

    selector = tallzip.select_lambdas(evaluate)
    manifest = tallzip.pack(tasks_dir, base_path, tmp_path / "f.tallz", store=StoreOptions(lambdas=selector))
    assert {t["name"]: t["lambda"] for t in manifest["tasks"]} == wanted
    assert len(calls) == 3 * 5 and set(selector.scores["task1"]) == {0.2, 0.3, 0.4, 0.5, 0.6}


def test_bfloat16_mtv_masks_from_full_precision(family, tmp_path):
    base, tasks, base_path, tasks_dir = family
    out = tmp_path / "f.tallz"
    tallzip.pack(tasks_dir, base_path, out, store=StoreOptions(mtv_dtype="bfloat16"))
    archive = tallzip.open(out)
    name = "enc.w"
    mtv = np_mtv(base, tasks, name)
    rounded = np_round_mtv(mtv, "bfloat16")
    assert not np.array_equal(rounded, mtv)  # the rounding is visible in this family
    assert np.array_equal(archive.mtv(name).numpy(), rounded)
    mask = np_mask(base[name], tasks["task2"][name], mtv, 0.4)  # from the fp32 mtv
    assert np.array_equal(archive.load("task2")[name].numpy(), np_rebuild(base[name], mask, rounded))


def test_base_by_reference(family, tmp_path):
    base, tasks, base_path, tasks_dir = family
    out = tmp_path / "f.tallz"
    tallzip.pack(tasks_dir, base_path, out, store=StoreOptions(base_ref=True))
    assert not [s for s in tallzip.open(out).manifest["sections"] if s["role"] == "base"]
    with pytest.raises(TallzipError, match="--base"):
        tallzip.open(out).load("task0")
    got = tallzip.open(out, base=base_path).load("task0")
    assert np.array_equal(got["enc.b"].numpy(), np_rebuilt(base, tasks, "task0", "enc.b", 0.4))
    other = dict(base, **{"enc.b": base["enc.b"] + 1})
    np_save_file(other, str(tmp_path / "other.safetensors"))
    with pytest.raises(TallzipError, match="sha256"):
        tallzip.open(out, base=tmp_path / "other.safetensors")


def test_verify_against_originals(family, tmp_path):
    base, tasks, base_path, tasks_dir = family
    out = tmp_path / "f.tallz"
    tallzip.pack(tasks_dir, base_path, out, store=StoreOptions(mtv_dtype="float32"))
    report = verify(tallzip.open(out), tasks_dir)
    assert report["mtv_dtypes"] == ["F32"] and report["verdict"] == "matches"
    assert report["family"]["mtv_recomputed"] and report["family"]["mtv_tensors_differing"] == {}
    for row in report["tasks"].values():
        assert row["verdict"] == "matches" and row["mask_bits_differing"] == 0
        assert row["rebuilt_vs_original"]["max_abs"] > 0  # masks are lossy by design: reported, not judged


def test_verify_declares_the_bfloat16_rounding_of_the_default(family, tmp_path):
    base, tasks, base_path, tasks_dir = family
    out = tmp_path / "f.tallz"
    tallzip.pack(tasks_dir, base_path, out)
    report = verify(tallzip.open(out), tasks_dir)
    assert report["mtv_dtypes"] == ["BF16"] and report["mtv_rounding"] == {"BF16": 2.0 ** -8}
    assert report["verdict"] == "matches"
    for row in report["tasks"].values():
        assert row["mask_bits_differing"] == 0  # masks come from the float32 mtv all the same


# --- bad input ----------------------------------------------------------------------------------

def test_mismatched_task_is_refused_naming_task_and_tensor(tmp_path):
    base, tasks = numpy_family()
    tasks["task1"]["enc.w"] = tasks["task1"]["enc.w"][:, :5].copy()
    del tasks["task2"]["enc.b"]
    base_path, tasks_dir = write_family(tmp_path, base, tasks)
    with pytest.raises(TallzipError, match=r"task 'task1'.*'enc.w'.*shape"):
        tallzip.pack(tasks_dir, base_path, tmp_path / "f.tallz")
    assert not (tmp_path / "f.tallz").exists()
    (tasks_dir / "task1.safetensors").unlink()
    with pytest.raises(TallzipError, match=r"task 'task2'.*'enc.b'"):
        tallzip.pack(tasks_dir, base_path, tmp_path / "f.tallz")
    assert not list(tmp_path.glob("*.tallz*")) and not list(tmp_path.glob(".f.tallz*"))


def test_too_few_tasks_and_missing_base(tmp_path):
    base, tasks = numpy_family(n_tasks=1)
    base_path, tasks_dir = write_family(tmp_path, base, tasks)
    with pytest.raises(TallzipError, match="at least 2"):
        tallzip.pack(tasks_dir, base_path, tmp_path / "f.tallz")
    with pytest.raises(TallzipError, match="missing base"):
        tallzip.pack(tasks_dir, None, tmp_path / "f.tallz")
    with pytest.raises(FormatError, match="no such"):
        tallzip.pack(tasks_dir, tmp_path / "nope.safetensors", tmp_path / "f.tallz")


def test_existing_target_needs_force(family, tmp_path):
    _, _, base_path, tasks_dir = family
    out = tmp_path / "f.tallz"
    out.write_bytes(b"precious")
    with pytest.raises(FormatError, match="already exists"):
        tallzip.pack(tasks_dir, base_path, out)
    assert out.read_bytes() == b"precious"
    tallzip.pack(tasks_dir, base_path, out, force=True)
    assert tallzip.open(out).tasks


def test_other_version_and_damage_are_refused(family, tmp_path):
    _, _, base_path, tasks_dir = family
    out = tmp_path / "f.tallz"
    tallzip.pack(tasks_dir, base_path, out)
    data = bytearray(out.read_bytes())
    versioned = bytearray(data)
    versioned[8:12] = (3).to_bytes(4, "little")
    (tmp_path / "v3.tallz").write_bytes(versioned)
    with pytest.raises(UnsupportedVersionError, match="version 3"):
        tallzip.open(tmp_path / "v3.tallz")
    manifest = tallzip.open(out).manifest
    mask = next(s for s in manifest["sections"] if s["role"] == "mask" and s["task"] == "task1")
    damaged = bytearray(data)
    damaged[mask["chunks"][0]["offset"]] ^= 0x10
    (tmp_path / "bad.tallz").write_bytes(damaged)
    archive = tallzip.open(tmp_path / "bad.tallz")
    archive.load("task0")  # other tasks are untouched
    with pytest.raises(CorruptArchiveError, match=r"checksum mismatch in section mask task 'task1'"):
        archive.load("task1")
    (tmp_path / "short.tallz").write_bytes(data[:-10])
    with pytest.raises(CorruptArchiveError):
        tallzip.open(tmp_path / "short.tallz")
    (tmp_path / "junk.tallz").write_bytes(b"hello world" * 10)
    with pytest.raises(FormatError, match="not a tallzip archive"):
        tallzip.open(tmp_path / "junk.tallz")


def test_unknown_task_lists_available(family, tmp_path):
    _, _, base_path, tasks_dir = family
    out = tmp_path / "f.tallz"
    tallzip.pack(tasks_dir, base_path, out)
    with pytest.raises(TallzipError, match="no task 'cars'.*task0, task1, task2"):
        tallzip.open(out).load("cars")


def test_nonfinite_inputs_refused_unless_allowed(tmp_path):
    base, tasks = numpy_family()
    tasks["task1"]["blk.0.w"][2, 3] = np.nan
    base_path, tasks_dir = write_family(tmp_path, base, tasks)
    with pytest.raises(TallzipError, match=r"task 'task1'.*'blk.0.w'.*NaN"):
        tallzip.pack(tasks_dir, base_path, tmp_path / "f.tallz")
    tallzip.pack(tasks_dir, base_path, tmp_path / "f.tallz", store=StoreOptions(allow_nonfinite=True))
    assert tallzip.open(tmp_path / "f.tallz").load("task0")
