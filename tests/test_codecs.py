"""Codecs: every codec round-trips bit for bit, bad input is a CodecError, the mask context codec pays off."""
from __future__ import annotations

import numpy as np
import pytest

from tallzip.formats.codecs import registry as codecs, floats as float_codecs, mask_ctx as mask_codecs
from tallzip.formats.codecs.registry import CodecError
from tallzip.options import StoreOptions

ARRAY_CODECS = ("raw", "zstd", "planes+zstd", "planes+ans", "blosc2+zstd")
LENGTHS = (0, 1, 7, 9, 1001)


def roundtrip(codec, array, context=None, dtype=None, level=3):
    data, params = codecs.encode(codec, array, level=level, context=context)
    out = codecs.decode(codec, data, dtype=dtype or array.dtype, count=array.size, params=params, context=context)
    return out, data, params


def float_bits(rng, count, dtype=np.float32):
    """Weights-like floats as their unsigned-integer bits, as the archive hands them over."""
    values = rng.normal(0, 0.02, count).astype(np.float32)
    if dtype == "bf16":
        return (values.view(np.uint32) >> 16).astype(np.uint16)
    return values.astype(dtype).view(f"u{np.dtype(dtype).itemsize}")


def binary_entropy(p):
    if p <= 0 or p >= 1:
        return 0.0
    return float(-(p * np.log2(p) + (1 - p) * np.log2(1 - p)))


def mask_depending_on_mtv(rng, shape, density=0.2):
    """A mask whose bits are far likelier where |mtv| is large, like a TALL mask."""
    mtv = rng.laplace(0, 1e-3, shape).astype(np.float32)
    rank = np.argsort(np.argsort(np.abs(mtv).reshape(-1))) / mtv.size  # 0..1 by magnitude
    p_one = np.clip(density * 3.0 * rank ** 2, 0, 1)
    mask = (rng.random(mtv.size) < p_one).reshape(shape)
    return mask, mtv


# --- round trips -------------------------------------------------------------------------------

@pytest.mark.parametrize("codec", ARRAY_CODECS)
@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.uint32, np.uint64])
@pytest.mark.parametrize("count", LENGTHS)
def test_array_codecs_roundtrip_random_bits(codec, dtype, count):
    rng = np.random.default_rng(count)
    array = rng.integers(0, np.iinfo(dtype).max, count, dtype=dtype, endpoint=True)
    out, _, _ = roundtrip(codec, array)
    assert out.dtype == array.dtype and np.array_equal(out, array)


@pytest.mark.parametrize("codec", ARRAY_CODECS)
@pytest.mark.parametrize("kind", [np.float32, np.float16, "bf16", np.float64])
def test_array_codecs_roundtrip_float_bits(codec, kind):
    array = float_bits(np.random.default_rng(1), 20_001, kind)
    out, _, _ = roundtrip(codec, array)
    assert np.array_equal(out, array)


@pytest.mark.parametrize("codec", ARRAY_CODECS)
def test_array_codecs_roundtrip_special_contents(codec):
    special = np.array([0.0, -0.0, np.inf, -np.inf, np.nan, 1e-45, -3.4e38], dtype=np.float32).view(np.uint32)
    for array in (np.zeros(4096, np.uint32), np.full(333, 0xFFFFFFFF, np.uint32), np.tile(special, 100)):
        out, _, _ = roundtrip(codec, array)
        assert np.array_equal(out, array)


@pytest.mark.parametrize("codec", ("planes+zstd", "planes+ans", "blosc2+zstd"))
def test_planes_codecs_accept_big_endian_input(codec):
    array = float_bits(np.random.default_rng(2), 999).astype(">u4")
    out, _, _ = roundtrip(codec, array, dtype=np.uint32)
    assert np.array_equal(out, array.astype(np.uint32))


def test_byte_planes_split_and_join_are_inverse():
    for dtype in (np.uint16, np.uint32, np.uint64):
        info = np.iinfo(dtype)
        values = np.random.default_rng(3).integers(0, info.max, 1000, dtype=dtype, endpoint=True)
        values[:3] = [0, info.max, 1 << (info.bits - 1)]  # the sign bit alone
        planes = float_codecs.split_planes(values)
        assert planes.shape == (values.dtype.itemsize, values.size)
        assert np.array_equal(float_codecs.join_planes(planes, values.dtype), values)


def test_top_byte_plane_of_float32_is_the_exponent():
    values = float_bits(np.random.default_rng(4), 1000)
    planes = float_codecs.split_planes(values)
    assert np.array_equal(planes[3], ((values >> 23) & 0xFF).astype(np.uint8))  # sign moved to plane 0's bit 0
    assert np.array_equal(planes[0] & 1, (values >> 31).astype(np.uint8))


MASK_CONTEXTS = {
    "laplace": lambda rng, n: rng.laplace(0, 1e-3, n).astype(np.float32),
    "all equal": lambda rng, n: np.full(n, 0.25, np.float32),
    "ties and zeros": lambda rng, n: np.round(rng.normal(0, 2, n)).astype(np.float32) * np.float32(1e-3),
    "signed zeros": lambda rng, n: np.where(rng.random(n) < 0.5, np.float32(0.0), np.float32(-0.0)).astype(np.float32),
}


@pytest.mark.parametrize("codec", ("bits+zstd", "bits-ctx", "bits-ctx-prior"))
@pytest.mark.parametrize("context_kind", sorted(MASK_CONTEXTS))
@pytest.mark.parametrize("count", LENGTHS + (50_000,))
def test_mask_codecs_roundtrip(codec, context_kind, count):
    rng = np.random.default_rng(count)
    mtv = MASK_CONTEXTS[context_kind](rng, count)
    priors = [rng.random(count) < 0.3 for _ in range(3)]
    for mask in (rng.random(count) < 0.2, np.zeros(count, bool), np.ones(count, bool), rng.random(count) < 0.5):
        context = {"mtv": mtv, "prior_masks": priors}
        data, params = codecs.encode(codec, mask, level=3, context=context)
        for out_dtype in (np.bool_, np.uint8):
            fresh = {"mtv": mtv.copy(), "prior_masks": priors}  # the decoder's own dict: no shared cache
            out = codecs.decode(codec, data, dtype=out_dtype, count=count, params=params, context=fresh)
            assert out.dtype == out_dtype and np.array_equal(out.astype(bool), mask)


def test_bits_ctx_uses_rows_of_a_2d_context_and_roundtrips():
    rng = np.random.default_rng(4)
    row_scale = rng.lognormal(0, 1.0, (256, 1))
    tau = rng.laplace(0, 1e-3, (256, 512)) * row_scale
    mtv = (tau + rng.laplace(0, 1e-3, (256, 512)) * row_scale).astype(np.float32)
    mask = np.abs(tau) > 0.6 * np.abs(mtv - tau)  # depends on magnitude relative to the row scale
    data, params = codecs.encode("bits-ctx", mask, context={"mtv": mtv})
    assert params["mode"] == "ctx" and params["feature"] == "row"
    out = codecs.decode("bits-ctx", data, dtype=np.bool_, count=mask.size, params=params, context={"mtv": mtv.reshape(-1), "shape": mtv.shape})
    assert np.array_equal(out, mask.reshape(-1))


def test_bits_ctx_widens_half_precision_context_exactly():
    rng = np.random.default_rng(5)
    mask, mtv = mask_depending_on_mtv(rng, 30_000)
    half = mtv.astype(np.float16)
    data, params = codecs.encode("bits-ctx", mask, context={"mtv": half})
    out = codecs.decode("bits-ctx", data, dtype=np.bool_, count=mask.size, params=params, context={"mtv": half.astype(np.float32)})
    assert np.array_equal(out, mask)


def test_bits_ctx_modes_for_tiny_and_run_length_masks():
    rng = np.random.default_rng(6)
    tiny = rng.random(100) < 0.3
    _, params = codecs.encode("bits-ctx", tiny, context={"mtv": rng.normal(size=100).astype(np.float32)})
    assert params == {"mode": "raw"}
    runs = np.repeat(rng.random(400) < 0.5, 500)  # long runs, independent of the mtv
    out, _, params = roundtrip("bits-ctx", runs, context={"mtv": rng.normal(size=runs.size).astype(np.float32)})
    assert params == {"mode": "zstd"} and np.array_equal(out, runs)


# --- the context codec pays off --------------------------------------------------------------------

def test_bits_ctx_beats_the_density_entropy_on_an_mtv_dependent_mask():
    rng = np.random.default_rng(7)
    mask, mtv = mask_depending_on_mtv(rng, (512, 512))
    count = mask.size
    entropy_of_density = binary_entropy(mask.mean())  # what bit-packing + any generic coder can reach
    magnitude = np.abs(mtv.reshape(-1))
    buckets = np.searchsorted(np.quantile(magnitude, np.linspace(0, 1, 17)[1:-1]), magnitude)
    conditional = sum(binary_entropy(mask.reshape(-1)[buckets == b].mean()) * np.sum(buckets == b) for b in range(16)) / count

    ctx_data, _ = codecs.encode("bits-ctx", mask, context={"mtv": mtv})
    zstd_data, _ = codecs.encode("bits+zstd", mask, level=19)
    ctx_bits, zstd_bits = 8 * len(ctx_data) / count, 8 * len(zstd_data) / count
    assert zstd_bits > 0.97 * entropy_of_density
    assert ctx_bits < 0.85 * entropy_of_density
    assert ctx_bits < conditional + 0.01  # at or below the 16-bucket conditional entropy


def test_planes_ans_beats_plain_zstd_on_weights():
    array = float_bits(np.random.default_rng(8), 200_000)
    planes, _ = codecs.encode("planes+ans", array)
    plain, _ = codecs.encode("zstd", array, level=19)
    assert len(planes) < 0.86 * array.nbytes < 0.95 * len(plain)


def test_context_groups_ignore_the_sign_and_are_identical_for_equal_values():
    mtv = np.array([1.0, -1.0, 2.0, -2.0, 0.0, -0.0] * 50, dtype=np.float32)
    groups = mask_codecs.mtv_grouping({"mtv": mtv}, mtv.size, "abs", "test").groups
    assert groups[0] == groups[1] and groups[2] == groups[3] and groups[4] == groups[5]


def test_degenerate_sections_stay_within_the_readers_expansion_bound():
    """The archive reader rejects plain size > 32768 x stored size + 1 MiB (see SPEC.md)."""
    count = 1 << 24
    rng = np.random.default_rng(13)
    shared = {"mtv": rng.normal(size=count).astype(np.float32)}  # one dict: the grouping is built once
    one_bit = np.zeros(count, bool)
    one_bit[12345] = True
    for codec, array, context in (("bits-ctx", np.zeros(count, bool), shared), ("bits-ctx", ~one_bit, shared),
                                  ("bits-ctx", one_bit, shared), ("planes+ans", np.zeros(count // 4, np.uint32), None),
                                  ("planes+ans", one_bit[:count // 4].astype(np.uint32), None)):
        data, params = codecs.encode(codec, array, level=3, context=context)
        plain = (array.size + 7) // 8 if array.dtype == bool else array.nbytes
        assert plain <= 32768 * len(data) + (1 << 20), (codec, params, len(data))
        out = codecs.decode(codec, data, dtype=array.dtype, count=array.size, params=params, context=context)
        assert np.array_equal(out, array)


# --- bad input is a CodecError -----------------------------------------------------------------

def encoded_examples():
    rng = np.random.default_rng(9)
    weights = float_bits(rng, 30_000)
    mask, mtv = mask_depending_on_mtv(rng, (200, 150))
    priors = [rng.random(mask.size) < 0.3 for _ in range(2)]
    examples = []
    for codec in ARRAY_CODECS + ("bits+zstd",):
        array = mask if codec == "bits+zstd" else weights
        examples.append((codec, array, None))
    examples.append(("bits-ctx", mask, {"mtv": mtv}))  # "ctx" mode (checked in the params test)
    examples.append(("bits-ctx-prior", mask, {"mtv": mtv, "prior_masks": priors}))
    out = []
    for codec, array, context in examples:
        data, params = codecs.encode(codec, array, level=3, context=context)
        out.append((codec, array, context, data, params))
    return out


EXAMPLES = encoded_examples()
IDS = [example[0] for example in EXAMPLES]


def decode_example(codec, array, context, data, params):
    return codecs.decode(codec, data, dtype=array.dtype, count=array.size, params=params, context=context)


@pytest.mark.parametrize("example", EXAMPLES, ids=IDS)
def test_truncated_payload_is_a_codec_error(example):
    codec, array, context, data, params = example
    for cut in (len(data) - 1, len(data) // 2, 3, 0):
        with pytest.raises(CodecError):
            decode_example(codec, array, context, data[:cut], params)


@pytest.mark.parametrize("example", EXAMPLES, ids=IDS)
def test_wrong_count_is_a_codec_error(example):
    codec, array, context, data, params = example
    if context is not None:
        context = {**context, "mtv": np.resize(context["mtv"], array.size + 8)}
        if "prior_masks" in context:
            context["prior_masks"] = [np.resize(m, array.size + 8) for m in context["prior_masks"]]
    with pytest.raises(CodecError):
        codecs.decode(codec, data, dtype=array.dtype, count=array.size + 8, params=params, context=context)


def damaged_params(codec, params):
    """Plausible-looking wrong params for each codec that reads params."""
    if codec == "planes+zstd":
        sizes = params["sizes"]
        yield {"sizes": sizes[::-1]}
        yield {"sizes": [sizes[0] + 1] + sizes[1:-1] + [sizes[-1] - 1]}
        yield {"sizes": sizes[:-1]}
        yield {"sizes": [str(s) for s in sizes]}
    elif codec == "planes+ans":
        planes = params["planes"]
        yield {"planes": planes[::-1]}
        yield {"planes": [["zstd" if c == "raw" else "raw", s] for c, s in planes]}
        yield {"planes": [[c, s] for c, s in planes[:-1]]}
        yield {"planes": [[c, float(s)] for c, s in planes]}
    elif codec == "bits-ctx":
        assert params["mode"] == "ctx"
        yield {**params, "groups": params["groups"] // 2 or 2}
        yield {**params, "groups": 3}
        yield {**params, "groups": True}
        yield {**params, "feature": "row" if params["feature"] == "abs" else "abs"}
        yield {**params, "feature": ["abs"]}
        yield {**params, "mode": "zstd"}
        yield {"mode": "raw"}
        yield {"mode": "zstd"}
        yield {"mode": "ctx"}
        yield {**params, "extra": 1}
    elif codec == "bits-ctx-prior":
        yield {**params, "priors": params["priors"] + 1}
        yield {"mode": "ctx"}
    yield None
    yield {"mode": {"nested": [1, 2]}}


@pytest.mark.parametrize("example", EXAMPLES, ids=IDS)
def test_damaged_params_are_a_codec_error(example):
    codec, array, context, data, params = example
    if codec in ("raw", "zstd", "bits+zstd"):
        pytest.skip("the original codecs take no params")
    for bad in damaged_params(codec, params):
        with pytest.raises(CodecError):
            decode_example(codec, array, context, data, bad)


@pytest.mark.parametrize("example", EXAMPLES, ids=IDS)
def test_flipped_bytes_never_give_a_silently_wrong_array(example):
    codec, array, context, data, params = example
    if codec in ("raw", "zstd", "bits+zstd", "blosc2+zstd"):
        pytest.skip("no checksum in these payloads; the archive's section sha256 covers stored bytes")
    rng = np.random.default_rng(10)
    for _ in range(40):
        damaged = bytearray(data)
        damaged[int(rng.integers(len(damaged)))] ^= 1 << int(rng.integers(8))
        try:
            out = decode_example(codec, array, context, bytes(damaged), params)
        except CodecError:
            continue
        assert np.array_equal(out, array), "a damaged payload decoded to a different array without an error"


def test_context_mismatch_is_a_codec_error():
    rng = np.random.default_rng(11)
    mask, mtv = mask_depending_on_mtv(rng, 40_000)
    data, params = codecs.encode("bits-ctx", mask, context={"mtv": mtv})
    assert params["mode"] == "ctx"
    other = mtv.copy()
    other[:100] *= 8  # the decoder's mtv differs a little (e.g. rounded differently)
    for bad_context in ({"mtv": other}, {"mtv": mtv[::-1].copy()}, None, {}, {"mtv": mtv.astype(np.float64)},
                        {"mtv": mtv[:-1]}, {"mtv": mtv, "shape": (3, 7)}, {"mtv": mtv, "shape": "abc"}):
        with pytest.raises(CodecError):
            codecs.decode("bits-ctx", data, dtype=np.bool_, count=mask.size, params=params, context=bad_context)


def test_encoding_needs_the_context():
    mask = np.zeros(100, bool)
    for codec in ("bits-ctx", "bits-ctx-prior"):
        with pytest.raises(CodecError):
            codecs.encode(codec, mask, context=None)
    with pytest.raises(CodecError):
        codecs.encode("bits-ctx-prior", mask, context={"mtv": np.zeros(100, np.float32)})


def test_cache_follows_the_mtv_object():
    rng = np.random.default_rng(12)
    mask, mtv = mask_depending_on_mtv(rng, 20_000)
    context = {"mtv": mtv}
    codecs.encode("bits-ctx", mask, context=context)
    context["mtv"] = -mtv[::-1].copy()  # a new tensor's mtv in a reused dict
    data, params = codecs.encode("bits-ctx", mask, context=context)
    out = codecs.decode("bits-ctx", data, dtype=np.bool_, count=mask.size, params=params, context={"mtv": context["mtv"]})
    assert np.array_equal(out, mask)


# --- through the archive -----------------------------------------------------------------------

@pytest.mark.parametrize("mtv_dtype", ["float32", "bfloat16"])
def test_archive_with_new_codecs_extracts_the_same_tensors(tmp_path, mtv_dtype):
    import torch

    import tallzip
    from conftest import numpy_family, write_family

    base, tasks = numpy_family(n_tasks=3, shapes={"enc.w": (64, 48), "enc.b": (64,), "blk.0.w": (37, 29)})
    base_path, tasks_dir = write_family(tmp_path / "fam", base, tasks)
    plain, coded = tmp_path / "plain.tallz", tmp_path / "coded.tallz"
    tallzip.pack(tasks_dir, base_path, plain, store=StoreOptions(mtv_dtype=mtv_dtype))
    manifest = tallzip.pack(tasks_dir, base_path, coded, store=StoreOptions(mtv_dtype=mtv_dtype, codecs={"float": "planes+ans", "mask": "bits-ctx"}))
    assert {s["codec"] for s in manifest["sections"]} >= {"planes+ans", "bits-ctx"}
    for task in tasks:
        expected, got = tallzip.open(plain).load(task), tallzip.open(coded).load(task)
        assert set(expected) == set(got)
        for name in expected:
            assert expected[name].dtype == got[name].dtype
            assert torch.equal(expected[name].reshape(-1).view(torch.uint8), got[name].reshape(-1).view(torch.uint8)), (task, name)


def test_bits_ctx_threads_sharing_a_context_build_each_grouping_once(monkeypatch):
    import threading
    import time

    rng = np.random.default_rng(14)
    mask, mtv = mask_depending_on_mtv(rng, (128, 256))
    calls = []
    real = mask_codecs._fine_groups
    def slow_build(*args):  # slow enough that all four threads ask for the grouping while it is built
        calls.append(1)
        time.sleep(0.2)
        return real(*args)

    monkeypatch.setattr(mask_codecs, "_fine_groups", slow_build)
    context, results, start = {"mtv": mtv}, [None] * 4, threading.Barrier(4)

    def encode(i):
        start.wait()
        results[i] = codecs.encode("bits-ctx", mask, context=context)

    threads = [threading.Thread(target=encode, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(calls) == 2 and all(r == results[0] for r in results)  # one grouping per feature ("abs", "row")
