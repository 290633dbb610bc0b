"""`info --agreement` counted chunk by chunk, checked against the TALL masks written again in numpy."""
from __future__ import annotations

import numpy as np
import pytest

import tallzip
from tallzip.verification.info import layer_kind

from conftest import np_mask, np_mtv, numpy_family, write_family
from tallzip.options import RunOptions, StoreOptions

LAMBDAS = {"task0": 0.3, "task1": 0.4, "task2": 0.5}


@pytest.mark.parametrize("chunk_elements", [1024, 1 << 22], ids=["many-chunks", "one-chunk"])
def test_agreement_counts_every_chunk(tmp_path, chunk_elements):
    """Masked tensors of several chunks (of 1014 elements in enc.w: not whole bytes of a mask): the per-kind histogram
    of how many tasks use each weight equals the count over the numpy masks."""
    base, tasks = numpy_family(shapes={"enc.w": (150, 13), "enc.b": (2500,), "blk.0.w": (40, 30), "frozen.emb": (5, 4)})
    base_path, tasks_dir = write_family(tmp_path / "fam", base, tasks)
    archive = tmp_path / "a.tallz"
    tallzip.pack(tasks_dir, base_path, archive, store=StoreOptions(lambdas=LAMBDAS, mtv_dtype="float32", chunk_elements=chunk_elements), run=RunOptions(device="cpu"))
    with tallzip.open(archive) as arc:
        data = tallzip.agreement(arc)
        masked = [n for n, info in arc.tensors.items() if info["kind"] == "masked"]
        assert any(len(arc.plan(None, n)) > 1 for n in masked) == (chunk_elements == 1024)
    want = {}
    for name in masked:
        mtv = np_mtv(base, tasks, name)
        used = sum(np_mask(base[name], sd[name], mtv, LAMBDAS[t]).astype(np.int64) for t, sd in tasks.items())
        want[layer_kind(name)] = want.get(layer_kind(name), 0) + np.bincount(used.ravel(), minlength=len(tasks) + 1)
    assert {k: v["histogram"] for k, v in data["kinds"].items()} == {k: list(v) for k, v in want.items()}
    assert data["total"]["histogram"] == list(sum(want.values()))
