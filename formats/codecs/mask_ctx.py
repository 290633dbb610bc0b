"""Mask codecs of format v1: bits grouped by quantiles of the mtv's magnitude (mask_groups codes them).

    bits-ctx        masks: groups at the quantiles of |mtv| or of |mtv| relative to its row
    bits-ctx-prior  masks: also by earlier tasks' masks (breaks random access; measurement only)

Their groupings sort whole tensors (an int64 permutation per feature); format v2 writes bits-lvl
(mask_levels.py) instead, and these stay so that v1 archives decode exactly as before.

Context contract (the `context` argument of encode and decode; a dict):
  "mtv"          required: this tensor's multi-task vector exactly as the DECODER will hold it, a
                 numpy float array of `count` elements, flat or in the tensor's shape (float16 and
                 bfloat16-as-float32 are widened to float32, exactly). If the archive stores the
                 mtv at reduced precision, the encoder must pass the decoded (rounded) values.
  "shape"        optional: the tensor's shape (default: the mtv's shape). With 2+ dimensions,
                 shape[0] rows of at least 16 elements, the "row" feature becomes available.
  "prior_masks"  "bits-ctx-prior" only: the masks of the earlier tasks of this tensor, in order.
The codec stores what it derives from the mtv in the dict under "_bits_ctx_cache" and reuses it
while context["mtv"] is the same object: pass one dict per tensor for all its tasks, and do not
modify the mtv in place. A decoder with a fresh dict gets the same result.

Features (integer arithmetic only, so the groups are identical on every platform):
  "abs": the magnitude level of the mtv = its float32 bits without the sign >> 19 (exponent plus
         4 mantissa bits: 1/16 octave); NaN and inf are just large levels.
  "row": that level minus the median level of its row (shape[0] rows): the update scale of a row
         (an output neuron) varies, and the mask depends on the relative magnitude.
A feature is cut into 64 fine groups at its quantiles (an exact integer histogram; equal values
always share a group, so ties are harmless), and for each task the encoder picks the feature and
the number of merged groups B in {1, 2, 4, ..., 64} with the smallest estimated size.

"bits-ctx" params: {"mode": "ctx", "feature": "abs" | "row", "groups": B}, {"mode": "zstd"} or
{"mode": "raw"} (see mask_groups).

"bits-ctx-prior" (measurement only: decoding task t needs the masks of tasks 0..t-1): groups = 16
quantile groups of "abs" x the number of earlier tasks whose mask is set at that weight. Params
{"mode": "ctx", "priors": number of earlier masks}; same payload.
"""
from __future__ import annotations

import threading

import numpy as np

from tallzip.formats.codecs.registry import CodecError, PayloadReader, decoder_errors_as_codec_errors, register, require
from tallzip.formats.codecs.mask_groups import (Grouping, as_flat_mask, best_merge, cheaper_plain_mode, decode_plain_mode, mask_from_payload, mask_payload, ones_per_group, quantized_probabilities)

FINE_GROUPS = 64
_LEVEL_SHIFT = 19                       # float32 bits >> 19: 8 exponent + 4 mantissa bits
_LEVELS = 1 << (31 - _LEVEL_SHIFT)      # 4096 magnitude levels
_MIN_ROW_LENGTH = 16                    # shorter rows give a noisy median: "abs" only
_PRIOR_ABS_GROUPS = 16


def _mtv_levels(mtv):
    magnitude_bits = np.ascontiguousarray(mtv, dtype=np.float32).reshape(-1).view(np.uint32) & np.uint32(0x7FFFFFFF)
    return (magnitude_bits >> np.uint32(_LEVEL_SHIFT)).astype(np.int32)


def _row_relative_levels(levels, rows):
    by_row = levels.reshape(rows, -1)
    middle = by_row.shape[1] // 2
    row_median = np.partition(by_row, middle, axis=1)[:, middle:middle + 1]
    return (by_row - row_median + _LEVELS).reshape(-1)  # 1 .. 2 * _LEVELS - 1


def _fine_groups(feature, n_values):
    """Group 0..63 of every element, cut at the quantiles of an integer feature in [0, n_values)."""
    histogram = np.bincount(feature, minlength=n_values)
    before = np.concatenate(([0], np.cumsum(histogram)[:-1]))
    group_of_value = np.minimum(before * FINE_GROUPS // max(feature.size, 1), FINE_GROUPS - 1).astype(np.uint8)
    return group_of_value[feature]


def context_mtv_and_shape(context, count, what):
    require(isinstance(context, dict) and "mtv" in context, what, "context['mtv'] (the decoded mtv) is required")
    mtv = context["mtv"]
    require(isinstance(mtv, np.ndarray) and mtv.dtype.kind == "f" and mtv.dtype.itemsize <= 4 and mtv.size == count,
            what, f"context['mtv'] must be a float array (at most 32-bit) of {count} elements")
    return mtv, context_shape(context, mtv, count, what)


def context_shape(context, mtv, count, what):
    try:
        shape = tuple(int(d) for d in context.get("shape", mtv.shape))
    except (TypeError, ValueError):
        raise CodecError(f"{what}: context['shape'] must be a sequence of ints") from None
    require(all(d >= 0 for d in shape) and int(np.prod(shape, dtype=np.int64)) == count, what,
            f"context['shape'] {shape} does not hold {count} elements")
    return shape


def features_for(shape):
    rows = shape[0] if len(shape) >= 2 else 1
    if rows > 1 and int(np.prod(shape[1:], dtype=np.int64)) >= _MIN_ROW_LENGTH:
        return ("abs", "row")
    return ("abs",)


def mtv_grouping(context, count, feature, what):
    """The fine grouping by one feature, cached in the context dict (all tasks of a tensor share it;
    a lock in the dict makes concurrent encoders wait for one build instead of each building it)."""
    mtv, shape = context_mtv_and_shape(context, count, what)
    require(feature in features_for(shape), what, f"feature {feature!r} is not available for shape {shape}")
    with context.setdefault("_bits_ctx_lock", threading.Lock()):  # setdefault is atomic: one lock per dict
        cache = context.get("_bits_ctx_cache")
        if not isinstance(cache, dict) or cache.get("mtv") is not mtv or cache.get("shape") != shape:
            cache = context["_bits_ctx_cache"] = {"mtv": mtv, "shape": shape}
        if feature not in cache:
            if "levels" not in cache:
                cache["levels"] = _mtv_levels(mtv)
            if feature == "abs":
                fine = _fine_groups(cache["levels"], _LEVELS)
            else:
                fine = _fine_groups(_row_relative_levels(cache["levels"], shape[0]), 2 * _LEVELS)
            cache[feature] = Grouping(fine, FINE_GROUPS)
        return cache[feature]


def _bits_ctx_encode(array, *, level, threads, context, **_):
    what = "bits-ctx"
    mask = as_flat_mask(array)
    _, shape = context_mtv_and_shape(context, mask.size, what)
    best = None
    for feature in features_for(shape):
        bits, n_groups, sizes, q, sorted_bits = best_merge(mtv_grouping(context, mask.size, feature, what), mask)
        if best is None or bits < best[0]:
            best = (bits, feature, n_groups, sizes, q, sorted_bits)
    bits, feature, n_groups, sizes, q, sorted_bits = best
    plain = cheaper_plain_mode(mask, bits, q.size, level, threads)
    if plain is not None:
        return plain
    return mask_payload(mask, sorted_bits, sizes, q), {"mode": "ctx", "feature": feature, "groups": n_groups}


@decoder_errors_as_codec_errors("bits-ctx")
def _bits_ctx_decode(data, *, dtype, count, params, context, **_):
    what = "bits-ctx"
    require(isinstance(params, dict), what, "params must be a dict")
    plain = decode_plain_mode(data, params, dtype, count, what)
    if plain is not None:
        return plain
    require(set(params) == {"mode", "feature", "groups"} and params["mode"] == "ctx", what, f"bad params {params!r}")
    n_groups = params["groups"]
    require(type(n_groups) is int and n_groups in {1 << k for k in range(7)}, what, "params['groups'] must be 1, 2, 4, ..., 64")
    require(params["feature"] in ("abs", "row"), what, f"unknown feature {params['feature']!r}")
    grouping = mtv_grouping(context, count, params["feature"], what)
    sizes = grouping.sizes.reshape(n_groups, -1).sum(axis=1)
    return mask_from_payload(PayloadReader(data, what), grouping.order, sizes, count, dtype, what)


def _prior_grouping(context, count, what):
    prior = context.get("prior_masks") if isinstance(context, dict) else None
    require(isinstance(prior, (list, tuple)) and all(isinstance(m, np.ndarray) and m.size == count for m in prior),
            what, f"context['prior_masks'] must be a list of masks of {count} elements")
    n_groups = _PRIOR_ABS_GROUPS * (len(prior) + 1)
    require(n_groups < 1 << 16, what, "too many prior masks")
    magnitude = mtv_grouping(context, count, "abs", what).groups // (FINE_GROUPS // _PRIOR_ABS_GROUPS)
    set_before = np.zeros(count, dtype=np.uint16)
    for earlier in prior:
        set_before += as_flat_mask(earlier)
    # uint16 ids keep numpy's stable argsort a radix sort
    return Grouping(magnitude.astype(np.uint16) * np.uint16(len(prior) + 1) + set_before, n_groups), len(prior)


def _bits_ctx_prior_encode(array, *, context, **_):
    mask = as_flat_mask(array)
    grouping, n_prior = _prior_grouping(context, mask.size, "bits-ctx-prior")
    sorted_bits = mask.view(np.uint8)[grouping.order]
    q = quantized_probabilities(grouping.sizes, ones_per_group(sorted_bits, grouping.sizes))
    return mask_payload(mask, sorted_bits, grouping.sizes, q), {"mode": "ctx", "priors": n_prior}


@decoder_errors_as_codec_errors("bits-ctx-prior")
def _bits_ctx_prior_decode(data, *, dtype, count, params, context, **_):
    what = "bits-ctx-prior"
    require(isinstance(params, dict) and set(params) == {"mode", "priors"} and params["mode"] == "ctx", what, f"bad params {params!r}")
    grouping, n_prior = _prior_grouping(context, count, what)
    require(params["priors"] == n_prior, what, f"coded with {params['priors']} earlier masks, the context has {n_prior}")
    return mask_from_payload(PayloadReader(data, what), grouping.order, grouping.sizes, count, dtype, what)


register("bits-ctx", _bits_ctx_encode, _bits_ctx_decode, uses_context=True)
register("bits-ctx-prior", _bits_ctx_prior_encode, _bits_ctx_prior_decode, uses_context=True)
