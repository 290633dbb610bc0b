"""CPU seconds of each stage of pack and extract, one thread (`python -m benchmarks.speed --stages`).

The one module of the speed suite that reaches into tallzip's internals (the mask kernel of ops/tall.py, the
Family reader, the codec registry): what a stage costs is not something the public verbs show.
"""
from __future__ import annotations

import math
import time
from pathlib import Path


def measure_stages(base: Path, task_paths: list, n: int = 8, blocks: int = 2) -> dict:
    """CPU seconds of each stage of pack and extract, on one thread, for the tensors of the first
    `blocks` transformer blocks, scaled to a whole checkpoint: what the ratios above are made of."""
    import hashlib
    import numpy as np
    import torch
    from tallzip.ops.tall import masked_tensor
    from tallzip.ops.ties import MtvMerger
    from tallzip.family import Family
    from tallzip.formats import codecs
    from tallzip.formats.tensors import to_bits
    family = Family.open({p.stem: p for p in task_paths[:n]}, base)
    names = [name for name in family.base.names
             if any(f"resblocks.{i}." in name for i in range(blocks)) and family.is_mergeable(name)]
    data = [family.tensors(name) for name in names]
    params = sum(b.numel() for b, _ in data)
    whole = sum(math.prod(family.base.shapes[name]) for name in family.base.names)
    scale = whole / params
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    stages = {"tasks": n, "scaled_from_params": params, "params": whole}
    try:
        merger = MtvMerger(family, "sum", 0.2, torch.device("cpu"), None)
        start = time.thread_time()
        made = [masked_tensor(merger, b, ts, [0.4] * n, torch.device("cpu")) for b, ts in data]
        stages[f"mtv + {n} masks + bit-packing (s)"] = (time.thread_time() - start) * scale
        raw = [to_bits(b) for b, _ in data]
        nbytes = sum(a.nbytes for a in raw)
        for codec in ("zstd", "planes+zstd", "planes+ans"):
            if codec not in codecs.names():
                continue
            start = time.thread_time()
            encoded = [codecs.encode(codec, a, level=3) for a in raw]
            mid = time.thread_time()
            for (data_, params_), a in zip(encoded, raw):
                codecs.decode(codec, data_, dtype=a.dtype, count=a.size, params=params_)
            end = time.thread_time()
            stages[f"{codec} float (MB/s encode, decode, ratio)"] = (
                nbytes / (mid - start) / 1e6, nbytes / (end - mid) / 1e6, sum(len(d) for d, _ in encoded) / nbytes)
        for codec in ("bits+zstd", "bits-ctx"):
            if codec not in codecs.names():
                continue
            enc = dec = 0.0
            size = 0
            for (mtv, packed, _), (b, _) in zip(made, data):
                context = {"mtv": mtv.reshape(-1).numpy(), "shape": tuple(mtv.shape)}
                mask = np.unpackbits(packed[0], count=b.numel(), bitorder="little").view(bool)
                start = time.thread_time()
                payload, params_ = codecs.encode(codec, mask, level=3, context=context)
                mid = time.thread_time()
                codecs.decode(codec, payload, dtype=bool, count=mask.size, params=params_,
                              context={"mtv": mtv.reshape(-1).numpy(), "shape": tuple(mtv.shape)})
                enc, dec, size = enc + mid - start, dec + time.thread_time() - mid, size + len(payload)
            stages[f"{codec} one mask (s encode, s decode, bits/param)"] = (enc * scale, dec * scale, 8 * size / params)
        blob = b"".join(a.tobytes() for a in raw)
        start = time.thread_time()
        hashlib.sha256(blob).hexdigest()
        stages["sha256 (MB/s)"] = len(blob) / (time.thread_time() - start) / 1e6
    finally:
        torch.set_num_threads(before)
    return stages
