"""Codecs: how one section's array becomes bytes and back. Bytes only, no model math.

Every codec takes a contiguous numpy array and returns the encoded bytes and a small dict of
parameters that the manifest records; decoding needs the same parameters, the element dtype and
count, and — for context codecs — the same side information the encoder saw (the decoded mtv).
Float tensors arrive as unsigned-integer views of their bits (bfloat16 as uint16), so codecs never
depend on numpy knowing a float format.

This module holds the registry (with what each codec can do: decode with a context, code bit-packed
masks as they are), the encode/decode dispatch, the payload helpers every codec shares and the three plain
codecs (raw, zstd, bits+zstd). It imports no other codec: each of the others, one idea per file, imports it
and registers itself, and the package (formats/codecs/__init__) imports them all:

    floats        planes+zstd, planes+ans: byte planes of float bits
    blosc2_zstd   blosc2+zstd: the same byte shuffle and zstd, in c-blosc2 (the default for floats)
    mask_ctx      bits-ctx, bits-ctx-prior: masks grouped by quantiles of |mtv| (format v1)
    mask_levels   bits-lvl: masks grouped by fixed |mtv| level buckets (linear, per chunk)
    mask_groups   the grouping and payloads those two share
    delta         delta: an exact task's tensor given the base
    ans           the entropy coder (constriction) they share
"""
from __future__ import annotations

import functools
import zlib

import numpy as np
import zstandard

_ENCODERS = {}
_DECODERS = {}


_CONTEXT = set()       # codecs whose decoding needs the mtv's side information (mask_context)
_PACKED = {}           # mask codecs that code bit-packed bytes directly: name -> (encoder, decoder)


def register(name, encoder, decoder, *, uses_context: bool = False, packed=None):
    """Every codec registers here when its module is imported (formats/codecs/__init__ imports them all).

    uses_context: decoding needs the side information built from the decoded mtv (mask codecs).
    packed: (encode(packed_bits, level, threads) -> (bytes, params), decode(data, count) -> packed bits)
    for a mask codec that stores the bit-packed bytes (little bit order) as they are."""
    _ENCODERS[name] = encoder
    _DECODERS[name] = decoder
    if uses_context:
        _CONTEXT.add(name)
    if packed is not None:
        _PACKED[name] = packed


def uses_context(codec: str) -> bool:
    """Whether decoding `codec` needs the mtv's side information (building it costs a float32 copy)."""
    return codec in _CONTEXT


def codes_packed_bits(codec: str) -> bool:
    """Whether a mask codec stores bit-packed bytes as they are (no unpacking to booleans and back)."""
    return codec in _PACKED


def encode_packed(codec: str, packed: np.ndarray, *, level: int = 3, threads: int = 0):
    return _PACKED[codec][0](np.ascontiguousarray(packed), level=level, threads=threads)


def decode_packed(codec: str, data, *, count: int) -> np.ndarray:
    """A mask's bit-packed bytes (uint8, little bit order) from a codec that stores them as they are."""
    return _PACKED[codec][1](data, count=count)


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
        # decompress() allocates what the frame header declares and ignores max_output_size then:
        # a 32 KB frame that declares 1 GB would get 1 GB before any size check.
        declared = zstandard.frame_content_size(data)
        if declared not in (-1, expected_size):
            raise CodecError(f"zstandard: frame declares {declared} bytes, expected {expected_size}")
        out = zstandard.ZstdDecompressor().decompress(data, max_output_size=expected_size)
    except zstandard.ZstdError as exc:
        raise CodecError(f"zstandard: {exc}") from None
    if len(out) != expected_size:
        raise CodecError(f"zstandard: got {len(out)} bytes, expected {expected_size}")
    return out


# --- payload helpers shared by the codecs of the other modules ------------------------------
#
# An ANS decoder fed truncated or mismatched input does not fail by itself, it returns other
# symbols, and a mask decoded against another mtv than the encoder's would be wrong without any
# sign; so every ANS payload carries a CRC-32 of the decoded data and a mismatch is a CodecError.
# The archive's own checksum per section covers damage to the stored bytes; the CRC covers wrong
# params and a context that differs from the encoder's.

WORD = np.dtype("<u4")  # the entropy coder's compressed words, stored little-endian


def require(condition, what, message):
    if not condition:
        raise CodecError(f"{what}: {message}")


def decoder_errors_as_codec_errors(what):
    """Whatever malformed input makes numpy or constriction raise becomes a CodecError."""
    def wrap(decoder):
        @functools.wraps(decoder)
        def guarded(*args, **kwargs):
            try:
                return decoder(*args, **kwargs)
            except CodecError:
                raise
            except (ValueError, TypeError, IndexError, KeyError, OverflowError, RuntimeError, zstandard.ZstdError) as exc:
                raise CodecError(f"{what}: {type(exc).__name__}: {exc}") from None
        return guarded
    return wrap


class PayloadReader:
    """Cuts a payload into pieces; running past its end is a CodecError."""

    def __init__(self, data, what):
        self.data = memoryview(data).cast("B")
        self.pos = 0
        self.what = what

    def take(self, size):
        require(0 <= size <= len(self.data) - self.pos, self.what, "payload truncated")
        piece = self.data[self.pos:self.pos + size]
        self.pos += size
        return piece

    def array(self, dtype, count):
        dtype = np.dtype(dtype)
        return np.frombuffer(self.take(count * dtype.itemsize), dtype=dtype)

    def u32(self):
        return int(self.array("<u4", 1)[0])

    def rest_as_words(self):
        rest = self.take(len(self.data) - self.pos)
        require(len(rest) % 4 == 0, self.what, "coded words are not a whole number of 32-bit words")
        return np.frombuffer(rest, dtype=WORD).astype(np.uint32)


def crc32(data) -> int:
    return zlib.crc32(data) & 0xFFFFFFFF


def check_crc(expected, data, what):
    require(crc32(data) == expected, what, "checksum mismatch (wrong params, or a context other than the encoder's)")


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

def bits_encode(array, *, level, threads, **_):
    return zstd_compress(np.packbits(array.astype(bool, copy=False), bitorder="little").tobytes(), level, threads), {}


def bits_decode(data, *, dtype, count, **_):
    packed = np.frombuffer(zstd_decompress(data, (count + 7) // 8), dtype=np.uint8)
    return np.unpackbits(packed, count=count, bitorder="little").astype(dtype, copy=False)


register("raw", _raw_encode, _raw_decode)
register("zstd", _zstd_encode, _zstd_decode)


def _bits_encode_packed(packed, *, level, threads=0):
    return zstd_compress(packed.tobytes(), level, threads), {}


def _bits_decode_packed(data, *, count):
    return np.frombuffer(zstd_decompress(data, (count + 7) // 8), dtype=np.uint8)


register("bits+zstd", bits_encode, bits_decode, packed=(_bits_encode_packed, _bits_decode_packed))

