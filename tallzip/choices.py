"""The choices and defaults that pack and merge offer, in one torch-free place: the `tallzip` command builds
its options from them before any heavy import (packing and merging use the same names)."""
from __future__ import annotations

from .formats.codecs import names as codec_names

MERGE_METHODS = ("sum", "ties")
MTV_DTYPES = ("float32", "bfloat16", "float16")
# bfloat16 by measurement: on the real-data benchmark (8, 14 and 20 tasks) the rebuilt tasks were exactly as
# accurate with a bfloat16 mtv as with float32, for 20-25% fewer archive bytes (benchmarks/RESULTS.md).
DEFAULT_MTV_DTYPE = "bfloat16"
# Measured side by side in benchmarks/defaults.py (benchmarks/RESULTS.md): byte planes beat plain
# zstandard by ~10% on float weights; zstandard level 1 is both smaller and faster than level 3 on
# byte planes; and at level 1, bit-packed masks + zstd give an archive within 0.2% of the context
# coders' at level 3 (ViT-B/32, N = 8) for half the pack CPU or less, where the context coders
# (bits-ctx, bits-lvl: ~10% fewer mask bits) cost 2-5x the CPU of all the rest at LLM sizes.
DEFAULT_CODECS = {"float": "planes+zstd", "mask": "bits+zstd", "other": "zstd"}
DEFAULT_LEVEL = 1
# Mask codecs code one bit per element. bits-ctx-prior also needs the earlier tasks' masks to
# decode (no random access), so it is for measuring only and pack does not offer it.
MASK_CODECS = ("bits+zstd", "bits-ctx", "bits-lvl")
# delta codes a tensor given the base: only exact tasks use it (representations.py)
FLOAT_CODECS = tuple(c for c in codec_names() if c not in MASK_CODECS and c not in ("bits-ctx-prior", "delta"))
# merge: the methods of one merged model (merging.py)
MODEL_MERGE_METHODS = ("task-arithmetic", "ties", "consensus-ta", "consensus-ties", "average")
