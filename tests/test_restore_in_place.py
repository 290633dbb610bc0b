"""Restoring straight into the output (issue 21): a chunk rebuilt into a slice of the task's tensor has
the bits of the plain formula where(mask, (base + mtv) rounded to base's dtype, base), computed here in
numpy/torch float32 apart from tallzip, and load() of a bfloat16 family cut into many chunks equals it."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import tallzip
from tallzip.archive.archive import rebuild_from_bits
from tallzip.options import StoreOptions

CPU = torch.device("cpu")


def formula(base, mask, mtv):
    summed = (base.float() + mtv.float()).to(base.dtype)
    return torch.where(torch.from_numpy(mask), summed, base)


@pytest.mark.parametrize("base_dtype, mtv_dtype", [(torch.bfloat16, torch.bfloat16), (torch.float32, torch.bfloat16),
                                                   (torch.float32, torch.float32), (torch.float16, torch.float16)])
def test_a_chunk_rebuilt_into_a_slice_has_the_formulas_bits(base_dtype, mtv_dtype):
    g = torch.Generator().manual_seed(1)
    n = 10_001
    base = (torch.randn(n, generator=g) * 0.02).to(base_dtype)
    base[:4] = torch.tensor([0.0, -0.0, 1.0, -1.0])
    mtv = (torch.randn(n, generator=g) * 0.003).to(mtv_dtype)
    mask = np.random.default_rng(2).random(n) < 0.4
    bits = np.packbits(mask, bitorder="little")
    target = torch.full((n + 20,), 7.0, dtype=base_dtype)
    got = rebuild_from_bits(base, bits, mtv, CPU, out=target[10:10 + n])
    want = formula(base, mask, mtv)
    width = {2: torch.int16, 4: torch.int32}[base.element_size()]
    assert torch.equal(target[10:10 + n].view(width), want.view(width))
    assert torch.equal(got.view(width), want.view(width))
    assert torch.all(target[:10] == 7.0) and torch.all(target[10 + n:] == 7.0)  # nothing outside the slice
    assert torch.equal(rebuild_from_bits(base, bits, mtv, CPU).view(width), want.view(width))


def test_load_of_a_bf16_family_in_many_chunks_equals_the_formula(tmp_path):
    g = torch.Generator().manual_seed(3)
    shapes = {"emb": (300, 64), "mlp": (64, 130), "norm": (64,), "bias": (7,)}
    base = {k: (torch.randn(s, generator=g) * 0.02).to(torch.bfloat16) for k, s in shapes.items()}
    base["norm"] = torch.ones(64, dtype=torch.bfloat16)
    (tmp_path / "tasks").mkdir()
    tasks = {}
    for t in range(3):
        tasks[f"t{t}"] = {k: (v.float() + torch.randn(v.shape, generator=g) * 0.002).to(torch.bfloat16)
                          for k, v in base.items()}
        tasks[f"t{t}"]["norm"] = base["norm"].clone()  # not moved by any task: stored once as the base
        save_file(tasks[f"t{t}"], str(tmp_path / "tasks" / f"t{t}.safetensors"))
    save_file(base, str(tmp_path / "base.safetensors"))
    out = tmp_path / "a.tallz"
    tallzip.pack(tmp_path / "tasks", tmp_path / "base.safetensors", out, store=StoreOptions(chunk_elements=1024))
    with tallzip.open(out) as archive:
        for task, tuned in tasks.items():
            got = archive.load(task)
            assert sorted(got) == sorted(base)
            for name, b in base.items():
                b32 = b.float()
                taus = [tasks[t][name].float() - b32 for t in tasks]
                mtv = taus[0]
                for tau in taus[1:]:
                    mtv = mtv + tau
                stored = mtv.to(torch.bfloat16)  # the archive's default mtv dtype
                own = (b32 - tuned[name].float()).abs()
                others = ((b32 + mtv) - tuned[name].float()).abs()
                mask = (own > others * 0.4).numpy()
                want = formula(b.reshape(-1), mask.reshape(-1), stored.reshape(-1)).reshape(b.shape)
                assert got[name].dtype == torch.bfloat16 and got[name].shape == b.shape
                assert torch.equal(got[name].view(torch.int16), want.view(torch.int16)), (task, name)
