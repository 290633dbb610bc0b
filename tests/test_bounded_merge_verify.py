"""merge (from an archive) holds a memory budget smaller than one tensor. (verify --against does not
yet: its chunked version could not be merged with the per-task representations in this round.)"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file as np_load_file

import tallzip
from conftest import write_big_family

ROOT = Path(__file__).resolve().parents[1]

MEASURE = r'''
import resource, sys
from tallzip import merging
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
merging.merge_to_file(sys.argv[2], sys.argv[3], method="consensus-ta", k=2, memory="96M", device="cpu")
print(base * 1024, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
'''


@pytest.mark.slow
def test_merge_holds_a_small_memory_budget(tmp_path):
    """Tensors of 128 MiB (base + 3 tasks): merge from the archive grows the process by at most the
    96 MiB budget (plus 16 MiB the allocator may keep), less than one tensor (the whole-tensor merge
    held several of them)."""
    fam = tmp_path / "big"
    tensor_bytes = write_big_family(fam)
    archive = tmp_path / "big.tallz"
    tallzip.pack(fam / "tasks", fam / "base.safetensors", archive, memory="256M", chunk_elements=1 << 20,
                 codecs={"float": "zstd", "mask": "bits+zstd"}, device="cpu")
    merged = tmp_path / "merged.safetensors"
    for args in (["merge", str(archive), str(merged)],):
        proc = subprocess.run([sys.executable, "-c", MEASURE, *args], capture_output=True, text=True, cwd=ROOT,
                              timeout=600)
        assert proc.returncode == 0, proc.stderr
        before, peak = map(int, proc.stdout.split())
        grown = peak - before
        assert grown < (96 + 16) * 2**20 < tensor_bytes, f"{args[0]} grew {grown / 2**20:.0f} MiB"
    # the streamed merge is base + 0.3 * [count >= 2] * mtv, from the archive's own base, mtv and masks
    out = np_load_file(str(merged))["w"]
    with tallzip.open(archive) as arc:
        mtv = arc.mtv("w").numpy()
        count = sum(arc.mask(t, "w", arc.mtv("w")).numpy().astype(np.int32) for t in arc.tasks)
        base_np = arc.base_tensor("w").numpy()
    expected = (base_np + np.float32(0.3) * np.where(count >= 2, mtv, np.float32(0))).astype(np.float32)
    assert np.array_equal(out, expected)
