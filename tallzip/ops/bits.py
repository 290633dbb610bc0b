"""Bit-packed masks as torch tensors, on whatever device the tensors live on.

The layout is numpy's `packbits(..., bitorder="little")`, which is also what the archive's
'bits+zstd' mask codec compresses: element i is bit (i % 8) of byte i // 8, and the last byte's
unused high bits are 0. Packing on a GPU moves an eighth of the bytes a bool mask would.
"""
from __future__ import annotations

import numpy as np
import torch

from tallzip.formats.tensors import torch_bits_dtype

_BIT_WEIGHTS = {}  # device -> uint8 tensor [1, 2, 4, ..., 128]


def _weights(device: torch.device) -> torch.Tensor:
    if device not in _BIT_WEIGHTS:
        _BIT_WEIGHTS[device] = torch.tensor([1 << i for i in range(8)], dtype=torch.uint8, device=device)
    return _BIT_WEIGHTS[device]


def packed_size(count: int) -> int:
    return (count + 7) // 8


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """A flat uint8 tensor of ceil(n / 8) bytes holding the n booleans of `mask`, little bit order."""
    if mask.device.type == "cpu":  # numpy's SIMD loop is ~100x faster than tensor ops on a CPU
        return torch.from_numpy(np.packbits(mask.reshape(-1).numpy(), bitorder="little"))
    return pack_bits_tensor(mask)


def unpack_bits(packed: torch.Tensor, count: int) -> torch.Tensor:
    """The first `count` booleans held by `packed` (the inverse of pack_bits), on packed's device."""
    if packed.numel() < packed_size(count):
        raise ValueError(f"{packed.numel()} bytes hold fewer than {count} bits")
    if packed.device.type == "cpu":
        return torch.from_numpy(np.unpackbits(packed.reshape(-1).numpy(), count=count, bitorder="little").view(bool))
    return unpack_bits_tensor(packed, count)


def pack_bits_tensor(mask: torch.Tensor) -> torch.Tensor:
    """pack_bits with tensor ops only (what runs on a GPU)."""
    flat = mask.reshape(-1)
    pad = -flat.numel() % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    # Each byte is the sum of its bits times 1, 2, ..., 128: no two bits share a weight, so the sum is an OR.
    return (flat.view(-1, 8).to(torch.uint8) * _weights(flat.device)).sum(dim=1, dtype=torch.uint8)


def unpack_bits_tensor(packed: torch.Tensor, count: int) -> torch.Tensor:
    """unpack_bits with tensor ops only (what runs on a GPU)."""
    bits = packed.reshape(-1, 1).bitwise_and(_weights(packed.device)).ne(0)
    return bits.reshape(-1)[:count]


# --- THE bit-select: torch.where(mask, a, b) on the bits ---------------------------------------------
# b ^ (mask * (a ^ b)) vectorizes on a CPU, where torch.where branches per element and runs several times
# slower; it is exact for any dtype (it moves bits, not values). Rebuilds, verify and resident use it.

def bit_select(mask: torch.Tensor, a: torch.Tensor, b: torch.Tensor, *, in_place: bool = False) -> torch.Tensor:
    """torch.where(mask, a, b) for tensors of one dtype; `in_place` writes it into `a` (and returns `a`)."""
    view = torch_bits_dtype(a.element_size())
    a_bits, b_bits = a.view(view), b.view(view)
    if in_place:
        a_bits.bitwise_xor_(b_bits).mul_(mask).bitwise_xor_(b_bits)
        return a
    return (a_bits ^ b_bits).mul_(mask).bitwise_xor_(b_bits).view(a.dtype)


def flip_select_into(out_bits: torch.Tensor, flip_bits: torch.Tensor, mask: torch.Tensor, b_bits: torch.Tensor):
    """The bit-select with a ^ b already computed (`flip_bits`, kept resident): out = b ^ (mask * flip),
    all as integer views of the same width."""
    torch.mul(flip_bits, mask, out=out_bits).bitwise_xor_(b_bits)
