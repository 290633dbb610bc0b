"""A task's chunk rebuilt from the base, the mtv and its bit-packed mask: taskvec.rebuild, fed the
mask as the archive stores it, on the device that does the work."""
from __future__ import annotations

import numpy as np
import torch

from tallzip.ops import taskvec
from tallzip.ops.bits import bit_select, unpack_bits


def rebuild_from_bits(base: torch.Tensor, bits: np.ndarray, mtv: torch.Tensor, device: torch.device,
                      out: torch.Tensor | None = None) -> torch.Tensor:
    """taskvec.rebuild(base, mask, mtv) with the mask given bit-packed; computed on `device`, where
    the packed mask is unpacked (an eighth of the bytes of a bool mask cross to a GPU). `mtv` may
    be in its stored dtype or the compute dtype: the sum is taken in the compute dtype either way.
    On a CPU, `out` (base's shape and dtype) receives the result: a chunk rebuilt straight into the
    task's tensor costs no chunk-sized allocation (its page faults) and no copy (issue 21)."""
    count = base.numel()
    if device.type == "cpu":
        mask = torch.from_numpy(np.unpackbits(bits, count=count, bitorder="little").view(bool)).view(base.shape)
        if mtv.dtype == base.dtype:
            # float32, or a bfloat16/float16 base and mtv: torch adds these by widening to float32
            # and rounding the sum back, exactly taskvec.rebuild's (base + mtv).to(base.dtype), in
            # half the bytes and with no float32 temporaries
            out = torch.add(base, mtv.reshape(base.shape), out=out)
        else:
            wide = torch.add(taskvec.as_compute(base), mtv.reshape(base.shape))
            if out is not None:
                out.copy_(wide)
            else:
                out = wide.to(base.dtype) if wide.dtype != base.dtype else wide
        # the unmasked entries then take the base's bits back: where(mask, out, base), as a bit-select
        return bit_select(mask, out, base, in_place=True)
    packed = torch.empty(bits.shape, dtype=torch.uint8, pin_memory=True)
    packed.numpy()[:] = bits
    mask = unpack_bits(packed.to(device, non_blocking=True), count).view(base.shape)
    return taskvec.rebuild(base.to(device, non_blocking=True), mask, mtv.to(device, non_blocking=True))
