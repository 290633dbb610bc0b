"""The `exact` representation's bytes (formats.delta_codec): bit-identical round trips, checked with numpy."""
from __future__ import annotations

import numpy as np
import pytest

from tallzip.formats.codecs import delta as delta_codec
from tallzip.formats.codecs.registry import CodecError

CODECS = ["planes+zstd", "planes+ans", "zstd"]
WIDTH = {"f32": np.uint32, "bf16": np.uint16, "f16": np.uint16}


def fine_tune_bits(kind, n=3000, seed=0):
    """(task bits, base bits) of a fake fine-tune in float32, bfloat16 or float16, with the awkward values:
    NaNs with payloads (and sign), +-inf, -0.0 against +0.0, subnormals, and a sign flip."""
    rng = np.random.default_rng(seed)
    base = rng.normal(0, 0.05, n).astype(np.float32)
    task = (base + rng.normal(0, 1e-4, n) * (rng.random(n) < 0.7)).astype(np.float32)
    if kind == "f16":
        base_bits, task_bits = base.astype(np.float16).view(np.uint16), task.astype(np.float16).view(np.uint16)
        nan_a, nan_b, ninf, tiny = 0x7E01, 0xFD5A, 0xFC00, 0x0003
    elif kind == "bf16":  # truncation to bfloat16 is enough for test data
        base_bits, task_bits = (base.view(np.uint32) >> 16).astype(np.uint16), (task.view(np.uint32) >> 16).astype(np.uint16)
        nan_a, nan_b, ninf, tiny = 0x7FC1, 0xFF93, 0xFF80, 0x0005
    else:
        base_bits, task_bits = base.view(np.uint32).copy(), task.view(np.uint32).copy()
        nan_a, nan_b, ninf, tiny = 0x7FC00ABC, 0xFFA00001, 0xFF800000, 0x00000007
    sign = task_bits.dtype.type(1 << (8 * task_bits.itemsize - 1))
    task_bits[:8] = [nan_a, nan_b, ninf, sign, 0, tiny, nan_a, task_bits[7] ^ sign]
    base_bits[:8] = [0, nan_a, 0, 0, sign, 0, nan_a, base_bits[7]]  # -0.0 vs +0.0 both ways, equal NaNs
    return task_bits, base_bits


def as_float(bits, kind):
    return bits.view(np.float32) if kind == "f32" else bits.view(np.float16) if kind == "f16" else bits


@pytest.mark.parametrize("kind", ["f32", "bf16", "f16"])
@pytest.mark.parametrize("mode", delta_codec.MODES)
@pytest.mark.parametrize("codec", CODECS)
def test_round_trip_is_bit_identical(kind, mode, codec):
    task, base = fine_tune_bits(kind)
    # Given as float arrays where numpy has the type: the codec works on the bits, never the values.
    payload, params = delta_codec.encode(as_float(task, kind), as_float(base, kind), mode=mode, codec=codec)
    decoded = delta_codec.decode(payload, base, params=params)
    assert decoded.dtype == np.dtype(f"<u{task.itemsize}") and np.array_equal(decoded, task)
    if kind != "bf16":
        floats = delta_codec.decode(payload, base, params=params, dtype=as_float(task, kind).dtype)
        assert np.array_equal(floats.view(task.dtype), task)


@pytest.mark.parametrize("kind", ["f32", "bf16"])
def test_xor_difference_is_numpy_xor(kind):
    task, base = fine_tune_bits(kind, seed=1)
    assert np.array_equal(delta_codec.difference(task, base, "xor"), np.bitwise_xor(task, base))


@pytest.mark.parametrize("kind", ["f32", "f16"])
def test_sub_difference_is_the_zigzagged_wrapped_difference(kind):
    task, base = fine_tune_bits(kind, seed=2)
    n = 8 * task.itemsize
    wrapped = (task.astype(np.int64) - base.astype(np.int64)) % (1 << n)
    signed = np.where(wrapped >= 1 << (n - 1), wrapped - (1 << n), wrapped)
    zigzag = np.where(signed >= 0, 2 * signed, -2 * signed - 1)
    assert np.array_equal(delta_codec.difference(task, base, "sub").astype(np.int64), zigzag)


def test_delta_is_smaller_than_the_task_alone():
    rng = np.random.default_rng(3)
    base = rng.normal(0, 0.05, 50_000).astype(np.float32)
    task = (base + rng.normal(0, 1e-5, base.size)).astype(np.float32)
    from tallzip.formats.codecs import registry as codecs
    alone = len(codecs.encode("planes+zstd", task.view(np.uint32))[0])
    for mode in delta_codec.MODES:
        payload, _ = delta_codec.encode(task, base, mode=mode)
        assert len(payload) < 0.8 * alone


def test_identical_tensors_cost_almost_nothing():
    base = np.random.default_rng(4).normal(size=100_000).astype(np.float32)
    payload, params = delta_codec.encode(base, base)
    assert len(payload) < 200 and np.array_equal(delta_codec.decode(payload, base, params=params), base.view(np.uint32))


def test_wrong_base_or_damage_is_refused():
    task, base = fine_tune_bits("f32", seed=5)
    payload, params = delta_codec.encode(task, base, codec="planes+zstd")
    other = base.copy()
    other[100] ^= 1
    with pytest.raises(CodecError, match="checksum"):
        delta_codec.decode(payload, other, params=params)
    damaged = bytearray(payload)
    damaged[1] ^= 0xFF  # the stored CRC itself
    with pytest.raises(CodecError):
        delta_codec.decode(bytes(damaged), base, params=params)
    with pytest.raises(CodecError):
        delta_codec.decode(payload[:len(payload) // 2], base, params=params)
    with pytest.raises(CodecError):
        delta_codec.decode(payload[:3], base, params=params)
    for bad in ({"mode": "add", "codec": "zstd", "params": {}}, {"mode": "xor"}, None):
        with pytest.raises(CodecError, match="bad params"):
            delta_codec.decode(payload, base, params=bad)


def test_mismatched_pairs_are_refused():
    with pytest.raises(ValueError, match="code it alone"):
        delta_codec.encode(np.zeros(4, np.float32), np.zeros(4, np.float16))
    with pytest.raises(ValueError, match="elements"):
        delta_codec.encode(np.zeros(4, np.float32), np.zeros(5, np.float32))
    with pytest.raises(ValueError, match="mode"):
        delta_codec.encode(np.zeros(4, np.float32), np.zeros(4, np.float32), mode="div")


def test_empty_and_big_endian_inputs():
    payload, params = delta_codec.encode(np.zeros(0, np.float32), np.zeros(0, np.float32))
    assert delta_codec.decode(payload, np.zeros(0, np.uint32), params=params).size == 0
    values = np.array([1.5, -0.0, np.nan], dtype=">f4")
    payload, params = delta_codec.encode(values, np.zeros(3, "<f4"))
    assert np.array_equal(delta_codec.decode(payload, np.zeros(3, "<f4"), params=params),
                          values.astype("<f4").view("<u4"))
