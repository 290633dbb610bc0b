"""The merge methods, one small class each, and their registry (METHODS: name -> method).

Each method is math over one chunk, no I/O: `from_tasks` merges the base's and every task's chunk (a
folder of checkpoints), `from_mtv` the chunk of an archive's mtv with the tasks' TALL masks (only the
methods built on the pack-time mtv can). Both give (vector, weights kept, weights counted); merge.py adds
alpha * vector to the base. A method's attributes say which options it takes (k, lambdas, density) and
which mtv it needs. The command line lists the names from options.MERGE_VERB_METHODS without loading
torch: this registry refuses to load if the two disagree.
"""
from __future__ import annotations

import torch

from tallzip.ops import taskvec
from tallzip.ops.tall import tall_mask
from tallzip.options import MERGE_VERB_METHODS


class MergeMethod:
    """A merge method. name: as the command line spells it. default_alpha: without a validation set to
    pick alpha on. mtv: the mtv the method is built on ('sum' or 'ties'), None when it works on the task
    vectors alone. consensus: keeps only the weights at least k tasks' masks use (takes k and lambdas).
    archive_mtv: the packed mtv (manifest's merge method) it can merge from; None: folder only."""
    name = ""
    default_alpha = 0.3
    mtv: str | None = None
    consensus = False
    archive_mtv: str | None = None

    @property
    def trims(self) -> bool:
        """Whether the method TIES-trims each task vector (takes density)."""
        return self.mtv == "ties"

    def from_tasks(self, base, tasks, merger, lambdas, k) -> tuple[torch.Tensor, int, int]:
        raise NotImplementedError

    def from_mtv(self, mtv, masks, k) -> tuple[torch.Tensor, int, int]:
        raise NotImplementedError


class TaskArithmetic(MergeMethod):
    """base + alpha * sum of the task vectors."""
    name, archive_mtv = "task-arithmetic", "sum"

    def from_tasks(self, base, tasks, merger, lambdas, k):
        return taskvec.sum_task_vectors(base, tasks), 0, 0

    def from_mtv(self, mtv, masks, k):
        return mtv, 0, 0


class Ties(MergeMethod):
    """TIES: each task vector trimmed to its top density (over the whole vector), elected sign, disjoint
    mean; alpha 1 by default (the mean is on the scale of one task vector: the TIES paper's setting)."""
    name, default_alpha, mtv = "ties", 1.0, "ties"

    def from_tasks(self, base, tasks, merger, lambdas, k):
        taus = [taskvec.task_vector(base, t) for t in tasks]
        return taskvec.ties_merge(taus, merger.thresholds, merger.majority, reduce="mean"), 0, 0


class Consensus(MergeMethod):
    """Consensus Merging: base + alpha * [tasks whose TALL masks use a weight >= k] * mtv."""
    consensus = True

    def from_tasks(self, base, tasks, merger, lambdas, k):
        mtv = merger.mtv(base, tasks)  # the same mtv the masks are made with
        return self.from_mtv(mtv, [tall_mask(base, t, mtv, lam) for t, lam in zip(tasks, lambdas)], k)

    def from_mtv(self, mtv, masks, k):
        keep = taskvec.consensus_mask(masks, k)
        return torch.where(keep, mtv, torch.zeros_like(mtv)), int(keep.sum()), keep.numel()


class ConsensusTA(Consensus):
    """Consensus over task arithmetic's mtv (the sum)."""
    name, mtv, archive_mtv = "consensus-ta", "sum", "sum"


class ConsensusTies(Consensus):
    """Consensus over the TIES merge with a disjoint sum (as packed with --merge ties)."""
    name, mtv, archive_mtv = "consensus-ties", "ties", "ties"


class Average(MergeMethod):
    """base + alpha * the mean task vector: alpha 1 (the default) is the mean of the fine-tuned weights."""
    name, default_alpha = "average", 1.0

    def from_tasks(self, base, tasks, merger, lambdas, k):
        return taskvec.sum_task_vectors(base, tasks) / len(tasks), 0, 0


METHODS = {method.name: method for method in (TaskArithmetic(), Ties(), ConsensusTA(), ConsensusTies(), Average())}
if tuple(METHODS) != MERGE_VERB_METHODS:  # the CLI offers options.MERGE_VERB_METHODS: the same, in this order
    raise ImportError(f"merge methods {tuple(METHODS)} and options.MERGE_VERB_METHODS {MERGE_VERB_METHODS} disagree")


def archive_methods(packed: str) -> tuple[str, ...]:
    """The methods an archive whose mtv was merged by `packed` ('sum' or 'ties') can serve."""
    return tuple(name for name, method in METHODS.items() if method.archive_mtv == packed)
