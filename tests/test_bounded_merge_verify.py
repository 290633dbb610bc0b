"""merge (from an archive), verify, verify --against and info --agreement hold a memory budget smaller than
one tensor."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file as np_load_file

import tallzip
from conftest import write_big_family
from tallzip.options import RunOptions, StoreOptions

ROOT = Path(__file__).resolve().parents[1]
BUDGET_MIB = 96
# What the allocator may keep beyond the budget (freed chunks not yet given back, thread stacks)
SLACK_MIB = 16

# The process's own resident memory from /proc: ru_maxrss would not do, Linux keeps it across fork and
# exec, so a child of a big pytest process starts with the parent's peak.
MEASURE = r'''
import json, sys
import blosc2  # imported before measuring: its import alone adds ~46 MiB of RSS (httpx, pydantic, rich), not data
import tallzip
from tallzip.merging import merge as merging
from tallzip.verification.verify import verify
from tallzip.options import RunOptions

def status(key):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key + ":"))

before = status("VmRSS")
command, archive, target = sys.argv[1:4]
if command == "merge":
    merging.merge_to_file(archive, target, method="consensus-ta", k=2,
                          run=RunOptions(memory="96M", device="cpu"))
    verdict = None
elif command == "agreement":
    with tallzip.open(archive, memory="96M") as arc:
        verdict = tallzip.agreement(arc)["total"]["histogram"]
else:
    with tallzip.open(archive, memory="96M") as arc:
        report = verify(arc, None if target == "-" else target)
    verdict = report.get("verdict", "ok" if report["ok"] else "damaged")
print(json.dumps([before, status("VmHWM"), verdict]))
'''


@pytest.fixture(scope="module")
def big(tmp_path_factory):
    """Tensors of 128 MiB (base + 3 tasks) and their archive, in chunks of 2^20 elements (4 MiB)."""
    root = tmp_path_factory.mktemp("bounded")
    fam = root / "big"
    tensor_bytes = write_big_family(fam)
    archive = root / "big.tallz"
    tallzip.pack(fam / "tasks", fam / "base.safetensors", archive, store=StoreOptions(chunk_elements=1 << 20, codecs={"float": "zstd", "mask": "bits+zstd"}), run=RunOptions(memory="256M", device="cpu"))
    some = root / "some"  # two of the three tasks: the mtv cannot be recomputed, only the masks checked
    some.mkdir()
    for name in ("t0.safetensors", "t2.safetensors"):
        (some / name).symlink_to(fam / "tasks" / name)
    return {"root": root, "fam": fam, "archive": archive, "some": some, "tensor_bytes": tensor_bytes}


def measured(command, archive, target):
    """(bytes the process grew by while running the command, the verdict it printed)."""
    proc = subprocess.run([sys.executable, "-c", MEASURE, command, str(archive), str(target)], capture_output=True,
                          text=True, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr
    before, peak, verdict = json.loads(proc.stdout.splitlines()[-1])
    return peak - before, verdict


@pytest.mark.slow
def test_merge_holds_a_small_memory_budget(big, tmp_path):
    """merge from the archive grows the process by at most the 96 MiB budget (plus what the allocator
    may keep), less than one tensor (the whole-tensor merge held several of them)."""
    merged = tmp_path / "merged.safetensors"
    grown, _ = measured("merge", big["archive"], merged)
    assert grown < (BUDGET_MIB + SLACK_MIB) * 2**20 < big["tensor_bytes"], f"merge grew {grown / 2**20:.0f} MiB"
    # the streamed merge is base + 0.3 * [count >= 2] * mtv, from the archive's own base, mtv and masks
    out = np_load_file(str(merged))["w"]
    with tallzip.open(big["archive"]) as arc:
        mtv = arc.mtv("w").numpy()
        count = sum(arc.mask(t, "w", arc.mtv("w")).numpy().astype(np.int32) for t in arc.tasks)
        base_np = arc.base_tensor("w").numpy()
    expected = (base_np + np.float32(0.3) * np.where(count >= 2, mtv, np.float32(0))).astype(np.float32)
    assert np.array_equal(out, expected)


@pytest.mark.slow
@pytest.mark.parametrize("against", ["none", "all", "some"])
def test_verify_holds_a_small_memory_budget(big, against):
    """verify (every section), verify --against all tasks (masks and the mtv recomputed) and against
    some of them grow the process by at most the budget, less than one tensor: the whole-tensor verify
    held the base, the mtv, every mask and every original of a tensor at once (~900 MiB here)."""
    target = {"none": "-", "all": big["fam"] / "tasks", "some": big["some"]}[against]
    grown, verdict = measured("verify", big["archive"], target)
    assert verdict == ("ok" if against == "none" else "matches")
    assert grown < (BUDGET_MIB + SLACK_MIB) * 2**20 < big["tensor_bytes"], f"verify grew {grown / 2**20:.0f} MiB"


@pytest.mark.slow
def test_agreement_holds_a_small_memory_budget(big):
    """info --agreement counts chunk by chunk: within the budget, and the counts are those of the masks."""
    grown, histogram = measured("agreement", big["archive"], "-")
    assert grown < (BUDGET_MIB + SLACK_MIB) * 2**20 < big["tensor_bytes"], f"agreement grew {grown / 2**20:.0f} MiB"
    with tallzip.open(big["archive"]) as arc:  # the weights of "w" ("b" is another masked tensor: counted apart)
        used = sum(arc.mask(t, "w", arc.mtv("w")).numpy().astype(np.int64) for t in arc.tasks)
        small = sum(arc.mask(t, "b", arc.mtv("b")).numpy().astype(np.int64) for t in arc.tasks)
    want = np.bincount(used.ravel(), minlength=4) + np.bincount(small.ravel(), minlength=4)
    assert histogram == list(want)
