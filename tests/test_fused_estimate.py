"""The data-free estimate summed inside the TALL rule's slice loop (issue 21): the same float32 sums, bit for bit,
as np.sum over a whole slice of the rebuild's products (what pack summed before, one pass per task), so archives
keep their bytes; and the cases the loop leaves to the caller say so."""
import filecmp

import numpy as np
import pytest
import torch

import tallzip
from tallzip.ops import quality, tall
from tallzip.ops.tall import EstimateRequest, masked_tensor_and_sums
from tallzip.packing import jobs

from conftest import numpy_family, write_family


class SumMerger:
    method = "sum"


class TiesMerger:
    method = "ties"


def bf16_round(x32: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 -> float32 by torch (the reference cast)."""
    return torch.from_numpy(np.ascontiguousarray(x32)).to(torch.bfloat16).float().numpy()


def expected_sums(base, tasks, lambdas, mtv_dtype):
    """Per task [sum tau^2, sum err^2, sum <r - b, tau>], each one float32 np.sum over the whole tensor, from the
    formulas: mtv = sum of task vectors (left to right), m = |b - t| > lam |(b + mtv) - t|, r = b + m * stored mtv
    in float32, cast to the base's dtype."""
    b = base.float().reshape(-1).numpy()
    ts = [t.float().reshape(-1).numpy() for t in tasks]
    mtv = ts[0] - b
    for t in ts[1:]:
        mtv = mtv + (t - b)
    stored = bf16_round(mtv) if mtv_dtype == "bfloat16" else mtv
    added = b + stored
    if base.dtype == torch.bfloat16:
        added = bf16_round(added)
    rows = []
    for t, lam in zip(ts, lambdas):
        mask = np.abs(b - t) > np.float32(lam) * np.abs((b + mtv) - t)
        r = np.where(mask, added, b)
        tau = t - b
        rows.append([np.sum(tau * tau), np.sum((r - t) * (r - t)), np.sum((r - b) * tau)])
    return np.array(rows, dtype=np.float32)


@pytest.mark.parametrize("count", [1, 100, 129, 4096, 70001])
@pytest.mark.parametrize("chunk", [7, 256, 1 << 15])
@pytest.mark.parametrize("dtype,mtv_dtype", [(torch.bfloat16, "bfloat16"), (torch.float32, "bfloat16"),
                                             (torch.float32, "float32"), (torch.bfloat16, "float32")])
def test_sums_are_np_sum_of_the_whole_tensor(monkeypatch, count, chunk, dtype, mtv_dtype):
    monkeypatch.setattr(tall, "CPU_CHUNK", chunk)
    gen = torch.Generator().manual_seed(count)
    base = (0.05 * torch.randn(count, generator=gen)).to(dtype)
    tasks = [(base.float() + 0.01 * torch.randn(count, generator=gen)).to(dtype) for _ in range(4)]
    lambdas = [0.2, 0.4, 0.5, 0.6]
    mtv, packed, ones, sums = masked_tensor_and_sums(SumMerger(), base, tasks, lambdas, torch.device("cpu"),
                                                     EstimateRequest(mtv_dtype))
    assert sums.dtype == np.float32 and sums.shape == (4, 3)
    assert np.array_equal(sums, expected_sums(base, tasks, lambdas, mtv_dtype))
    plain = tall.masked_tensor(SumMerger(), base, tasks, lambdas, torch.device("cpu"))
    assert torch.equal(mtv, plain[0]) and ones == plain[2]
    assert all(np.array_equal(a, b) for a, b in zip(packed, plain[1]))


@pytest.mark.parametrize("count", [0, 5, 128, 129, 1000, 1 << 16, 262143, 100001])
@pytest.mark.parametrize("leaf", [128, 1000, 1 << 15])
def test_pairwise_total_is_np_sum(count, leaf):
    values = np.random.default_rng(count).standard_normal(count).astype(np.float32) ** 3
    total = quality.pairwise_total(count, leaf, lambda lo, hi: np.sum(values[lo:hi]))
    assert total == np.sum(values)
    assert np.float32(total).tobytes() == np.sum(values).tobytes()


def test_pairwise_total_passes_none_through():
    assert quality.pairwise_total(1000, 128, lambda lo, hi: None) is None


@pytest.mark.parametrize("case", ["ties", "float16 mtv", "float16 base", "float64", "no request"])
def test_the_loop_leaves_other_cases_to_the_caller(case):
    gen = torch.Generator().manual_seed(0)
    dtype = {"float16 base": torch.float16, "float64": torch.float64}.get(case, torch.float32)
    base = (0.05 * torch.randn(300, generator=gen)).to(dtype)
    tasks = [(base + 0.01 * torch.randn(300, generator=gen).to(dtype)) for _ in range(3)]
    merger = TiesMerger() if case == "ties" else SumMerger()
    if case == "ties":
        merger.mtv = lambda b, ts: sum(t.float() - b.float() for t in ts)
    request = None if case == "no request" else EstimateRequest("float16" if case == "float16 mtv" else "bfloat16")
    *_, sums = masked_tensor_and_sums(merger, base, tasks, [0.4] * 3, torch.device("cpu"), request)
    assert sums is None


@pytest.mark.parametrize("keep", ["tall", {"task1": "q4", "*": "tall"}])
@pytest.mark.parametrize("mtv_dtype", ["bfloat16", "float32"])
def test_pack_bytes_are_those_of_the_per_task_sums(tmp_path, monkeypatch, keep, mtv_dtype):
    """Archives with the sums from the TALL loop are byte-identical to those summed per task after it (the code
    before issue 21's fusion, still the route for the other cases)."""
    base, tasks = numpy_family(3, seed=4)
    base_path, tasks_dir = write_family(tmp_path / "fam", base, tasks)
    store = tallzip.StoreOptions(keep=keep, mtv_dtype=mtv_dtype, chunk_elements=1 << 16)
    fused = tallzip.pack(tasks_dir, base_path, tmp_path / "fused.tallz", store)
    real = jobs.masked_tensor_and_sums
    monkeypatch.setattr(jobs, "masked_tensor_and_sums", lambda *a, **k: (*real(*a, **k)[:3], None))
    separate = tallzip.pack(tasks_dir, base_path, tmp_path / "separate.tallz", store)
    assert filecmp.cmp(tmp_path / "fused.tallz", tmp_path / "separate.tallz", shallow=False)
    assert [e["estimate"] for e in fused["tasks"]] == [e["estimate"] for e in separate["tasks"]]
    assert all(e["estimate"] is not None for e in fused["tasks"])
