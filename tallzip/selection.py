"""Choosing each task's representation on the user's data: `tallzip.select_representation(evaluate)`.

For each task the smallest candidate (q2, q3, q4, q8, then exact, which is the fine-tuned model itself)
whose score is within `tolerance` of the fine-tuned model's: score >= finetuned - tolerance * |finetuned|
(with accuracy, 0.005 is half a percent of it). Each candidate is rebuilt in memory exactly as the archive
will rebuild it (the same chunks, codes and scales), so the score recorded is the stored model's.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from .errors import TallzipError
from .formats.chunking import chunk_plan, chunk_shape
from .representations import QUANT_GROUP, dequantize_chunk, quantize_chunk, rebuild_quantized

CANDIDATES = ("q2", "q3", "q4", "q8")  # smallest first; exact is the fallback and needs no evaluation


@dataclass
class RepresentationSelector:
    """`evaluate(task, state_dict) -> float`, higher is better. Used as
    `tallzip.pack(..., keep=tallzip.select_representation(evaluate, tolerance=0.005))`."""
    evaluate: Callable[[str, dict], float]
    tolerance: float = 0.005
    candidates: tuple = CANDIDATES
    scores: dict = field(default_factory=dict)   # filled in: task -> {"finetuned": s, rep: s, ...}
    chosen: dict = field(default_factory=dict)   # filled in: task -> representation


def select_representation(evaluate, tolerance: float = 0.005, candidates=CANDIDATES) -> RepresentationSelector:
    if not (isinstance(tolerance, (int, float)) and 0 <= tolerance < 1):
        raise TallzipError(f"tolerance must be a number in [0, 1), got {tolerance!r}")
    unknown = [c for c in candidates if c not in CANDIDATES]
    if unknown:
        raise TallzipError(f"candidate {unknown[0]!r} is not one of {', '.join(CANDIDATES)} (exact is always the last)")
    return RepresentationSelector(evaluate, float(tolerance), tuple(candidates))


def quantized_state(family, task: str, rep: str, chunk_elements: int) -> dict:
    """The task's state dict as a `rep` archive rebuilds it (chunk by chunk, as pack quantizes)."""
    ckpt = family.tasks[task]
    state = {}
    for name in ckpt.names:
        tensor = ckpt.get(name)
        if name not in family.base or not family.is_mergeable(name):
            state[name] = tensor
            continue
        base = family.base.get(name)
        shape = tuple(base.shape)
        flat_base, flat_task = base.reshape(-1), tensor.reshape(-1)
        parts = []
        for start, count in chunk_plan(shape, chunk_elements):
            b, t = flat_base[start:start + count], flat_task[start:start + count]
            codes, scales, offsets = quantize_chunk(b, t, chunk_shape(shape, start, count), rep)
            value = dequantize_chunk(codes, scales, chunk_shape(shape, start, count), QUANT_GROUP, offsets)
            parts.append(rebuild_quantized(b, value).to(tensor.dtype))
        state[name] = torch.cat(parts).reshape(shape) if parts else tensor
    return state


def _score(selector, task, state) -> float:
    value = float(selector.evaluate(task, state))
    if value != value or value in (float("inf"), float("-inf")):
        raise TallzipError(f"evaluate({task!r}, ...) returned {value}: scores must be finite numbers")
    return value


def choose(family, selector: RepresentationSelector, chunk_elements: int, progress=None) -> dict:
    """{task: representation}, filling in selector.scores and selector.chosen."""
    for i, task in enumerate(family.names):
        finetuned = _score(selector, task, {n: family.tasks[task].get(n) for n in family.tasks[task].names})
        scores = selector.scores[task] = {"finetuned": finetuned}
        floor = finetuned - selector.tolerance * abs(finetuned)
        selector.chosen[task] = "exact"
        for rep in selector.candidates:
            scores[rep] = _score(selector, task, quantized_state(family, task, rep, chunk_elements))
            if scores[rep] >= floor:
                selector.chosen[task] = rep
                break
        if progress:
            progress("choosing representations", i + 1, len(family.names))
    return dict(selector.chosen)
