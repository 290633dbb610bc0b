"""The options of the verbs, and their checks, in one place.

What to store (merge method, mtv precision, codecs, zstandard level, chunk size) and how to run (memory
budget, workers, engine, device, progress callback) travel as small frozen dataclasses: `StoreOptions` and
`RunOptions`. Nothing here imports torch: the command line builds its choices from these names before it
loads any model code.
"""
from __future__ import annotations

from tallzip.errors import TallzipError
from tallzip.formats import codecs as codec_registry

MERGE_METHODS = ("sum", "ties")
MTV_DTYPES = ("float32", "bfloat16", "float16")
# bfloat16 by measurement: on the real-data benchmark (8, 14 and 20 tasks) the rebuilt tasks were exactly as
# accurate with a bfloat16 mtv as with float32, for 20-25% fewer archive bytes (benchmarks/RESULTS.md).
DEFAULT_MTV_DTYPE = "bfloat16"
LAMBDA_CANDIDATES = (0.2, 0.3, 0.4, 0.5, 0.6)
DEFAULT_LAMBDA = 0.4
DEFAULT_TIES_DENSITY = 0.2
# the methods of `merge` (tallzip/merging/merge.py), named here so the command line lists them without torch
MERGE_VERB_METHODS = ("task-arithmetic", "ties", "consensus-ta", "consensus-ties", "average")

# Measured side by side (benchmarks/RESULTS.md, "The default codecs and level"): byte planes beat plain
# zstandard by ~10% on float weights; zstandard level 1 is both smaller and faster than level 3 on
# byte planes; and at level 1, bit-packed masks + zstd give an archive within 0.2% of the context
# coders' at level 3 (ViT-B/32, N = 8) for half the pack CPU or less, where the context coders
# (bits-ctx, bits-lvl: ~10% fewer mask bits) cost 2-5x the CPU of all the rest at LLM sizes.
# Floats: blosc2+zstd (issue 21, benchmarks/codec_speed.py) is planes+zstd's byte shuffle and zstd
# done in C: 1.7-2.1x the decode and 1.1-1.3x the encode throughput per CPU-second, for +0.3-0.7% of
# the floats' bytes (+0.46% of an LLM-shaped N = 8 archive).
DEFAULT_CODECS = {"float": "blosc2+zstd", "mask": "bits+zstd", "other": "zstd"}
DEFAULT_LEVEL = 1

# Mask codecs code one bit per element. bits-ctx-prior also needs the earlier tasks' masks to
# decode (no random access), so it is for measuring only and pack does not offer it.
MASK_CODECS = ("bits+zstd", "bits-ctx", "bits-lvl")

# delta codes a tensor given the base: only exact tasks use it (representations.py)
FLOAT_CODECS = tuple(c for c in codec_registry.names() if c not in MASK_CODECS and c not in ("bits-ctx-prior", "delta"))


def checked_codecs(codecs: dict | None) -> dict:
    """DEFAULT_CODECS with the caller's choices for 'float', 'mask' and 'other' sections; refuses a
    codec that cannot code that kind of section."""
    chosen = {**DEFAULT_CODECS, **(codecs or {})}
    unknown = sorted(set(chosen) - set(DEFAULT_CODECS))
    if unknown:
        raise TallzipError(f"codecs: unknown section kind {unknown[0]!r} (expected float, mask or other)")
    for kind, allowed in (("float", FLOAT_CODECS), ("other", FLOAT_CODECS), ("mask", MASK_CODECS)):
        if chosen[kind] not in allowed:
            raise TallzipError(f"{kind} codec {chosen[kind]!r} is not one of {', '.join(allowed)}")
    return chosen


