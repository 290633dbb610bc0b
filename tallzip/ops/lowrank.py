"""Low-rank task representations (issue 22): quantized top singular triplets of a task's matrices. Math only.

A tensor of shape (d0, d1, ...) with at least two dimensions is seen as the matrix (d0, d1*...) and kept as its
top singular triplets, tau ~ U_r (S_r V_r^T): U's columns and the rows of B = S V^T are quantized per vector (one
scale each, symmetric round to nearest, or the q* quantizers' error-minimising clip search "mse"), with mixed
precision along the spectrum allowed (more bits for the leading vectors, as Delta-CoMe does). The rank comes from
a bit budget per weight or from an energy fraction; with `refit`, B is the least-squares fit to tau given the
quantized U (it absorbs U's rounding). The SVD is exact when the matrix fits the memory budget and otherwise a
randomized SVD with a fixed seed (deterministic), reading the matrix in chunks of rows. Tensors with fewer than
two dimensions, and matrices whose rank the budget cannot hold, fall back to a q* quantizer (of the matrix view,
so groups run along the input dimensions); an optional residual (q* or a sign code, tallzip/ops/signcode.py)
stores what the factors miss.
"""
from __future__ import annotations

import heapq
import math
from dataclasses import dataclass, field
from typing import Callable, Union

import torch

from tallzip.ops.quantize import QuantSpec, Quantized, dequantize, quantize, storage_bits
from tallzip.ops.signcode import (SCALE_BITS, SignCode, SignSpec, check_finite_float, sign_dequantize, sign_quantize,
                                   sign_storage_bits)

Rows = Union[torch.Tensor, Callable[[int, int], torch.Tensor]]


def _row_chunks(rows: int, cols: int, memory_bytes: int) -> list[tuple[int, int]]:
    step = max(1, memory_bytes // max(1, 8 * cols))
    return [(start, min(rows, start + step)) for start in range(0, rows, step)]


def top_singular(matrix: Rows, shape: tuple[int, int], k: int, *, seed: int = 0, oversample: int = 8,
                 power_iters: int = 2, memory_bytes: int = 256 << 20) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(U (m, k), S (k,), Vh (k, n)), float64, of the top k singular triplets of an (m, n) matrix, given as a
    tensor or as a function rows(start, stop) returning those rows. Exact (LAPACK) when the matrix fits
    `memory_bytes` as float64; otherwise a randomized SVD (Halko et al.: a Gaussian sketch drawn from a
    generator seeded with `seed`, `power_iters` power iterations with re-orthonormalization) that reads the
    matrix in chunks of rows of at most `memory_bytes`. Deterministic either way: the same input gives the same
    factors. Signs are fixed so that each column of U has its largest-magnitude entry positive."""
    m, n = shape
    k = max(0, min(k, m, n))
    read = matrix if callable(matrix) else (lambda start, stop: matrix[start:stop])
    if k == 0:
        return torch.zeros(m, 0, dtype=torch.float64), torch.zeros(0, dtype=torch.float64), torch.zeros(0, n, dtype=torch.float64)
    if 8 * m * n <= memory_bytes:
        full = read(0, m).to(torch.float64)
        u, s, vh = torch.linalg.svd(full, full_matrices=False)
        u, s, vh = u[:, :k], s[:k], vh[:k]
    else:
        chunks = _row_chunks(m, n, memory_bytes)
        width = min(k + oversample, m, n)

        def times(x):  # A @ x, (m, width)
            return torch.cat([read(a, b).to(torch.float64) @ x for a, b in chunks])

        def times_t(y):  # A^T @ y, (n, width)
            total = torch.zeros(n, y.shape[1], dtype=torch.float64)
            for a, b in chunks:
                total += read(a, b).to(torch.float64).T @ y[a:b]
            return total

        generator = torch.Generator().manual_seed(seed)
        sketch = torch.randn(n, width, generator=generator, dtype=torch.float64)
        q = torch.linalg.qr(times(sketch)).Q
        for _ in range(power_iters):
            q = torch.linalg.qr(times(torch.linalg.qr(times_t(q)).Q)).Q
        small_u, s, vh = torch.linalg.svd(times_t(q).T, full_matrices=False)
        u = q @ small_u
        u, s, vh = u[:, :k], s[:k], vh[:k]
    # A canonical sign per triplet, so that the factors do not depend on LAPACK's sign choice.
    pivot = u.abs().argmax(dim=0)
    flip = torch.sign(u[pivot, torch.arange(k)])
    flip = torch.where(flip == 0, torch.ones_like(flip), flip)
    return u * flip, s, vh * flip[:, None]


# --------------------------------------------------------------------------- low-rank factors


@dataclass(frozen=True)
class LowRankSpec:
    """How a task's matrices are kept as quantized top singular triplets.

    budget: bits per weight of each matrix for its factors (codes and scales), or None to use `energy`: the
    smallest rank whose singular values hold that fraction of ||tau||^2. tiers: ((count, bits), ...) for the
    leading triplets, the rest at rest_bits (each in 8, 4, 3, 2). allocation "tensor" spends the budget per
    matrix; "task" spends the task's whole budget where it buys the most energy per bit. fallback: the q*
    quantizer of tensors with fewer than two dimensions and of matrices left without a rank; residual: a q*
    or sign code of what the factors miss (None: nothing)."""

    budget: float | None = 1.0
    energy: float | None = None
    tiers: tuple = ()
    rest_bits: int = 8
    scale_dtype: str = "bfloat16"
    factor_method: str = "rtn"
    factor_group: int | None = None
    refit: bool = True
    allocation: str = "tensor"
    max_rank: int | None = None
    fallback: QuantSpec = field(default_factory=lambda: QuantSpec(4, 128))
    residual: QuantSpec | SignSpec | None = None
    seed: int = 0
    oversample: int = 8
    power_iters: int = 2
    memory_bytes: int = 256 << 20

    def __post_init__(self):
        if (self.budget is None) == (self.energy is None):
            raise ValueError("give exactly one of budget (bits per weight) and energy (a fraction)")
        if self.budget is not None and not self.budget >= 0:
            raise ValueError(f"budget must be >= 0 bits per weight, got {self.budget!r}")
        if self.energy is not None and not 0.0 < self.energy <= 1.0:
            raise ValueError(f"energy must be in (0, 1], got {self.energy!r}")
        for count, bits in self.tiers:
            if type(count) is not int or count < 1:
                raise ValueError(f"a tier's count must be a positive integer, got {count!r}")
            QuantSpec(bits, None)
        QuantSpec(self.rest_bits, self.factor_group, method=self.factor_method)
        if self.allocation not in ("tensor", "task"):
            raise ValueError(f"allocation must be 'tensor' or 'task', got {self.allocation!r}")
        if self.allocation == "task" and self.budget is None:
            raise ValueError("allocation 'task' spends a budget: give budget, not energy")

    def bits_of(self, index: int) -> int:
        """The bits of triplet `index` (0 = the largest singular value)."""
        for count, bits in self.tiers:
            if index < count:
                return bits
            index -= count
        return self.rest_bits

    def triplet_bits(self, index: int, m: int, n: int) -> int:
        """Stored bits of triplet `index` of an (m, n) matrix: its two vectors' codes and their scales (one per
        vector, or per factor_group elements of it)."""
        scales = 2 if self.factor_group is None else -(-m // self.factor_group) + -(-n // self.factor_group)
        return (m + n) * self.bits_of(index) + scales * SCALE_BITS[self.scale_dtype]

    def label(self) -> str:
        rank = f"{self.budget:g}b" if self.budget is not None else f"e{self.energy:g}"
        tiers = "".join(f"{bits}x{count}+" for count, bits in self.tiers) + f"{self.rest_bits}"
        extra = ("" if self.refit else "-norefit") + ("-task" if self.allocation == "task" else "")
        extra += ("" if self.factor_method == "rtn" else f"-{self.factor_method}") + \
            ("" if self.factor_group is None else f"-g{self.factor_group}")
        residual = "" if self.residual is None else f"+res[{self.residual.label()}]"
        return f"lowrank-{rank}-f{tiers}{extra}{residual}"


def matrix_shape(shape) -> tuple[int, int] | None:
    """(d0, d1*...) for a tensor of two or more dimensions (the output x input view), None otherwise."""
    shape = tuple(shape)
    return (shape[0], math.prod(shape[1:])) if len(shape) >= 2 else None


def matrix_view(tau: torch.Tensor) -> torch.Tensor:
    """A tensor of two or more dimensions as its (d0, d1*...) matrix (so that a fallback q* code groups along
    the input dimensions, not along a short last axis such as a 7-wide kernel row); others unchanged."""
    shape = matrix_shape(tau.shape)
    return tau if shape is None else tau.reshape(shape)


def rank_for_budget(spec: LowRankSpec, m: int, n: int, bits: float) -> int:
    """The largest rank whose triplets fit `bits` (capped at min(m, n) and spec.max_rank)."""
    cap = min(m, n) if spec.max_rank is None else min(m, n, spec.max_rank)
    rank, spent = 0, 0
    while rank < cap:
        cost = spec.triplet_bits(rank, m, n)
        if spent + cost > bits:
            break
        spent += cost
        rank += 1
    return rank


def rank_for_energy(singular_values: torch.Tensor, total_energy: float, fraction: float) -> int:
    """The smallest rank whose squared singular values reach `fraction` of `total_energy` (= ||tau||_F^2)."""
    if total_energy <= 0:
        return 0
    cumulative = torch.cumsum(singular_values.to(torch.float64) ** 2, 0)
    reached = (cumulative >= fraction * total_energy * (1 - 1e-12)).nonzero()
    return int(reached[0]) + 1 if len(reached) else len(singular_values)


def allocate_ranks(spectra: dict, shapes: dict, spec: LowRankSpec, total_bits: float) -> dict:
    """Ranks per matrix spending `total_bits` greedily: the next triplet of whichever matrix gains the most
    squared singular value per stored bit (each matrix's triplets in order). spectra: name -> singular values
    (descending); shapes: name -> (m, n). Ties go to the name first in sorted order."""
    ranks = {name: 0 for name in spectra}
    heap = []

    def push(name):
        index = ranks[name]
        values = spectra[name]
        m, n = shapes[name]
        cap = min(len(values), m, n, spec.max_rank if spec.max_rank is not None else len(values))
        if index < cap:
            cost = spec.triplet_bits(index, m, n)
            heapq.heappush(heap, (-float(values[index]) ** 2 / cost, name, cost))

    for name in sorted(spectra):
        push(name)
    spent = 0.0
    while heap:
        _, name, cost = heapq.heappop(heap)
        if spent + cost > total_bits:
            continue  # this matrix's next triplet does not fit; a cheaper one elsewhere might
        spent += cost
        ranks[name] += 1
        push(name)
    return ranks


@dataclass
class Factors:
    """tau (seen as its (m, n) matrix) ~ left^T @ right: left holds U's columns as rows, right the rows of
    S V^T, each a list of per-tier Quantized blocks (one scale per vector)."""

    shape: tuple
    left: list
    right: list

    @property
    def rank(self) -> int:
        return sum(block.codes.shape[0] for block in self.left)


def _quantize_vectors(vectors: torch.Tensor, spec: LowRankSpec) -> list:
    """Rows of `vectors` quantized (one scale per row, or per factor_group), in tiers of the spec's bits."""
    blocks, start = [], 0
    while start < vectors.shape[0]:
        bits = spec.bits_of(start)
        stop = start + 1
        while stop < vectors.shape[0] and spec.bits_of(stop) == bits:
            stop += 1
        blocks.append(quantize(vectors[start:stop].to(torch.float32).contiguous(),
                               QuantSpec(bits, spec.factor_group, method=spec.factor_method,
                                         scale_dtype=spec.scale_dtype)))
        start = stop
    return blocks


def _stack(blocks: list, width: int) -> torch.Tensor:
    if not blocks:
        return torch.zeros(0, width, dtype=torch.float32)
    return torch.cat([dequantize(block) for block in blocks])


def factorize(tau: torch.Tensor, rank: int, spec: LowRankSpec, svd=None) -> Factors:
    """The rank-`rank` factors of tau, quantized (svd: its top_singular result, if already computed)."""
    check_finite_float(tau, "factorize")
    m, n = matrix_shape(tau.shape)
    matrix = tau.reshape(m, n)
    if svd is None or svd[1].shape[0] < rank:
        svd = top_singular(matrix, (m, n), rank, seed=spec.seed, oversample=spec.oversample,
                           power_iters=spec.power_iters, memory_bytes=spec.memory_bytes)
    u, s, vh = (part for part in svd)
    u, s, vh = u[:, :rank], s[:rank], vh[:rank]
    left = _quantize_vectors(u.T, spec)
    if spec.refit and rank:
        # B = argmin ||tau - U_q B||: the normal equations (U_q^T U_q) B = U_q^T tau, accumulated over chunks
        # of rows so that a large matrix is never held in float64 at once.
        uq = _stack(left, m).T.to(torch.float64)
        gram = uq.T @ uq
        rhs = torch.zeros(rank, n, dtype=torch.float64)
        for start, stop in _row_chunks(m, n, spec.memory_bytes):
            rhs += uq[start:stop].T @ matrix[start:stop].to(torch.float64)
        right_values = torch.linalg.solve(gram, rhs)
    else:
        right_values = s[:, None] * vh
    return Factors(tuple(tau.shape), left, _quantize_vectors(right_values, spec))


def unfactorize(factors: Factors) -> torch.Tensor:
    """left^T @ right in float32, the tensor's shape."""
    m, n = matrix_shape(factors.shape)
    return (_stack(factors.left, m).T @ _stack(factors.right, n)).reshape(factors.shape)


def factors_storage_bits(factors: Factors) -> int:
    return sum(storage_bits(block) for block in factors.left + factors.right)


@dataclass
class LowRankTensor:
    """One tensor of a low-rank task: factors (or None), a fallback q* code (or None), a residual (or None)."""

    shape: tuple
    factors: Factors | None = None
    fallback: Quantized | None = None
    residual: Quantized | SignCode | None = None


def _code(tau: torch.Tensor, spec):
    return sign_quantize(tau, spec) if isinstance(spec, SignSpec) else quantize(tau, spec)


def _decode(code) -> torch.Tensor:
    return sign_dequantize(code) if isinstance(code, SignCode) else dequantize(code)


def lowrank_task(taus: dict, spec: LowRankSpec) -> dict:
    """Every tensor of a task vector (name -> tau) as a LowRankTensor, by the spec's rank rule."""
    matrices = {name: matrix_shape(tau.shape) for name, tau in taus.items()}
    matrices = {name: shape for name, shape in matrices.items() if shape is not None and min(shape) >= 1}
    svds, ranks = {}, {}
    for name, (m, n) in sorted(matrices.items()):
        if spec.budget is not None and spec.allocation == "tensor":
            want = rank_for_budget(spec, m, n, spec.budget * m * n)
        elif spec.budget is not None:  # "task": every matrix's spectrum up to what the whole budget could buy
            total = spec.budget * sum(a * b for a, b in matrices.values())
            want = rank_for_budget(spec, m, n, total)
        else:
            want = min(m, n) if spec.max_rank is None else min(m, n, spec.max_rank)
        svds[name] = top_singular(taus[name].reshape(m, n), (m, n), want, seed=spec.seed, oversample=spec.oversample,
                                  power_iters=spec.power_iters, memory_bytes=spec.memory_bytes)
        ranks[name] = want
    if spec.budget is not None and spec.allocation == "task":
        total = spec.budget * sum(a * b for a, b in matrices.values())
        ranks = allocate_ranks({k: v[1] for k, v in svds.items()}, matrices, spec, total)
    elif spec.energy is not None:
        for name in ranks:
            energy = float((taus[name].to(torch.float64) ** 2).sum())
            ranks[name] = rank_for_energy(svds[name][1], energy, spec.energy)
            m, n = matrices[name]
            low_rank_bits = sum(spec.triplet_bits(i, m, n) for i in range(ranks[name]))
            if low_rank_bits >= storage_bits(quantize(matrix_view(taus[name]), spec.fallback)):
                ranks[name] = 0  # a rank that costs more than the fallback: the fallback holds it
    out = {}
    for name, tau in taus.items():
        entry = LowRankTensor(tuple(tau.shape))
        if ranks.get(name, 0) > 0:
            entry.factors = factorize(tau, ranks[name], spec, svds[name])
            if spec.residual is not None:
                entry.residual = _code(tau.to(torch.float32) - unfactorize(entry.factors), spec.residual)
        else:
            entry.fallback = quantize(matrix_view(tau), spec.fallback)
        out[name] = entry
    return out


def lowrank_decode(entry: LowRankTensor) -> torch.Tensor:
    """The task vector one LowRankTensor stands for, float32."""
    if entry.fallback is not None:
        return dequantize(entry.fallback).reshape(entry.shape)
    value = unfactorize(entry.factors)
    if entry.residual is not None:
        value = value + _decode(entry.residual)
    return value


def lowrank_storage_bits(entry: LowRankTensor) -> int:
    """Packed bits: the factors' codes and scales, the fallback's or the residual's codes and scales."""
    bits = 0
    if entry.factors is not None:
        bits += factors_storage_bits(entry.factors)
    for code in (entry.fallback, entry.residual):
        if isinstance(code, SignCode):
            bits += sign_storage_bits(code)
        elif code is not None:
            bits += storage_bits(code)
    return bits
