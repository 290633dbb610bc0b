"""The `exact` representation's bytes: a tensor's bits coded GIVEN the base tensor's bits. Bytes only.

A fine-tuned weight differs from its base weight in the low mantissa bits only, so the element-wise
difference of the two bit patterns is mostly zero in its top bytes and far more compressible than
the weights themselves. Two reversible differences of unsigned bit patterns t (task) and b (base),
both of one itemsize:

* "xor": d = t XOR b;                      t = d XOR b
* "sub": d = zigzag(t - b mod 2**n);       t = b + unzigzag(d) mod 2**n
  (zigzag maps the wrapped signed difference 0, -1, 1, -2, ... to 0, 1, 2, 3, ..., so that a step of
  a few units in the last place is a small number in both directions)

d is then coded by one of formats.codecs' codecs (byte planes + zstd or + ANS), as any array.

Payload: the CRC-32 of t's little-endian bytes (u32, little-endian), then the inner codec's bytes.
Decoding against another base than the encoder's cannot fail by itself (it yields other weights),
so the CRC is checked on the result and a mismatch is a CodecError.
Params (recorded in the manifest): {"mode": "xor" | "sub", "codec": inner codec, "params": its params}.

Element-wise, so a chunk of the task tensor is coded against the same chunk of the base.
"""
from __future__ import annotations

import zlib

import numpy as np

from tallzip.formats.codecs import registry as codecs
from tallzip.formats.codecs.registry import CodecError

MODES = ("xor", "sub")
DEFAULT_MODE = "sub"  # by measurement (benchmarks/REPRESENTATIONS.md): 0.4-0.6 bits/param below xor
DEFAULT_CODEC = "planes+ans"  # 0.5-0.7 bits/param below planes+zstd on the same deltas
_UNSIGNED = {1: np.dtype("<u1"), 2: np.dtype("<u2"), 4: np.dtype("<u4"), 8: np.dtype("<u8")}


def _as_unsigned(array: np.ndarray, what: str) -> np.ndarray:
    array = np.asarray(array)
    if array.dtype.kind not in "uif" or array.dtype.itemsize not in _UNSIGNED:
        raise ValueError(f"{what}: expected an array of 1, 2, 4 or 8-byte elements, got {array.dtype}")
    little = np.ascontiguousarray(array.reshape(-1).astype(array.dtype.newbyteorder("<"), copy=False))
    return little.view(_UNSIGNED[array.dtype.itemsize])


def _crc(values: np.ndarray) -> int:
    return zlib.crc32(memoryview(np.ascontiguousarray(values)).cast("B")) & 0xFFFFFFFF


def _zigzag(d: np.ndarray) -> np.ndarray:
    top = d.dtype.type(d.dtype.itemsize * 8 - 1)
    negative = (d >> top).astype(d.dtype)            # 1 where the wrapped difference is negative
    return (d << d.dtype.type(1)) ^ (np.zeros_like(d) - negative)


def _unzigzag(z: np.ndarray) -> np.ndarray:
    return (z >> z.dtype.type(1)) ^ (np.zeros_like(z) - (z & z.dtype.type(1)))


def difference(target: np.ndarray, base: np.ndarray, mode: str = DEFAULT_MODE) -> np.ndarray:
    """d of the module docstring (unsigned, the target's itemsize)."""
    t, b = _as_unsigned(target, "target"), _as_unsigned(base, "base")
    _check_pair(t, b, mode)
    if mode == "xor":
        return t ^ b
    return _zigzag(t - b)


def undo_difference(d: np.ndarray, base: np.ndarray, mode: str) -> np.ndarray:
    b = _as_unsigned(base, "base")
    _check_pair(d, b, mode)
    if mode == "xor":
        return d ^ b
    return b + _unzigzag(d)


def _check_pair(t, b, mode):
    if mode not in MODES:
        raise ValueError(f"unknown delta mode {mode!r} (expected one of {', '.join(MODES)})")
    if t.dtype.itemsize != b.dtype.itemsize:
        raise ValueError(f"the tensor has {t.dtype.itemsize}-byte elements, its base {b.dtype.itemsize}-byte ones: "
                         "code it alone, not against the base")
    if t.size != b.size:
        raise ValueError(f"the tensor has {t.size} elements, its base {b.size}")


def encode(target: np.ndarray, base: np.ndarray, *, mode: str = DEFAULT_MODE, codec: str = DEFAULT_CODEC,
           level: int = 3, threads: int = 0) -> tuple[bytes, dict]:
    """Code `target`'s bits given `base`'s (same itemsize and element count); returns (payload, params)."""
    t = _as_unsigned(target, "target")
    d = difference(t, base, mode)
    inner, inner_params = codecs.encode(codec, d, level=level, threads=threads)
    return _crc(t).to_bytes(4, "little") + inner, {"mode": mode, "codec": codec, "params": inner_params}


def decode(data, base: np.ndarray, *, params: dict, dtype=None) -> np.ndarray:
    """Inverse of encode: the target's bits as a flat unsigned array (or viewed as `dtype`, same itemsize)."""
    if not isinstance(params, dict) or set(params) != {"mode", "codec", "params"} or params["mode"] not in MODES:
        raise CodecError(f"delta: bad params {params!r}")
    data = memoryview(data).cast("B")
    if len(data) < 4:
        raise CodecError("delta: payload truncated")
    b = _as_unsigned(base, "base")
    d = codecs.decode(params["codec"], data[4:], dtype=b.dtype, count=b.size, params=params["params"])
    t = undo_difference(d, b, params["mode"])
    if _crc(t) != int.from_bytes(data[:4], "little"):
        raise CodecError("delta: checksum mismatch (damaged payload, or a base other than the encoder's)")
    if dtype is not None:
        dtype = np.dtype(dtype)
        if dtype.itemsize != t.dtype.itemsize:
            raise ValueError(f"delta: cannot view {t.dtype.itemsize}-byte elements as {dtype}")
        return t.view(dtype)
    return t


# As an archive codec ("delta"): the context carries the same chunk of the base, as its bits.
def _archive_encode(array, *, level, threads, context=None, **_):
    if not context or "base" not in context:
        raise ValueError("delta: the base chunk is needed (context {'base': bits})")
    return encode(array, context["base"], level=level, threads=threads)


@codecs.decoder_errors_as_codec_errors("delta")
def _archive_decode(data, *, dtype, count, params, context=None, **_):
    if not context or "base" not in context:
        raise CodecError("delta: decoding needs the base chunk")
    base = np.asarray(context["base"]).reshape(-1)
    if base.size != count:
        raise CodecError(f"delta: the base chunk has {base.size} elements, the chunk {count}")
    return decode(data, base, params=params, dtype=dtype)


codecs.register("delta", _archive_encode, _archive_decode)
