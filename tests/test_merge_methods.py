"""The merge methods' registry (tallzip/merging/methods.py): its names are the CLI's, and each method's
math on a chunk against the formula in plain numpy."""
import numpy as np
import pytest
import torch
from click.testing import CliRunner

from tallzip.cli.main import cli
from tallzip.merging.methods import METHODS, archive_methods
from tallzip.options import MERGE_VERB_METHODS


def test_registry_names_are_the_cli_choices_and_refuse_to_drift(monkeypatch):
    assert tuple(METHODS) == MERGE_VERB_METHODS
    help_text = CliRunner().invoke(cli, ["merge", "--help"]).output
    assert all(name in help_text for name in METHODS)
    assert archive_methods("sum") == ("task-arithmetic", "consensus-ta")
    assert archive_methods("ties") == ("consensus-ties",)
    # the registry checks the names it shares with the CLI as it loads
    import importlib
    import tallzip.merging.methods as methods
    import tallzip.options as options
    monkeypatch.setattr(options, "MERGE_VERB_METHODS", MERGE_VERB_METHODS + ("slerp",))
    with pytest.raises(ImportError, match="disagree"):
        importlib.reload(methods)
    monkeypatch.undo()
    importlib.reload(methods)


def _chunk():
    rng = np.random.default_rng(7)
    base = rng.normal(size=200).astype(np.float32)
    tasks = [base + rng.normal(scale=0.1, size=200).astype(np.float32) for _ in range(3)]
    return base, tasks


def test_sum_and_average_are_the_formulas():
    base, tasks = _chunk()
    taus = np.stack([t - base for t in tasks])
    tb, tt = torch.from_numpy(base), [torch.from_numpy(t) for t in tasks]
    vector, kept, total = METHODS["task-arithmetic"].from_tasks(tb, tt, None, None, None)
    np.testing.assert_allclose(vector.numpy(), taus.sum(0), rtol=1e-6, atol=1e-7)
    assert (kept, total) == (0, 0)
    vector, _, _ = METHODS["average"].from_tasks(tb, tt, None, None, None)
    np.testing.assert_allclose(vector.numpy(), taus.mean(0), rtol=1e-6, atol=1e-7)
    vector, _, _ = METHODS["task-arithmetic"].from_mtv(torch.from_numpy(taus.sum(0)), None, None)
    np.testing.assert_array_equal(vector.numpy(), taus.sum(0))


def test_consensus_keeps_the_weights_k_masks_use():
    base, tasks = _chunk()
    mtv = np.stack([t - base for t in tasks]).sum(0)
    lam = 0.4
    masks = [np.abs(base - t) > lam * np.abs(base + mtv - t) for t in tasks]  # the TALL rule, in numpy
    for k in (0, 1, 2, 3):
        keep = np.stack(masks).sum(0) >= k
        expected = np.where(keep, mtv, 0)

        class SumMerger:
            @staticmethod
            def mtv(b, ts):
                return sum(t - b for t in ts)
        tb, tt = torch.from_numpy(base), [torch.from_numpy(t) for t in tasks]
        vector, kept, total = METHODS["consensus-ta"].from_tasks(tb, tt, SumMerger, [lam] * 3, k)
        np.testing.assert_allclose(vector.numpy(), expected, rtol=1e-6, atol=1e-6)
        assert (kept, total) == (int(keep.sum()), keep.size)
        vector, kept2, _ = METHODS["consensus-ta"].from_mtv(torch.from_numpy(mtv),
                                                            [torch.from_numpy(m) for m in masks], k)
        np.testing.assert_array_equal(vector.numpy(), expected)
        assert kept2 == kept
    assert METHODS["ties"].archive_mtv is None and METHODS["average"].archive_mtv is None
    with pytest.raises(NotImplementedError):
        METHODS["ties"].from_mtv(torch.from_numpy(mtv), None, 2)
