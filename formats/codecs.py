"""Codecs: how one section's array becomes bytes and back. Bytes only, no model math.

Every codec takes a contiguous numpy array and returns the encoded bytes and a small dict of
parameters that the manifest records; decoding needs the same parameters, the element dtype and
count, and — for context codecs — the same side information the encoder saw (the decoded mtv).
Float tensors arrive as unsigned-integer views of their bits (bfloat16 as uint16), so codecs never
depend on numpy knowing a float format.
"""
from __future__ import annotations

import numpy as np
import zstandard

_ENCODERS = {}
_DECODERS = {}


def register(name, encoder, decoder):
    _ENCODERS[name] = encoder
    _DECODERS[name] = decoder


def names():
    return sorted(_ENCODERS)


class CodecError(ValueError):
    """A section could not be decoded (unknown codec or inconsistent bytes)."""


def encode(codec: str, array: np.ndarray, *, level: int = 3, threads: int = 0, context=None):
    if codec not in _ENCODERS:
        raise CodecError(f"unknown codec {codec!r}")
    return _ENCODERS[codec](np.ascontiguousarray(array), level=level, threads=threads, context=context)


def decode(codec: str, data, *, dtype, count: int, params: dict, context=None) -> np.ndarray:
    """Decode to a flat array of `count` elements of `dtype`."""
    if codec not in _DECODERS:
        raise CodecError(f"unknown codec {codec!r}")
    out = _DECODERS[codec](data, dtype=np.dtype(dtype), count=count, params=params, context=context)
    if out.dtype != np.dtype(dtype) or out.size != count:
        raise CodecError(f"codec {codec!r} decoded {out.size} x {out.dtype}, expected {count} x {dtype}")
    return out


def zstd_compress(data, level: int = 3, threads: int = 0) -> bytes:
    return zstandard.ZstdCompressor(level=level, threads=threads, write_content_size=True).compress(data)


def zstd_decompress(data, expected_size: int) -> bytes:
    try:
        out = zstandard.ZstdDecompressor().decompress(data, max_output_size=expected_size)
    except zstandard.ZstdError as exc:
        raise CodecError(f"zstandard: {exc}") from None
    if len(out) != expected_size:
        raise CodecError(f"zstandard: got {len(out)} bytes, expected {expected_size}")
    return out


# --- raw and zstd: any dtype -----------------------------------------------------------------

def _raw_encode(array, **_):
    return array.tobytes(), {}


def _raw_decode(data, *, dtype, count, **_):
    if len(data) != count * dtype.itemsize:
        raise CodecError(f"raw: {len(data)} bytes for {count} x {dtype}")
    return np.frombuffer(data, dtype=dtype).copy()


def _zstd_encode(array, *, level, threads, **_):
    return zstd_compress(array.tobytes(), level, threads), {}


def _zstd_decode(data, *, dtype, count, **_):
    return np.frombuffer(zstd_decompress(data, count * dtype.itemsize), dtype=dtype).copy()


# --- masks: one bit per element, little bit order, then zstd ---------------------------------

def _bits_encode(array, *, level, threads, **_):
    return zstd_compress(np.packbits(array.astype(bool, copy=False), bitorder="little").tobytes(), level, threads), {}


def _bits_decode(data, *, dtype, count, **_):
    packed = np.frombuffer(zstd_decompress(data, (count + 7) // 8), dtype=np.uint8)
    return np.unpackbits(packed, count=count, bitorder="little").astype(dtype, copy=False)


register("raw", _raw_encode, _raw_decode)
register("zstd", _zstd_encode, _zstd_decode)
register("bits+zstd", _bits_encode, _bits_decode)
