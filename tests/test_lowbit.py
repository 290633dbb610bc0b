"""Sign codes and low-rank factors (tallzip/ops/lowrank.py, tallzip/ops/signcode.py) against independent numpy computations."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from tallzip.ops import lowrank as lr
from tallzip.ops import signcode as sc
from tallzip.ops.quantize import QuantSpec


def _bf16(values: np.ndarray) -> np.ndarray:
    """Round float32 values to nearest-even bfloat16, in numpy bit arithmetic (independent of torch)."""
    bits = values.astype(np.float32).view(np.uint32).astype(np.uint64)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return rounded.astype(np.uint32).view(np.float32)


def _tau(shape, seed=0, scale=1e-3):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal(shape) * scale).astype(np.float32)


# --------------------------------------------------------------------------- sign codes


@pytest.mark.parametrize("shape,group", [((6, 300), 128), ((6, 300), None), ((5, 7, 3), 2), ((300,), 128),
                                         ((4, 130), "tensor")])
def test_q1_matches_the_sign_and_mean_formula(shape, group):
    tau = _tau(shape, 1)
    tau.reshape(-1)[3] = 0.0  # a zero weight codes as +scale
    code = sc.sign_quantize(torch.from_numpy(tau), sc.SignSpec(group=group))
    # the formula, in numpy: per group of `group` elements along the last dimension (or the whole tensor)
    if group == "tensor":
        rows = tau.reshape(1, -1)
        size = rows.shape[1]
    else:
        rows = tau.reshape(-1, shape[-1])
        size = shape[-1] if group is None else group
    expected = np.empty_like(rows)
    for r in range(rows.shape[0]):
        for start in range(0, rows.shape[1], size):
            part = rows[r, start:start + size]
            scale = _bf16(np.array([np.abs(part).astype(np.float64).mean()], dtype=np.float32))[0]
            expected[r, start:start + size] = np.where(part < 0, -scale, scale)
    got = sc.sign_dequantize(code).numpy()
    np.testing.assert_array_equal(got, expected.reshape(shape))
    assert sc.sign_storage_bits(code) == tau.size + 16 * code.scales.numel()


def test_q1_scale_is_the_least_squares_optimum():
    tau = _tau((3, 128), 2)
    code = sc.sign_quantize(torch.from_numpy(tau), sc.SignSpec(group=128, scale_dtype="float32"))
    value = sc.sign_dequantize(code).numpy()
    signs = np.where(tau < 0, -1.0, 1.0)
    for r in range(3):
        best = float(code.scales[r, 0])
        error = lambda a: float(((tau[r] - a * signs[r]) ** 2).sum())
        assert error(best) <= error(best * 1.01) and error(best) <= error(best * 0.99)
        np.testing.assert_allclose(value[r], best * signs[r])


def test_sparse_sign_keeps_the_largest_and_their_mean():
    tau = _tau((4, 100), 3)
    code = sc.sign_quantize(torch.from_numpy(tau), sc.SignSpec(group=None, density=0.25, scale_dtype="float32"))
    got = sc.sign_dequantize(code).numpy()
    for r in range(4):
        top = np.argsort(-np.abs(tau[r]), kind="stable")[:25]
        scale = np.float32(np.abs(tau[r, top]).astype(np.float64).mean())
        expected = np.zeros(100, dtype=np.float32)
        expected[top] = np.where(tau[r, top] < 0, -scale, scale)
        np.testing.assert_allclose(got[r], expected, rtol=1e-6)
    assert int((sc.sign_codes(code) != 0).sum()) == 4 * 25
    assert sc.sign_storage_bits(code) == 2 * 400 + 32 * 4


def test_sign_code_refuses_bad_input():
    with pytest.raises(ValueError, match="finite"):
        sc.sign_quantize(torch.tensor([1.0, float("nan")]), sc.SignSpec())
    with pytest.raises(ValueError, match="float"):
        sc.sign_quantize(torch.tensor([1, 2]), sc.SignSpec())
    with pytest.raises(ValueError, match="density"):
        sc.SignSpec(density=0.0)
    with pytest.raises(ValueError, match="group"):
        sc.SignSpec(group=0)


def test_all_zero_group_gives_zero_scale():
    tau = np.zeros((2, 8), dtype=np.float32)
    tau[1] = 1.0
    code = sc.sign_quantize(torch.from_numpy(tau), sc.SignSpec(group=8))
    np.testing.assert_array_equal(sc.sign_dequantize(code).numpy(), tau)


# --------------------------------------------------------------------------- the SVD


def _low_rank_plus_noise(m, n, rank, seed=0):
    rng = np.random.default_rng(seed)
    left, right = rng.standard_normal((m, rank)), rng.standard_normal((rank, n))
    spectrum = np.diag(2.0 ** -np.arange(rank))
    return (left @ spectrum @ right + 1e-4 * rng.standard_normal((m, n))).astype(np.float32)


def test_top_singular_exact_matches_numpy():
    a = _low_rank_plus_noise(40, 30, 6)
    u, s, vh = lr.top_singular(torch.from_numpy(a), a.shape, 5)
    nu, ns, nvh = np.linalg.svd(a.astype(np.float64), full_matrices=False)
    np.testing.assert_allclose(s.numpy(), ns[:5], rtol=1e-10)
    np.testing.assert_allclose((u * s) @ vh, (nu[:, :5] * ns[:5]) @ nvh[:5], atol=1e-10)


def test_randomized_chunked_svd_matches_numpy_and_is_deterministic():
    a = _low_rank_plus_noise(300, 80, 8, seed=1)
    budget = 8 * 80 * 7  # 7 rows a chunk: forces the randomized, chunked path
    reads = []

    def rows(start, stop):
        reads.append(stop - start)
        return torch.from_numpy(a[start:stop])

    u, s, vh = lr.top_singular(rows, a.shape, 6, memory_bytes=budget, seed=3)
    assert max(reads) <= 7 and len(reads) > 40
    ns = np.linalg.svd(a.astype(np.float64), compute_uv=False)
    np.testing.assert_allclose(s.numpy(), ns[:6], rtol=1e-6)
    nu, _, nvh = np.linalg.svd(a.astype(np.float64), full_matrices=False)
    np.testing.assert_allclose(np.abs(u.numpy().T @ nu[:, :6]), np.eye(6), atol=1e-6)  # same subspace
    again = lr.top_singular(torch.from_numpy(a), a.shape, 6, memory_bytes=budget, seed=3)
    for first, second in zip((u, s, vh), again):
        assert torch.equal(first, second)


# --------------------------------------------------------------------------- low-rank factors


def _per_row_rtn(rows: np.ndarray, bits: int) -> np.ndarray:
    """Symmetric round-to-nearest per row with a bfloat16 scale rounded up to cover the row (numpy)."""
    q = 2 ** (bits - 1) - 1
    out = np.empty_like(rows, dtype=np.float32)
    for i, row in enumerate(rows.astype(np.float32)):
        scale = np.float32(np.abs(row).max() / np.float32(q))
        stored = _bf16(np.array([scale]))[0]
        if stored < scale:
            stored = (np.array([stored], dtype=np.float32).view(np.uint32) + 0x10000).view(np.float32)[0]
        out[i] = np.round(row / stored) * stored if stored > 0 else 0
    return out


def test_factors_without_refit_match_numpy_svd_and_rtn():
    a = _low_rank_plus_noise(24, 20, 4, seed=5) * 1e-3
    spec = lr.LowRankSpec(budget=1.0, rest_bits=8, refit=False)
    factors = lr.factorize(torch.from_numpy(a), 3, spec)
    nu, ns, nvh = np.linalg.svd(a.astype(np.float64), full_matrices=False)
    pivot = np.abs(nu[:, :3]).argmax(axis=0)
    flip = np.sign(nu[pivot, np.arange(3)])
    left = _per_row_rtn((nu[:, :3] * flip).T, 8)
    right = _per_row_rtn((ns[:3, None] * nvh[:3]) * flip[:, None], 8)
    np.testing.assert_allclose(lr.unfactorize(factors).numpy(), left.T @ right, rtol=1e-5, atol=1e-9)
    assert factors.rank == 3
    assert lr.factors_storage_bits(factors) == 3 * (24 + 20) * 8 + 6 * 16


def test_refit_is_the_least_squares_right_factor_and_helps():
    a = _low_rank_plus_noise(64, 48, 12, seed=6) * 1e-3
    plain = lr.factorize(torch.from_numpy(a), 6, lr.LowRankSpec(rest_bits=3, refit=False))
    refit = lr.factorize(torch.from_numpy(a), 6, lr.LowRankSpec(rest_bits=3, refit=True))
    uq = np.concatenate([b.codes.numpy().astype(np.float64) * b.scales.to(torch.float32).numpy() for b in refit.left]).T
    lstsq = np.linalg.lstsq(uq, a.astype(np.float64), rcond=None)[0]
    right = _per_row_rtn(lstsq, 3)
    np.testing.assert_allclose(lr.unfactorize(refit).numpy(), (uq.astype(np.float32) @ right), rtol=1e-4, atol=1e-9)
    error = lambda f: np.linalg.norm(lr.unfactorize(f).numpy() - a)
    assert error(refit) < error(plain)


def test_mixed_precision_tiers_and_rank_from_budget():
    spec = lr.LowRankSpec(budget=2.0, tiers=((2, 8), (3, 4)), rest_bits=2)
    assert [spec.bits_of(i) for i in range(7)] == [8, 8, 4, 4, 4, 2, 2]
    m, n = 100, 60
    # 2 triplets at 8 bits (160*8 + 32 each), then 3 at 4 bits (160*4 + 32), then 2 bits (160*2 + 32)
    costs = [160 * 8 + 32] * 2 + [160 * 4 + 32] * 3 + [160 * 2 + 32] * 60
    budget = 2.0 * m * n
    expected = int(np.searchsorted(np.cumsum(costs), budget, side="right"))
    assert lr.rank_for_budget(spec, m, n, budget) == expected
    a = _low_rank_plus_noise(m, n, 10, seed=7)
    factors = lr.factorize(torch.from_numpy(a), 7, spec)
    assert [(b.spec.bits, b.codes.shape[0]) for b in factors.left] == [(8, 2), (4, 3), (2, 2)]
    assert lr.factors_storage_bits(factors) == sum(costs[:7])


def test_rank_for_energy_against_numpy():
    s = torch.tensor([4.0, 2.0, 1.0, 0.5])
    total = float((s ** 2).sum()) + 0.25  # energy outside the spectrum seen
    cumulative = np.cumsum(s.numpy() ** 2) / total
    for fraction in (0.5, 0.8, 0.95, 0.99):
        assert lr.rank_for_energy(s, total, fraction) == int(np.argmax(cumulative >= fraction)) + 1 \
            if (cumulative >= fraction).any() else 4


def test_allocate_ranks_prefers_energy_per_bit():
    spec = lr.LowRankSpec(budget=1.0, rest_bits=8)
    spectra = {"a": torch.tensor([10.0, 1.0, 0.1]), "b": torch.tensor([5.0, 4.0, 3.0])}
    shapes = {"a": (10, 10), "b": (10, 10)}
    cost = spec.triplet_bits(0, 10, 10)
    # 4 triplets fit: by s^2 per bit a0 (100), b0 (25), b1 (16), b2 (9) -- a1 (1) loses
    assert lr.allocate_ranks(spectra, shapes, spec, 4 * cost) == {"a": 1, "b": 3}
    assert lr.allocate_ranks(spectra, shapes, spec, cost - 1) == {"a": 0, "b": 0}


def test_lowrank_task_falls_back_and_adds_residual():
    taus = {"w": torch.from_numpy(_low_rank_plus_noise(32, 16, 3, seed=8) * 1e-3),
            "b": torch.from_numpy(_tau((16,), 9)), "conv": torch.from_numpy(_tau((8, 4, 3, 3), 10)),
            "tiny": torch.from_numpy(_tau((2, 3), 11))}
    spec = lr.LowRankSpec(budget=1.5, fallback=QuantSpec(4, 128), residual=sc.SignSpec(group=None))
    entries = lr.lowrank_task(taus, spec)
    assert entries["b"].factors is None and entries["b"].fallback is not None
    assert entries["conv"].factors is not None and entries["conv"].factors.rank == 1  # (8, 36): 432 bits buy one
    assert entries["tiny"].factors is None and entries["tiny"].fallback is not None  # no rank fits: the fallback
    np.testing.assert_array_equal(lr.lowrank_decode(entries["tiny"]).numpy(), _per_row_rtn(taus["tiny"].numpy(), 4))
    w = entries["w"]
    rank = lr.rank_for_budget(spec, 32, 16, 1.5 * 32 * 16)
    assert w.factors.rank == rank
    # decode = factors + the residual's sign code of exactly what the factors miss
    factors_only = lr.unfactorize(w.factors)
    residual = taus["w"] - factors_only
    expected = factors_only + sc.sign_dequantize(sc.sign_quantize(residual, sc.SignSpec(group=None)))
    torch.testing.assert_close(lr.lowrank_decode(w), expected)
    assert torch.linalg.norm(lr.lowrank_decode(w) - taus["w"]) < torch.linalg.norm(factors_only - taus["w"])
    for entry in entries.values():
        assert lr.lowrank_storage_bits(entry) > 0


def test_lowrank_spec_refuses_bad_settings():
    with pytest.raises(ValueError, match="exactly one"):
        lr.LowRankSpec(budget=None, energy=None)
    with pytest.raises(ValueError, match="exactly one"):
        lr.LowRankSpec(budget=1.0, energy=0.9)
    with pytest.raises(ValueError, match="bits"):
        lr.LowRankSpec(rest_bits=5)
    with pytest.raises(ValueError, match="allocation"):
        lr.LowRankSpec(allocation="global")


def test_fallback_quantizes_the_matrix_view():
    conv = _tau((8, 4, 3, 3), 12)
    entries = lr.lowrank_task({"conv": torch.from_numpy(conv)}, lr.LowRankSpec(budget=0.0))
    entry = entries["conv"]
    assert entry.factors is None and tuple(entry.fallback.scales.shape) == (8, 1)  # one scale per 36-wide row
    expected = _per_row_rtn(conv.reshape(8, 36), 4).reshape(conv.shape)
    np.testing.assert_array_equal(lr.lowrank_decode(entry).numpy(), expected)
