"""The faster pack/extract paths against plain numpy formulas: the one-sum finite check, the numpy
mask kernel, the bfloat16 rebuild without float32 temporaries, and byte planes cut in blocks."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from tallzip.ops import tall, taskvec
from tallzip.archive.archive import rebuild_from_bits
from tallzip.formats.codecs import floats as float_codecs
from tallzip.ops.taskvec import all_finite


def test_all_finite_says_no_to_nan_and_infinity():
    assert all_finite(torch.tensor([1.0, -2.0, 0.0]))
    assert not all_finite(torch.tensor([1.0, float("nan"), 0.0]))
    assert not all_finite(torch.tensor([float("inf"), 1.0]))
    assert not all_finite(torch.tensor([float("inf"), float("-inf")]))  # a NaN sum
    # finite values whose sum overflows: the full check decides, and they are finite
    assert all_finite(torch.tensor([3e38, 3e38], dtype=torch.float32))
    assert not all_finite(torch.tensor([3e38, 3e38, float("nan")], dtype=torch.float32))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("n_tasks", [1, 3])
def test_sum_and_masks_into_is_the_formula(dtype, n_tasks):
    rng = np.random.default_rng(n_tasks)
    n = 1001
    base = (rng.standard_normal(n) * 0.02).astype(dtype)
    tasks = (base + rng.standard_normal((n_tasks, n)) * 1e-3 * (rng.random((n_tasks, n)) < 0.5)).astype(dtype)
    lambdas = [0.2 + 0.1 * j for j in range(n_tasks)]
    mtv, masks = np.empty(n, dtype), np.empty((n_tasks, n), bool)
    tall.sum_and_masks_into(base, tasks, np.array(lambdas, dtype).reshape(-1, 1), mtv, masks,
                               np.empty((n_tasks, n), dtype), np.empty((n_tasks + 1, n), dtype))
    expected = tasks[0] - base
    for t in tasks[1:]:
        expected = expected + (t - base)
    assert np.array_equal(mtv, expected)
    for t, lam, got in zip(tasks, lambdas, masks):
        want = np.abs(base - t) > dtype(lam) * np.abs((base + expected) - t)
        assert np.array_equal(got, want)
        assert 0 < got.sum() < n  # the test data has both kinds of entries


def _bf16_bits(values: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bits, round to nearest even (finite values)."""
    bits = values.astype(np.float32).view(np.uint32).astype(np.uint64)
    return ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)


def test_bfloat16_rebuild_is_the_formula():
    rng = np.random.default_rng(0)
    n = 4099
    base_bits = _bf16_bits(rng.standard_normal(n) * 0.02)
    mtv_bits = _bf16_bits(rng.standard_normal(n) * 1e-3)
    mask = rng.random(n) < 0.4
    widen = lambda b: (b.astype(np.uint32) << 16).view(np.float32)  # noqa: E731
    expected = np.where(mask, _bf16_bits(widen(base_bits) + widen(mtv_bits)), base_bits)
    as_bf16 = lambda b: torch.from_numpy(b.view(np.int16)).view(torch.bfloat16)  # noqa: E731
    got = rebuild_from_bits(as_bf16(base_bits), np.packbits(mask, bitorder="little"), as_bf16(mtv_bits),
                            torch.device("cpu"))
    assert got.dtype == torch.bfloat16
    assert np.array_equal(got.view(torch.int16).numpy().view(np.uint16), expected)
    assert not np.array_equal(expected, base_bits)  # the mask changed something


@pytest.mark.parametrize("count", [0, 1, float_codecs.PLANE_BLOCK - 1, float_codecs.PLANE_BLOCK + 1,
                                   3 * float_codecs.PLANE_BLOCK + 5])
@pytest.mark.parametrize("dtype", [np.uint16, np.uint32])
def test_planes_cut_in_blocks_are_the_rotated_bytes(count, dtype):
    values = np.random.default_rng(count).integers(0, np.iinfo(dtype).max, count, dtype=dtype, endpoint=True)
    bits = np.dtype(dtype).itemsize * 8
    rotated = ((values.astype(np.uint64) << 1) | (values.astype(np.uint64) >> (bits - 1))) & ((1 << bits) - 1)
    expected = np.stack([(rotated >> (8 * i)) & 0xFF for i in range(bits // 8)]).astype(np.uint8)
    planes = float_codecs.split_planes(values)
    assert np.array_equal(planes, expected.reshape(bits // 8, count))
    assert np.array_equal(float_codecs.join_planes(planes, np.dtype(dtype)), values)
