"""Codecs: how one section's array becomes bytes and back.

registry.py sits at the bottom of the import graph (registry, dispatch, shared payload helpers and the plain
codecs raw, zstd, bits+zstd); each other module imports it and registers its codecs. Importing this package
imports them all, so every codec is registered before any archive is read or written.
"""
from tallzip.formats.codecs import blosc2_zstd, delta, floats, mask_ctx, mask_levels  # noqa: F401 - imported to register
from tallzip.formats.codecs.registry import (CodecError, codes_packed_bits, decode, decode_packed, encode,  # noqa: F401
                                            encode_packed, names, uses_context)
