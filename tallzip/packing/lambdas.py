"""Each task's lambda: given (one number, or per task), or chosen by the user's score (select_lambdas)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from tallzip.errors import TallzipError
from tallzip.family import Family
from tallzip.ops import taskvec
from tallzip.ops.tall import tall_mask
from tallzip.ops.ties import MtvMerger


@dataclass
class LambdaSelector:
    """Choose each task's lambda by a score on the user's data (validation accuracy, say).

    `evaluate(task, state_dict) -> float`, higher is better; the first best candidate wins.
    Used as `tallzip.pack(..., lambdas=tallzip.select_lambdas(evaluate))`.
    """
    evaluate: Callable[[str, dict], float]
    candidates: tuple = taskvec.LAMBDA_CANDIDATES
    scores: dict = field(default_factory=dict)  # filled in: task -> {lambda: score}


def select_lambdas(evaluate, candidates=taskvec.LAMBDA_CANDIDATES) -> LambdaSelector:
    return LambdaSelector(evaluate, tuple(candidates))


def task_lambdas(lambdas, tasks) -> dict[str, float] | None:
    """{task: lambda} from one number or {task: number} ('*' for the rest), checked; None for a LambdaSelector
    (the lambdas are then chosen by its score: selected_lambdas)."""
    if isinstance(lambdas, LambdaSelector):
        return None
    if isinstance(lambdas, (int, float)):
        out = {t: float(lambdas) for t in tasks}
    else:
        unknown = set(lambdas) - set(tasks) - {"*"}
        if unknown:
            raise TallzipError(f"--lambda names unknown task {sorted(unknown)[0]!r}; tasks: {', '.join(tasks)}")
        default = float(lambdas.get("*", taskvec.DEFAULT_LAMBDA))
        out = {t: float(lambdas.get(t, default)) for t in tasks}
    for task, lam in out.items():
        if not 0.0 <= lam < float("inf"):
            raise TallzipError(f"lambda for task {task!r} must be a non-negative number, got {lam}")
    return out


def selected_lambdas(family: Family, merger: MtvMerger, selector: LambdaSelector, device, progress):
    """Rebuild each task at each candidate lambda and keep the best by the user's score.

    evaluate(task, state_dict) takes a whole model, so this holds exactly one rebuilt task state at a
    time, plus one tensor of every task while that tensor's mtv is recomputed: the mtv is recomputed
    tensor by tensor for each candidate rather than kept for the whole model (N x the model before)."""
    chosen = {}
    for i, (task, ckpt) in enumerate(family.tasks.items()):
        selector.scores[task] = {}
        for lam in selector.candidates:
            state = {}
            for name in ckpt.names:
                if name in family.base and family.is_mergeable(name):
                    base, tasks = family.tensors(name)
                    base = base.to(device)
                    mtv = merger.mtv(base, [t.to(device) for t in tasks])
                    del tasks
                    task_t = ckpt.get(name)
                    mask = tall_mask(base, task_t.to(device), mtv, lam)
                    state[name] = taskvec.rebuild(base, mask, mtv).to(task_t.dtype)
                    del base, mtv, mask
                else:
                    state[name] = ckpt.get(name)
            selector.scores[task][lam] = float(selector.evaluate(task, state))
            del state
        scores = selector.scores[task]
        chosen[task] = max(selector.candidates, key=lambda lam: (scores[lam], -selector.candidates.index(lam)))
        if progress:
            progress("choosing lambdas", i + 1, len(family.tasks))
    return chosen
