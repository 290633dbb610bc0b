"""The rivals of tallzip measured on the language family's own files (one function each, as their papers describe).

- bitdelta_rebuild: BitDelta (Liu et al., NeurIPS 2024, arXiv 2402.10193) without its scale distillation: per
  linear matrix of the transformer blocks, the fine-tune's delta kept as its sign bits and one scale, the mean
  |delta| of the matrix (the scale that minimises the L2 error of sign * scale); the embeddings, the LM head and
  the norms are kept in full (16-bit), as the paper keeps them.
- bitx_bytes: BitX (ZipLLM, arXiv 2505.06252): each bf16 weight XORed with the base's, the XOR's exponent byte as
  one stream and its sign + mantissa byte as another, zstd level 3 each; other dtypes XORed and zstd'd whole.
- zipnn: its byte-grouping coder on each file as it is (benchmarks/fixtures/lossless.py; pip zipnn, built from source).
"""
from __future__ import annotations


import numpy as np
import torch
import zstandard


def is_block_linear(name: str, tensor: torch.Tensor) -> bool:
    """A 2-D weight inside the decoder layers (attention and MLP projections): what BitDelta 1-bit codes."""
    return tensor.dim() == 2 and ".layers." in name


def bitdelta_rebuild(base: dict, task: dict) -> tuple[dict, int]:
    """(the rebuilt state dict, the bytes BitDelta stores for this task: sign bits + a bf16 scale per matrix, and
    the other changed tensors in their own 16-bit dtype)."""
    out, nbytes = {}, 0
    for name, value in task.items():
        b = base[name]
        if is_block_linear(name, value):
            delta = value.float() - b.float()
            scale = delta.abs().mean()
            sign = torch.where(delta >= 0, 1.0, -1.0)
            out[name] = (b.float() + scale * sign).to(value.dtype)
            nbytes += (delta.numel() + 7) // 8 + 2
        else:
            out[name] = value
            if not torch.equal(value, b):
                nbytes += value.numel() * value.element_size()
    return out, nbytes


def _zstd3(data: bytes) -> int:
    return len(zstandard.ZstdCompressor(level=3).compress(data))


def bitx_tensor_bytes(base: torch.Tensor, task: torch.Tensor) -> int:
    """BitX-coded bytes of one tensor given the base's."""
    if task.dtype == torch.bfloat16:
        x = (task.view(torch.int16) ^ base.view(torch.int16)).numpy().view(np.uint16).ravel()
        exponent = ((x >> 7) & 0xFF).astype(np.uint8)
        sign_mantissa = (((x >> 8) & 0x80) | (x & 0x7F)).astype(np.uint8)
        return _zstd3(exponent.tobytes()) + _zstd3(sign_mantissa.tobytes())
    raw_t = task.contiguous().view(torch.uint8).numpy()
    raw_b = base.contiguous().view(torch.uint8).numpy()
    return _zstd3((raw_t ^ raw_b).tobytes())


def bitx_bytes(base: dict, task: dict) -> int:
    """A task's BitX bytes: every tensor XOR-coded against the base's (tensors the base lacks: zstd-3 of them)."""
    total = 0
    for name, value in task.items():
        if name in base and base[name].shape == value.shape and base[name].dtype == value.dtype:
            total += bitx_tensor_bytes(base[name], value)
        else:
            total += _zstd3(value.contiguous().view(torch.uint8).numpy().tobytes())
    return total


def bitx_roundtrip(base: torch.Tensor, task: torch.Tensor) -> bool:
    """The two streams put back together and XORed with the base give the task's bits (BitX is lossless)."""
    x = (task.view(torch.int16) ^ base.view(torch.int16)).numpy().view(np.uint16).ravel()
    exponent = ((x >> 7) & 0xFF).astype(np.uint16)
    sign_mantissa = (((x >> 8) & 0x80) | (x & 0x7F)).astype(np.uint16)
    back = ((sign_mantissa & 0x80) << 8) | (exponent << 7) | (sign_mantissa & 0x7F)
    restored = torch.from_numpy(back.view(np.int16).copy()) ^ base.view(torch.int16).reshape(-1)
    return torch.equal(restored, task.view(torch.int16).reshape(-1))
