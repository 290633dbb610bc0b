"""Per-task representations (q8/q4/q3/q2, exact, tall mixed with them): every decode checked against a
plain numpy computation from the input checkpoints (SPEC.md's formulas), not against tallzip's output."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from click.testing import CliRunner
from safetensors.numpy import load_file as np_load, save_file as np_save

import tallzip
from tallzip.cli.main import cli
from tallzip.errors import TallzipError
from tallzip.formats.errors import CorruptArchiveError
from tallzip.options import StoreOptions

CHUNK = 1024
GROUP = 128


def _bf16_round_up(x: np.ndarray) -> np.ndarray:
    """The smallest bfloat16 value >= each non-negative float32 x, as float32 (numpy, on the bits)."""
    u = x.astype(np.float32).view(np.uint32)
    low = (u & np.uint32(0xFFFF0000)).view(np.float32)
    up = ((u & np.uint32(0xFFFF0000)) + np.uint32(0x10000)).view(np.float32)
    return np.where(low < x, up, low).astype(np.float32)


def _bf16_round_down(x: np.ndarray) -> np.ndarray:
    """The largest bfloat16 value <= each float32 x, as float32 (numpy, on the bits)."""
    x = x.astype(np.float32)
    trunc = x.view(np.uint32) & np.uint32(0xFFFF0000)          # toward zero
    low = trunc.view(np.float32)
    further = (trunc + np.uint32(0x10000)).view(np.float32)     # one step away from zero (negative x)
    return np.where(low > x, further, low).astype(np.float32)


def np_quant_rebuild(base: np.ndarray, task: np.ndarray, bits: int, rows_of) -> np.ndarray:
    """SPEC: tau = f32(task) - f32(base), per group of 128 of a row. Symmetric (q8/q4/q3): scale =
    bf16_up(max|tau| / Q), code = round_half_even(tau / scale) in [-Q, Q], value = code * scale.
    Asymmetric (q2): offset = bf16_down(min), scale = bf16_up((max - offset) / L), code =
    clip(round(tau - offset) / scale), 0, L), value = code * scale + offset (two roundings).
    rebuilt = f32(base) + value, cast to the dtype."""
    b32, t32 = base.astype(np.float32), task.astype(np.float32)
    tau = (t32 - b32).reshape(rows_of)
    out = np.empty_like(tau)
    for g in range(0, tau.shape[1], GROUP):
        part = tau[:, g:g + GROUP]
        if bits == 2:  # asymmetric
            top = np.float32(2 ** bits - 1)
            offset = _bf16_round_down(part.min(axis=1, keepdims=True))
            span = np.maximum(part.max(axis=1, keepdims=True) - offset, np.float32(0))
            scale = _bf16_round_up(span / top)
            safe = np.where(scale > 0, scale, np.float32(1))
            code = np.where(scale > 0, np.clip(np.rint((part - offset) / safe), 0, top), 0).astype(np.uint8)
            out[:, g:g + GROUP] = (code.astype(np.float32) * scale).astype(np.float32) + offset
            continue
        q = 2 ** (bits - 1) - 1
        scale = _bf16_round_up(np.abs(part).max(axis=1, keepdims=True) / np.float32(q))
        safe = np.where(scale > 0, scale, np.float32(1))
        # codes are integers (int8): a code of "-0" is 0, and f32(0) * scale is +0
        code = np.where(scale > 0, np.clip(np.rint(part / safe), -q, q), 0).astype(np.int8).astype(np.float32)
        out[:, g:g + GROUP] = code * scale
    return (b32 + out.reshape(base.shape)).astype(base.dtype)


@pytest.fixture
def family(tmp_path):
    rng = np.random.default_rng(7)
    base = {"w": rng.standard_normal((40, 300)).astype(np.float32),    # chunks of 3 whole rows
            "v": rng.standard_normal(3000).astype(np.float32),         # 1-d, chunks of 1024
            "b": rng.standard_normal(300).astype(np.float32),          # one chunk, groups 128, 128, 44
            "z": np.array([0.0, -0.0, 1.5, -2.25] * 8, dtype=np.float32),
            "same": rng.standard_normal(20).astype(np.float32),
            "step": np.arange(4, dtype=np.int64)}
    np_save(base, str(tmp_path / "base.safetensors"))
    (tmp_path / "tasks").mkdir()
    tasks = {}
    for k in range(3):
        t = {n: (v + (0.02 * rng.standard_normal(v.shape)).astype(v.dtype) if v.dtype == np.float32 and n != "same"
                 else v.copy()) for n, v in base.items()}
        t["z"][1] = 0.0 if k == 0 else -0.0   # a sign of zero that only bits tell apart
        t["step"] = t["step"] + k
        t[f"head{k}"] = rng.standard_normal((3, 5)).astype(np.float32)
        tasks[f"t{k}"] = t
        np_save(t, str(tmp_path / "tasks" / f"t{k}.safetensors"))
    return tmp_path, base, tasks


ROWS = {"w": (40, 300), "v": (1, 3000), "b": (1, 300), "z": (1, 32)}


def _pack(tmp_path, keep, name="a.tallz"):
    out = tmp_path / name
    tallzip.pack(tmp_path / "tasks", tmp_path / "base.safetensors", out, store=StoreOptions(keep=keep, chunk_elements=CHUNK), force=True)
    return out


@pytest.mark.parametrize("rep,bits", [("q8", 8), ("q4", 4), ("q3", 3), ("q2", 2)])
def test_quantized_decode_matches_numpy(family, rep, bits):
    tmp_path, base, tasks = family
    out = _pack(tmp_path, rep)
    with tallzip.open(out) as arc:
        roles = {s["role"] for s in arc.manifest["sections"]}
        assert "mtv" not in roles and "mask" not in roles  # no tall task: no mtv, no masks
        assert all(arc.representation(t) == rep for t in arc.tasks)
        for t, original in tasks.items():
            got = {n: v.numpy() for n, v in arc.load(t).items()}
            for n in ("w", "v", "b", "z"):
                want = np_quant_rebuild(base[n], original[n], bits, ROWS[n])
                assert np.array_equal(got[n].view(np.uint32), want.view(np.uint32)), (rep, t, n)
            assert np.array_equal(got["same"], base["same"]) and np.array_equal(got["step"], original["step"])
            assert np.array_equal(got[f"head{t[1]}"], original[f"head{t[1]}"])


def test_exact_extracts_byte_identical(family):
    tmp_path, _, tasks = family
    out = _pack(tmp_path, "exact")
    with tallzip.open(out) as arc:
        assert {s["role"] for s in arc.manifest["sections"]} >= {"delta"}
        assert "mtv" not in {s["role"] for s in arc.manifest["sections"]}
        for t, original in tasks.items():
            path = arc.extract(t, tmp_path / f"{t}.out.safetensors").output
            got = np_load(str(path))
            assert set(got) == set(original)
            for n, v in original.items():
                assert got[n].dtype == v.dtype and got[n].tobytes() == v.tobytes(), (t, n)


def test_mixed_representations_and_tall(family):
    tmp_path, base, tasks = family
    out = _pack(tmp_path, {"t0": "exact", "t1": "tall", "*": "q4"})
    with tallzip.open(out) as arc:
        assert [arc.representation(t) for t in arc.tasks] == ["exact", "tall", "q4"]
        roles = {(s["role"], s["task"]) for s in arc.manifest["sections"]}
        assert ("mask", "t1") in roles and ("mask", "t0") not in roles and ("mask", "t2") not in roles
        assert ("mtv", None) in roles
        # the mtv is still the sum over every task (its formula does not depend on the representations)
        mtv = arc.mtv("w").numpy()
        want = sum(tasks[t]["w"].astype(np.float32) - base["w"] for t in ("t0", "t1", "t2"))
        assert np.allclose(mtv, want, atol=1e-2)
        assert arc.load("t0")["w"].numpy().tobytes() == tasks["t0"]["w"].tobytes()
        got = arc.load("t2")["v"].numpy()
        assert np.array_equal(got, np_quant_rebuild(base["v"], tasks["t2"]["v"], 4, ROWS["v"]))
        # extracting every task together (base decoded once) gives the same
        paths = arc.extract(None, tmp_path / "all").paths
        assert np_load(str(paths[0]))["w"].tobytes() == tasks["t0"]["w"].tobytes()
        assert np.array_equal(np_load(str(paths[2]))["v"], got)


def test_keep_refuses_unknowns(family):
    tmp_path, _, _ = family
    with pytest.raises(TallzipError, match="unknown task 'nope'"):
        _pack(tmp_path, {"nope": "q4"})
    with pytest.raises(TallzipError, match="unknown representation 'q5'"):
        _pack(tmp_path, "q5")
    result = CliRunner().invoke(cli, ["pack", str(tmp_path / "tasks"), "--base", str(tmp_path / "base.safetensors"),
                                      "-o", str(tmp_path / "c.tallz"), "--keep", "q7"])
    assert result.exit_code == 2 and "q7" in result.output
    assert not (tmp_path / "c.tallz").exists()


def test_cli_keep_and_info(family):
    tmp_path, _, _ = family
    out = tmp_path / "c.tallz"
    result = CliRunner().invoke(cli, ["pack", str(tmp_path / "tasks"), "--base", str(tmp_path / "base.safetensors"),
                                      "-o", str(out), "--keep", "q3", "--keep", "t1=exact", "--chunk-elements", "1024"])
    assert result.exit_code == 0, result.output
    info = json.loads(CliRunner().invoke(cli, ["info", str(out), "--json"]).output)
    assert info["representations"] == {"t0": "q3", "t1": "exact", "t2": "q3"}
    manifest = tallzip.open(out).manifest
    changed = sum(int(np.prod(v["shape"])) for v in manifest["tensors"].values() if v["kind"] == "masked")
    for t in ("t0", "t1", "t2"):  # bits/param: the task's codes + scales (or delta) over the changed parameters
        own = sum(s["length"] for s in manifest["sections"] if s["task"] == t
                  and s["role"] in ("qcodes", "qscales", "qoffsets", "delta"))
        assert info["tasks"][t]["bits_per_param"] == pytest.approx(8 * own / changed)
    assert info["lossless"] is False
    table = CliRunner().invoke(cli, ["info", str(out)]).output
    assert "exact" in table and "q3" in table


def _changed_copy(tmp_path, task, factor=1.01):
    folder = tmp_path / "changed"
    shutil.copytree(tmp_path / "tasks", folder)
    t = np_load(str(folder / f"{task}.safetensors"))
    t["w"] = (t["w"] * np.float32(factor)).astype(np.float32)
    np_save(t, str(folder / f"{task}.safetensors"))
    return folder


@pytest.mark.parametrize("keep", ["q8", "q4", "q2", "exact"])
def test_verify_knows_each_guarantee(family, keep):
    tmp_path, _, _ = family
    out = _pack(tmp_path, {"t0": keep, "*": "q3"})
    with tallzip.open(out) as arc:
        report = tallzip.verify(arc, tmp_path / "tasks")
        assert report["verdict"] == "matches", report
        assert report["tasks"]["t0"]["representation"] == keep
        report = tallzip.verify(arc, _changed_copy(tmp_path, "t0"))
        assert report["tasks"]["t0"]["verdict"] == "differs"
        assert report["tasks"]["t0"]["tensors_differing"] == ["w"]
        assert report["tasks"]["t1"]["verdict"] == "matches"


def test_exact_says_differs_on_one_ulp(family):
    tmp_path, _, _ = family
    out = _pack(tmp_path, "exact")
    folder = tmp_path / "ulp"
    shutil.copytree(tmp_path / "tasks", folder)
    t = np_load(str(folder / "t2.safetensors"))
    t["v"][5] = np.nextafter(t["v"][5], np.float32(np.inf))
    np_save(t, str(folder / "t2.safetensors"))
    with tallzip.open(out) as arc:
        report = tallzip.verify(arc, folder)
    assert report["tasks"]["t2"]["verdict"] == "differs" and "1 of 3,000" in report["tasks"]["t2"]["differences"][0]["what"]


def test_codes_beyond_the_grid_are_refused(family):
    """A hostile archive whose (checksummed) codes exceed +-Q builds a wrong model: refused."""
    import fuzz
    from tallzip.formats.container.writer import encode_chunk
    tmp_path, _, _ = family
    out = _pack(tmp_path, "q2")
    data = out.read_bytes()
    manifest = tallzip.open(out).manifest
    entry = next(s for s in manifest["sections"] if s["role"] == "qcodes" and s["tensor"] == "b" and s["task"] == "t0")
    bad, params, digest = encode_chunk("planes+ans", np.full(300, 5, dtype=np.uint8))
    offset = len(data) + 64  # placed in the extra bytes, after the old manifest
    manifest_offset = int.from_bytes(data[16:24], "little")
    extra_at = manifest_offset + (-manifest_offset % 64)
    entry["length"] = len(bad)
    entry["chunks"][0].update(offset=extra_at, length=len(bad), params=params, blake3=digest)
    fuzz.write_with_manifest(data, manifest, tmp_path / "bad.tallz", extra=b"\0" * (extra_at - manifest_offset) + bad)
    del offset
    with tallzip.open(tmp_path / "bad.tallz") as arc:
        with pytest.raises(CorruptArchiveError, match="codes out of range"):
            arc.load("t0")


# --- choosing on the user's data ----------------------------------------------------------------

def _closeness(original):
    """A score computed in numpy: 1 - relative L2 distance to the original (1.0 for the original)."""
    def score(state):
        num = sum(float(np.sum((np.asarray(state[n], dtype=np.float64) - v.astype(np.float64)) ** 2))
                  for n, v in original.items())
        den = sum(float(np.sum(v.astype(np.float64) ** 2)) for v in original.values())
        return 1.0 - (num / den) ** 0.5
    return score


@pytest.mark.parametrize("tolerance", [0.0, 0.0005, 0.003])
def test_select_representation_picks_the_smallest_within_tolerance(family, tolerance):
    tmp_path, base, tasks = family
    scorers = {t: _closeness(o) for t, o in tasks.items()}
    selector = tallzip.select_representation(lambda task, sd: scorers[task]({n: v.numpy() for n, v in sd.items()}),
                                             tolerance=tolerance)
    out = tmp_path / "sel.tallz"
    tallzip.pack(tmp_path / "tasks", tmp_path / "base.safetensors", out, store=StoreOptions(keep=selector, chunk_elements=CHUNK))
    expected = {}
    for t, original in tasks.items():  # the same choice from numpy rebuilds
        expected[t] = "exact"
        for rep, bits in (("tall", None), ("q2", 2), ("q3", 3), ("q4", 4), ("q8", 8)):
            state = np_tall_state(base, tasks, t) if rep == "tall" else \
                {n: (np_quant_rebuild(base[n], v, bits, ROWS[n]) if n in ROWS else v) for n, v in original.items()}
            if scorers[t](state) >= 1.0 - tolerance:
                expected[t] = rep
                break
    with tallzip.open(out) as arc:
        assert {t: arc.representation(t) for t in arc.tasks} == expected
        recorded = arc.manifest["representation_choice"]
        assert recorded["tolerance"] == tolerance and recorded["scores"]["t0"]["finetuned"] == 1.0
    if tolerance == 0.0:
        assert set(expected.values()) == {"exact"}
    if tolerance == 0.003:
        assert "exact" not in expected.values()


def _bf16_nearest(x: np.ndarray) -> np.ndarray:
    """float32 -> the nearest bfloat16 (ties to even), as float32 (numpy, on the bits; finite x)."""
    u = x.astype(np.float32).view(np.uint32)
    rounded = (u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))) & np.uint32(0xFFFF0000)
    return rounded.view(np.float32)


def np_tall_state(base, tasks, task, lam=0.4, mtv_dtype="bfloat16"):
    """SPEC's tall rebuild in numpy: mtv = sum of task vectors (task order), mask = |b - t| > lam * |(b + mtv) - t|
    from the float32 mtv, rebuilt = where(mask, b + stored mtv, b) with the mtv stored as `mtv_dtype`."""
    out = {}
    for n, original in tasks[task].items():
        if n not in base or base[n].dtype != np.float32:
            out[n] = original
            continue
        b = base[n]
        mtv = np.zeros_like(b)
        for name in sorted(tasks):
            mtv = mtv + (tasks[name][n] - b)
        mask = np.abs(b - original) > np.float32(lam) * np.abs((b + mtv) - original)
        stored = _bf16_nearest(mtv) if mtv_dtype == "bfloat16" else mtv
        out[n] = np.where(mask, b + stored, b)
    return out


def _relative_error(original, state):
    num = sum(float(np.sum((np.asarray(state[n], np.float64) - v.astype(np.float64)) ** 2)) for n, v in original.items())
    return (num / sum(float(np.sum(v.astype(np.float64) ** 2)) for v in original.values())) ** 0.5


@pytest.mark.parametrize("mtv_dtype", ["bfloat16", "float32"])
def test_select_representation_picks_tall_within_tolerance_else_falls_back(family, mtv_dtype):
    """Scores weighted per task so that tall is within the tolerance for t0 only: t0 must be kept tall, the
    others fall back to the first quantized candidate within it; the recorded tall score is the numpy
    rebuild's (the mask from the float32 mtv, the mtv as stored)."""
    tmp_path, base, tasks = family
    tolerance = 0.01
    tall_error = {t: _relative_error(o, np_tall_state(base, tasks, t, mtv_dtype=mtv_dtype)) for t, o in tasks.items()}
    weight = {t: (0.5 if t == "t0" else 2.0) * tolerance / tall_error[t] for t in tasks}

    def score(task, state):
        return 1.0 - weight[task] * _relative_error(tasks[task], {n: v.numpy() for n, v in state.items()})

    selector = tallzip.select_representation(score, tolerance=tolerance, weigh_mtv=False)
    out = tmp_path / "tall-sel.tallz"
    tallzip.pack(tmp_path / "tasks", tmp_path / "base.safetensors", out, store=StoreOptions(keep=selector, chunk_elements=CHUNK, mtv_dtype=mtv_dtype))
    expected = {}
    for t, original in tasks.items():
        expected[t] = "exact"
        for rep, bits in (("tall", None), ("q2", 2), ("q3", 3), ("q4", 4), ("q8", 8)):
            state = np_tall_state(base, tasks, t, mtv_dtype=mtv_dtype) if rep == "tall" else \
                {n: (np_quant_rebuild(base[n], v, bits, ROWS[n]) if n in ROWS else v) for n, v in original.items()}
            if 1.0 - weight[t] * _relative_error(original, state) >= 1.0 - tolerance:
                expected[t] = rep
                break
    assert expected["t0"] == "tall" and "tall" not in (expected["t1"], expected["t2"])
    assert selector.scores["t0"]["tall"] == pytest.approx(0.995, abs=1e-9)
    assert selector.scores["t1"]["tall"] == pytest.approx(0.98, abs=1e-9)
    with tallzip.open(out) as arc:
        assert {t: arc.representation(t) for t in arc.tasks} == expected
        rebuilt = {n: v.numpy() for n, v in arc.load("t0").items()}
        want = np_tall_state(base, tasks, "t0", mtv_dtype=mtv_dtype)
        assert all(np.array_equal(rebuilt[n], want[n]) for n in want)  # scored what the archive rebuilds


def test_weighing_the_mtv_drops_tall_when_it_does_not_pay(family):
    """One tall task cannot pay for a 16-bit mtv with what a 1-bit mask saves against q*: it takes its fallback
    (the numpy-computed first q* within the tolerance) and no mtv is stored. Three tasks whose only acceptable
    model is their exact tall rebuild (the fallback exact: 31 bits saved each) keep tall."""
    tmp_path, base, tasks = family
    tolerance = 0.01
    tall_error = {t: _relative_error(o, np_tall_state(base, tasks, t)) for t, o in tasks.items()}
    weight = {t: (0.5 if t == "t0" else 2.0) * tolerance / tall_error[t] for t in tasks}
    selector = tallzip.select_representation(
        lambda task, sd: 1.0 - weight[task] * _relative_error(tasks[task], {n: v.numpy() for n, v in sd.items()}),
        tolerance=tolerance)
    out = tmp_path / "weighed.tallz"
    tallzip.pack(tmp_path / "tasks", tmp_path / "base.safetensors", out, store=StoreOptions(keep=selector, chunk_elements=CHUNK))
    fallback = "exact"
    for rep, bits in (("q2", 2), ("q3", 3), ("q4", 4), ("q8", 8)):
        state = {n: (np_quant_rebuild(base[n], v, bits, ROWS[n]) if n in ROWS else v) for n, v in tasks["t0"].items()}
        if 1.0 - weight["t0"] * _relative_error(tasks["t0"], state) >= 1.0 - tolerance:
            fallback = rep
            break
    with tallzip.open(out) as arc:
        assert arc.representation("t0") == fallback != "tall"
        assert not any(s["role"] in ("mtv", "mask") for s in arc.manifest["sections"])
        assert arc.manifest["representation_choice"]["mtv_weighed"]["kept_tall"] is False

    def only_tall(task, sd):  # 1 for the task's own tall rebuild (numpy) or the fine-tuned model, else 0
        want = np_tall_state(base, tasks, task)
        got = {n: v.numpy() for n, v in sd.items()}
        return float(all(np.array_equal(got[n], want[n]) for n in want)
                     or all(np.array_equal(got[n], tasks[task][n]) for n in tasks[task]))

    selector = tallzip.select_representation(only_tall, tolerance=tolerance)
    tallzip.pack(tmp_path / "tasks", tmp_path / "base.safetensors", out, store=StoreOptions(keep=selector, chunk_elements=CHUNK), force=True)
    with tallzip.open(out) as arc:
        assert {arc.representation(t) for t in arc.tasks} == {"tall"}
    assert selector.mtv_weighed["fallbacks"] == {t: "exact" for t in tasks}
    assert selector.mtv_weighed["kept_tall"] is True


def test_select_representation_without_tall_stores_no_mtv(family):
    tmp_path, base, tasks = family
    selector = tallzip.select_representation(lambda t, s: 1.0, tolerance=0.005, candidates=("q2", "q3"))
    out = tmp_path / "q.tallz"
    tallzip.pack(tmp_path / "tasks", tmp_path / "base.safetensors", out, store=StoreOptions(keep=selector, chunk_elements=CHUNK))
    with tallzip.open(out) as arc:
        assert {arc.representation(t) for t in arc.tasks} == {"q2"}
        assert not any(s["role"] in ("mtv", "mask") for s in arc.manifest["sections"])
        assert "tall" not in selector.scores["t0"]


def test_select_representation_refuses_bad_settings():
    with pytest.raises(TallzipError, match="tolerance"):
        tallzip.select_representation(lambda t, s: 0.0, tolerance=-1)
    with pytest.raises(TallzipError, match="'q5' is not one of"):
        tallzip.select_representation(lambda t, s: 0.0, candidates=("tall", "q5"))
    with pytest.raises(TallzipError, match="'exact' is not one of"):
        tallzip.select_representation(lambda t, s: 0.0, candidates=("exact",))


@pytest.mark.parametrize("fraction,verdict", [(0.25, "matches"), (0.45, "matches"), (0.55, "differs"), (0.75, "differs")])
def test_verify_q4_says_no_just_beyond_half_a_scale(family, fraction, verdict):
    """One weight moved to `fraction` of its stored scale from its q4 value (scale and value computed
    here in numpy from the inputs): within half a scale it matches, beyond it differs."""
    tmp_path, base, tasks = family
    out = _pack(tmp_path, {"t0": "q4", "*": "q3"})
    tau = tasks["t0"]["b"].astype(np.float32) - base["b"]
    group = tau[:GROUP]
    scale = _bf16_round_up(np.abs(group).max(keepdims=True) / np.float32(7))[0]
    i = int(np.argmin(np.abs(group)))  # not the group's largest: the stored scale stays what it is
    value = np.float32(np.rint(group[i] / scale) * scale)
    folder = tmp_path / f"moved{fraction}"
    shutil.copytree(tmp_path / "tasks", folder)
    t = np_load(str(folder / "t0.safetensors"))
    t["b"][i] = base["b"][i] + value + np.float32(fraction) * scale
    np_save(t, str(folder / "t0.safetensors"))
    with tallzip.open(out) as arc:
        report = tallzip.verify(arc, folder)
    assert report["tasks"]["t0"]["verdict"] == verdict, report["tasks"]["t0"]
    assert report["tasks"]["t1"]["verdict"] == "matches"


def test_fixture_with_representations_still_reads():
    """tests/fixtures/reps-family.tallz (make_reps_fixture.py) holds a q4, an exact, a tall and an
    added q2 task: each rebuilds as the numpy formulas say from the regenerated inputs."""
    import sys
    from pathlib import Path
    from conftest import np_rebuilt
    fixtures = Path(__file__).resolve().parent / "fixtures"
    sys.path.insert(0, str(fixtures))
    try:
        from make_v1_fixture import LAMBDA, fixture_family
    finally:
        sys.path.remove(str(fixtures))
    base, tasks = fixture_family()
    rows = {"enc.w": (24, 20), "enc.b": (1, 24)}
    with tallzip.open(fixtures / "reps-family.tallz") as arc:
        assert {t: arc.representation(t) for t in arc.tasks} == {"task0": "q4", "task1": "exact", "task2": "tall",
                                                                 "added": "q2"}
        assert {s["role"] for s in arc.manifest["sections"]} >= {"qcodes", "qscales", "qoffsets", "delta", "mtv", "mask"}
        for task, source, rep in (("task0", "task0", "q4"), ("task1", "task1", "exact"), ("task2", "task2", "tall"),
                                  ("added", "task0", "q2")):
            got = {n: v.numpy() for n, v in arc.load(task).items()}
            original = tasks[source]
            assert set(got) == set(original)
            for name in ("enc.w", "enc.b"):
                want = {"q4": lambda: np_quant_rebuild(base[name], original[name], 4, rows[name]),
                        "q2": lambda: np_quant_rebuild(base[name], original[name], 2, rows[name]),
                        "exact": lambda: original[name],
                        "tall": lambda: np_rebuilt(base, tasks, task, name, LAMBDA)}[rep]()
                assert got[name].tobytes() == want.tobytes(), (task, name)
            for name in ("frozen.emb", "head.weight", "steps"):
                assert got[name].tobytes() == original[name].tobytes(), (task, name)
