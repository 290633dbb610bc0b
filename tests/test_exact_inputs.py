"""`--keep exact` gives back each input file's tensors byte for byte, whatever they are: bfloat16,
float16, float32, float64, integer and bool tensors, a tensor the task keeps in another dtype than
the base, NaN payloads, signed zeros and infinities, and from a safetensors file, a torch pickle
and a sharded folder with a side file alike (compared with the inputs as torch reads them)."""
from __future__ import annotations

import json

import torch
from safetensors.torch import load_file, save_file

import tallzip
from tallzip.options import StoreOptions


def _bytes(t: torch.Tensor) -> bytes:
    return t.reshape(-1).contiguous().view(torch.uint8).numpy().tobytes()


def test_exact_is_byte_identical_for_every_dtype_and_input_format(tmp_path):
    g = torch.Generator().manual_seed(0)
    base = {"bf": torch.randn(50, 40, generator=g).bfloat16(), "hf": torch.randn(700, generator=g).half(),
            "f32": torch.randn(30, 70, generator=g), "f64": torch.randn(9, generator=g).double(),
            "i": torch.arange(10), "bo": torch.tensor([True, False, True]), "u8": torch.arange(5, dtype=torch.uint8),
            "mix": torch.randn(64, generator=g), "odd": torch.randn(16, generator=g)}
    save_file(base, str(tmp_path / "base.safetensors"))
    (tmp_path / "tasks").mkdir()
    tasks = {}
    for k in range(3):
        t = {n: (v + (0.01 * torch.randn(v.shape, generator=g)).to(v.dtype) if v.is_floating_point() else v.clone())
             for n, v in base.items()}
        t["i"] = t["i"] + k
        t["bo"] = ~t["bo"] if k == 1 else t["bo"]
        t["mix"] = t["mix"].bfloat16()  # another dtype than the base's
        nan = torch.tensor([0x7FC00001 + k], dtype=torch.int32).view(torch.float32)  # a NaN with a payload
        t["odd"][:4] = torch.cat([nan, torch.tensor([-0.0, float("inf"), -float("inf")])])
        t[f"head{k}"] = torch.randn(3, 4, generator=g)
        tasks[f"t{k}"] = t
    save_file(tasks["t0"], str(tmp_path / "tasks" / "t0.safetensors"))
    torch.save(tasks["t1"], tmp_path / "tasks" / "t1.pt")
    sharded = tmp_path / "tasks" / "t2"
    sharded.mkdir()
    names = list(tasks["t2"])
    files = {"model-00001-of-00002.safetensors": names[:4], "model-00002-of-00002.safetensors": names[4:]}
    for file, part in files.items():
        save_file({n: tasks["t2"][n] for n in part}, str(sharded / file))
    (sharded / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": {n: f for f, part in files.items() for n in part}}))
    (sharded / "config.json").write_text('{"side": 1}')
    out = tmp_path / "a.tallz"
    tallzip.pack(tmp_path / "tasks", tmp_path / "base.safetensors", out, store=StoreOptions(keep="exact", chunk_elements=1024, allow_nonfinite=True))
    with tallzip.open(out) as arc:
        roles = {(s["role"], s["tensor"]) for s in arc.manifest["sections"] if s["task"] == "t0"}
        assert {("delta", "bf"), ("delta", "hf"), ("delta", "f32"), ("delta", "f64"), ("own", "mix")} <= roles
        paths = arc.extract(None, tmp_path / "x").paths
        for task, path in zip(arc.tasks, paths):
            if path.suffix == ".pt":
                got = torch.load(path, weights_only=True)
            elif path.is_dir():
                got = {}
                for f in path.glob("*.safetensors"):
                    got.update(load_file(str(f)))
                assert (path / "config.json").read_text() == '{"side": 1}'
            else:
                got = load_file(str(path))
            want = tasks[task]
            assert set(got) == set(want)
            for n in want:
                assert got[n].dtype == want[n].dtype and got[n].shape == want[n].shape, (task, n)
                assert _bytes(got[n]) == _bytes(want[n]), (task, n)
            loaded = arc.load(task)
            assert all(_bytes(loaded[n]) == _bytes(want[n]) for n in want), task
