"""blosc2+zstd (issue 21): the payload is c-blosc2's own chunk format as SPEC.md names it (read
back here by the blosc2 library directly, and its header fields checked byte by byte), it round-trips
any unsigned element width, and a reader refuses every header it was not written to decode."""
from __future__ import annotations

import struct

import blosc2
import numpy as np
import pytest

from tallzip.formats import codecs
from tallzip.formats.codecs import blosc2_zstd as blosc2_codec

NAME = "blosc2+zstd"


def weights_bits(count, dtype, seed=0):
    """Bits of N(0, 0.02) weights as the registry hands floats to codecs (bf16 -> u2, f32 -> u4, f64 -> u8)."""
    values = np.random.default_rng(seed).normal(0.0, 0.02, count)
    if dtype == np.uint16:
        return (values.astype(np.float32).view(np.uint32) >> 16).astype(np.uint16)
    return values.astype({np.uint32: np.float32, np.uint64: np.float64}[dtype]).view(dtype)


def encode(array, level=1):
    data, params = codecs.encode(NAME, array, level=level)
    assert params == {}
    return data


def decode(data, dtype, count):
    return codecs.decode(NAME, data, dtype=dtype, count=count, params={})


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.uint32, np.uint64])
@pytest.mark.parametrize("count", [0, 1, 7, 4096, 300_001])
def test_round_trip(dtype, count):
    bits = weights_bits(count, dtype) if dtype != np.uint8 else np.arange(count, dtype=np.uint8)
    assert np.array_equal(decode(encode(bits), dtype, count), bits)


def test_the_payload_is_a_blosc2_chunk_as_spec_says():
    bits = weights_bits(1 << 20, np.uint16)
    data = encode(bits, level=1)
    version, versionlz, flags, typesize, nbytes, blocksize, cbytes = struct.unpack_from("<BBBBiii", data)
    assert version == 5 and versionlz == 1
    assert flags & 0x05 == 0x05 and flags >> 5 == 4 and not flags & 0x10  # extended header, zstd, streams split
    assert typesize == 2 and nbytes == bits.nbytes and cbytes == len(data) and blocksize == min(blosc2_codec.BLOCK_BYTES, nbytes)
    assert list(data[16:22]) == [1, 0, 0, 0, 0, 0]  # the filter pipeline: SHUFFLE only
    # the library itself, not tallzip's decoder, reads it back to the elements' little-endian bytes
    assert blosc2.decompress2(data) == bits.astype("<u2").tobytes()
    # byte-shuffled streams code about as small as planes+zstd (within 1% on these weights)
    planes, _ = codecs.encode("planes+zstd", bits, level=1)
    assert len(data) < 1.01 * len(planes)


def zstd_levels_of_first_stream(data, stream, bits):
    """The zstd levels whose python-zstandard frame equals the chunk's first block's stream `stream`."""
    import zstandard
    first_block = struct.unpack_from("<i", data, 32)[0]
    pos = first_block
    for _ in range(stream + 1):
        size = struct.unpack_from("<i", data, pos)[0]
        frame, pos = bytes(data[pos + 4:pos + 4 + size]), pos + 4 + size
    plane = bits.view(np.uint8).reshape(-1, bits.itemsize)[:, stream].tobytes()
    return {z for z in range(1, 23) if zstandard.ZstdCompressor(level=z).compress(plane) == frame}


@pytest.mark.parametrize("level, zstd_level", [(1, 1), (3, 3), (4, 5), (9, 9), (15, 15), (16, 22), (19, 22)])
def test_the_archive_level_is_zstds_level(level, zstd_level):
    """c-blosc2's clevel is not zstd's level (its c runs zstd at 2c - 1, 9 at 22): the archive's
    zstandard level reaches zstd, checked on the exponent stream's frame against python-zstandard's."""
    bits = weights_bits(200_000, np.uint32)
    data = encode(bits, level=level)
    assert zstd_level in zstd_levels_of_first_stream(data, 3, bits)
    assert np.array_equal(decode(data, np.uint32, bits.size), bits)


def test_several_blosc2_chunks_when_the_array_is_large(monkeypatch):
    monkeypatch.setattr(blosc2_codec, "CHUNK_BYTES", 1 << 16)
    bits = weights_bits(100_003, np.uint32)
    data = encode(bits)
    first = struct.unpack_from("<i", data, 12)[0]
    assert first < len(data)  # more than one chunk
    assert np.array_equal(decode(data, np.uint32, bits.size), bits)


def _patched(data, offset, value):
    out = bytearray(data)
    out[offset] = value
    return bytes(out)


@pytest.mark.parametrize("damage, message", [
    (lambda d: _patched(d, 0, 6), "format version 6"),          # a newer Blosc2 chunk format
    (lambda d: _patched(d, 0, 1), "format version 1"),
    (lambda d: _patched(d, 3, 4), "typesize 4"),
    (lambda d: _patched(d, 16, 2), "filters"),                   # bit-shuffle is not what was written
    (lambda d: _patched(d, 2, (d[2] & 0x1F) | (1 << 5)), "compressor 1"),  # lz4
    (lambda d: _patched(d, 31, 0x01), "dictionary"),
    (lambda d: _patched(d, 31, 0x08), "lazy"),
    (lambda d: d[:20], "truncated"),
    (lambda d: d[:-1], "bytes"),
    (lambda d: d + d, "does not fit"),                          # a second chunk past the array's end
    (lambda d: d + b"\0" * 40, "format version 0"),
])
def test_refuses_what_it_cannot_decode(damage, message):
    bits = weights_bits(5000, np.uint16)
    with pytest.raises(codecs.CodecError, match=message):
        decode(damage(encode(bits)), np.uint16, bits.size)


def test_refuses_a_size_that_is_not_the_arrays():
    bits = weights_bits(5000, np.uint16)
    data = encode(bits)
    with pytest.raises(codecs.CodecError, match="does not fit"):
        decode(data, np.uint16, bits.size - 1)
    with pytest.raises(codecs.CodecError, match="expected"):
        decode(data, np.uint16, bits.size + 1)


def test_damaged_streams_are_a_codec_error_or_caught_by_the_archive_digest():
    """Inside the streams Blosc2 has no checksum (the archive's per-chunk digest is what refuses damaged
    bytes): a flipped byte may decode to other values, but never crashes or overruns the array."""
    bits = weights_bits(20_000, np.uint16)
    data = encode(bits)
    rng = np.random.default_rng(3)
    for _ in range(200):
        damaged = bytearray(data)
        damaged[rng.integers(32, len(data))] ^= 1 << int(rng.integers(0, 8))
        try:
            out = decode(bytes(damaged), np.uint16, bits.size)
        except codecs.CodecError:
            continue
        assert out.shape == bits.shape and out.dtype == bits.dtype
