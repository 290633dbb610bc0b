"""Resident serving of tall, q* and exact tasks side by side: every switch gives bit for bit what
load(task) gives and what the numpy formulas give from the input checkpoints (q4: SPEC's decode;
exact: the input's bytes; tall: base + mask * mtv), and a q* task holds its codes and scales, not a
float copy of the model."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.numpy import save_file as np_save

import tallzip

from test_representations import GROUP, ROWS as _ROWS, np_quant_rebuild
from tallzip.options import StoreOptions

ROWS = {**_ROWS, "m": (64, 256)}

CHUNK = 1024


@pytest.fixture
def family(tmp_path):
    rng = np.random.default_rng(11)
    base = {"w": rng.standard_normal((40, 300)).astype(np.float32),   # chunks of 3 whole rows
            "v": rng.standard_normal(3000).astype(np.float32),        # 1-d, chunks of 1024
            "b": rng.standard_normal(300).astype(np.float32),
            "m": rng.standard_normal((64, 256)).astype(np.float32),   # groups all of 128: scales broadcast
            "z": np.array([0.0, -0.0, 1.5, -2.25] * 8, dtype=np.float32),
            "same": rng.standard_normal(20).astype(np.float32),
            "step": np.arange(4, dtype=np.int64)}
    np_save(base, str(tmp_path / "base.safetensors"))
    (tmp_path / "tasks").mkdir()
    tasks = {}
    for k in range(5):
        t = {n: (v + (0.02 * rng.standard_normal(v.shape)).astype(np.float32) if v.dtype == np.float32 and n != "same"
                 else v.copy()) for n, v in base.items()}
        t["step"] = t["step"] + k
        t[f"head{k}"] = rng.standard_normal((3, 5)).astype(np.float32)
        tasks[f"t{k}"] = t
        np_save(t, str(tmp_path / "tasks" / f"t{k}.safetensors"))
    out = tmp_path / "a.tallz"
    tallzip.pack(tmp_path / "tasks", tmp_path / "base.safetensors", out, store=StoreOptions(mtv_dtype="float32", keep={"t0": "tall", "t1": "q4", "t2": "exact", "t3": "q2", "t4": "q8"}, chunk_elements=CHUNK))
    return tmp_path, base, tasks, out


def np_tall(base, tasks, task, name, lam=0.4):
    """TALL in numpy (float32 mtv stored): mask = |b - t| > lam * |(b + mtv) - t|, rebuilt b + mask * mtv."""
    b = base[name]
    mtv = np.zeros_like(b)
    for t in tasks.values():
        mtv = mtv + (t[name] - b)
    mask = np.abs(b - tasks[task][name]) > lam * np.abs((b + mtv) - tasks[task][name])
    return np.where(mask, b + mtv, b).astype(np.float32)


def bits_of(tensor) -> bytes:
    return tensor.detach().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes()


def test_switching_between_tall_q4_exact_and_q2_is_load_and_the_numpy_formulas(family):
    _, base, tasks, out = family
    with tallzip.open(out) as arc:
        resident = arc.resident(device="cpu")
        assert resident.representations == {"t0": "tall", "t1": "q4", "t2": "exact", "t3": "q2", "t4": "q8"}
        for task in ["t1", "t0", "t2", "t3", "t4", "t1", "t2", "t4", "t0"]:  # back and forth across kinds
            state = resident.switch(task).state_dict()
            loaded = arc.load(task)
            assert list(state) == list(loaded)
            for name, tensor in loaded.items():
                assert state[name].dtype == tensor.dtype and bits_of(state[name]) == bits_of(tensor), (task, name)
            original = tasks[task]
            for name in ("w", "v", "b", "m", "z"):
                got = state[name].numpy()
                if task == "t2":
                    want = original[name]
                elif task in ("t1", "t3", "t4"):
                    want = np_quant_rebuild(base[name], original[name], {"t1": 4, "t3": 2, "t4": 8}[task], ROWS[name])
                else:
                    want = np_tall(base, tasks, task, name)
                assert got.tobytes() == want.tobytes(), (task, name)
            assert np.array_equal(state["step"].numpy(), original["step"])
            assert np.array_equal(state[f"head{task[1]}"].numpy(), original[f"head{task[1]}"])
            assert np.array_equal(state["same"].numpy(), base["same"])


def test_a_q4_task_holds_codes_and_scales_not_a_float_copy(family):
    _, base, _, out = family
    with tallzip.open(out) as arc:
        resident = arc.resident(device="cpu", tasks=["t1", "t2"])
        held = resident.memory()["tasks"]
    # counted here from the shapes: every changed tensor at 4 bits a weight (its slot rounded up to
    # 64 weights) plus a float32 scale per group of 128 of a chunk's row; its head as float32
    changed = {n: base[n].shape for n in ("w", "v", "b", "m", "z")}
    slots = sum(-(-int(np.prod(s)) // 64) * 64 for s in changed.values())
    groups = 40 * -(-300 // GROUP) + sum(-(-c // GROUP) for c in (1024, 1024, 952)) + -(-300 // GROUP) + 64 * 2 + 1
    pads = sum(1 for s in changed.values() if int(np.prod(s)) % 64)
    head = 3 * 5 * 4 + 4 * 8  # and its int64 step counter
    # (the layout holds one scale slot for each padding run; the last tensor's may be absent)
    assert slots // 2 + 4 * groups + head <= held["t1"] <= slots // 2 + 4 * (groups + pads) + head
    float_copy = 4 * sum(int(np.prod(s)) for s in changed.values())
    assert held["t1"] < 0.2 * float_copy
    assert held["t2"] >= float_copy  # exact: its own tensors, lossless


def test_bind_follows_q_and_exact_switches_in_place(family):
    _, base, tasks, out = family

    class Layer(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(40, 300))

    with tallzip.open(out) as arc:
        resident = arc.resident(device="cpu", tasks=["t1", "t2", "t0"])
        layer = Layer()
        assert resident.bind(layer) == ["w"]
        pointer = layer.w.data_ptr()
        for task, want in (("t1", np_quant_rebuild(base["w"], tasks["t1"]["w"], 4, ROWS["w"])),
                           ("t2", tasks["t2"]["w"]), ("t0", np_tall(base, tasks, "t0", "w"))):
            resident.switch(task)
            assert layer.w.data_ptr() == pointer  # the same storage, rewritten
            assert layer.w.detach().numpy().tobytes() == want.tobytes(), task
        with pytest.raises(tallzip.errors.TallzipError, match="not resident"):
            resident.switch("t3")


def test_added_tasks_are_served_too(family):
    """A task added later may store codes or a delta for a tensor the others share with the base."""
    tmp_path, base, tasks, out = family
    rng = np.random.default_rng(5)
    new = {n: (v + (0.02 * rng.standard_normal(v.shape)).astype(np.float32) if v.dtype == np.float32 else v + 9)
           for n, v in base.items()}
    np_save(new, str(tmp_path / "n.safetensors"))
    tallzip.add(out, tmp_path / "n.safetensors", "n4", keep="q4")
    tallzip.add(out, tmp_path / "n.safetensors", "nx", keep="exact")
    with tallzip.open(out) as arc:
        resident = arc.resident(device="cpu")
        for task in ["n4", "t0", "nx", "t1", "n4"]:
            state = resident.switch(task).state_dict()
            for name, tensor in arc.load(task).items():
                assert bits_of(state[name]) == bits_of(tensor), (task, name)
        state = resident.switch("n4").state_dict()
        assert state["same"].numpy().tobytes() == np_quant_rebuild(base["same"], new["same"], 4, (1, 20)).tobytes()
        assert resident.switch("t0").state_dict()["same"].numpy().tobytes() == base["same"].tobytes()
        assert resident.switch("nx").state_dict()["same"].numpy().tobytes() == new["same"].tobytes()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_switching_across_representations_equals_load(family):
    """On a GPU the q* rebuild runs there (separate float32 multiply and add kernels, no FMA): the
    same bits as load(), which decodes on the CPU."""
    _, _, _, out = family
    with tallzip.open(out) as arc:
        resident = arc.resident(device="cuda")
        for task in ["t1", "t0", "t2", "t3", "t1"]:
            state = resident.switch(task).state_dict()
            for name, tensor in arc.load(task).items():
                assert state[name].is_cuda and bits_of(state[name].cpu()) == bits_of(tensor), (task, name)


def test_no_tall_task_resident_holds_no_mtv(family):
    """Without a tall task (in the archive, or among those asked for) nothing of the mtv is held:
    shared memory is the base and the live weights, and an all-q4 archive (no mtv stored) serves."""
    tmp_path, base, tasks, out = family
    changed = sum(-(-int(np.prod(base[n].shape)) // 64) * 64 for n in ("w", "v", "b", "m", "z"))
    unchanged = base["same"].nbytes
    with tallzip.open(out) as arc:
        with_tall = arc.resident(device="cpu", tasks=["t0", "t1"]).memory()["shared"]
        without = arc.resident(device="cpu", tasks=["t1"])
        assert without.memory()["shared"] - without._layouts[(torch.float32, GROUP)].nbytes == 2 * 4 * changed + unchanged
        assert with_tall - without.memory()["shared"] == 4 * changed  # base + mtv (as XOR on a CPU)
    only_q4 = tmp_path / "q4.tallz"
    tallzip.pack(tmp_path / "tasks", tmp_path / "base.safetensors", only_q4, store=StoreOptions(keep="q4", chunk_elements=CHUNK))
    with tallzip.open(only_q4) as arc:
        assert not {s["role"] for s in arc.manifest["sections"]} & {"mtv", "mask"}
        resident = arc.resident(device="cpu")
        for task in ("t3", "t0"):
            state = resident.switch(task).state_dict()
            for name in ("w", "m", "z"):
                want = np_quant_rebuild(base[name], tasks[task][name], 4, ROWS[name])
                assert state[name].numpy().tobytes() == want.tobytes(), (task, name)


@pytest.mark.parametrize("fixture", ["v1-family.tallz", "v2-family.tallz", "reps-family.tallz"])
def test_fixture_archives_are_served(fixture):
    """Archives of earlier writers (v1, v2 before representations) and the representations fixture:
    every task served as load() gives it (load is checked against numpy in test_format_v2 and
    test_representations)."""
    from pathlib import Path
    with tallzip.open(Path(__file__).resolve().parent / "fixtures" / fixture) as arc:
        resident = arc.resident(device="cpu")
        for task in [*arc.tasks, arc.tasks[0]]:
            state = resident.switch(task).state_dict()
            assert {n: bits_of(v) for n, v in state.items()} == {n: bits_of(v) for n, v in arc.load(task).items()}
