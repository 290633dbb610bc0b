"""The `lowrank` and `q1` representations in the archive (issue 22; formats/SPEC.md): a decoder written here from the
SPEC text (numpy, zstandard and the spec-decoder's container reader, nothing of tallzip's) reads what tallzip
wrote and agrees with tallzip's rebuild to float32 rounding and with the originals within the recorded error; the
rank follows the energy rule of a numpy SVD; the committed fixture still reads; damaged or inconsistent low-rank
entries are refused with one line; verify says "differs" for an edited task file; resident serving, add and
info handle it."""
from __future__ import annotations

import json
import math
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import zstandard
from click.testing import CliRunner
from safetensors.numpy import load_file as np_load, save_file as np_save

import tallzip
from tallzip.cli.main import cli
from tallzip.errors import TallzipError
from tallzip.formats.errors import CorruptArchiveError
from tallzip.options import LowRankOptions, RunOptions, StoreOptions

from test_spec_decoder import bf16_to_f32, chunk_view_shape, plan, read_archive, read_section, section_chunks

FIXTURES = Path(__file__).resolve().parent / "fixtures"
sys.path.insert(0, str(FIXTURES))
from make_lowrank_fixture import CHUNK, KEEP, lowrank_family, write  # noqa: E402


# --- the decoder, from SPEC.md "lowrank" only ---------------------------------------------------------

def spec_lowrank_values(data, manifest, task) -> dict:
    """{tensor: the decoded task vector (float32, the tensor's shape)} of a lowrank task, as SPEC says."""
    entry = next(t for t in manifest["tasks"] if t["name"] == task)
    params = entry["lowrank"]
    assert params["scale_dtype"] == "BF16"
    c = manifest["chunk_elements"]
    codes_entry = next(s for s in manifest["sections"] if (s["role"], s["task"]) == ("lrcodes", task))
    codes = read_section(data, manifest, "lrcodes", "", task, counts=[n for _, n in plan(codes_entry["shape"], c)])
    codes = codes.view(np.int8)
    scales = np.concatenate([bf16_to_f32(np.frombuffer(zstandard.ZstdDecompressor().decompress(p), dtype="<u2"))
                             for _, _, p, _ in section_chunks(data, manifest, "lrscales", "", task)])
    g, at_code, at_scale, out = params["group"], 0, 0, {}
    for record in params["tensors"]:
        name, r, b, _ = record[:4]
        grid = record[4] if len(record) == 5 else "symmetric"
        assert grid in ("symmetric", "asymmetric") and (grid == "symmetric" or (r == 0 and b in (2, 3, 4)))
        shape = manifest["tensors"][name]["shape"]
        m, n = (shape[0], math.prod(shape[1:])) if len(shape) >= 2 else (1, shape[0] if shape else 1)
        q = 2 ** (b - 1) - 1
        if grid == "asymmetric":  # codes in [0, 2^b - 1]; m*G scales, then m*G offsets
            groups = -(-n // g)
            own = codes[at_code:at_code + m * n]
            assert own.min(initial=0) >= 0 and own.max(initial=0) <= 2 ** b - 1
            s = scales[at_scale:at_scale + m * groups]
            o = scales[at_scale + m * groups:at_scale + 2 * m * groups]
            i = np.arange(m * n)
            k = (i // n) * groups + (i % n) // g
            product = own.astype(np.float32) * s[k]  # one float32 multiplication, then one addition
            value = product + o[k]
            at_code, at_scale = at_code + m * n, at_scale + 2 * m * groups
            out[name] = value.reshape(shape).astype(np.float32)
            continue
        if r:
            own = codes[at_code:at_code + r * (m + n)].astype(np.float32)
            s = scales[at_scale:at_scale + 2 * r]
            left = own[:r * m].reshape(r, m) * s[:r, None]
            right = own[r * m:].reshape(r, n) * s[r:, None]
            value = left.T @ right
            at_code, at_scale = at_code + r * (m + n), at_scale + 2 * r
        else:
            groups = -(-n // g)
            own = codes[at_code:at_code + m * n].astype(np.float32)
            s = scales[at_scale:at_scale + m * groups]
            i = np.arange(m * n)
            value = own * s[(i // n) * groups + (i % n) // g]
            at_code, at_scale = at_code + m * n, at_scale + m * groups
        assert np.abs(codes[at_code - (r * (m + n) if r else m * n):at_code]).max(initial=0) <= q
        out[name] = value.reshape(shape).astype(np.float32)
    assert (at_code, at_scale) == (len(codes), len(scales))  # the streams hold exactly the records
    return out


def spec_q1_values(data, manifest, task) -> dict:
    """SPEC "q1": a q* task with b = 1 on the sign grid: value = f32(code) * f32(scale[r * G + j]) per chunk."""
    quant = next(t for t in manifest["tasks"] if t["name"] == task)["quant"]
    assert quant == {"bits": 1, "group": 128, "grid": "sign", "method": "mean", "scale_dtype": "BF16"}
    out = {}
    for name, info in manifest["tensors"].items():
        if info["kind"] != "masked":
            continue
        shape, chunks = info["shape"], plan(info["shape"], manifest["chunk_elements"])
        codes = read_section(data, manifest, "qcodes", name, task, counts=[n for _, n in chunks]).view(np.int8)
        assert set(np.unique(codes).tolist()) <= {-1, 1}
        parts = [bf16_to_f32(np.frombuffer(zstandard.ZstdDecompressor().decompress(p), dtype="<u2"))
                 for _, _, p, _ in section_chunks(data, manifest, "qscales", name, task)]
        value = np.empty(math.prod(shape), dtype=np.float32)
        for (start, count), scales in zip(chunks, parts):
            view = chunk_view_shape(shape, start, count)
            cols = view[-1] if view else 1
            i = np.arange(count)
            value[start:start + count] = codes[start:start + count].astype(np.float32) * \
                scales[(i // cols) * -(-cols // 128) + (i % cols) // 128]
        out[name] = value.reshape(shape)
    return out


def np_q1(tau: np.ndarray, chunk_elements: int):
    """SPEC's q1 writer in numpy: per chunk's rows, groups of 128: codes -1 where tau < 0 else +1, scale = mean |tau|
    (float64 here, before its bfloat16 rounding); the codes flat and each weight's scale, flat."""
    shape, codes, scales = tau.shape, np.where(tau.reshape(-1) < 0, -1, 1).astype(np.int8), []
    for start, count in plan(list(shape), chunk_elements):
        view = chunk_view_shape(list(shape), start, count)
        rows = tau.reshape(-1)[start:start + count].reshape(-1, view[-1] if view else 1)
        for row in rows:
            for g in range(0, row.size, 128):
                group = np.abs(row[g:g + 128]).astype(np.float64)
                scales += [group.mean()] * group.size
    return codes, np.array(scales)


def rel_error(tau, value) -> float:
    tau, value = tau.astype(np.float64), value.astype(np.float64)
    return float(np.linalg.norm(tau - value) / np.linalg.norm(tau))


@pytest.fixture
def family(tmp_path):
    base_path, tasks_path = write(tmp_path / "fam")
    base, tasks = lowrank_family()
    return base, tasks, base_path, tasks_path


def _pack(family, out, **store):
    _, _, base_path, tasks_path = family
    tallzip.pack(tasks_path, base_path, out, StoreOptions(chunk_elements=CHUNK, **{"keep": KEEP, **store}))
    return out


def test_a_decoder_from_the_spec_reads_lowrank_tasks(family, tmp_path):
    base, tasks, _, _ = family
    out = _pack(family, tmp_path / "a.tallz", lowrank=LowRankOptions(quant_tensors=(("conv.*", 3),)))
    data, manifest = read_archive(out)
    with tallzip.open(out) as archive:
        for task in ("task0", "task1"):
            values = spec_lowrank_values(data, manifest, task)
            records = {r[0]: r for r in archive.task_entry(task)["lowrank"]["tensors"]}
            assert set(values) == {"enc.w", "conv.w", "enc.b"}  # every changed float tensor, not frozen.emb
            assert records["enc.w"][1] > 0 and records["enc.b"][1] == 0 and records["conv.w"][1:3] == [0, 3]
            loaded = archive.load(task)
            for name, value in values.items():
                want = base[name] + value  # SPEC: f32(base) + value, cast to the task's float32
                got = loaded[name].numpy()
                assert np.allclose(got, want, rtol=1e-6, atol=1e-6 * float(np.abs(want).max())), (task, name)
                tau = tasks[task][name] - base[name]
                recorded = records[name][3]
                assert rel_error(tau, value) <= recorded * (1 + 1e-3) + 1e-6, (task, name)
                assert rel_error(tau, value) >= recorded * 0.99, (task, name)  # recorded rounded up, not loose
            assert np.array_equal(loaded["head.weight"].numpy(), tasks[task]["head.weight"])
            assert np.array_equal(loaded["frozen.emb"].numpy(), base["frozen.emb"])


def test_the_rank_is_the_energy_rule_of_a_numpy_svd(family, tmp_path):
    base, tasks, _, _ = family
    for energy in (0.8, 0.95):
        out = _pack(family, tmp_path / f"e{energy}.tallz", lowrank=LowRankOptions(energy=energy))
        with tallzip.open(out) as archive:
            for task in ("task0", "task1"):
                records = {r[0]: r for r in archive.task_entry(task)["lowrank"]["tensors"]}
                for name in ("enc.w", "conv.w"):
                    tau = (tasks[task][name] - base[name]).astype(np.float64)
                    s = np.linalg.svd(tau.reshape(tau.shape[0], -1), compute_uv=False)
                    want = int(np.argmax(np.cumsum(s ** 2) >= energy * (s ** 2).sum() * (1 - 1e-12))) + 1
                    assert records[name][1] == want, (energy, task, name)


def test_pack_is_deterministic_and_the_randomized_svd_bounded(family, tmp_path):
    one = _pack(family, tmp_path / "one.tallz")
    _, _, base_path, tasks_path = family
    two = tmp_path / "two.tallz"  # tensors coded on one thread, then on three, within a small budget
    tallzip.pack(tasks_path, base_path, two, StoreOptions(keep=KEEP, chunk_elements=CHUNK), RunOptions(workers=1))
    assert one.read_bytes() == two.read_bytes()
    tallzip.pack(tasks_path, base_path, two, StoreOptions(keep=KEEP, chunk_elements=CHUNK),
                 RunOptions(workers=3, memory="300M"), force=True)
    assert one.read_bytes() == two.read_bytes()
    # a memory budget below the matrices: the seeded randomized SVD, same bytes twice, the same ranks
    small = LowRankOptions(memory_bytes=1 << 16)
    three = _pack(family, tmp_path / "three.tallz", lowrank=small)
    four = _pack(family, tmp_path / "four.tallz", lowrank=small)
    assert three.read_bytes() == four.read_bytes()
    with tallzip.open(one) as a, tallzip.open(three) as b:
        exact = {r[0]: r for r in a.task_entry("task0")["lowrank"]["tensors"]}
        randomized = {r[0]: r for r in b.task_entry("task0")["lowrank"]["tensors"]}
        assert randomized["enc.w"][1] == exact["enc.w"][1] == 3
        assert randomized["enc.w"][3] <= exact["enc.w"][3] * 1.05


def test_the_committed_fixture_still_reads(tmp_path):
    base, tasks = lowrank_family()
    tasks = {**tasks, "added": tasks["task1"]}
    fixture = FIXTURES / "lowrank-family.tallz"
    data, manifest = read_archive(fixture)
    with tallzip.open(fixture) as archive:
        assert [archive.representation(t) for t in archive.tasks] == ["lowrank", "lowrank", "tall", "q1", "lowrank"]
        q1 = archive.load("task3")
        for name, want in spec_q1_values(data, manifest, "task3").items():
            assert np.array_equal(q1[name].numpy(), base[name] + want), name  # elementwise: bit for bit
        for task in ("task0", "task1", "added"):
            values = spec_lowrank_values(data, manifest, task)
            out = archive.extract(task, tmp_path / f"{task}.safetensors").output
            got = np_load(str(out))
            for name, value in values.items():
                want = base[name] + value
                assert np.allclose(got[name], want, rtol=1e-6, atol=1e-6 * float(np.abs(want).max())), (task, name)
            assert np.array_equal(got["steps"], tasks[task]["steps"])
    result = CliRunner().invoke(cli, ["verify", str(fixture), "--against", str(_folder(tmp_path, tasks)), "--json"])
    report = json.loads(result.output)
    assert result.exit_code == 0 and all(t["verdict"] == "matches" for t in report["tasks"].values()), result.output


def _folder(tmp_path, tasks) -> Path:
    folder = tmp_path / "against"
    folder.mkdir(exist_ok=True)
    for name, sd in tasks.items():
        np_save(dict(sd), str(folder / f"{name}.safetensors"))
    return folder


def test_verify_says_differs_for_an_edited_task_file(family, tmp_path):
    base, tasks, _, tasks_path = family
    out = _pack(family, tmp_path / "a.tallz", keep="lowrank")
    against = tmp_path / "against"
    shutil.copytree(tasks_path, against)
    result = CliRunner().invoke(cli, ["verify", str(out), "--against", str(against), "--json"])
    assert result.exit_code == 0, result.output
    assert {t["verdict"] for t in json.loads(result.output)["tasks"].values()} == {"matches"}
    edited = dict(tasks["task1"])
    edited["enc.w"] = edited["enc.w"].copy()
    edited["enc.w"][5, :8] += 0.02  # a few weights, well inside the float range of the task vector
    np_save(edited, str(against / "task1.safetensors"))
    result = CliRunner().invoke(cli, ["verify", str(out), "--against", str(against), "--json"])
    report = json.loads(result.output)
    assert result.exit_code != 0
    assert report["tasks"]["task1"]["verdict"] == "differs"
    assert report["tasks"]["task1"]["tensors_differing"] == ["enc.w"]
    assert "lowrank: relative error" in report["tasks"]["task1"]["differences"][0]["what"]
    assert {report["tasks"][t]["verdict"] for t in ("task0", "task2", "task3")} == {"matches"}


def _rewritten(out: Path, tmp_path: Path, change) -> Path:
    import fuzz
    data, manifest = read_archive(out)
    manifest = json.loads(json.dumps(manifest))
    change(manifest)
    bad = tmp_path / "bad.tallz"
    fuzz.write_with_manifest(data, manifest, bad)
    return bad


def _task(manifest, name="task0"):
    return next(t for t in manifest["tasks"] if t["name"] == name)


@pytest.mark.parametrize("change, message", [
    (lambda m: _task(m)["lowrank"]["tensors"][2].__setitem__(1, 41), "rank 41 does not fit"),
    (lambda m: _task(m)["lowrank"]["tensors"][2].__setitem__(1, 4), "wrong size"),
    (lambda m: _task(m)["lowrank"]["tensors"].pop(2), "no lowrank record"),
    (lambda m: _task(m)["lowrank"]["tensors"][1].__setitem__(1, 1), "does not fit its shape"),
    (lambda m: _task(m)["lowrank"]["tensors"][1].__setitem__(2, 5), "bad lowrank tensor record"),
    (lambda m: _task(m)["lowrank"]["tensors"].append(list(_task(m)["lowrank"]["tensors"][0])), "repeated"),
    (lambda m: _task(m).pop("lowrank"), "no lowrank parameters"),
    (lambda m: next(s for s in m["sections"] if s["role"] == "lrscales" and s["task"] == "task0").__setitem__(
        "dtype", "F32"), "does not fit its tensor or task"),
    (lambda m: [m["sections"].remove(s) for s in list(m["sections"]) if s["role"] == "lrcodes" and s["task"] == "task0"],
     "lowrank sections missing"),
])
def test_inconsistent_lowrank_entries_are_refused(family, tmp_path, change, message):
    out = _pack(family, tmp_path / "a.tallz")
    bad = _rewritten(out, tmp_path, change)
    with pytest.raises(CorruptArchiveError, match=message):
        tallzip.open(bad)
    result = CliRunner().invoke(cli, ["extract", str(bad), "--task", "task0", "-o", str(tmp_path / "t.safetensors")])
    assert result.exit_code != 0 and "Traceback" not in result.output and not (tmp_path / "t.safetensors").exists()


def test_codes_out_of_the_grid_are_refused_not_rebuilt(family, tmp_path):
    """A stream whose (checksummed) codes exceed the record's grid: claimed as 2-bit, stored as 4-bit."""
    out = _pack(family, tmp_path / "a.tallz")
    bad = _rewritten(out, tmp_path, lambda m: _task(m)["lowrank"]["tensors"][2].__setitem__(2, 2))
    with tallzip.open(bad) as archive:
        with pytest.raises(CorruptArchiveError, match="codes out of range"):
            archive.load("task0")


def test_an_unknown_representation_is_refused_by_name(family, tmp_path):
    from tallzip.formats.errors import UnsupportedVersionError
    out = _pack(family, tmp_path / "a.tallz")
    bad = _rewritten(out, tmp_path, lambda m: _task(m).__setitem__("representation", "lowrank2"))
    with pytest.raises(UnsupportedVersionError, match="'lowrank2'"):
        tallzip.open(bad)


def test_resident_switches_to_what_load_gives(family, tmp_path):
    out = _pack(family, tmp_path / "a.tallz")
    with tallzip.open(out) as archive:
        resident = archive.resident("cpu")
        for task in archive.tasks * 2:
            live = resident.state_dict(task)
            for name, tensor in archive.load(task).items():
                assert torch.equal(live[name], tensor), (task, name)
        assert resident.memory()["tasks"]["task0"] > 0


def test_add_keeps_a_new_task_lowrank_and_info_counts_it(family, tmp_path):
    base, tasks, _, tasks_path = family
    out = _pack(family, tmp_path / "a.tallz", keep="tall")
    result = CliRunner().invoke(cli, ["add", str(out), str(tasks_path / "task3.safetensors"), "--task", "late",
                                      "--keep", "lowrank"])
    assert result.exit_code == 0, result.output
    data, manifest = read_archive(out)
    values = spec_lowrank_values(data, manifest, "late")
    with tallzip.open(out) as archive:
        assert archive.representation("late") == "lowrank"
        got = archive.load("late")
        for name, value in values.items():
            assert np.allclose(got[name].numpy(), base[name] + value, atol=1e-6), name
    info = json.loads(CliRunner().invoke(cli, ["info", str(out), "--json"]).output)
    row = info["tasks"]["late"]
    coded = sum(s["length"] for s in manifest["sections"] if s["task"] == "late" and s["role"].startswith("lr"))
    masked = sum(math.prod(t["shape"]) for t in manifest["tensors"].values() if t["kind"] == "masked")
    assert row["representation"] == "lowrank" and row["bits_per_param"] == pytest.approx(8 * coded / masked)
    assert info["lossless"] is False


def test_lowrank_options_are_checked():
    with pytest.raises(TallzipError, match="energy"):
        LowRankOptions(energy=1.5)
    with pytest.raises(TallzipError, match="bits"):
        LowRankOptions(factor_bits=5)
    with pytest.raises(TallzipError, match="bits"):
        LowRankOptions(quant_tensors=(("conv*", 7),))
    with pytest.raises(TallzipError, match="q2"):
        LowRankOptions(quant_tensors=(("conv*", "q1"),))
    assert LowRankOptions(quant_tensors=(("conv*", 3),)).tensor_code("conv1.weight") == 3
    assert LowRankOptions(quant_tensors=(("emb*", "q2"), ("*", 4))).tensor_code("emb.weight") == "q2"
    assert LowRankOptions().tensor_code("conv1.weight") is None


def test_pack_cli_takes_the_lowrank_options(family, tmp_path):
    _, _, base_path, tasks_path = family
    out = tmp_path / "cli.tallz"
    result = CliRunner().invoke(cli, ["pack", str(tasks_path), "--base", str(base_path), "-o", str(out), "--keep",
                                      "lowrank", "--lowrank-energy", "0.8", "--lowrank-quant", "conv.*=8"])
    assert result.exit_code == 0, result.output
    with tallzip.open(out) as archive:
        params = archive.task_entry("task0")["lowrank"]
        assert params["energy"] == 0.8 and ["conv.w", 0, 8] == params["tensors"][0][:3]
    result = CliRunner().invoke(cli, ["pack", str(tasks_path), "--base", str(base_path), "-o", str(tmp_path / "x"),
                                      "--keep", "lowrank", "--lowrank-quant", "conv.*=5"])
    assert result.exit_code != 0 and "PATTERN=CODE" in result.output
    result = CliRunner().invoke(cli, ["pack", str(tasks_path), "--base", str(base_path), "-o", str(out), "--force",
                                      "--keep", "lowrank", "--lowrank-energy", "0.8", "--lowrank-energy", "task1=0.99"])
    assert result.exit_code == 0, result.output
    with tallzip.open(out) as archive:
        assert [archive.task_entry(t)["lowrank"]["energy"] for t in ("task0", "task1", "task2")] == [0.8, 0.99, 0.8]
        ranks = {t: archive.task_entry(t)["lowrank"]["tensors"][2][1] for t in ("task0", "task1")}
        assert ranks["task1"] > ranks["task0"]  # more energy, more of the spectrum
    for bad, message in ((["--lowrank-energy", "task9=0.9"], "unknown task 'task9'"),
                         (["--lowrank-energy", "task1=lots"], "[TASK=]ENERGY"),
                         (["--lowrank-energy", "1.5"], "energy must be in (0, 1]")):
        result = CliRunner().invoke(cli, ["pack", str(tasks_path), "--base", str(base_path), "-o", str(tmp_path / "y"),
                                          "--keep", "lowrank", *bad])
        assert result.exit_code != 0 and message in result.output and "Traceback" not in result.output, result.output
        assert not (tmp_path / "y").exists()


def test_select_representation_scores_lowrank_as_the_archive_rebuilds_it(family, tmp_path):
    """A score that is the rebuilt enc.w's distance to the original: lowrank passes only within a tolerance that
    its error fits (numpy's), and the score recorded is the stored model's."""
    base, tasks, base_path, tasks_path = family

    def score(task, state):
        tau = tasks[task]["enc.w"] - base["enc.w"]
        return -float(np.linalg.norm(state["enc.w"].numpy() - tasks[task]["enc.w"]) / np.linalg.norm(tau))

    out = tmp_path / "sel.tallz"
    selector = tallzip.select_representation(score, tolerance=0.5, candidates=("lowrank", "q2"))
    tallzip.pack(tasks_path, base_path, out, StoreOptions(keep=selector, chunk_elements=CHUNK))
    with tallzip.open(out) as archive:
        for task in tasks:
            # finetuned scores 0, so the floor is 0 whatever the tolerance: nothing lossy is within it -> exact
            assert archive.representation(task) == "exact"
    relative = lambda t: lambda task, state: 1.0 + score(task, state)  # noqa: E731  fine-tuned: 1.0
    selector = tallzip.select_representation(relative(None), tolerance=0.2, candidates=("lowrank", "q2"))
    tallzip.pack(tasks_path, base_path, out, StoreOptions(keep=selector, chunk_elements=CHUNK), force=True)
    data, manifest = read_archive(out)
    with tallzip.open(out) as archive:
        for task in tasks:
            assert archive.representation(task) == "lowrank"  # its enc.w error (~0.15) is within 0.2
            value = spec_lowrank_values(data, manifest, task)["enc.w"]
            want = 1.0 - rel_error(tasks[task]["enc.w"] - base["enc.w"], value)
            assert selector.scores[task]["lowrank"] == pytest.approx(want, abs=1e-5)
            assert selector.scores[task]["lowrank"] == relative(None)(task, archive.load(task))
    selector = tallzip.select_representation(relative(None), tolerance=0.1, candidates=("lowrank", "q2"))
    tallzip.pack(tasks_path, base_path, out, StoreOptions(keep=selector, chunk_elements=CHUNK), force=True)
    with tallzip.open(out) as archive:  # lowrank's ~0.15 is not within 0.1 (nor q2's): the fine-tuned tensors
        assert {archive.representation(t) for t in tasks} == {"exact"}
    assert all(0.8 < selector.scores[t]["lowrank"] < 0.9 and "q2" in selector.scores[t] for t in tasks)
    with pytest.raises(TallzipError, match="'q1x'"):
        tallzip.select_representation(score, candidates=("q1x",))


def test_q1_stores_signs_and_mean_magnitudes_as_the_spec_says(family, tmp_path):
    base, tasks, _, tasks_path = family
    out = _pack(family, tmp_path / "q1.tallz", keep="q1")
    data, manifest = read_archive(out)
    with tallzip.open(out) as archive:
        for task in tasks:
            assert archive.representation(task) == "q1"
            values = spec_q1_values(data, manifest, task)
            loaded = archive.load(task)
            for name, value in values.items():
                tau = tasks[task][name] - base[name]
                codes, means = np_q1(tau, CHUNK)
                assert np.array_equal(np.sign(value.reshape(-1)).astype(np.int8), codes), (task, name)
                # each weight's stored scale: the group's mean |tau| rounded to bfloat16 (half an ulp: <= 2^-8 of it)
                assert np.all(np.abs(np.abs(value.reshape(-1)) - means) <= 2 ** -8 * means * (1 + 1e-6)), (task, name)
                assert np.array_equal(loaded[name].numpy(), base[name] + value), (task, name)
        resident = archive.resident("cpu")
        for task in tasks:
            assert all(torch.equal(resident.state_dict(task)[n], t) for n, t in archive.load(task).items())
    against = tmp_path / "against"
    shutil.copytree(tasks_path, against)
    result = CliRunner().invoke(cli, ["verify", str(out), "--against", str(against), "--json"])
    assert result.exit_code == 0 and {t["verdict"] for t in json.loads(result.output)["tasks"].values()} == {"matches"}
    edited = dict(tasks["task2"])
    edited["enc.w"] = edited["enc.w"].copy()
    tau = edited["enc.w"][7, 3] - base["enc.w"][7, 3]
    edited["enc.w"][7, 3] = base["enc.w"][7, 3] - tau  # one weight's task vector flipped: another sign
    np_save(edited, str(against / "task2.safetensors"))
    result = CliRunner().invoke(cli, ["verify", str(out), "--against", str(against), "--json"])
    report = json.loads(result.output)["tasks"]
    assert result.exit_code != 0 and report["task2"]["verdict"] == "differs"
    assert report["task2"]["tensors_differing"] == ["enc.w"] and "another sign" in report["task2"]["differences"][0]["what"]
    assert {report[t]["verdict"] for t in ("task0", "task1", "task3")} == {"matches"}


def test_q1_codes_beyond_the_sign_grid_are_refused(family, tmp_path):
    """A q3 task relabelled q1 (its quant made a valid sign grid): its codes (up to +-3) are refused at decode."""
    out = _pack(family, tmp_path / "q3.tallz", keep="q3")

    def relabel(m):
        _task(m, "task0")["representation"] = "q1"
        _task(m, "task0")["quant"].update(bits=1, grid="sign")
    bad = _rewritten(out, tmp_path, relabel)
    with tallzip.open(bad) as archive:
        with pytest.raises(CorruptArchiveError, match="codes out of range"):
            archive.load("task0")
    bad = _rewritten(out, tmp_path, lambda m: _task(m, "task0").update(representation="q1"))  # bits 3 for q1
    with pytest.raises(CorruptArchiveError, match="bad quant parameters"):
        tallzip.open(bad)


def test_base_by_reference_and_remove(family, tmp_path):
    _, tasks, base_path, tasks_path = family
    whole = _pack(family, tmp_path / "whole.tallz", keep="lowrank")
    ref = _pack(family, tmp_path / "ref.tallz", keep="lowrank", base_ref=True)
    assert ref.stat().st_size < whole.stat().st_size
    with tallzip.open(whole) as a, tallzip.open(ref, base=base_path) as b:
        for task in tasks:
            want, got = a.load(task), b.load(task)
            assert all(torch.equal(want[n], got[n]) for n in want), task
    result = CliRunner().invoke(cli, ["remove", str(whole), "--task", "task1"])
    assert result.exit_code == 0, result.output
    with tallzip.open(whole) as archive, tallzip.open(ref, base=base_path) as b:
        assert archive.tasks == ["task0", "task2", "task3"]
        assert not any(s["task"] == "task1" for s in archive.manifest["sections"])
        for task in archive.tasks:
            want = b.load(task)
            assert all(torch.equal(t, want[n]) for n, t in archive.load(task).items()), task


def test_the_codes_stream_in_zstd_decodes_to_the_same_codes(family, tmp_path):
    """codes_codec="zstd" (an encoder's choice, SPEC: each chunk records its codec): the same codes, as the SPEC
    decoder reads them, and the same rebuilt weights as the default planes+ans stream."""
    options = LowRankOptions(quant_tensors=(("conv.*", 2),))
    ans = _pack(family, tmp_path / "ans.tallz", lowrank=options)
    zst = _pack(family, tmp_path / "zstd.tallz", lowrank=LowRankOptions(quant_tensors=(("conv.*", 2),),
                                                                       codes_codec="zstd"))
    (data_a, man_a), (data_z, man_z) = read_archive(ans), read_archive(zst)
    codecs = {s["codec"] for s in man_z["sections"] if s["role"] == "lrcodes"}
    assert codecs == {"zstd"} and {s["codec"] for s in man_a["sections"] if s["role"] == "lrcodes"} == {"planes+ans"}
    with tallzip.open(ans) as a, tallzip.open(zst) as z:
        for task in ("task0", "task1"):
            want, got = spec_lowrank_values(data_a, man_a, task), spec_lowrank_values(data_z, man_z, task)
            assert want.keys() == got.keys() and all(np.array_equal(want[n], got[n]) for n in want)
            left, right = a.load(task), z.load(task)
            assert all(torch.equal(left[n], right[n]) for n in left)
    with pytest.raises(TallzipError, match="codes_codec"):
        LowRankOptions(codes_codec="lzma")
    _, _, base_path, tasks_path = family
    bad = CliRunner().invoke(cli, ["pack", str(tasks_path), "--base", str(base_path), "-o", str(tmp_path / "x.tallz"),
                                   "--keep", "lowrank", "--lowrank-codes-codec", "lzma"])
    assert bad.exit_code != 0 and "Traceback" not in bad.output and not (tmp_path / "x.tallz").exists()


# --- a rank-0 tensor on a q* task's own code: q2 asymmetric (an offset per group) ------------------------------

Q2_NAMED = LowRankOptions(quant_tensors=(("conv.*", "q2"), ("enc.b", "q2")))


def _bf16(x: np.ndarray, up: bool) -> np.ndarray:
    """The nearest bfloat16 value on one side (up: >=, else <=) of each float32, as float32 (numpy only)."""
    x = np.asarray(x, dtype=np.float32)
    toward_zero = (x.view(np.uint32) & np.uint32(0xFFFF0000)).view(np.float32)
    away = (toward_zero.view(np.uint32) + np.uint32(0x10000)).view(np.float32)
    exact = toward_zero == x
    lower = np.where(x > 0, toward_zero, away)
    upper = np.where(x > 0, away, toward_zero)
    return np.where(exact, x, upper if up else lower)


def np_q2(tau: np.ndarray, group: int = 128):
    """REPRESENTATIONS/SPEC's asymmetric q2 writer in numpy on the matrix view (m, n), groups of `group` along its
    rows: offset = bf16 <= min, scale = bf16 >= (max - offset) / 3, code = clip(rint((tau - offset) / scale), 0, 3)
    (0 where the scale is 0). Returns (codes, scale per weight, offset per weight), flat."""
    m = tau.shape[0] if tau.ndim >= 2 else 1
    matrix = tau.reshape(m, -1).astype(np.float32)
    codes, scales, offsets = [], [], []
    for row in matrix:
        for start in range(0, row.size, group):
            x = row[start:start + group]
            offset = _bf16(x.min(), up=False)
            scale = _bf16(np.float32(max(np.float32(0), x.max() - offset)) / np.float32(3), up=True)
            code = np.clip(np.rint((x - offset) / scale), 0, 3) if scale > 0 else np.zeros(x.size)
            codes.append(code)
            scales.append(np.full(x.size, scale, dtype=np.float32))
            offsets.append(np.full(x.size, offset, dtype=np.float32))
    return np.concatenate(codes).astype(np.int8), np.concatenate(scales), np.concatenate(offsets)


def test_a_tensor_named_q2_takes_the_asymmetric_q2_code(family, tmp_path):
    """conv.w (8 x 18) and enc.b (1 x 1200: ten groups, the last short, across two chunks) kept as --keep q2 codes
    them: the record says so, the SPEC decoder reads codes, scales and offsets that numpy's q2 formula gives, and
    the archive rebuilds base + code * scale + offset bit for bit (elementwise, float32)."""
    base, tasks, _, _ = family
    out = _pack(family, tmp_path / "q2.tallz", lowrank=Q2_NAMED)
    data, manifest = read_archive(out)
    with tallzip.open(out) as archive:
        for task in ("task0", "task1"):
            records = {r[0]: r for r in archive.task_entry(task)["lowrank"]["tensors"]}
            assert records["conv.w"][1:3] == [0, 2] and records["conv.w"][4:] == ["asymmetric"]
            assert records["enc.b"][1:3] == [0, 2] and records["enc.b"][4:] == ["asymmetric"]
            assert len(records["enc.w"]) == 4 and records["enc.w"][1] > 0  # factored, no grid field
            values = spec_lowrank_values(data, manifest, task)
            loaded = archive.load(task)
            for name in ("conv.w", "enc.b"):
                tau = tasks[task][name] - base[name]
                codes, scales, offsets = np_q2(tau)
                want = (codes.astype(np.float32) * scales + offsets).reshape(tau.shape)
                assert len(np.unique(codes)) == 4, name  # four levels, not the ternary code
                assert np.array_equal(values[name], want), (task, name)
                assert np.array_equal(loaded[name].numpy(), base[name] + want), (task, name)
                assert np.all(np.abs(tau.reshape(-1) - want.reshape(-1)) <= scales / 2 * (1 + 1e-5) + 1e-9), name
                recorded = records[name][3]
                assert rel_error(tau, want) <= recorded <= rel_error(tau, want) * (1 + 1e-3), (task, name)
        symmetric = _pack(family, tmp_path / "sym.tallz", lowrank=LowRankOptions(quant_tensors=(("conv.*", 2),)))
        with tallzip.open(symmetric) as sym:
            record = next(r for r in sym.task_entry("task0")["lowrank"]["tensors"] if r[0] == "conv.w")
            assert record[1:3] == [0, 2] and len(record) == 4  # `2` keeps its meaning: three levels, no field
            rows = spec_lowrank_values(*read_archive(symmetric), "task0")["conv.w"].reshape(8, 18)  # a group a row
            levels = rows / np.abs(rows).max(axis=1, keepdims=True)
            assert set(np.unique(levels).tolist()) == {-1.0, 0.0, 1.0}
        resident = archive.resident("cpu")
        for task in archive.tasks * 2:
            live = resident.state_dict(task)
            assert all(torch.equal(live[n], t) for n, t in archive.load(task).items()), task


def test_verify_says_differs_for_an_edited_q2_named_tensor(family, tmp_path):
    base, tasks, _, tasks_path = family
    out = _pack(family, tmp_path / "q2.tallz", lowrank=Q2_NAMED)
    against = tmp_path / "against"
    shutil.copytree(tasks_path, against)
    result = CliRunner().invoke(cli, ["verify", str(out), "--against", str(against), "--json"])
    assert result.exit_code == 0 and {t["verdict"] for t in json.loads(result.output)["tasks"].values()} == {"matches"}
    edited = dict(tasks["task0"])
    edited["enc.b"] = edited["enc.b"].copy()
    edited["enc.b"][300:310] += 0.01  # ten weights of the 1200 the q2 code keeps
    np_save(edited, str(against / "task0.safetensors"))
    result = CliRunner().invoke(cli, ["verify", str(out), "--against", str(against), "--json"])
    report = json.loads(result.output)["tasks"]
    assert result.exit_code != 0 and report["task0"]["verdict"] == "differs"
    assert report["task0"]["tensors_differing"] == ["enc.b"]
    assert {report[t]["verdict"] for t in ("task1", "task2", "task3")} == {"matches"}


def _record(manifest, name, task="task0"):
    return next(r for r in _task(manifest, task)["lowrank"]["tensors"] if r[0] == name)


@pytest.mark.parametrize("change, message", [
    (lambda m: _record(m, "conv.w").__setitem__(4, "ternary"), "unknown grid 'ternary'"),
    (lambda m: _record(m, "conv.w").append("extra"), "bad lowrank tensor record"),
    (lambda m: _record(m, "enc.w").append("asymmetric"), "asymmetric grid needs rank 0"),
    (lambda m: _record(m, "conv.w").__setitem__(2, 8), "asymmetric grid needs rank 0 and bits 2, 3 or 4"),
    (lambda m: _record(m, "conv.w").pop(), "wrong size"),  # read as symmetric: its offsets left over
    (lambda m: _record(m, "conv.w").__setitem__(4, "symmetric"), "wrong size"),
])
def test_inconsistent_q2_named_records_are_refused(family, tmp_path, change, message):
    out = _pack(family, tmp_path / "q2.tallz", lowrank=Q2_NAMED)
    bad = _rewritten(out, tmp_path, change)
    with pytest.raises(CorruptArchiveError, match=message):
        tallzip.open(bad)
    result = CliRunner().invoke(cli, ["extract", str(bad), "--task", "task0", "-o", str(tmp_path / "t.safetensors")])
    assert result.exit_code != 0 and "Traceback" not in result.output and not (tmp_path / "t.safetensors").exists()
    assert len(result.output.strip().splitlines()) == 1, result.output


def test_pack_cli_takes_a_q_code_name(family, tmp_path):
    _, _, base_path, tasks_path = family
    out = tmp_path / "cli.tallz"
    result = CliRunner().invoke(cli, ["pack", str(tasks_path), "--base", str(base_path), "-o", str(out), "--keep",
                                      "lowrank", "--lowrank-quant", "conv.*=q2", "--lowrank-quant", "enc.b=q3"])
    assert result.exit_code == 0, result.output
    with tallzip.open(out) as archive:
        records = {r[0]: r for r in archive.task_entry("task0")["lowrank"]["tensors"]}
        assert records["conv.w"][1:3] == [0, 2] and records["conv.w"][4] == "asymmetric"
        assert records["enc.b"][1:3] == [0, 3] and len(records["enc.b"]) == 4  # q3: symmetric, as --keep q3
    result = CliRunner().invoke(cli, ["pack", str(tasks_path), "--base", str(base_path), "-o", str(tmp_path / "x"),
                                      "--keep", "lowrank", "--lowrank-quant", "conv.*=q1"])
    assert result.exit_code != 0 and "PATTERN=CODE" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "x").exists()
