"""bits-lvl: a mask coded in groups of fixed |mtv| level buckets, relative to the row's median level.

The successor of bits-ctx (mask_codecs.py) for format v2, where a tensor is coded in chunks: the
same idea (the bits are grouped by the magnitude of the mtv the decoder already holds) at a cost
linear in the chunk and small. No quantiles and no feature choice: one grouping per chunk, from
integer arithmetic on the mtv's bits, built once per context dict and shared by all the tasks and
threads that code with that dict. Measured in benchmarks/RESULTS.md ("Mask codecs by chunk").

Context (the `context` argument of encode and decode; a dict):
  "mtv"        required: the chunk's multi-task vector exactly as the DECODER will hold it, `count`
               elements, flat or shaped: a float16 or float32 array (bfloat16 widened to float32,
               exactly), or a uint16 array of bfloat16 bits with "mtv_dtype": "bfloat16".
  "mtv_dtype"  "bfloat16" when "mtv" holds bfloat16 bits as uint16; otherwise absent.
  "shape"      optional: the chunk's shape (default: the mtv's shape).
The grouping is cached in the dict under "_bits_lvl_cache" while context["mtv"] is the same object
(do not modify it in place); a lock in the dict makes concurrent encoders wait for one build.

Grouping (formats/SPEC.md says the same):
  level   l = (the float32 bits of the mtv & 0x7FFFFFFF) >> 19: exponent and 4 mantissa bits, so
          1/16 octave of |mtv| per level; bfloat16 bits u give l = (u & 0x7FFF) >> 3, the same.
  rows    shape[0] rows of prod(shape[1:]) elements when the shape has 2+ dimensions and rows of at
          least 16 elements; otherwise the whole chunk is one row.
  median  m = the (k // 2)-th smallest level (from 0) of each row of k elements: the row's update
          scale (an output neuron's) varies, and the mask depends on the relative magnitude.
  bucket  b = clip(floor((l - m) / 4) + 32, 0, 63): quarter-octave buckets, 8 octaves either side.
The groups are the 64 buckets in order, each holding its elements in index order; for each task the
encoder merges adjacent buckets into B in {1, 2, 4, ..., 64} groups, whichever is estimated
smallest with its table, and codes them as mask_groups describes.

Params: {"mode": "ctx", "groups": B}, {"mode": "zstd"} or {"mode": "raw"}.
"""
from __future__ import annotations

import threading

import numpy as np

from tallzip.formats.codecs.registry import PayloadReader, decoder_errors_as_codec_errors, register, require
from tallzip.formats.codecs.mask_ctx import context_shape
from tallzip.formats.codecs.mask_groups import (Grouping, as_flat_mask, best_merge, cheaper_plain_mode, decode_plain_mode, mask_from_payload, mask_payload)

BUCKETS = 64
_LEVEL_SHIFT = 19                       # float32 bits >> 19: 8 exponent + 4 mantissa bits
_BUCKET_SHIFT = 2                       # 4 levels (a quarter octave) per bucket
_CENTER = BUCKETS // 2                  # the bucket of the row's median level
_MIN_ROW_LENGTH = 16                    # shorter rows give a noisy median: one row per chunk
_CACHE_KEY, _LOCK_KEY = "_bits_lvl_cache", "_bits_lvl_lock"
ARCHIVE_MTV_DTYPES = ("BF16", "F16", "F32", "F64")


def _context_mtv(context, count, what):
    require(isinstance(context, dict) and "mtv" in context, what, "context['mtv'] (the decoded mtv) is required")
    mtv, mtv_dtype = context["mtv"], context.get("mtv_dtype")
    require(isinstance(mtv, np.ndarray) and mtv.size == count, what, f"context['mtv'] must be an array of {count} elements")
    if mtv_dtype == "bfloat16":
        require(mtv.dtype == np.uint16, what, "context['mtv'] with mtv_dtype 'bfloat16' must hold the bits as uint16")
    else:
        # an archive's chunk context names the mtv's stored dtype beside its float32 widening
        # (formats/chunking.mask_context): the float values are what is read
        require(mtv_dtype in (None, *ARCHIVE_MTV_DTYPES) and mtv.dtype in (np.float16, np.float32), what,
                "context['mtv'] must be float16 or float32 (or uint16 bfloat16 bits with mtv_dtype 'bfloat16')")
    return mtv, context_shape(context, mtv, count, what)


def magnitude_levels(mtv):
    """l = |mtv|'s float32 bits >> 19 (int32, flat), from float16, float32 or bfloat16 bits (uint16)."""
    if mtv.dtype == np.uint16:  # bfloat16: the top half of the float32 bits
        return ((np.ascontiguousarray(mtv).reshape(-1) & np.uint16(0x7FFF)) >> np.uint16(_LEVEL_SHIFT - 16)).astype(np.int32)
    bits = np.ascontiguousarray(mtv, dtype=np.float32).reshape(-1).view(np.uint32) & np.uint32(0x7FFFFFFF)
    bits >>= np.uint32(_LEVEL_SHIFT)
    return bits.view(np.int32)  # < 4096: the same values


def rows_of(shape, count):
    if len(shape) >= 2 and shape[0] > 1 and count // shape[0] >= _MIN_ROW_LENGTH:
        return shape[0]
    return 1


def level_buckets(levels, rows):
    """b = clip(floor((l - row median) / 4) + 32, 0, 63) of every element (uint8, flat)."""
    if levels.size == 0:
        return np.zeros(0, dtype=np.uint8)
    by_row = levels.reshape(rows, -1)
    middle = by_row.shape[1] // 2
    median = np.partition(by_row, middle, axis=1)[:, middle:middle + 1]
    relative = by_row.astype(np.int16)  # levels < 4096: the differences fit, at half the memory traffic
    relative -= median.astype(np.int16)
    relative >>= _BUCKET_SHIFT  # arithmetic shift: floor division
    relative += _CENTER
    np.clip(relative, 0, BUCKETS - 1, out=relative)
    return relative.astype(np.uint8).reshape(-1)


def chunk_grouping(context, count, what):
    """The chunk's grouping, built once per context dict (every task and thread shares it)."""
    mtv, shape = _context_mtv(context, count, what)
    key = (shape, context.get("mtv_dtype"))
    cached = context.get(_CACHE_KEY)
    if cached is None or cached[0] is not mtv or cached[1] != key:
        with context.setdefault(_LOCK_KEY, threading.Lock()):  # setdefault is atomic: one lock per dict
            cached = context.get(_CACHE_KEY)
            if cached is None or cached[0] is not mtv or cached[1] != key:
                buckets = level_buckets(magnitude_levels(mtv), rows_of(shape, count))
                cached = context[_CACHE_KEY] = (mtv, key, Grouping(buckets, BUCKETS))
    return cached[2]


def _bits_lvl_encode(array, *, level, threads, context, **_):
    what = "bits-lvl"
    mask = as_flat_mask(array)
    bits, n_groups, sizes, q, sorted_bits = best_merge(chunk_grouping(context, mask.size, what), mask)
    plain = cheaper_plain_mode(mask, bits, q.size, level, threads)
    if plain is not None:
        return plain
    return mask_payload(mask, sorted_bits, sizes, q), {"mode": "ctx", "groups": n_groups}


@decoder_errors_as_codec_errors("bits-lvl")
def _bits_lvl_decode(data, *, dtype, count, params, context, **_):
    what = "bits-lvl"
    require(isinstance(params, dict), what, "params must be a dict")
    plain = decode_plain_mode(data, params, dtype, count, what)
    if plain is not None:
        return plain
    require(set(params) == {"mode", "groups"} and params["mode"] == "ctx", what, f"bad params {params!r}")
    n_groups = params["groups"]
    require(type(n_groups) is int and n_groups in {1 << k for k in range(7)}, what, "params['groups'] must be 1, 2, 4, ..., 64")
    grouping = chunk_grouping(context, count, what)
    sizes = grouping.sizes.reshape(n_groups, -1).sum(axis=1)
    return mask_from_payload(PayloadReader(data, what), grouping.order, sizes, count, dtype, what)


register("bits-lvl", _bits_lvl_encode, _bits_lvl_decode, uses_context=True)
