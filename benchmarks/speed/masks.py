"""Pack's mask arithmetic (the sum merge's mtv and every task's TALL mask, bit-packed), per chunk, in
several implementations side by side (issue 21): CPU-seconds of one thread per chunk, median of
--repeats; every result compared bit for bit with the plain numpy formula.

    python -m benchmarks.speed masks                  # ViT-B/32 fp32 and LLM bf16 chunk sizes, N = 8
    python -m benchmarks.speed masks --tasks 8 --repeats 7

The formula (taskvec.tall_mask, strict >, float32 as the authors' code):
    mtv = (t0 - b) + (t1 - b) + ...      m_t = |b - t| > lambda * |(b + mtv) - t|
Implementations:
- numpy slices: today's path (taskvec.sum_and_masks_into over 32K-element slices, inputs widened
  into reused scratch, bfloat16 by shifting its bits), then np.packbits of each mask;
- numexpr: the same slices widened, the mtv and each mask as one numexpr expression (one pass each,
  one thread, preallocated outputs), then np.packbits;
- torch out=: the slice's ops as torch calls into preallocated tensors, then packbits;
- numba fused: one compiled loop per chunk that widens, sums, compares and packs the bits.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

import numpy as np
import torch

SLICE = 1 << 15
SIZES = {"ViT-B/32 fp32 (mlp 3072x768)": (3072 * 768, "fp32"), "LLM bf16 (1024x4096 chunk)": (1024 * 4096, "bf16")}


def make_inputs(count, kind, n_tasks, seed=0):
    """(base, [tasks]) as the readers hand them: float32 arrays, or bfloat16 bits as uint16."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(count, generator=g) * 0.02
    tasks = [base + torch.randn(count, generator=g) * 1e-3 * (1 + t % 3) for t in range(n_tasks)]
    if kind == "bf16":
        def bits(x):
            return x.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
        return bits(base), [bits(t) for t in tasks]
    return base.numpy(), [t.numpy() for t in tasks]


def widened(array):
    if array.dtype == np.uint16:
        return (array.astype(np.uint32) << 16).view(np.float32)
    return array


def reference(base, tasks, lams):
    """The plain numpy formula on whole arrays (float32), masks bit-packed."""
    b = widened(base)
    ts = [widened(t) for t in tasks]
    with np.errstate(all="ignore"):
        mtv = ts[0] - b
        for t in ts[1:]:
            mtv = mtv + (t - b)
        plus = b + mtv
        masks = [np.abs(b - t) > np.float32(lam) * np.abs(plus - t) for t, lam in zip(ts, lams)]
    return mtv, [np.packbits(m, bitorder="little") for m in masks]


def _widen_into(source, out):
    if source.dtype == np.uint16:
        np.left_shift(source, 16, out=out.view(np.uint32), dtype=np.uint32)
    else:
        out[...] = source


def numpy_slices(base, tasks, lams):
    from tallzip.ops import tall
    count, n = base.size, len(tasks)
    mtv = np.empty(count, np.float32)
    masks = np.empty((n, count), bool)
    size = min(SLICE, count)
    wide = np.empty((n + 1, size), np.float32)
    taus, others = np.empty((n, size), np.float32), np.empty((n + 1, size), np.float32)
    lam = np.array(lams, np.float32).reshape(-1, 1)
    with np.errstate(all="ignore"):
        for start in range(0, count, size):
            stop = min(count, start + size)
            k = stop - start
            for row, source in zip(wide, (base, *tasks)):
                _widen_into(source[start:stop], row[:k])
            tall.sum_and_masks_into(wide[0, :k], wide[1:, :k], lam, mtv[start:stop], masks[:, start:stop],
                                       taus[:, :k], others[:, :k])
    return mtv, [np.packbits(m, bitorder="little") for m in masks]


def numexpr_slices(base, tasks, lams, size=SLICE):
    import numexpr
    numexpr.set_num_threads(1)
    count, n = base.size, len(tasks)
    mtv = np.empty(count, np.float32)
    masks = np.empty((n, count), bool)
    size = min(size, count)
    wide = np.empty((n + 1, size), np.float32)
    names = {f"t{i}": None for i in range(n)}
    sum_expr = " + ".join(f"(t{i} - b)" for i in range(n))
    lam32 = [np.float32(x) for x in lams]
    for start in range(0, count, size):
        stop = min(count, start + size)
        k = stop - start
        for row, source in zip(wide, (base, *tasks)):
            _widen_into(source[start:stop], row[:k])
        local = {"b": wide[0, :k], **{f"t{i}": wide[i + 1, :k] for i in range(n)}}
        m = mtv[start:stop]
        numexpr.evaluate(sum_expr, local_dict=local, out=m, casting="same_kind")
        for i in range(n):
            numexpr.evaluate("abs(b - t) > lam * abs((b + m) - t)",
                             local_dict={"b": local["b"], "t": local[f"t{i}"], "lam": lam32[i], "m": m},
                             out=masks[i, start:stop])
    del names
    return mtv, [np.packbits(m, bitorder="little") for m in masks]


def torch_slices(base, tasks, lams):
    count, n = base.size, len(tasks)
    mtv = torch.empty(count, dtype=torch.float32)
    masks = torch.empty((n, count), dtype=torch.bool)
    size = min(SLICE, count)
    wide = torch.empty((n + 1, size), dtype=torch.float32)
    taus, others = torch.empty((n, size)), torch.empty((n + 1, size))
    lam = torch.tensor(lams, dtype=torch.float32).reshape(-1, 1)
    sources = [torch.from_numpy(x.view(np.int16)) if x.dtype == np.uint16 else torch.from_numpy(x) for x in (base, *tasks)]
    for start in range(0, count, size):
        stop = min(count, start + size)
        k = stop - start
        for row, source in zip(wide, sources):
            s = source[start:stop]
            if s.dtype == torch.int16:
                row[:k].copy_(s.view(torch.bfloat16))
            else:
                row[:k].copy_(s)
        b, t = wide[0, :k], wide[1:, :k]
        tau = torch.sub(t, b, out=taus[:, :k])
        m = mtv[start:stop]
        torch.add(tau[0], tau[1], out=m)
        for row in tau[2:]:
            m.add_(row)
        plus = torch.add(b, m, out=others[-1, :k])
        o = torch.sub(plus, t, out=others[:-1, :k]).abs_().mul_(lam)
        torch.gt(tau.abs_(), o, out=masks[:, start:stop])
    mnp = masks.numpy()
    return mtv.numpy(), [np.packbits(m, bitorder="little") for m in mnp]


_NUMBA_KERNEL = None


def _numba_kernel():
    global _NUMBA_KERNEL
    if _NUMBA_KERNEL is None:
        import numba

        @numba.njit(cache=True, nogil=True)
        def kernel(base, tasks, lams, mtv, packed, ones):
            n, count = tasks.shape
            bits = np.zeros(n, np.uint8)
            for byte in range(count // 8):
                bits[:] = 0
                for j in range(8):
                    i = byte * 8 + j
                    b = np.float32(base[i])
                    s = np.float32(tasks[0, i]) - b
                    for t in range(1, n):
                        s = s + (np.float32(tasks[t, i]) - b)
                    mtv[i] = s
                    plus = b + s
                    for t in range(n):
                        x = np.float32(tasks[t, i])
                        if abs(b - x) > lams[t] * abs(plus - x):
                            bits[t] |= np.uint8(1 << j)
                for t in range(n):
                    packed[t, byte] = bits[t]
        _NUMBA_KERNEL = kernel
    return _NUMBA_KERNEL


def numba_fused(base, tasks, lams):
    kernel = _numba_kernel()
    count, n = base.size, len(tasks)
    if base.dtype == np.uint16:  # the kernel reads float32: widen (one pass) -- bf16 path below
        return numba_fused_bf16(base, tasks, lams)
    stack = np.stack(tasks) if not isinstance(tasks, np.ndarray) else tasks
    mtv = np.empty(count, np.float32)
    packed = np.zeros((n, count // 8), np.uint8)
    kernel(base, stack, np.array(lams, np.float32), mtv, packed, np.zeros(n, np.int64))
    return mtv, list(packed)


_NUMBA_BF16 = None


def numba_fused_bf16(base, tasks, lams):
    global _NUMBA_BF16
    if _NUMBA_BF16 is None:
        import numba

        @numba.njit(cache=True, nogil=True)
        def kernel(base, tasks, lams, mtv, packed):
            n, count = tasks.shape
            wide_bits = np.empty(n + 1, np.uint32)
            wide_all = wide_bits.view(np.float32)
            wide = wide_all[1:]
            bits = np.zeros(n, np.uint8)
            for byte in range(count // 8):
                bits[:] = 0
                for j in range(8):
                    i = byte * 8 + j
                    wide_bits[0] = np.uint32(base[i]) << 16
                    for t in range(n):
                        wide_bits[t + 1] = np.uint32(tasks[t, i]) << 16
                    b = wide_all[0]
                    s = wide[0] - b
                    for t in range(1, n):
                        s = s + (wide[t] - b)
                    mtv[i] = s
                    plus = b + s
                    for t in range(n):
                        if abs(b - wide[t]) > lams[t] * abs(plus - wide[t]):
                            bits[t] |= np.uint8(1 << j)
                for t in range(n):
                    packed[t, byte] = bits[t]
        _NUMBA_BF16 = kernel
    count, n = base.size, len(tasks)
    mtv = np.empty(count, np.float32)
    packed = np.zeros((n, count // 8), np.uint8)
    _NUMBA_BF16(base, np.stack(tasks), np.array(lams, np.float32), mtv, packed)
    return mtv, list(packed)


_NUMBA_BLOCKED = None
BLOCK = 4096


def numba_blocked(base, tasks, lams):
    """One compiled pass per cache-sized block: inner loops over elements (SIMD), tasks outer."""
    global _NUMBA_BLOCKED
    if _NUMBA_BLOCKED is None:
        import numba

        @numba.njit(cache=True, nogil=True, boundscheck=False)
        def kernel(base, tasks, lams, mtv, packed, ones, block, is_bf16):
            n, count = len(tasks), base.size
            wide = np.empty((n + 1, block), np.float32)
            plus = np.empty(block, np.float32)
            mask = np.empty(block, np.uint8)
            for start in range(0, count, block):
                k = min(block, count - start)
                if is_bf16:
                    wb = wide.view(np.uint32)
                    for i in range(k):
                        wb[0, i] = np.uint32(base[start + i]) << 16
                    for t in range(n):
                        src = tasks[t]
                        for i in range(k):
                            wb[t + 1, i] = np.uint32(src[start + i]) << 16
                else:
                    for i in range(k):
                        wide[0, i] = base[start + i]
                    for t in range(n):
                        src = tasks[t]
                        for i in range(k):
                            wide[t + 1, i] = src[start + i]
                b = wide[0]
                m = mtv[start:start + k]
                for i in range(k):
                    m[i] = wide[1, i] - b[i]
                for t in range(1, n):
                    x = wide[t + 1]
                    for i in range(k):
                        m[i] = m[i] + (x[i] - b[i])
                for i in range(k):
                    plus[i] = b[i] + m[i]
                for t in range(n):
                    x = wide[t + 1]
                    lam = lams[t]
                    for i in range(k):
                        mask[i] = abs(b[i] - x[i]) > lam * abs(plus[i] - x[i])
                    total = 0
                    for q in range(k // 8):
                        byte = mask[8 * q] | (mask[8 * q + 1] << 1) | (mask[8 * q + 2] << 2) | (mask[8 * q + 3] << 3) \
                            | (mask[8 * q + 4] << 4) | (mask[8 * q + 5] << 5) | (mask[8 * q + 6] << 6) | (mask[8 * q + 7] << 7)
                        packed[t, start // 8 + q] = byte
                    for i in range(k):
                        total += mask[i]
                    ones[t] += total
        _NUMBA_BLOCKED = kernel
    count, n = base.size, len(tasks)
    mtv = np.empty(count, np.float32)
    packed = np.zeros((n, count // 8), np.uint8)
    _NUMBA_BLOCKED(base, tuple(tasks), np.array(lams, np.float32), mtv, packed, np.zeros(n, np.int64), BLOCK, base.dtype == np.uint16)
    return mtv, list(packed)


def numexpr_big(base, tasks, lams):
    return numexpr_slices(base, tasks, lams, size=1 << 18)


IMPLEMENTATIONS = {"numpy slices (today)": numpy_slices, "numexpr slices": numexpr_slices,
                   "numexpr 256K slices": numexpr_big,
                   "torch out=": torch_slices, "numba fused": numba_fused, "numba blocked": numba_blocked}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--only", action="append", help="only these implementations")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    print("$ python -m benchmarks.speed masks " + " ".join(sys.argv[1:] if argv is None else argv))
    lams = [0.2 + 0.05 * (t % 5) for t in range(args.tasks)]
    impls = {k: v for k, v in IMPLEMENTATIONS.items() if not args.only or k in args.only}
    for label, (count, kind) in SIZES.items():
        base, tasks = make_inputs(count, kind, args.tasks)
        want_mtv, want_masks = reference(base, tasks, lams)
        times = {k: [] for k in impls}
        for name, fn in impls.items():  # warm up (numba compiles) and check bit for bit
            mtv, masks = fn(base, tasks, lams)
            same = np.array_equal(mtv.view(np.uint32), want_mtv.view(np.uint32)) and all(
                np.array_equal(a, b) for a, b in zip(masks, want_masks))
            if not same:
                sys.exit(f"{name}: differs from the numpy formula on {label}")
        for _ in range(args.repeats):
            for name, fn in impls.items():
                cpu = time.thread_time()
                fn(base, tasks, lams)
                times[name].append(time.thread_time() - cpu)
        print(f"\n{label}: {count:,} elements per chunk, N = {args.tasks}; CPU ms of one thread per chunk, median of {args.repeats}")
        today = statistics.median(times[next(iter(impls))])
        for name, ts in times.items():
            med = statistics.median(ts)
            print(f"  {name:22} {med * 1e3:8.1f} ms   {today / med:5.2f}x   ({count * (args.tasks + 1) * (2 if kind == 'bf16' else 4) / med / 1e9:.2f} GB/s of inputs)")

