"""Choosing each task's representation on the user's data: `tallzip.select_representation(evaluate)`.

For each task the smallest candidate (tall, q2, q3, q4, q8, then exact, which is the fine-tuned model
itself) whose score is within `tolerance` of the fine-tuned model's: score >= finetuned - tolerance *
|finetuned| (with accuracy, 0.005 is half a percent of it). Each candidate is rebuilt in memory exactly as
the archive will rebuild it (the same chunks, codes and scales; for tall the mask from the full-precision
mtv, the mtv as pack stores it, e.g. bfloat16, and the task's lambda), so the score recorded is the stored
model's.

tall is tried first: beyond the mtv, which every tall task shares, a tall task costs only its mask (about
1 bit per weight, against 2.25 for q2). But the mtv itself (16 bits per weight in bfloat16) is only stored
when some task is tall, so with few tall tasks their fallbacks are smaller in all. With weigh_mtv (the
default), once every task has its choice, the tall tasks keep tall only if what they save against their
own fallbacks (the next candidate within the tolerance, else exact) pays for the mtv, in NOMINAL_BITS per
weight; otherwise they all take their fallbacks and no mtv is stored. Their fallbacks are evaluated only
when the sum could go either way. (benchmarks/RESULTS.md, the frontier, measures the choices.)
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch

from tallzip.errors import TallzipError
from tallzip.formats.container.chunking import chunk_plan, chunk_shape
from tallzip.ops.lowrank_store import decode_range, encode_tensor
from tallzip.ops.representations import QUANT_GROUP, dequantize_chunk, quantize_chunk, rebuild_quantized
from tallzip.ops.tall import tall_mask
from tallzip.ops.taskvec import as_compute, rebuild as tall_rebuild, stored_mtv

CANDIDATES = ("tall", "q2", "q3", "q4", "q8")  # smallest first; exact is the fallback and needs no evaluation
# also allowed, not tried unless named (issue 22; q1 below): lowrank, ~1.4 bits per weight on the vision benchmark (RESULTS.md,
# "Real archives"), so ("tall", "lowrank", "q2", ...) tries it before q2
ALLOWED = (*CANDIDATES, "lowrank", "q1")  # q1: ~1.1 bits per weight, 96.9% there: for families it suits
# Bits per weight before entropy coding, to weigh the mtv against what tall saves: a mask bit; q* codes plus
# a bfloat16 scale per group of 128 (and an offset for the asymmetric q2); exact: the weight's own bits.
NOMINAL_BITS = {"tall": 1.0, "q2": 2 + 32 / QUANT_GROUP, "q3": 3 + 16 / QUANT_GROUP, "q4": 4 + 16 / QUANT_GROUP,
                "q8": 8 + 16 / QUANT_GROUP, "lowrank": 1.5, "q1": 1 + 16 / QUANT_GROUP}
MTV_BITS = {"float32": 32, "bfloat16": 16, "float16": 16}


@dataclass
class RepresentationSelector:
    """`evaluate(task, state_dict) -> float`, higher is better. Used as
    `tallzip.pack(..., keep=tallzip.select_representation(evaluate, tolerance=0.005))`."""
    evaluate: Callable[[str, dict], float]
    tolerance: float = 0.005
    candidates: tuple = CANDIDATES
    weigh_mtv: bool = True
    scores: dict = field(default_factory=dict)   # filled in: task -> {"finetuned": s, rep: s, ...}
    chosen: dict = field(default_factory=dict)   # filled in: task -> representation
    mtv_weighed: dict = field(default_factory=dict)  # filled in when tall was weighed against the mtv
    lowrank: object = None  # the LowRankOptions pack stores lowrank tasks with (pack fills it in from StoreOptions)


def select_representation(evaluate, tolerance: float = 0.005, candidates=CANDIDATES,
                          weigh_mtv: bool = True) -> RepresentationSelector:
    if not (isinstance(tolerance, (int, float)) and 0 <= tolerance < 1):
        raise TallzipError(f"tolerance must be a number in [0, 1), got {tolerance!r}")
    unknown = [c for c in candidates if c not in ALLOWED]
    if unknown:
        raise TallzipError(f"candidate {unknown[0]!r} is not one of {', '.join(ALLOWED)} (exact is always the last)")
    return RepresentationSelector(evaluate, float(tolerance), tuple(candidates), bool(weigh_mtv))


def tall_state(family, task: str, merger, lam: float, mtv_dtype: str) -> dict:
    """The task's state dict as a tall archive rebuilds it: base + mask * stored mtv, where the mask
    comes from the full-precision mtv (as pack computes it) and the mtv is rounded to `mtv_dtype`.
    One tensor of every task is read at a time (the mtv of that tensor), so memory stays one model."""
    ckpt = family.tasks[task]
    state = {}
    for name in ckpt.names:
        if name not in family.base or not family.is_mergeable(name):
            state[name] = ckpt.get(name)
            continue
        base, tasks = family.tensors(name)
        mtv = merger.mtv(base, tasks)
        own = ckpt.get(name)
        mask = tall_mask(base, own, mtv, lam)
        state[name] = tall_rebuild(base, mask, as_compute(stored_mtv(mtv, mtv_dtype))).to(own.dtype)
    return state


def chunk_rebuilt_state(family, task: str, chunk_elements: int, chunk_values) -> dict:
    """The task's state dict rebuilt as the archive does, chunk by chunk in its plan: base + the decoded value of
    each chunk. chunk_values(name, base, tensor) gives the representation's decode of one tensor as a function
    (start, count) -> the value of those elements; tensors the archive keeps whole come back as they are."""
    ckpt = family.tasks[task]
    state = {}
    for name in ckpt.names:
        tensor = ckpt.get(name)
        if name not in family.base or not family.is_mergeable(name):
            state[name] = tensor
            continue
        base = family.base.get(name)
        value_of = chunk_values(name, base, tensor)
        flat_base, parts = base.reshape(-1), []
        for start, count in chunk_plan(tuple(base.shape), chunk_elements):
            parts.append(rebuild_quantized(flat_base[start:start + count], value_of(start, count)).to(tensor.dtype))
        state[name] = torch.cat(parts).reshape(base.shape) if parts else tensor
    return state


def quantized_state(family, task: str, rep: str, chunk_elements: int) -> dict:
    """The task's state dict as a `rep` archive rebuilds it (chunk by chunk, as pack quantizes)."""
    def chunk_values(name, base, tensor):
        shape, flat_base, flat_task = tuple(base.shape), base.reshape(-1), tensor.reshape(-1)

        def value(start, count):
            piece = chunk_shape(shape, start, count)
            codes, scales, offsets = quantize_chunk(flat_base[start:start + count], flat_task[start:start + count],
                                                    piece, rep)
            return dequantize_chunk(codes, scales, piece, QUANT_GROUP, offsets)
        return value
    return chunk_rebuilt_state(family, task, chunk_elements, chunk_values)


def lowrank_state(family, task: str, options, chunk_elements: int) -> dict:
    """The task's state dict as a `lowrank` archive rebuilds it (options: LowRankOptions; decoded chunk by chunk
    in the archive's plan, as the reader decodes)."""
    options = options.for_task(task)

    def chunk_values(name, base, tensor):
        code = encode_tensor(as_compute(tensor) - as_compute(base), options, options.tensor_code(name))
        return lambda start, count: decode_range(code.codes, code.scales, code.shape, code.rank, options.group,
                                                 start, count, code.grid)
    return chunk_rebuilt_state(family, task, chunk_elements, chunk_values)


def _score(selector, task, state) -> float:
    value = float(selector.evaluate(task, state))
    if value != value or value in (float("inf"), float("-inf")):
        raise TallzipError(f"evaluate({task!r}, ...) returned {value}: scores must be finite numbers")
    return value


def choose(family, selector: RepresentationSelector, chunk_elements: int, progress=None, *, tall=None) -> dict:
    """{task: representation}, filling in selector.scores and selector.chosen.
    tall: (merger, {task: lambda}, mtv_dtype) as pack will store the mtv; needed when "tall" is a candidate."""
    if "tall" in selector.candidates and tall is None:
        raise TallzipError("choosing 'tall' needs the mtv and the lambdas pack will use")
    for i, task in enumerate(family.names):
        finetuned = _score(selector, task, {n: family.tasks[task].get(n) for n in family.tasks[task].names})
        selector.scores[task] = {"finetuned": finetuned}
        floor = finetuned - selector.tolerance * abs(finetuned)
        selector.chosen[task] = _first_within(family, selector, task, selector.candidates, floor, chunk_elements, tall)
        if progress:
            progress("choosing representations", i + 1, len(family.names))
    if selector.weigh_mtv:
        _weigh_mtv(family, selector, chunk_elements, tall)
    return dict(selector.chosen)


def _first_within(family, selector, task, candidates, floor, chunk_elements, tall) -> str:
    """The first of `candidates` whose score reaches `floor` (scores recorded), else exact."""
    scores = selector.scores[task]
    for rep in candidates:
        if rep not in scores:
            if rep == "tall":
                merger, lambdas, mtv_dtype = tall
                state = tall_state(family, task, merger, lambdas[task], mtv_dtype)
            elif rep == "lowrank":
                state = lowrank_state(family, task, selector.lowrank, chunk_elements)
            else:
                state = quantized_state(family, task, rep, chunk_elements)
            scores[rep] = _score(selector, task, state)
            del state
        if scores[rep] >= floor:
            return rep
    return "exact"


def _weigh_mtv(family, selector, chunk_elements, tall) -> None:
    """Keep the tall tasks tall only if, in NOMINAL_BITS, what they save against their fallbacks pays for
    the mtv; else every one of them takes its fallback."""
    tall_tasks = [t for t, rep in selector.chosen.items() if rep == "tall"]
    if not tall_tasks:
        return
    mtv_bits = MTV_BITS[tall[2]]
    rest = tuple(c for c in selector.candidates if c != "tall")
    cheapest = min((NOMINAL_BITS[c] for c in rest), default=_exact_bits(family))
    if len(tall_tasks) * (cheapest - NOMINAL_BITS["tall"]) > mtv_bits:  # pays whatever the fallbacks are
        selector.mtv_weighed = {"kept_tall": True, "tall_tasks": tall_tasks, "fallbacks_evaluated": False}
        return
    fallbacks = {}
    for task in tall_tasks:
        finetuned = selector.scores[task]["finetuned"]
        fallbacks[task] = _first_within(family, selector, task, rest, finetuned - selector.tolerance * abs(finetuned),
                                        chunk_elements, tall)
    saved = sum(NOMINAL_BITS.get(fallbacks[t], _exact_bits(family)) - NOMINAL_BITS["tall"] for t in tall_tasks)
    keep = saved > mtv_bits
    selector.mtv_weighed = {"kept_tall": keep, "tall_tasks": tall_tasks, "fallbacks": fallbacks,
                            "bits_saved_per_weight": saved, "mtv_bits_per_weight": mtv_bits}
    if not keep:
        selector.chosen.update(fallbacks)


def _exact_bits(family) -> float:
    """The mean bits per weight of the family's mergeable tensors, as stored (what exact costs before coding)."""
    from tallzip.formats.container.constants import DTYPE_SIZES
    names = [n for n in family.base.names if family.is_mergeable(n)]
    counts = {n: math.prod(family.base.shapes[n]) for n in names}
    total = sum(counts.values())
    return 8 * sum(counts[n] * DTYPE_SIZES[family.base.dtypes[n]] for n in names) / total if total else 32.0
