"""The data-free estimate of tall tasks on a sample of each tensor's pieces (issue 21): the sums are those of exactly
the sampled pieces (checked in float64 numpy), small tensors are summed whole, the manifest says what was sampled,
the verdicts hold, and the archive's bytes do not depend on the workers or (but for the estimate) on the sample."""
import filecmp
from collections import OrderedDict

import numpy as np
import pytest
import torch

import tallzip
from tallzip.errors import TallzipError
from tallzip.formats.container.reader import ArchiveReader
from tallzip.ops import quality
from tallzip.ops.tall import EstimateRequest, masked_tensor_and_sums

from conftest import write_family

PIECE = quality.SAMPLE_PIECE


class SumMerger:
    method = "sum"


def bf16_round(x32: np.ndarray) -> np.ndarray:
    return torch.from_numpy(np.ascontiguousarray(x32)).to(torch.bfloat16).float().numpy()


def rebuild_products(base: np.ndarray, tasks, lam: float, mtv_dtype: str):
    """Per task (tau, r - task, r - base) in float64, r the tall rebuild from the formulas (float32 arithmetic)."""
    mtv = tasks[0] - base
    for t in tasks[1:]:
        mtv = mtv + (t - base)
    stored = bf16_round(mtv) if mtv_dtype == "bfloat16" else mtv
    added = base + stored
    out = []
    for t in tasks:
        mask = np.abs(base - t) > np.float32(lam) * np.abs((base + mtv) - t)
        r = np.where(mask, added, base).astype(np.float64)
        out.append((t.astype(np.float64) - base, r - t, r - base))
    return out


def sums_over(products, selected: np.ndarray) -> np.ndarray:
    return np.array([[np.sum(tau[selected] ** 2), np.sum(err[selected] ** 2), np.sum(rb[selected] * tau[selected])]
                     for tau, err, rb in products])


def test_pieces_and_sampled_counts():
    assert list(quality.sample_pieces(PIECE - 5, PIECE + 10, 2)) == [(0, 5, True), (5, PIECE + 5, False),
                                                                    (PIECE + 5, PIECE + 10, True)]
    for elements in (0, 1, PIECE, PIECE + 1, 8 * PIECE, 8 * PIECE + 1, 100_003):
        for every in (1, 3, 8):
            taken = sum(min(PIECE, elements - p * PIECE) for p in range(0, -(-elements // PIECE), every))
            assert quality.sampled_elements(elements, every) == taken
    assert quality.tensor_sample_every(quality.SAMPLE_FLOOR, 8) == 1  # at most the floor: whole
    assert quality.tensor_sample_every(quality.SAMPLE_FLOOR + 1, 8) == 8


@pytest.mark.parametrize("offset", [0, 1000, 3 * PIECE])
@pytest.mark.parametrize("every", [2, 3])
@pytest.mark.parametrize("mtv_dtype", ["bfloat16", "float32"])
def test_sampled_sums_are_those_of_exactly_the_sampled_pieces(offset, every, mtv_dtype):
    count = 5 * PIECE + 777  # a slice starting at element `offset` of its tensor
    gen = torch.Generator().manual_seed(every + offset)
    base = 0.05 * torch.randn(count, generator=gen)
    tasks = [base + 0.01 * torch.randn(count, generator=gen) for _ in range(3)]
    mtv, packed, ones, sums = masked_tensor_and_sums(SumMerger(), base, tasks, [0.4] * 3, torch.device("cpu"),
                                                     EstimateRequest(mtv_dtype, every, offset))
    b, ts = base.numpy(), [t.numpy() for t in tasks]
    positions = offset + np.arange(count)
    selected = (positions // PIECE) % every == 0
    assert 0 < selected.sum() < count
    expected = sums_over(rebuild_products(b, ts, 0.4, mtv_dtype), selected)
    np.testing.assert_allclose(sums, expected, rtol=2e-5)
    whole = sums_over(rebuild_products(b, ts, 0.4, mtv_dtype), np.ones(count, dtype=bool))
    assert not np.allclose(sums, whole, rtol=1e-3)  # a sample, not the whole
    # the masks and mtv are those of every element, sampled or not
    for t, bits in zip(ts, packed):
        mask = np.abs(b - t) > np.float32(0.4) * np.abs((b + (ts[0] - b + (ts[1] - b) + (ts[2] - b))) - t)
        np.testing.assert_array_equal(np.unpackbits(bits, bitorder="little")[:count].astype(bool), mask)


def big_family(poor: bool, seed=0):
    """base and 3 tasks: one tensor above the sampling floor, two small ones. poor: dense overlapping task vectors
    (tall rebuilds them badly); else disjoint supports (each task rebuilt almost exactly)."""
    rng = np.random.default_rng(seed)
    shapes = {"big.w": (1025, 1024), "small.w": (64, 48), "small.b": (64,)}
    base = OrderedDict((n, rng.normal(0, 0.05, s).astype(np.float32)) for n, s in shapes.items())
    tasks = OrderedDict()
    for j in range(3):
        sd = OrderedDict()
        for n, x in base.items():
            tau = rng.normal(0, 0.01, x.shape).astype(np.float32)
            if not poor:
                flat = np.arange(x.size).reshape(x.shape)
                tau = np.where(flat % 3 == j, tau, 0).astype(np.float32)
            sd[n] = (x + tau).astype(np.float32)
        tasks[f"task{j}"] = sd
    return base, tasks


def expected_estimates(base, tasks, every, lam=0.4, mtv_dtype="bfloat16"):
    """Each task's estimate from numpy: large tensors on every `every`-th piece, weighted by elements / sampled,
    small ones whole."""
    names = list(tasks)
    total = np.zeros((len(names), 3))
    for n, b in base.items():
        flat_b = b.reshape(-1)
        products = rebuild_products(flat_b, [tasks[t][n].reshape(-1) for t in names], lam, mtv_dtype)
        if flat_b.size > quality.SAMPLE_FLOOR:
            selected = (np.arange(flat_b.size) // PIECE) % every == 0
            total += sums_over(products, selected) * (flat_b.size / selected.sum())
        else:
            total += sums_over(products, np.ones(flat_b.size, dtype=bool))
    out = {}
    for t, (tau_sq, err_sq, dot) in zip(names, total):
        rebuilt_sq = err_sq + 2 * dot - tau_sq
        out[t] = {"rel_error": err_sq / tau_sq, "cosine": dot / np.sqrt(rebuilt_sq * tau_sq)}
    return out


@pytest.mark.parametrize("poor", [True, False])
def test_pack_records_the_sampled_estimate_and_its_verdict(tmp_path, poor):
    base, tasks = big_family(poor)
    base_path, tasks_dir = write_family(tmp_path / "fam", base, tasks)
    manifest = tallzip.pack(tasks_dir, base_path, tmp_path / "a.tallz")
    every = quality.SAMPLE_EVERY
    expected = expected_estimates(base, tasks, every)
    big, small = 1025 * 1024, 64 * 48 + 64
    taken = quality.sampled_elements(big, every)
    assert 0 < taken < big
    for entry in manifest["tasks"]:
        got = entry["estimate"]
        assert got["sampled"] == {"every": every, "fraction": pytest.approx((taken + small) / (big + small), rel=1e-5)}
        assert got["cosine"] == pytest.approx(expected[entry["name"]]["cosine"], rel=1e-5)
        assert got["rel_error"] == pytest.approx(expected[entry["name"]]["rel_error"], rel=1e-4, abs=1e-7)
    poor_names = [name for name, _, _ in quality.poor_tasks(manifest["tasks"])]
    if poor:  # dense overlapping tasks: the sample sees it on every task (full cosines ~0.5)
        assert poor_names == list(tasks)
    else:  # disjoint tasks: rebuilt within the bfloat16 mtv's rounding, cosines ~0.9999
        assert poor_names == []
        assert all(e["estimate"]["cosine"] > 0.999 for e in manifest["tasks"])


def test_estimate_every_one_sums_everything_and_records_no_sample(tmp_path):
    base, tasks = big_family(True, seed=1)
    base_path, tasks_dir = write_family(tmp_path / "fam", base, tasks)
    manifest = tallzip.pack(tasks_dir, base_path, tmp_path / "full.tallz", tallzip.StoreOptions(estimate_every=1))
    expected = expected_estimates(base, tasks, 1)
    for entry in manifest["tasks"]:
        assert "sampled" not in entry["estimate"]
        assert entry["estimate"]["cosine"] == pytest.approx(expected[entry["name"]]["cosine"], rel=1e-5)


def test_small_tensors_are_summed_whole(tmp_path):
    """Every tensor at most the floor: nothing is sampled, the estimate is the full one, no record."""
    base, tasks = big_family(True, seed=2)
    for sd in (base, *tasks.values()):
        del sd["big.w"]
    base_path, tasks_dir = write_family(tmp_path / "fam", base, tasks)
    sampled = tallzip.pack(tasks_dir, base_path, tmp_path / "s.tallz")
    full = tallzip.pack(tasks_dir, base_path, tmp_path / "f.tallz", tallzip.StoreOptions(estimate_every=1))
    assert [e["estimate"] for e in sampled["tasks"]] == [e["estimate"] for e in full["tasks"]]
    assert all("sampled" not in e["estimate"] for e in sampled["tasks"])
    assert filecmp.cmp(tmp_path / "s.tallz", tmp_path / "f.tallz", shallow=False)


def test_sampled_pack_is_deterministic_and_changes_only_the_estimate(tmp_path):
    base, tasks = big_family(True, seed=3)
    base_path, tasks_dir = write_family(tmp_path / "fam", base, tasks)
    store = tallzip.StoreOptions(chunk_elements=1 << 18)  # chunks that cut pieces (1024-element rows: 256 rows)
    for workers, memory in ((1, None), (2, None), (2, "64M")):
        tallzip.pack(tasks_dir, base_path, tmp_path / f"w{workers}{memory}.tallz", store,
                     tallzip.RunOptions(workers=workers, memory=memory))
    assert filecmp.cmp(tmp_path / "w1None.tallz", tmp_path / "w2None.tallz", shallow=False)
    assert filecmp.cmp(tmp_path / "w1None.tallz", tmp_path / "w264M.tallz", shallow=False)
    tallzip.pack(tasks_dir, base_path, tmp_path / "full.tallz",
                 tallzip.StoreOptions(chunk_elements=1 << 18, estimate_every=1))
    with ArchiveReader(tmp_path / "w1None.tallz") as sampled, ArchiveReader(tmp_path / "full.tallz") as full:
        a, b = sampled.manifest, full.manifest
        assert a["sections"] == b["sections"]  # every section's offsets, sizes and digests: the same bytes
        for entry_a, entry_b in zip(a["tasks"], b["tasks"]):
            assert entry_a["estimate"] != entry_b["estimate"]
            entry_a.pop("estimate"), entry_b.pop("estimate")
        assert {k: v for k, v in a.items() if k != "tasks"} == {k: v for k, v in b.items() if k != "tasks"}
        assert a["tasks"] == b["tasks"]


def test_estimate_every_is_checked():
    with pytest.raises(TallzipError, match="estimate_every"):
        tallzip.StoreOptions(estimate_every=0)


def test_reports_say_the_estimate_was_sampled():
    from cli.report import estimate_text

    recorded = {"rel_error": 1.5, "cosine": 0.5, "sampled": {"every": 8, "fraction": 0.13}}
    assert estimate_text(recorded).endswith(", sampled 1/8")
    assert "sampled" not in estimate_text({"rel_error": 1.5, "cosine": 0.5})  # older archives: every element


def test_the_per_task_route_samples_the_same_pieces():
    """The route for TIES, float16 and GPUs (jobs.sampled_tall_sums) sums exactly the sampled pieces too."""
    from tallzip.packing.jobs import sampled_tall_sums

    count, offset, every = 4 * PIECE + 99, PIECE // 2, 2
    rng = np.random.default_rng(5)
    base = rng.normal(0, 0.05, count).astype(np.float32)
    task = base + rng.normal(0, 0.01, count).astype(np.float32)
    mtv = (2.5 * (task - base)).astype(np.float32)
    mask = rng.random(count) < 0.3
    got = sampled_tall_sums(torch.from_numpy(base), torch.from_numpy(task), torch.from_numpy(mtv),
                            np.packbits(mask, bitorder="little"), count, every, offset)
    r = np.where(mask, base + mtv, base).astype(np.float64)
    products = [(task.astype(np.float64) - base, r - task, r - base)]
    selected = ((offset + np.arange(count)) // PIECE) % every == 0
    np.testing.assert_allclose(got, sums_over(products, selected)[0], rtol=2e-5)
