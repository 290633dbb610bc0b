"""The `lowrank` representation as the archive stores it (issue 22; SPEC.md "lowrank"). Math only, no I/O.

Per tensor of a task vector, seen as its matrix (m, n) (formats/container/lowrank_layout.py): either rank r > 0,
tau ~ L^T R with L (r, m) the left singular vectors and R (r, n) the rows of S V^T refitted by least squares to tau
given the quantized L, both quantized symmetric round-to-nearest with one scale per vector (ops/lowrank.py); or
rank 0, the q* code (round-to-nearest, groups along the matrix's rows) of the matrix: symmetric at `bits`, or a q*
task's own code where the options name one (`q2`: asymmetric, an offset per group; ops/representations.quant_spec).
The rank is the smallest whose singular values keep `energy` of ||tau||^2; a matrix whose factors would cost more
than its q* code, a 1-d tensor, or one the options name (quant_tensors), is kept as that q* code.

Decoding runs per chunk of the archive's plan: a chunk [start, start + count) of the flat tensor takes the rows
[start // n, ceil((start + count) / n)) of L^T R (one float32 matrix product of those rows), then its elements.
Every reader (extract, load, resident serving, verify) calls `decode_range` with the archive's chunk plan, so
they agree bit for bit on one machine; BLAS may order the product's sums differently elsewhere.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from tallzip.formats.container.lowrank_layout import ASYMMETRIC, SYMMETRIC, stored_matrix
from tallzip.ops.lowrank import LowRankSpec, factorize, rank_for_energy, top_singular
from tallzip.ops.quantize import QuantSpec, quantize
from tallzip.ops.representations import dequantize_chunk, quant_spec

SCALE_TORCH = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}


@dataclass(frozen=True)
class TensorCode:
    """One tensor of a lowrank task: rank (0: the q* code), bits, the codes (int8, flat, in stream order), the
    scales (flat, in the scale dtype; an asymmetric code's offsets after them), the relative error ||tau - value|| /
    ||tau|| of its decode and the grid of a rank-0 code (lowrank_layout: symmetric or asymmetric)."""
    shape: tuple
    rank: int
    bits: int
    codes: torch.Tensor
    scales: torch.Tensor
    rel_error: float
    grid: str = SYMMETRIC


def forced_spec(code: int | str, group: int, scale_dtype: str) -> QuantSpec:
    """The q* code a tensor the options name is kept as: bits b (symmetric round-to-nearest, 2**b - 1 levels), or a
    q* task's code by its name (q8, q4, q3: symmetric; q2: asymmetric), with the lowrank group and scale dtype."""
    if isinstance(code, str):
        return replace(quant_spec(code), group=group, scale_dtype=_spec_dtype(scale_dtype))
    return QuantSpec(code, group, symmetric=True, method="rtn", scale_dtype=_spec_dtype(scale_dtype))


def quant_code(matrix: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor, str]:
    """(codes flat int8, scales flat (then offsets, asymmetric), grid) of a q* code of a matrix (groups along its
    rows): the q* task's quantizer (ops/quantize.py)."""
    q = quantize(matrix, spec)
    if q.offsets is None:
        return q.codes.reshape(-1).to(torch.int8), q.scales.reshape(-1), SYMMETRIC
    return q.codes.reshape(-1).to(torch.int8), torch.cat([q.scales.reshape(-1), q.offsets.reshape(-1)]), ASYMMETRIC


def _spec_dtype(scale_dtype: str) -> str:
    return {"BF16": "bfloat16", "F16": "float16", "F32": "float32"}[scale_dtype]


def _fallback_fits(rank: int, m: int, n: int, factor_bits: int, fallback_bits: int, group: int) -> bool:
    """Whether rank-`rank` factors (codes and 16-bit scales) cost less than the q* code of the matrix."""
    factors = rank * ((m + n) * factor_bits + 32)
    fallback = m * n * fallback_bits + m * -(-n // group) * 16
    return factors < fallback


def encode_tensor(tau: torch.Tensor, options, forced: int | str | None = None, scale_dtype: str = "BF16") -> TensorCode:
    """The stored code of one tensor's task vector (float32 or float64, whole). options: LowRankOptions
    (energy, factor_bits, fallback_bits, group, seed, memory_bytes); forced: keep it as this q* code (forced_spec:
    bits, or a q* task's name such as "q2")."""
    shape = tuple(tau.shape)
    m, n = stored_matrix(shape)
    matrix = tau.reshape(m, n).to(torch.float32)
    rank, grid = 0, SYMMETRIC
    if forced is None and len(shape) >= 2 and m * n:
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
        spec = forced_spec(forced if forced is not None else options.fallback_bits, options.group, scale_dtype)
        codes, scales, grid = quant_code(matrix, spec)
        bits = spec.bits
    value = decode_range(codes, scales, shape, rank, options.group, 0, m * n, grid)
    norm = float(matrix.to(torch.float64).norm())
    error = float((matrix.reshape(-1).to(torch.float64) - value.to(torch.float64)).norm())
    return TensorCode(shape, rank, bits, codes, scales, error / norm if norm > 0 else 0.0, grid)


def check_codes(codes: torch.Tensor, scales: torch.Tensor, bits: int, grid: str = SYMMETRIC) -> bool:
    """Codes within the grid (symmetric [-Q, Q], asymmetric [0, 2^b - 1]), scales finite and >= 0, offsets (the
    second half of an asymmetric code's scales) finite: what a decoder may accept."""
    low, top = (0, 2 ** bits - 1) if grid == ASYMMETRIC else (-(2 ** (bits - 1) - 1), 2 ** (bits - 1) - 1)
    values = scales.to(torch.float32)
    scales = values[:values.numel() // 2] if grid == ASYMMETRIC else values
    return (codes.numel() == 0 or (int(codes.min()) >= low and int(codes.max()) <= top)) and \
        bool(torch.isfinite(values).all()) and not bool((scales < 0).any())


def decode_range(codes: torch.Tensor, scales: torch.Tensor, shape, rank: int, group: int, start: int,
                 count: int, grid: str = SYMMETRIC) -> torch.Tensor:
    """Elements [start, start + count) of one tensor's decoded task vector, float32, flat. codes, scales: the
    tensor's own part of the streams (an asymmetric code's offsets after its scales); a rank-0 code decodes as a q*
    task's chunk does (ops/representations.dequantize_chunk)."""
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
        per_group = scales.reshape(-1, m, groups)[:, first:last]  # [scales] or [scales, offsets]
        offsets = per_group[1] if grid == ASYMMETRIC else None
        rows = dequantize_chunk(codes.reshape(m, n)[first:last], per_group[0], (last - first, n), group, offsets)
    offset = start - first * n
    return rows.reshape(-1)[offset:offset + count].contiguous()


__all__ = ["TensorCode", "encode_tensor", "decode_range", "check_codes", "quant_code", "forced_spec", "SCALE_TORCH"]
