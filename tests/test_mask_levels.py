"""bits-lvl: exact round trips on any chunk, its grouping against the SPEC's formula in plain numpy,
and no silently wrong mask from a wrong context, damaged payload or damaged params."""
from __future__ import annotations

import threading
import time
import zlib

import numpy as np
import pytest
import torch

from tallzip.formats.codecs import registry as codecs, mask_levels
from tallzip.formats.codecs.registry import CodecError


def bf16_bits(values):
    return torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32)).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)


def widened(bits):
    return (bits.astype(np.uint32) << 16).view(np.float32)


def contexts(mtv32, shape):
    """The same mtv as each kind of context the codec accepts (f16 and bf16 rounded first)."""
    bits = bf16_bits(mtv32)
    return {
        "f32": {"mtv": mtv32, "shape": shape},
        "f16": {"mtv": mtv32.astype(np.float16), "shape": shape},
        "bf16 bits": {"mtv": bits, "mtv_dtype": "bfloat16", "shape": shape},
        "bf16 widened": {"mtv": widened(bits), "shape": shape},
    }


def fresh(context):
    return {k: (v.copy() if isinstance(v, np.ndarray) else v) for k, v in context.items() if not k.startswith("_")}


def tall_like(rng, shape, density=0.25):
    """A mtv and a mask likelier where |mtv| is large relative to its row, like a TALL mask."""
    rows = shape[0] if len(shape) > 1 else 1
    scale = rng.lognormal(0, 1.0, (rows, 1))
    mtv = (rng.laplace(0, 1e-3, (rows, int(np.prod(shape)) // max(rows, 1))) * scale).astype(np.float32)
    relative = (np.abs(mtv) / scale).reshape(-1)
    rank = np.argsort(np.argsort(relative)).reshape(mtv.shape) / max(relative.size, 1)  # 0..1 by relative magnitude
    p_one = np.clip(density * 3.0 * rank ** 2, 0, 1)
    return mtv.reshape(shape), (rng.random(mtv.shape) < p_one).reshape(-1)


def roundtrip(mask, context):
    data, params = codecs.encode("bits-lvl", mask, level=3, context=context)
    out = codecs.decode("bits-lvl", data, dtype=np.bool_, count=mask.size, params=params, context=fresh(context))
    return out, data, params


# --- round trips -------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["f32", "f16", "bf16 bits", "bf16 widened"])
@pytest.mark.parametrize("shape", [(0,), (1,), (7,), (8,), (9,), (3, 3), (1001,), (64, 80), (8, 4, 5)])
def test_roundtrip_exact_on_any_chunk(kind, shape):
    rng = np.random.default_rng(sum(shape))
    mtv, tall = tall_like(rng, shape) if int(np.prod(shape)) else (np.zeros(shape, np.float32), np.zeros(0, bool))
    context = contexts(mtv.reshape(shape), shape)[kind]
    count = tall.size
    for mask in (tall, rng.random(count) < 0.5, np.zeros(count, bool), np.ones(count, bool)):
        out, _, params = roundtrip(mask, context)
        assert out.dtype == np.bool_ and np.array_equal(out, mask), params


@pytest.mark.parametrize("count", [0, 1, 7, 8, 9, 50_000])
def test_roundtrip_decodes_to_the_asked_dtype_with_special_values(count):
    rng = np.random.default_rng(count)
    special = np.array([0.0, -0.0, np.inf, -np.inf, np.nan, 1e-45, -3.4e38, 1.0], dtype=np.float32)
    mtv = np.resize(special, count) * np.float32(1) if count < 50 else np.where(rng.random(count) < 0.1, np.resize(special, count),
                                                                              rng.laplace(0, 1e-3, count)).astype(np.float32)
    mask = rng.random(count) < 0.3
    data, params = codecs.encode("bits-lvl", mask, context={"mtv": mtv})
    out = codecs.decode("bits-lvl", data, dtype=np.uint8, count=count, params=params, context={"mtv": mtv.copy()})
    assert out.dtype == np.uint8 and np.array_equal(out.astype(bool), mask)


def test_bf16_bits_and_widened_float32_contexts_give_the_same_payload():
    rng = np.random.default_rng(1)
    mtv, mask = tall_like(rng, (128, 256))
    ctx = contexts(mtv, mtv.shape)
    a = codecs.encode("bits-lvl", mask, context=ctx["bf16 bits"])
    b = codecs.encode("bits-lvl", mask, context=ctx["bf16 widened"])
    assert a == b and a[1]["mode"] == "ctx"


# --- the grouping is the SPEC's formula -----------------------------------------------------------

def spec_buckets(mtv32, shape):
    """SPEC, bits-lvl, in plain numpy: level from frexp (not from the bits), the row median by a full
    sort, bucket = clip(floor((l - m) / 4) + 32, 0, 63)."""
    x = np.abs(mtv32.astype(np.float64)).reshape(-1)
    fraction, exponent = np.frexp(x)  # x = fraction * 2^exponent, fraction in [0.5, 1)
    normal = x >= 2.0 ** -126
    level = np.where(normal, (exponent - 1 + 127) * 16 + np.floor((2 * fraction - 1) * 16), np.floor(x / 2.0 ** -149 / 2 ** 19))
    level = np.where(x == 0, 0, level).astype(np.int64)
    rows = shape[0] if len(shape) >= 2 and shape[0] > 1 and int(np.prod(shape[1:])) >= 16 else 1
    by_row = level.reshape(rows, -1)
    median = np.sort(by_row, axis=1)[:, by_row.shape[1] // 2][:, None]
    return np.clip(np.floor((by_row - median) / 4) + 32, 0, 63).astype(np.int64).reshape(-1)


@pytest.mark.parametrize("shape", [(5000,), (40, 125), (40, 10), (2, 3, 50)])
def test_buckets_match_the_spec_formula(shape):
    rng = np.random.default_rng(2)
    mtv = (rng.laplace(0, 1e-3, shape) * rng.lognormal(0, 2, shape[:1] + (1,) * (len(shape) - 1))).astype(np.float32)
    mtv.reshape(-1)[:20] = [0.0, -0.0, 1e-40, -1e-42, 3e38, 1.0, -1.0, 2.0] + [1e-3] * 12
    grouping = mask_levels.chunk_grouping({"mtv": mtv}, mtv.size, "test")
    expected = spec_buckets(mtv, shape)
    assert np.array_equal(grouping.groups, expected)
    assert np.array_equal(grouping.sizes, np.bincount(expected, minlength=64))
    assert np.array_equal(grouping.order, np.lexsort((np.arange(mtv.size), expected)))  # by (bucket, index)


def test_payload_holds_the_crc_and_the_per_group_probabilities_the_spec_says():
    rng = np.random.default_rng(3)
    mtv, mask = tall_like(rng, (200, 300))
    data, params = codecs.encode("bits-lvl", mask, context={"mtv": mtv})
    assert params["mode"] == "ctx"
    merged = spec_buckets(mtv, mtv.shape) // (64 // params["groups"])
    sizes = np.bincount(merged, minlength=params["groups"])
    ones = np.bincount(merged[mask], minlength=params["groups"])
    q = np.clip(np.rint(ones[sizes > 0] * 65536.0 / sizes[sizes > 0]), 2, 65534)
    assert int.from_bytes(data[:4], "little") == zlib.crc32(np.packbits(mask, bitorder="little").tobytes())
    assert np.array_equal(np.frombuffer(data[4:4 + 2 * q.size], "<u2"), q)


def test_bits_lvl_pays_off_on_an_mtv_dependent_mask():
    rng = np.random.default_rng(4)
    mtv, mask = tall_like(rng, (512, 512))
    p = mask.mean()
    density_entropy = -(p * np.log2(p) + (1 - p) * np.log2(1 - p))
    lvl, _ = codecs.encode("bits-lvl", mask, context={"mtv": mtv})
    plain, _ = codecs.encode("bits+zstd", mask, level=19)
    assert 8 * len(plain) / mask.size > 0.97 * density_entropy
    assert 8 * len(lvl) / mask.size < 0.9 * density_entropy


def test_tiny_and_run_length_masks_take_the_plain_modes():
    rng = np.random.default_rng(5)
    tiny = rng.random(100) < 0.3
    _, _, params = roundtrip(tiny, {"mtv": rng.normal(size=100).astype(np.float32)})
    assert params == {"mode": "raw"}
    runs = np.repeat(rng.random(400) < 0.5, 500)
    out, _, params = roundtrip(runs, {"mtv": rng.normal(size=runs.size).astype(np.float32)})
    assert params == {"mode": "zstd"} and np.array_equal(out, runs)


# --- shared context: built once, even from two threads ---------------------------------------------

def test_one_grouping_per_context_dict_across_threads(monkeypatch):
    rng = np.random.default_rng(6)
    mtv, mask = tall_like(rng, (256, 512))
    calls = []
    real = mask_levels.level_buckets
    def slow_build(*args):  # slow enough that all four threads ask for the grouping while it is built
        calls.append(1)
        time.sleep(0.2)
        return real(*args)

    monkeypatch.setattr(mask_levels, "level_buckets", slow_build)
    context, results, start = {"mtv": mtv.reshape(-1), "shape": mtv.shape}, [None] * 4, threading.Barrier(4)

    def encode(i):
        start.wait()
        results[i] = codecs.encode("bits-lvl", mask, context=context)

    threads = [threading.Thread(target=encode, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(calls) == 1 and all(r == results[0] for r in results)
    context["mtv"] = -mtv.reshape(-1)[::-1].copy()  # another chunk's mtv in a reused dict: rebuilt
    data, params = codecs.encode("bits-lvl", mask, context=context)
    assert len(calls) == 2
    assert np.array_equal(codecs.decode("bits-lvl", data, dtype=bool, count=mask.size, params=params, context=fresh(context)), mask)


# --- never a wrong mask silently -------------------------------------------------------------------

@pytest.fixture(scope="module")
def coded():
    rng = np.random.default_rng(7)
    mtv, mask = tall_like(rng, (200, 150))
    context = {"mtv": mtv.reshape(-1), "shape": mtv.shape}
    data, params = codecs.encode("bits-lvl", mask, context=context)
    assert params["mode"] == "ctx"
    return mtv, mask, data, params


def test_wrong_context_is_a_codec_error(coded):
    mtv, mask, data, params = coded
    flat = mtv.reshape(-1)
    other = flat.copy()
    other[:100] *= 8
    for bad in ({"mtv": other, "shape": mtv.shape}, {"mtv": flat[::-1].copy(), "shape": mtv.shape}, None, {},
                {"mtv": flat.astype(np.float64)}, {"mtv": flat[:-1]}, {"mtv": flat, "shape": (3, 7)},
                {"mtv": flat, "shape": "abc"}, {"mtv": flat, "shape": (mask.size,)},  # one row: other buckets
                {"mtv": flat.view(np.uint32)}, {"mtv": bf16_bits(flat)},  # bits without saying they are bf16
                {"mtv": flat, "mtv_dtype": "bfloat16"}, {"mtv": flat, "shape": mtv.shape, "mtv_dtype": "float8"}):
        with pytest.raises(CodecError):
            codecs.decode("bits-lvl", data, dtype=np.bool_, count=mask.size, params=params, context=bad)


def test_encoding_needs_a_context():
    for bad in (None, {}, {"mtv": np.zeros(10, np.float32)}, {"mtv": np.zeros(100, np.int32)}):
        with pytest.raises(CodecError):
            codecs.encode("bits-lvl", np.zeros(100, bool), context=bad)


def test_damaged_payload_is_a_codec_error_or_the_same_mask(coded):
    mtv, mask, data, params = coded
    context = {"mtv": mtv.reshape(-1), "shape": mtv.shape}
    for cut in (len(data) - 1, len(data) - 4, len(data) // 2, 5, 3, 0):
        with pytest.raises(CodecError):
            codecs.decode("bits-lvl", data[:cut], dtype=np.bool_, count=mask.size, params=params, context=context)
    rng = np.random.default_rng(8)
    for _ in range(60):
        damaged = bytearray(data)
        damaged[int(rng.integers(len(damaged)))] ^= 1 << int(rng.integers(8))
        try:
            out = codecs.decode("bits-lvl", bytes(damaged), dtype=np.bool_, count=mask.size, params=params, context=context)
        except CodecError:
            continue
        assert np.array_equal(out, mask), "a damaged payload decoded to a different mask without an error"


def test_damaged_params_are_a_codec_error(coded):
    mtv, mask, data, params = coded
    context = {"mtv": mtv.reshape(-1), "shape": mtv.shape}
    for bad in ({**params, "groups": params["groups"] // 2 or 2}, {**params, "groups": 3}, {**params, "groups": True},
                {**params, "groups": 128}, {**params, "feature": "abs"}, {"mode": "raw"}, {"mode": "zstd"}, {"mode": "ctx"},
                None, {"mode": {"nested": [1]}}):
        with pytest.raises(CodecError):
            codecs.decode("bits-lvl", data, dtype=np.bool_, count=mask.size, params=bad, context=context)
