"""The `lowrank` representation as the archive stores it (issue 22; SPEC.md "lowrank"). Math only, no I/O.

Per tensor of a task vector, seen as its matrix (m, n) (formats/container/lowrank_layout.py): either rank r > 0,
tau ~ L^T R with L (r, m) the left singular vectors and R (r, n) the rows of S V^T refitted by least squares to tau
given the quantized L, both quantized symmetric round-to-nearest with one scale per vector (ops/lowrank.py); or
rank 0, the q* code (symmetric round-to-nearest, groups along the matrix's rows) of the matrix. The rank is the
smallest whose singular values keep `energy` of ||tau||^2; a matrix whose factors would cost more than its q*
code, a 1-d tensor, or one the options name (quant_tensors), is kept as that q* code.

Decoding runs per chunk of the archive's plan: a chunk [start, start + count) of the flat tensor takes the rows
[start // n, ceil((start + count) / n)) of L^T R (one float32 matrix product of those rows), then its elements.
Every reader (extract, load, resident serving, verify) calls `decode_range` with the archive's chunk plan, so
they agree bit for bit on one machine; BLAS may order the product's sums differently elsewhere.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from tallzip.formats.container.lowrank_layout import stored_matrix
from tallzip.ops.lowrank import LowRankSpec, factorize, rank_for_energy, top_singular
from tallzip.ops.quantize import QuantSpec, quantize

SCALE_TORCH = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}


@dataclass(frozen=True)
class TensorCode:
    """One tensor of a lowrank task: rank (0: the q* code), bits, the codes (int8, flat, in stream order), the
    scales (flat, in the scale dtype) and the relative error ||tau - value|| / ||tau|| of its decode."""
    shape: tuple
    rank: int
    bits: int
    codes: torch.Tensor
    scales: torch.Tensor
    rel_error: float


def quant_code(matrix: torch.Tensor, bits: int, group: int, scale_dtype: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes flat int8, scales flat) of the q{bits} code of a matrix (symmetric rtn, groups along its rows)."""
    q = quantize(matrix, QuantSpec(bits, group, symmetric=True, method="rtn",
                                   scale_dtype=_spec_dtype(scale_dtype)))
    return q.codes.reshape(-1), q.scales.reshape(-1)


def _spec_dtype(scale_dtype: str) -> str:
    return {"BF16": "bfloat16", "F16": "float16", "F32": "float32"}[scale_dtype]


def _fallback_fits(rank: int, m: int, n: int, factor_bits: int, fallback_bits: int, group: int) -> bool:
    """Whether rank-`rank` factors (codes and 16-bit scales) cost less than the q* code of the matrix."""
    factors = rank * ((m + n) * factor_bits + 32)
    fallback = m * n * fallback_bits + m * -(-n // group) * 16
    return factors < fallback


def encode_tensor(tau: torch.Tensor, options, forced_bits: int | None = None, scale_dtype: str = "BF16") -> TensorCode:
    """The stored code of one tensor's task vector (float32 or float64, whole). options: LowRankOptions
    (energy, factor_bits, fallback_bits, group, seed, memory_bytes); forced_bits: keep it as q{bits}."""
    shape = tuple(tau.shape)
    m, n = stored_matrix(shape)
    matrix = tau.reshape(m, n).to(torch.float32)
    rank = 0
    if forced_bits is None and len(shape) >= 2 and m * n:
        bits, fb, group = options.factor_bits, options.fallback_bits, options.group
        cap = 0  # the largest rank cheaper than the q* code: no SVD beyond it is ever used
        while cap < min(m, n) and _fallback_fits(cap + 1, m, n, bits, fb, group):
            cap += 1
        if cap:
            spec = LowRankSpec(budget=None, energy=options.energy, rest_bits=bits, scale_dtype=_spec_dtype(scale_dtype),
                               seed=options.seed, memory_bytes=options.memory_bytes)
            svd = top_singular(matrix, (m, n), min(m, n) if 8 * m * n <= options.memory_bytes else cap,
                               seed=options.seed, memory_bytes=options.memory_bytes)
            energy = float((matrix.to(torch.float64) ** 2).sum())
            wanted = rank_for_energy(svd[1], energy, options.energy)
            if wanted <= cap and energy > 0:
                rank = wanted
    if rank:
        factors = factorize(matrix, rank, spec, svd)
        left, right = factors.left[0], factors.right[0]  # no tiers: one block each
        codes = torch.cat([left.codes.reshape(-1), right.codes.reshape(-1)]).to(torch.int8)
        scales = torch.cat([left.scales.reshape(-1), right.scales.reshape(-1)])
        bits = options.factor_bits
    else:
        bits = forced_bits if forced_bits is not None else options.fallback_bits
        codes, scales = quant_code(matrix, bits, options.group, scale_dtype)
    value = decode_range(codes, scales, shape, rank, options.group, 0, m * n)
    norm = float(matrix.to(torch.float64).norm())
    error = float((matrix.reshape(-1).to(torch.float64) - value.to(torch.float64)).norm())
    return TensorCode(shape, rank, bits, codes, scales, error / norm if norm > 0 else 0.0)


def check_codes(codes: torch.Tensor, scales: torch.Tensor, bits: int) -> bool:
    """Codes within the symmetric grid [-Q, Q] and scales finite and >= 0 (what a decoder may accept)."""
    top = 2 ** (bits - 1) - 1
    scales = scales.to(torch.float32)
    return (codes.numel() == 0 or (int(codes.min()) >= -top and int(codes.max()) <= top)) and \
        bool(torch.isfinite(scales).all()) and not bool((scales < 0).any())


def decode_range(codes: torch.Tensor, scales: torch.Tensor, shape, rank: int, group: int, start: int,
                 count: int) -> torch.Tensor:
    """Elements [start, start + count) of one tensor's decoded task vector, float32, flat. codes, scales: the
    tensor's own part of the streams."""
    m, n = stored_matrix(shape)
    if count == 0:
        return torch.zeros(0, dtype=torch.float32, device=codes.device)
    first, last = start // n, -(-(start + count) // n)
    scales = scales.to(torch.float32)
    if rank:
        left = codes[:rank * m].reshape(rank, m)[:, first:last].to(torch.float32) * scales[:rank, None]
        right = codes[rank * m:].reshape(rank, n).to(torch.float32) * scales[rank:, None]
        rows = left.T @ right
    else:
        groups = -(-n // group)
        rows = codes.reshape(m, n)[first:last].to(torch.float32)
        spread = scales.reshape(m, groups)[first:last].repeat_interleave(group, dim=1)[:, :n]
        rows = rows * spread
    offset = start - first * n
    return rows.reshape(-1)[offset:offset + count].contiguous()


__all__ = ["TensorCode", "encode_tensor", "decode_range", "check_codes", "quant_code", "SCALE_TORCH"]
