"""The manifest as stored: JSON bytes, plain (header flags 0) or one zstandard frame (flag bit 0).

Decompression is bounded: the frame must declare its content size, at most MAX_MANIFEST_BYTES
(checked from its header, before anything is allocated), and it is decoded a few compressed bytes
at a time, so a frame that inflates past what it declares is stopped within a few MiB of that.
"""
from __future__ import annotations

import json

import zstandard

from tallzip.formats.container.constants import FLAG_MANIFEST_ZSTD, KNOWN_FLAGS, MANIFEST_ZSTD_LEVEL, MAX_MANIFEST_BYTES
from tallzip.formats.errors import CorruptArchiveError

# Compressed bytes fed per step: zstd expands at most ~32768x (a 4-byte RLE block is 128 KiB), so
# one step yields at most ~4 MiB beyond what was already counted.
_FEED = 128


def encode_manifest(manifest: dict, level: int = MANIFEST_ZSTD_LEVEL) -> tuple[bytes, int]:
    """(stored bytes, header flags) of a manifest: one zstd frame that declares its content size."""
    plain = json.dumps(manifest, separators=(",", ":"), allow_nan=False).encode()
    return zstandard.ZstdCompressor(level=level, write_content_size=True).compress(plain), FLAG_MANIFEST_ZSTD


def check_flags(flags: int, where) -> None:
    if flags & ~KNOWN_FLAGS:
        raise CorruptArchiveError(f"{where}: damaged header (unknown flags {flags:#x})")


def decode_manifest(stored: bytes, flags: int, where) -> bytes | bytearray:
    """The manifest's JSON bytes from its stored bytes (already checked against the header's sha256)."""
    check_flags(flags, where)
    if not flags & FLAG_MANIFEST_ZSTD:
        return stored
    try:
        declared = zstandard.frame_content_size(stored)
    except zstandard.ZstdError:
        raise CorruptArchiveError(f"{where}: damaged archive (manifest is not a zstd frame)") from None
    if declared < 0:  # writers declare it: the decode below is then bounded by it
        raise CorruptArchiveError(f"{where}: damaged archive (manifest frame declares no content size)")
    if declared > MAX_MANIFEST_BYTES:
        raise CorruptArchiveError(f"{where}: damaged archive (manifest frame declares {declared} bytes, "
                                  f"more than {MAX_MANIFEST_BYTES})")
    limit = declared
    decoder = zstandard.ZstdDecompressor().decompressobj()
    out = bytearray()
    fed = 0
    try:
        while fed < len(stored) and not decoder.eof:
            out += decoder.decompress(stored[fed:fed + _FEED])
            fed += _FEED
            if len(out) > limit:
                raise CorruptArchiveError(f"{where}: damaged archive (manifest frame inflates past "
                                          f"{limit} bytes)")
    except zstandard.ZstdError as error:
        raise CorruptArchiveError(f"{where}: damaged archive (manifest frame does not decode: "
                                  f"{str(error).splitlines()[0] if str(error) else 'zstd error'})") from None
    complete = decoder.eof and not decoder.unused_data and fed >= len(stored)
    if not complete or (declared >= 0 and len(out) != declared):
        raise CorruptArchiveError(f"{where}: damaged archive (manifest is not exactly one whole zstd frame)")
    return out  # not copied: json.loads and the value count take a bytearray
