"""Quantized task vectors (tallzip.quantize) against plain numpy computations of the same formulas."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from tallzip.ops import quantize as qz
from tests.conftest import np_round_mtv

SHAPES = [(5, 70), (3, 4, 33), (7,), ()]
SPECS = [qz.QuantSpec(bits, group, symmetric, method, scale)
         for bits in (8, 3, 2) for group in (None, 32) for symmetric in (True, False)
         for method in ("rtn", "mse") for scale in ("bfloat16",)] + \
        [qz.QuantSpec(4, 32, True, "rtn", "float32"), qz.QuantSpec(4, 32, False, "mse", "float16"),
         qz.QuantSpec(3, 128, True, "mse", "float32"), qz.QuantSpec(2, 256, False, "rtn", "float32")]


def task_vector(shape, seed=0, scale=1e-3):
    rng = np.random.default_rng(seed)
    # Heavy tails and a sparse part, as task vectors have: clipping must matter for "mse".
    x = rng.laplace(0, scale, shape) * (rng.random(shape) < 0.8)
    return np.asarray(x, dtype=np.float32)


def np_rows(shape):
    shape = tuple(shape)
    return (math.prod(shape[:-1]) if shape else 1), (shape[-1] if shape else 1)


def np_per_element(groups_array, cols, size):
    """(rows, G) -> (rows, cols): each group's value over its elements (numpy)."""
    return np.repeat(groups_array, size, axis=1)[:, :cols]


def np_dequant(codes, scales, offsets, shape, group):
    rows, cols = np_rows(shape)
    size = cols if group is None else group
    q = codes.reshape(rows, cols).astype(np.float32)
    value = (q * np_per_element(scales, cols, size)).astype(np.float32)
    if offsets is not None:
        value = (value + np_per_element(offsets, cols, size)).astype(np.float32)
    return value.reshape(shape)


def f32(t):
    return t.to(torch.float32).numpy()


def np_round_up_bf16(x):
    """Smallest bfloat16 >= x (x >= 0, float32), as float32: drop the low 16 bits, one step up if any were set."""
    bits = x.astype(np.float32).view(np.uint32)
    up = (bits >> 16) + ((bits & 0xFFFF) != 0)
    return (up.astype(np.uint32) << 16).view(np.float32)


# --------------------------------------------------------------------------- decode vs numpy


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.label())
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_dequantize_is_the_numpy_formula(spec, shape):
    tau = task_vector(shape, seed=len(shape))
    q = qz.quantize(torch.from_numpy(tau), spec)
    rows, cols = np_rows(shape)
    groups = -(-cols // (cols if spec.group is None else spec.group))
    assert q.codes.shape == tuple(shape) and q.scales.shape == (rows, groups)
    assert q.scales.dtype == qz.SCALE_DTYPES[spec.scale_dtype]
    offsets = None if q.offsets is None else f32(q.offsets)
    expected = np_dequant(q.codes.numpy(), f32(q.scales), offsets, shape, spec.group)
    got = qz.dequantize(q).numpy()
    assert got.dtype == np.float32 and np.array_equal(got.view(np.uint32), expected.view(np.uint32))
    low, high = (-spec.code_max, spec.code_max) if spec.symmetric else (0, spec.code_max)
    assert low <= int(q.codes.min()) and int(q.codes.max()) <= high


@pytest.mark.parametrize("bits", [8, 4, 3, 2])
@pytest.mark.parametrize("group", [None, 32, 256])
@pytest.mark.parametrize("scale_dtype", ["float32", "bfloat16"])
def test_symmetric_rtn_is_the_numpy_quantizer(bits, group, scale_dtype):
    shape = (6, 300)
    tau = task_vector(shape, seed=bits)
    q = qz.quantize(torch.from_numpy(tau), qz.QuantSpec(bits, group, True, "rtn", scale_dtype))
    size = 300 if group is None else group
    big_q = 2 ** (bits - 1) - 1
    padded = np.pad(np.abs(tau), ((0, 0), (0, -300 % size)))
    amax = padded.reshape(6, -1, size).max(axis=2)
    scale = (amax / np.float32(big_q)).astype(np.float32)
    if scale_dtype == "bfloat16":
        scale = np_round_up_bf16(scale)
    assert np.array_equal(f32(q.scales), scale)
    per = np_per_element(scale, 300, size)
    codes = np.where(per > 0, np.round(tau / np.where(per > 0, per, 1)), 0)
    assert np.array_equal(q.codes.numpy().astype(np.int64), codes.astype(np.int64))


@pytest.mark.parametrize("bits", [8, 4, 2])
def test_asymmetric_rtn_is_the_numpy_quantizer(bits):
    shape, size = (4, 100), 32
    tau = task_vector(shape, seed=7) + np.float32(2e-4)
    q = qz.quantize(torch.from_numpy(tau), qz.QuantSpec(bits, size, False, "rtn", "float32"))
    levels = 2 ** bits - 1
    edge = np.concatenate([tau, np.repeat(tau[:, -1:], -100 % size, axis=1)], axis=1).reshape(4, -1, size)
    lo, hi = edge.min(axis=2), edge.max(axis=2)
    scale = ((hi - lo) / np.float32(levels)).astype(np.float32)
    assert np.array_equal(f32(q.offsets), lo) and np.array_equal(f32(q.scales), scale)
    per_s, per_o = np_per_element(scale, 100, size), np_per_element(lo, 100, size)
    codes = np.clip(np.round((tau - per_o) / per_s), 0, levels)
    assert np.array_equal(q.codes.numpy().astype(np.int64), codes.astype(np.int64))


# --------------------------------------------------------------------------- guarantees


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("scale_dtype", ["float32", "bfloat16", "float16"])
@pytest.mark.parametrize("bits", [8, 4, 3, 2])
def test_rtn_error_is_at_most_half_a_scale(symmetric, scale_dtype, bits):
    shape, group = (9, 75), 32
    tau = task_vector(shape, seed=bits, scale=1e-2)
    q = qz.quantize(torch.from_numpy(tau), qz.QuantSpec(bits, group, symmetric, "rtn", scale_dtype))
    half = np_per_element(f32(q.scales), 75, group) / 2
    offsets = None if q.offsets is None else f32(q.offsets)
    error = np.abs(tau.astype(np.float64) - np_dequant(q.codes.numpy(), f32(q.scales), offsets, shape, group))
    assert np.all(error <= half * (1 + 1e-5) + 1e-12)
    assert not qz.guarantee_violations(torch.from_numpy(tau), q).any()


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("bits", [4, 3, 2])
def test_mse_never_worse_than_rtn_per_group_and_better_overall(symmetric, bits):
    shape, group = (16, 256), 64
    tau = torch.from_numpy(task_vector(shape, seed=3))
    errors = {}
    for method in ("rtn", "mse"):
        q = qz.quantize(tau, qz.QuantSpec(bits, group, symmetric, method, "float32"))
        errors[method] = ((qz.dequantize(q) - tau) ** 2).reshape(16, 4, 64).sum(dim=2).numpy()
        assert not qz.guarantee_violations(tau, q).any()
    assert np.all(errors["mse"] <= errors["rtn"] * (1 + 1e-6))
    assert errors["mse"].sum() < 0.95 * errors["rtn"].sum()


def test_guarantee_check_says_no():
    tau = torch.from_numpy(task_vector((4, 64), seed=1))
    q = qz.quantize(tau, qz.QuantSpec(4, 32, True, "rtn", "float32"))
    bad = tau.clone()
    scale = float(q.scales[2, 1])
    # An entry that is not at the grid's end, moved by a whole scale: beyond the promised scale/2.
    col = 32 + int(np.argmin(np.abs(q.codes[2, 32:].numpy())))
    bad[2, col] += scale
    flagged = qz.guarantee_violations(bad, q)
    assert flagged[2, col] and int(flagged.sum()) == 1
    # An entry at the grid's top, pushed down inside the grid by more than scale/2: also refused.
    top = int(np.argmax(q.codes[0].numpy()))
    assert int(q.codes[0, top]) == 7
    bad = tau.clone()
    bad[0, top] -= 0.8 * float(q.scales[0, top // 32])
    assert qz.guarantee_violations(bad, q)[0, top]
    # ... but beyond the top (a clipped weight) it is what the codes promise.
    bad = tau.clone()
    bad[0, top] += 10 * float(q.scales[0, top // 32])
    assert not qz.guarantee_violations(bad, q).any()


def test_mse_clips_some_weights_and_they_saturate():
    tau = torch.from_numpy(task_vector((8, 256), seed=5))
    q = qz.quantize(tau, qz.QuantSpec(2, 64, True, "mse", "float32"))
    value = qz.dequantize(q)
    half = q.scales.to(torch.float32).repeat_interleave(64, dim=1) / 2
    clipped = (tau - value).abs() > half * (1 + 1e-6)
    assert clipped.any()  # the search did shrink scales on this heavy-tailed input
    assert torch.all(q.codes[clipped].abs() == 1) and torch.all(torch.sign(tau[clipped]) == q.codes[clipped].sign())


# --------------------------------------------------------------------------- chunks and edges


@pytest.mark.parametrize("spec", [qz.QuantSpec(3, 32, True, "mse"), qz.QuantSpec(4, None, False, "rtn")], ids=lambda s: s.label())
def test_whole_rows_quantize_alone_to_the_same_codes(spec):
    tau = torch.from_numpy(task_vector((10, 3, 70), seed=2))
    whole = qz.quantize(tau, spec)
    parts = [qz.quantize(tau[a:b], spec) for a, b in ((0, 3), (3, 4), (4, 10))]
    assert torch.equal(whole.codes, torch.cat([p.codes for p in parts]))
    assert torch.equal(whole.scales, torch.cat([p.scales for p in parts]))  # rows = 10*3, in order
    if spec.symmetric is False:
        assert torch.equal(whole.offsets, torch.cat([p.offsets for p in parts]))


@pytest.mark.parametrize("shape", [(0,), (0, 5), (5, 0), (2, 0, 3)])
def test_empty_tensors(shape):
    for spec in (qz.QuantSpec(4, 32), qz.QuantSpec(2, None, False, "mse")):
        q = qz.quantize(torch.zeros(shape), spec)
        rows, cols = np_rows(shape)
        assert q.codes.shape == shape and q.scales.shape == (rows, -(-cols // (spec.group or max(cols, 1))))
        assert qz.dequantize(q).shape == shape
        assert qz.rebuild(torch.zeros(shape, dtype=torch.bfloat16), q).dtype == torch.bfloat16


def test_zero_d_and_all_zero_groups():
    q = qz.quantize(torch.tensor(0.25), qz.QuantSpec(4, 32, True, "rtn", "float32"))
    assert q.codes.shape == () and q.scales.shape == (1, 1)
    assert float(qz.dequantize(q)) == 0.25  # one element: max / 7 * 7 is 0.25 exactly here
    tau = torch.zeros(3, 40)
    tau[1, 35] = 1e-3
    q = qz.quantize(tau, qz.QuantSpec(3, 32, False, "mse"))
    value = qz.dequantize(q)
    assert torch.equal(value[0], torch.zeros(40)) and float(q.scales[0, 0]) == 0.0
    assert torch.equal(value[1, :32], torch.zeros(32))


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="finite"):
        qz.quantize(torch.tensor([1.0, float("nan")]), qz.QuantSpec(4))
    with pytest.raises(ValueError, match="float"):
        qz.quantize(torch.tensor([1, 2]), qz.QuantSpec(4))
    with pytest.raises(ValueError, match="does not fit"):
        qz.quantize(torch.tensor([1e9]), qz.QuantSpec(8, None, True, "rtn", "float16"))
    for bad in ({"bits": 5}, {"bits": 4, "group": 0}, {"bits": 4, "method": "gptq"}, {"bits": 4, "scale_dtype": "int8"}):
        with pytest.raises(ValueError):
            qz.QuantSpec(**bad)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_rebuild_is_base_plus_dequant_rounded_once(dtype):
    rng = np.random.default_rng(0)
    base32 = rng.normal(0, 0.05, (6, 50)).astype(np.float32)
    if dtype == "bfloat16":
        base32 = np_round_mtv(base32)  # a bfloat16 base, held as float32
    tau = task_vector((6, 50), seed=4)
    q = qz.quantize(torch.from_numpy(tau), qz.QuantSpec(4, 32, True, "mse"))
    base = torch.from_numpy(base32).to(getattr(torch, dtype))
    got = qz.rebuild(base, q)
    expected = (base32 + np_dequant(q.codes.numpy(), f32(q.scales), None, (6, 50), 32)).astype(np.float32)
    if dtype == "bfloat16":
        expected = np_round_mtv(expected)
    assert got.dtype == base.dtype and np.array_equal(f32(got), expected)


def test_storage_bits_counts_codes_and_scales():
    q = qz.quantize(torch.from_numpy(task_vector((4, 100))), qz.QuantSpec(3, 32, False, "rtn", "bfloat16"))
    assert qz.storage_bits(q) == 400 * 3 + 2 * (4 * 4) * 16


def test_the_one_group_layout_lengths_and_per_element_spread():
    """formats' group_lengths and ops' per_element against the layout written out by hand."""
    from tallzip.formats.container.quant_layout import group_lengths
    from tallzip.ops.quantize import per_element
    assert group_lengths((3, 10), 4).tolist() == [4, 4, 2] * 3
    assert group_lengths((3, 10), None).tolist() == [10] * 3
    assert group_lengths((8,), 8).tolist() == [8]
    scales = torch.arange(9, dtype=torch.float32)  # 3 rows x 3 groups, flat as stored
    expected = np.repeat(np.arange(9, dtype=np.float32).reshape(3, 3), [4, 4, 2], axis=1)
    np.testing.assert_array_equal(per_element(scales, (3, 10), 4).numpy(), expected)
    assert per_element(torch.zeros(0), (2, 0), 4).shape == (2, 0)
