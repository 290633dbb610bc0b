"""The storage-accuracy frontier (issue 13): every way tallzip keeps a family, and the references, as
points (bytes, normalized test accuracy), with their Pareto front.

Every tallzip point is a real `tallzip.pack` of the family: its bytes are the archive's size on disk, and
each task is rebuilt with `tallzip.open(path).load(task)` and evaluated on the test split.

* tall, sum and TIES mtv, lambda per task chosen on val (`select_lambdas`), the mtv as pack stores it by
  default (bfloat16); and the sum mtv kept in float32;
* every task q8 / q4 / q3 / q2 (the task's own vector quantized, `pack(keep=...)`);
* every task exact (bits coded given the base's; every tensor asserted bit-identical to its input file),
  next to zstd level 3 and 19 of the same files, and zipnn when installed (its decode is checked too);
* the automatic choice, `select_representation(on val, tolerance)`: at 0.5% with tall among the
  candidates and without it, and at other tolerances (the mixed settings: tall where it is within the
  tolerance, else the smallest q* that is, else exact);

and as references, computed here:
* the paper's layout: base + mtv in float32 + one bit-packed mask per task, counted as the paper counts
  it ((64 + N) bits per parameter); its accuracy is TALL's with the float32 mtv and the sum row's lambdas;
* EMR-style: one unified vector (the elected sign x the largest |tau| agreeing with it), per task its
  sign-agreement mask and one rescaler (mean |tau_t| over mean |mask_t * unified|); stored as the base
  and the unified vector coded as the archive codes floats, the masks bit-packed + zstd, 4 bytes a rescaler;
* task arithmetic and Consensus TA (k = 2), alpha on val: one merged checkpoint file each.

Every point also has its bytes without the base (as `pack --base-ref` stores it: by identity only),
since the pretrained model is usually public and on the user's disk already; a merged model replaces
the base, so its bytes stay. Ratio = the N fine-tuned files' bytes / the point's bytes.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import blake3
import torch
import zstandard
from safetensors.torch import save_file

import tallzip
from tallzip.options import RunOptions, StoreOptions
from tallzip import merge

from benchmarks.accuracy import ALPHAS, Bench, merge_vector, scaled, select_alpha
from benchmarks.accuracy_library import CANDIDATES, DEFAULT_CODECS, DEFAULT_LEVEL, ROLE_BASE, codecs, summary, to_bits
from benchmarks.fixtures.lossless import zipnn_bytes
from benchmarks.metrics import mean_accuracy, min_normalized_accuracy, normalized_accuracy

AUTO_TOLERANCE = 0.005
MIXED_TOLERANCES = (0.002, 0.01, 0.02)  # the automatic choice at other tolerances: the mixed settings
QUANTIZED = ("q8", "q4", "q3", "q2")
TARGETS = ({"normalized": 0.995, "min_task": 0.99, "ratio": 12.0}, {"normalized": 0.999})  # issue 13, 20 tasks


@dataclass
class Point:
    """One way of keeping the whole family: its bytes and each task's test accuracy."""

    label: str
    kind: str  # "tall", "quantized", "exact", "auto", "lossless file coder", "reference", "merge"
    bytes: int
    base_bytes: int  # of those, the base's (0 where the point has no separate base)
    overhead_bytes: int  # of those, the archive's header and JSON manifest (per section, not per weight)
    test: dict
    representations: dict = field(default_factory=dict)
    settings: dict = field(default_factory=dict)
    normalized: float = 0.0
    min_task: float = 0.0

    @property
    def payload_bytes(self) -> int:
        """Without the base and the archive's manifest: what the ratio tends to on a model with far more
        weights per tensor than this benchmark's small ViT (the manifest grows with tensors, not weights)."""
        return self.bytes - self.base_bytes - self.overhead_bytes

    def as_dict(self, finetuned_bytes: int) -> dict:
        return {**self.__dict__, "ratio": finetuned_bytes / self.bytes,
                "ratio_without_base": finetuned_bytes / (self.bytes - self.base_bytes),
                "ratio_coded_sections_without_base": finetuned_bytes / self.payload_bytes,
                "mean_test": mean_accuracy(self.test)}


BASES = (("self-contained", lambda p: p.bytes), ("base not counted", lambda p: p.bytes - p.base_bytes),
         ("coded sections, no base", lambda p: p.payload_bytes))


class Frontier:
    def __init__(self, bench: Bench):
        self.bench = bench
        self.tasks = bench.tasks
        self.points: list[Point] = []
        self.extra: dict = {}
        self.sum_lambdas: dict | None = None
        self.base_bytes = 0  # the base section of the archives (the same in every archive)
        self._scores: dict = {}

    def add(self, label, kind, nbytes, base_bytes, test, overhead_bytes=0, **settings) -> Point:
        ft = self.bench.finetuned["test"]
        reps = settings.pop("representations", {})
        point = Point(label, kind, int(nbytes), int(base_bytes), int(overhead_bytes), dict(test), reps, settings,
                      normalized_accuracy(test, ft), min_normalized_accuracy(test, ft))
        self.points.append(point)
        self.bench.log(f"  {label:48s} {nbytes:>11,} B  {self.bench.finetuned_bytes / nbytes:6.2f}x  "
                       f"{point.normalized:.2%} (min task {point.min_task:.2%})")
        return point

    def on_val(self, task, state) -> float:
        return self._evaluate(task, state, "val")

    def on_test(self, task, state) -> float:
        return self._evaluate(task, state, "test")

    def _evaluate(self, task, state, split) -> float:
        """Evaluation, remembered by the state's exact bits: the same rebuild (the fine-tuned model each
        automatic choice scores first, a q2 task chosen again at another tolerance) is evaluated once."""
        digest = blake3.blake3()
        for name in sorted(state):
            tensor = state[name].contiguous()
            digest.update(f"{name}{tensor.dtype}{tuple(tensor.shape)}".encode())
            digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
        key = (task, split, digest.hexdigest())
        if key not in self._scores:
            self._scores[key] = self.bench.family.evaluate(task, state, split)
        return self._scores[key]


# --------------------------------------------------------------------------- the front


def pareto_front(points, size=lambda p: p.bytes, accuracy=lambda p: p.normalized) -> list:
    """The points no other point beats: none smaller-or-equal and at least as accurate with one of the two
    strictly better. Ordered by size; ties of size and accuracy keep the first."""
    front = []
    for p in sorted(points, key=lambda p: (size(p), -accuracy(p))):
        if not front or accuracy(p) > accuracy(front[-1]):
            front.append(p)
    return front


# --------------------------------------------------------------------------- tallzip points


def bit_identical(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    view = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
    return torch.equal(a.contiguous().view(view), b.contiguous().view(view))


def pack_point(fr: Frontier, label: str, kind: str, name: str, *, exact_check: bool = False, **pack_options) -> Point:
    """Pack the family with `pack_options`, rebuild every task from the archive, evaluate it on test."""
    bench = fr.bench
    path = bench.work_dir / f"{name}.tallz"
    tallzip.pack(bench.task_paths, bench.base_path, path, StoreOptions(**pack_options), RunOptions(device=bench.device),
                 force=True)
    test = {}
    with tallzip.open(path) as arc:
        reps = {t: arc.representation(t) for t in fr.tasks}
        lambdas = dict(arc.lambdas)
        for task in fr.tasks:
            state = arc.load(task)
            if exact_check:
                original = bench.family.load(task)
                differ = [n for n in original if not bit_identical(state[n], original[n])]
                assert not differ and set(state) == set(original), f"exact {task}: {differ[:3]} not bit-identical"
                test[task] = bench.finetuned["test"][task]  # the fine-tuned model itself, bit for bit
            else:
                test[task] = fr.on_test(task, state)
        sizes = summary(arc)
        choice = arc.manifest.get("representation_choice")
    nbytes = os.path.getsize(path)
    base_bytes = sizes["sections"].get(ROLE_BASE, {}).get("bytes", 0)
    fr.base_bytes = base_bytes
    settings = {"lambdas": lambdas, "task_bytes": {t: sizes["tasks"][t]["representation_bytes"] +
                                                      sizes["tasks"][t]["mask_bytes"] for t in fr.tasks},
                "sections": {role: s["bytes"] for role, s in sizes["sections"].items()},
                **{k: v for k, v in pack_options.items() if k in ("merge", "mtv_dtype", "codecs")}}
    if choice:
        settings["choice"] = choice
    path.unlink()
    return fr.add(label, kind, nbytes, base_bytes, test, nbytes - sum(settings["sections"].values()),
                  representations=reps, **settings)


def tall_points(fr: Frontier) -> None:
    for merge_method, name in (("sum", "sum"), ("ties", "TIES")):
        point = pack_point(fr, f"tall, {name} mtv (bf16), lambda on val", "tall", f"tall-{merge_method}",
                           merge=merge_method, lambdas=tallzip.select_lambdas(fr.on_val))
        if merge_method == "sum":
            fr.sum_lambdas = point.settings["lambdas"]
        # the same masks coded by the context coder (pack --mask-codec bits-ctx): fewer bits, the same models
        pack_point(fr, f"tall, {name} mtv (bf16), bits-ctx masks", "tall", f"tall-{merge_method}-ctx",
                   merge=merge_method, lambdas=point.settings["lambdas"], codecs={"mask": "bits-ctx"})
    pack_point(fr, "tall, sum mtv (fp32), lambda on val", "tall", "tall-sum-fp32", merge="sum",
               lambdas=fr.sum_lambdas, mtv_dtype="float32")


def quantized_points(fr: Frontier) -> None:
    for rep in QUANTIZED:
        pack_point(fr, f"every task {rep}", "quantized", rep, keep=rep)


def auto_points(fr: Frontier, tolerances=(AUTO_TOLERANCE, *MIXED_TOLERANCES)) -> None:
    """select_representation on val; tall rebuilt with the sum row's lambdas, the mtv in bfloat16."""
    for tolerance in tolerances:
        for with_tall in (True, False) if tolerance == AUTO_TOLERANCE else (True,):
            candidates = CANDIDATES if with_tall else tuple(c for c in CANDIDATES if c != "tall")
            label = f"auto {100 * tolerance:g}% on val" + ("" if with_tall else ", no tall")
            pack_point(fr, label, "auto", f"auto-{tolerance}-{with_tall}", merge="sum", lambdas=fr.sum_lambdas,
                       keep=tallzip.select_representation(fr.on_val, tolerance=tolerance, candidates=candidates))


def exact_points(fr: Frontier) -> None:
    """exact, checked bit for bit; and the generic lossless coders of the same N files."""
    pack_point(fr, "every task exact", "exact", "exact", keep="exact", exact_check=True)
    bench = fr.bench
    ft = bench.finetuned["test"]
    data = [Path(bench.task_paths[t]).read_bytes() for t in fr.tasks]
    for level in (3, 19):
        compressor = zstandard.ZstdCompressor(level=level)
        fr.add(f"zstd -{level} of the files", "lossless file coder", sum(len(compressor.compress(d)) for d in data),
               0, ft)
    zipnn = zipnn_bytes(data, "float32")
    if zipnn is not None:
        nbytes, roundtrip, version = zipnn
        fr.add(f"zipnn {version} of the files" + ("" if roundtrip else " (did NOT decode back)"),
               "lossless file coder", nbytes, 0, ft, roundtrip=roundtrip)
    else:
        fr.extra["zipnn"] = "not installed (pip install zipnn==0.5.4)"


# --------------------------------------------------------------------------- references


def paper_point(fr: Frontier) -> None:
    """The paper's storage count: base and mtv in float32 and a bit-packed mask per task; the accuracy of the
    fp32-mtv tall point (the same rebuild: base + mask * fp32 mtv)."""
    tall32 = next(p for p in fr.points if p.label == "tall, sum mtv (fp32), lambda on val")
    params = sum(v.numel() for v in fr.bench.base_state.values() if v.is_floating_point())
    nbytes = 2 * 4 * params + len(fr.tasks) * ((params + 7) // 8)
    fr.add("paper's layout (base + fp32 mtv + 1-bit masks)", "reference", nbytes, 4 * params, tall32.test,
           formula="(64 + N) bits per parameter")


def coded_float_bytes(tensor: torch.Tensor) -> int:
    payload, _ = codecs.encode(DEFAULT_CODECS["float"], to_bits(tensor.contiguous()), level=DEFAULT_LEVEL)
    return len(payload)


def emr_rebuild(base: dict, tasks: list[dict]):
    """EMR-style, on the float tensors flattened: (rebuilt state per task, unified vector, masks, rescalers).
    unified = sign(sum tau) * max |tau_t| over the tasks agreeing with that sign; mask_t = tau_t * unified > 0;
    rescaler_t = sum |tau_t| / sum |mask_t * unified|; rebuilt_t = base + rescaler_t * mask_t * unified."""
    names = [n for n, v in base.items() if v.is_floating_point()]
    flat_base = torch.cat([base[n].reshape(-1).to(torch.float32) for n in names])
    stacked = torch.stack([torch.cat([t[n].reshape(-1).to(torch.float32) for n in names]) - flat_base for t in tasks])
    sign = torch.sign(stacked.sum(0))
    unified = sign * torch.where(stacked * sign > 0, stacked.abs(), torch.zeros(())).amax(0)
    states, masks, rescalers = [], [], []
    for tau in stacked:
        mask = tau * unified > 0
        rescaler = float(tau.abs().sum() / (mask * unified).abs().sum())
        flat = flat_base + rescaler * mask * unified
        state, offset = dict(base), 0
        for n in names:
            count = base[n].numel()
            state[n] = flat[offset:offset + count].reshape(base[n].shape).to(base[n].dtype)
            offset += count
        states.append(state)
        masks.append(mask)
        rescalers.append(rescaler)
    return states, unified, masks, rescalers


def emr_point(fr: Frontier) -> Point:
    bench = fr.bench
    base = bench.base_state
    states, unified, masks, rescalers = emr_rebuild(base, [bench.family.load(t) for t in fr.tasks])
    test = {task: fr.on_test(task, state) for task, state in zip(fr.tasks, states)}
    mask_bytes = sum(len(codecs.encode("bits+zstd", m.numpy(), level=DEFAULT_LEVEL)[0]) for m in masks)
    base_bytes = sum(coded_float_bytes(v) for v in base.values() if v.is_floating_point())
    unified_bytes = coded_float_bytes(unified)
    return fr.add("EMR-style (unified + masks + rescalers)", "reference",
                  base_bytes + unified_bytes + mask_bytes + 4 * len(fr.tasks), base_bytes, test,
                  unified_bytes=unified_bytes, mask_bytes=mask_bytes, rescalers=dict(zip(fr.tasks, rescalers)))


def merge_points(fr: Frontier, alphas=ALPHAS) -> None:
    bench = fr.bench

    def mean_val(state):
        return mean_accuracy(bench.evaluate_all(state, "val"))

    for label, options in (("task arithmetic (1 model)", {"method": "task-arithmetic"}),
                           ("Consensus TA, k=2 (1 model)", {"method": "consensus-ta", "k": 2,
                                                            "lambdas": fr.sum_lambdas})):
        if options.get("k", 0) > len(fr.tasks):
            continue
        merged = merge(bench.task_paths, base=bench.base_path, alpha=1.0, run=RunOptions(device=bench.device), **options)
        vector = merge_vector(bench.base_state, merged)
        alpha, scores = select_alpha(mean_val, bench.base_state, vector, alphas)
        state = scaled(bench.base_state, vector, alpha)
        path = bench.work_dir / "merged.safetensors"
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
        test = {task: fr.on_test(task, state) for task in fr.tasks}
        fr.add(label, "merge", os.path.getsize(path), 0, test, alpha=alpha,
               val_by_alpha={f"{a:g}": s for a, s in scores.items()})
        path.unlink()


def reference_points(fr: Frontier) -> None:
    bench = fr.bench
    fr.add(f"the {len(fr.tasks)} fine-tuned files (fp32)", "reference", bench.finetuned_bytes, 0,
           bench.finetuned["test"])


# --------------------------------------------------------------------------- the run


def run_frontier(bench: Bench, *, alphas=ALPHAS, tolerances=(AUTO_TOLERANCE, *MIXED_TOLERANCES), timings=None,
                 after_phase=None) -> Frontier:
    """Every point on `bench`'s family, the most telling first (a run stopped early keeps those; the automatic
    choice reuses the tall sum point's lambdas); after_phase(frontier) is called after each phase."""
    fr = Frontier(bench)
    phases = (("frontier: references", reference_points), ("frontier: q8..q2", quantized_points),
              ("frontier: tall", tall_points), ("frontier: automatic choice", lambda f: auto_points(f, tolerances)),
              ("frontier: exact and file coders", exact_points),
              ("frontier: paper layout, EMR", lambda f: (paper_point(f), emr_point(f))),
              ("frontier: merges", lambda f: merge_points(f, alphas)))
    for name, phase in phases:
        start = time.perf_counter()
        phase(fr)
        seconds = round(time.perf_counter() - start, 1)
        bench.log(f"[{name}: {seconds} s]")
        if timings is not None:
            timings[name] = seconds
        if after_phase is not None:
            after_phase(fr)
    return fr


def targets_met(fr: Frontier) -> list[str]:
    """Plain statements: which of the issue's targets some point reaches (self-contained, and base not counted)."""
    ft_bytes = fr.bench.finetuned_bytes
    lossy = [p for p in fr.points if p.kind in ("tall", "quantized", "auto", "exact")]
    lines = []
    first, second = TARGETS
    for basis, size in BASES:
        good = [p for p in lossy if p.normalized >= first["normalized"] and p.min_task >= first["min_task"]]
        best = max(good, key=lambda p: ft_bytes / size(p), default=None)
        if best is None:
            lines.append(f"{basis}: no tallzip point reaches >= 99.5% with no task under 99%.")
        else:
            ratio = ft_bytes / size(best)
            verdict = "MET" if ratio >= first["ratio"] else "NOT MET"
            lines.append(f"{basis}: >= 99.5% (no task under 99%) at >= 12x: {verdict} -- best such point "
                         f"'{best.label}' {best.normalized:.3%} (min task {best.min_task:.2%}) at {ratio:.2f}x.")
        top = [p for p in lossy if p.normalized >= second["normalized"]]
        best = max(top, key=lambda p: ft_bytes / size(p), default=None)
        if best is not None:
            lines.append(f"{basis}: >= 99.9% at the best ratio: '{best.label}' {best.normalized:.3%} "
                         f"(min task {best.min_task:.2%}) at {ft_bytes / size(best):.2f}x.")
    return lines
