"""Accuracy summaries used by the benchmark."""

from __future__ import annotations

from collections.abc import Mapping


def normalized_accuracy(acc: Mapping[str, float], finetuned_acc: Mapping[str, float]) -> float:
    """Mean over tasks of acc_t / finetuned_acc_t (TALL masks paper, appendix A).

    ``acc`` holds the accuracy of the model under test (a merged or compressed model) on
    each task; ``finetuned_acc`` that of the individual fine-tuned model of each task.  The
    mean runs over the tasks of ``acc``; every one of them needs a fine-tuned reference.
    """
    if not acc:
        raise ValueError("normalized_accuracy needs at least one task")
    missing = sorted(set(acc) - set(finetuned_acc))
    if missing:
        raise KeyError(f"no fine-tuned accuracy for tasks {missing}")
    ratios = []
    for task, value in acc.items():
        reference = finetuned_acc[task]
        if reference <= 0:
            raise ValueError(f"fine-tuned accuracy of {task!r} is {reference}; cannot normalise by it")
        ratios.append(value / reference)
    return sum(ratios) / len(ratios)


def mean_accuracy(acc: Mapping[str, float]) -> float:
    """Plain (absolute) mean accuracy over tasks."""
    if not acc:
        raise ValueError("mean_accuracy needs at least one task")
    return sum(acc.values()) / len(acc)


def min_normalized_accuracy(acc: Mapping[str, float], finetuned_acc: Mapping[str, float]) -> float:
    """The worst task's acc_t / finetuned_acc_t: how much the least well kept task lost."""
    if not acc:
        raise ValueError("min_normalized_accuracy needs at least one task")
    return min(normalized_accuracy({task: value}, finetuned_acc) for task, value in acc.items())
