"""Masks coded in groups: what the mtv-context mask codecs (bits-ctx, bits-lvl) share.

A TALL mask bit says whether task t dominates the other tasks at that weight, and the decoder
already holds the multi-task vector: where |mtv| is large one task tends to dominate, where it is
tiny the tasks cancel. So the bits are grouped by a context computed from the mtv alone, each
group is coded with its own probability, and the decoder recomputes the same groups. The codecs
differ only in how they group; this module codes bits that are already grouped.

A grouping is the stable order that sorts the elements by group id, and the group sizes. The
encoder may merge adjacent groups (B of them out of the fine ones, by estimated size, table
included); B = 1 is the plain density, an ideal order-0 coder.

"ctx" payload: crc32 of the mask bit-packed little-endian (u32) | one u16 per non-empty group:
P(bit = 1) x 65536, in 2..65534 | the ANS words. Within a group the bits keep their original
order, are packed eight to a byte, and each byte is coded with the product of eight Bernoulli(p)
probabilities: as good as coding the bits one by one for independent bits, 8x fewer symbols.
Beside "ctx" the codecs have a "zstd" mode (the bits+zstd payload, when zstandard level 1 already
beats the model: masks with long runs) and a "raw" mode (the packed bits alone, for tiny masks
where the crc and the coder's state cost more than the model saves).
"""
from __future__ import annotations

import numpy as np

from tallzip.formats.codecs import ans
from tallzip.formats.codecs.registry import bits_decode, check_crc, crc32, require, zstd_compress

ZSTD_TRIAL_MIN = 4096                   # below this a zstd frame's header outweighs any runs
_Q_MIN, _Q_MAX = 2, 65534               # P(1) x 65536 stays inside these
_BYTE_BITS = ((np.arange(256)[:, None] >> np.arange(8)[None, :]) & 1).astype(bool)  # bit k of byte b


class Grouping:
    """Group ids, the stable order that sorts elements by group, and the group sizes."""

    def __init__(self, groups, n_groups):
        self.groups = groups
        self.order = np.argsort(groups, kind="stable")  # radix sort for 8/16-bit ids
        # the sizes from the sorted ids: cheaper than np.bincount, which widens every id to int64 first
        self.sizes = np.diff(np.searchsorted(groups[self.order], np.arange(n_groups + 1))).astype(np.int64)


def as_flat_mask(array):
    return array.reshape(-1).astype(bool, copy=False)


def byte_probabilities(q):
    """(groups, 256): P(byte value) for eight independent bits that are 1 with probability q / 65536.

    Sequential elementwise products, so every platform computes the same float64 table."""
    p_one = (np.asarray(q, dtype=np.float64) / 65536.0)[:, None]
    probabilities = np.ones((p_one.shape[0], 256))
    for k in range(8):
        probabilities = probabilities * np.where(_BYTE_BITS[None, :, k], p_one, 1.0 - p_one)
    return probabilities


def quantized_probabilities(sizes, ones):
    """P(1) x 65536 of each non-empty group, rounded into 2..65534.

    The bounds cap the cheapest bit at 4.4e-5 bits, so even an all-zero mask stays within the
    archive reader's expansion bound (plain size <= 32768 x stored size + 1 MiB)."""
    nonempty = sizes > 0
    return np.clip(np.rint(ones[nonempty] * 65536.0 / sizes[nonempty]), _Q_MIN, _Q_MAX).astype(np.uint16)


def estimated_bits(sizes, ones, q):
    """Size in bits of the groups coded with table q, plus the table."""
    nonempty = sizes > 0
    n, k = sizes[nonempty].astype(np.float64), ones[nonempty].astype(np.float64)
    p = q.astype(np.float64) / 65536.0
    return float(-(k * np.log2(p) + (n - k) * np.log2(1.0 - p)).sum()) + 16 * q.size


def ones_per_group(sorted_bits, sizes):
    """Ones in each group's run of the sorted bits (count_nonzero per run: 20x faster than reduceat)."""
    bits = sorted_bits.view(np.bool_)
    stops = np.cumsum(sizes)
    return np.array([np.count_nonzero(bits[stop - size:stop]) for size, stop in zip(sizes.tolist(), stops.tolist())], dtype=np.int64)


def _encode_groups(sorted_bits, sizes, q):
    probabilities = byte_probabilities(q)
    jobs, start = [], 0
    for size in sizes[sizes > 0]:
        packed = np.packbits(sorted_bits[start:start + size], bitorder="little").astype(np.int32)
        jobs.append((packed, ans.categorical(probabilities[len(jobs)])))
        start += size
    return ans.encode(jobs)


def _decode_groups(reader, sizes, what):
    q = reader.array("<u2", int(np.count_nonzero(sizes)))
    require(q.size == 0 or (q.min() >= _Q_MIN and q.max() <= _Q_MAX), what, "probability table out of range")
    probabilities = byte_probabilities(q)
    decoder = ans.decoder(reader.rest_as_words())
    sorted_bits = np.empty(int(sizes.sum()), dtype=np.uint8)
    start = 0
    for g, size in enumerate(int(size) for size in sizes[sizes > 0]):
        packed = ans.pop(decoder, ans.categorical(probabilities[g]), (size + 7) // 8)
        sorted_bits[start:start + size] = np.unpackbits(packed.astype(np.uint8), count=size, bitorder="little")
        start += size
    require(decoder.is_empty(), what, "coded words left over")
    return sorted_bits


def mask_payload(mask, sorted_bits, sizes, q):
    crc = np.array([crc32(np.packbits(mask, bitorder="little").tobytes())], dtype="<u4").tobytes()
    return crc + q.astype("<u2").tobytes() + _encode_groups(sorted_bits, sizes, q)


def mask_from_payload(reader, order, sizes, count, dtype, what):
    crc = reader.u32()
    sorted_bits = _decode_groups(reader, sizes, what)
    mask = np.empty(count, dtype=np.uint8)
    mask[order] = sorted_bits
    check_crc(crc, np.packbits(mask, bitorder="little").tobytes(), what)
    return mask.astype(dtype, copy=False)


def best_merge(grouping, mask):
    """(estimated bits, B, merged sizes, q, bits sorted by group) for the best number of merged groups."""
    sorted_bits = mask.view(np.uint8)[grouping.order]
    ones_fine = ones_per_group(sorted_bits, grouping.sizes)
    best = None
    n_groups = grouping.sizes.size
    while n_groups >= 1:
        sizes = grouping.sizes.reshape(n_groups, -1).sum(axis=1)
        ones = ones_fine.reshape(n_groups, -1).sum(axis=1)
        q = quantized_probabilities(sizes, ones)
        bits = estimated_bits(sizes, ones, q)
        if best is None or bits < best[0]:
            best = (bits, n_groups, sizes, q, sorted_bits)
        n_groups //= 2
    return best


def _ctx_payload_bytes(estimated_bits, n_groups):
    """Rough size of a "ctx" payload: crc, table, ANS words (the coder's final state ~ a word more)."""
    return 4 + 2 * n_groups + 4 * (int(estimated_bits) // 32 + 2)


def cheaper_plain_mode(mask, estimated_bits, n_groups, level, threads):
    """(payload, params) of the "raw" or "zstd" mode when it beats the "ctx" estimate, else None."""
    ctx_bytes = _ctx_payload_bytes(estimated_bits, n_groups)
    packed = np.packbits(mask, bitorder="little").tobytes()
    if len(packed) <= ctx_bytes:
        return packed, {"mode": "raw"}
    if mask.size >= ZSTD_TRIAL_MIN and len(zstd_compress(packed, 1)) < ctx_bytes:
        return zstd_compress(packed, level, threads), {"mode": "zstd"}
    return None


def decode_plain_mode(data, params, dtype, count, what):
    """The mask of a "raw" or "zstd" payload, or None for any other params."""
    if params == {"mode": "zstd"}:
        return bits_decode(data, dtype=dtype, count=count)
    if params == {"mode": "raw"}:
        require(len(data) == (count + 7) // 8, what, f"raw mask of {len(data)} bytes for {count} bits")
        return np.unpackbits(np.frombuffer(data, dtype=np.uint8), count=count, bitorder="little").astype(dtype, copy=False)
    return None
