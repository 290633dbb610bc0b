"""Below two bits per weight (issue 22): sign codes, low-rank factors, their combinations and two published
rivals on the vision family at 8, 14 and 20 tasks, as points (bits per weight per task, storage ratio,
normalized accuracy).

Every point rebuilds every task from its representation (tallzip/ops/lowrank.py, tallzip/ops/signcode.py, tallzip/ops/quantize.py) and
evaluates it on the test split with the accuracy benchmark's functions (benchmarks.family's evaluate, through
benchmarks.frontier's cache of evaluations). Storage is counted from the stored values themselves:

* packed bits: the codes at their width (1 bit a sign, 2 a ternary code, b a b-bit factor or q* code) and
  every scale at its stored precision (bfloat16 unless said), factors included;
* coded bits: the same codes entropy-coded, the smaller of zstd (level 19) of the packed codes and the
  archive's planes+ans codec of the one-byte codes, per code array; scales raw or zstd'd, whichever is
  smaller. This is the "bits per weight per task" column (mean over tasks, / 567,936 weights).

Ratios are against the N fp32 fine-tuned files. The base and the archive overhead come from real
`tallzip.pack`s of the same family (every task q2, and tall with the TIES mtv and bits-ctx masks, lambda
on val, which are also rows here): "self-contained" = the base section as pack stores it (coded fp32) + the
coded payload + an estimate of the archive's manifest (its bytes per section and its fixed part, solved from
those two real archives, times the sections the representation would need); "--base-ref" = the same without
the base; "sections" = the coded payload alone. Rivals (TSV-C, BitDelta) are counted as their papers count
them: the payload only (plus the base when self-contained), no manifest. The tall rows are the real archives'
bytes; tall + residual adds the residual's coded payload and manifest estimate to the real tall archive.

The rivals, one function each:
* `tsv_c` -- Task Singular Vectors, compression (Gargiulo et al., CVPR 2025, arXiv 2412.00081): per task and
  2-D matrix the top floor(r/T) singular triplets of the task's own delta (at least one), kept in float32;
  every other tensor (1-D, and the 4-D patch convolution) kept in full (float32, the files' dtype).
* `bitdelta` -- BitDelta (Liu et al., arXiv 2402.10193): per linear weight matrix the sign of the delta and
  one scale, the mean |delta| of the matrix (the paper's initialization), stored as float16; embeddings
  (positional embedding, the patch convolution) and every 1-D tensor kept in full. NO scale distillation:
  the paper then fine-tunes the scales on model outputs; that step is not done here.

Usage: python -m benchmarks.lowbit --cache-dir /work/cache/vision-family [--tasks 8 14 20] [--threads 1]
Writes benchmarks/results/lowbit_frontier.json and lowbit_frontier.png.
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import zstandard

import tallzip
from tallzip.ops import lowrank as lr
from tallzip.ops import signcode as sc
from tallzip.ops import quantize as qz

from benchmarks.accuracy import Bench
from benchmarks.accuracy_library import codecs, to_bits
from benchmarks.data import TASKS
from benchmarks.family import PRESETS, Family, build_family
from benchmarks.frontier import Frontier, pack_point

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
GOAL = {"ratio": 12.0, "normalized": 0.995, "min_task": 0.99}
Q2 = qz.QuantSpec(2, 128, symmetric=False)  # the archive's q2 (REPRESENTATIONS.md: asymmetric rtn, group 128)
Q3, Q4, Q8 = qz.QuantSpec(3, 128), qz.QuantSpec(4, 128), qz.QuantSpec(8, 128)
ZSTD = zstandard.ZstdCompressor(level=19)
COST_VERSION = 2  # of the bit counting (2: scales zstd'd when smaller); stored results of another are recounted


# --------------------------------------------------------------------------- counting bits


def _zstd_len(data: bytes) -> int:
    return len(ZSTD.compress(data))


def pack_codes(unsigned: np.ndarray, bits: int) -> bytes:
    """Unsigned codes (each < 2**bits) bit-packed at `bits` bits each, little bit first."""
    flat = unsigned.reshape(-1).astype(np.uint8)
    planes = ((flat[:, None] >> np.arange(bits, dtype=np.uint8)) & 1).astype(np.uint8)
    return np.packbits(planes.reshape(-1), bitorder="little").tobytes()


def _ans_len(codes: np.ndarray) -> int:
    return len(codecs.encode("planes+ans", np.ascontiguousarray(codes.reshape(-1)))[0])


@dataclass
class Cost:
    packed: int = 0  # bits
    coded: int = 0  # bits
    sections: int = 0

    def __iadd__(self, other: "Cost"):
        self.packed += other.packed
        self.coded += other.coded
        self.sections += other.sections
        return self


def side_bits(values: torch.Tensor) -> int:
    """Scales (or offsets) at their stored width, or zstd'd when that is smaller (as the archive codes them)."""
    raw = to_bits(values.contiguous()).tobytes()
    return 8 * min(len(raw), _zstd_len(raw))


def quant_cost(q: qz.Quantized) -> Cost:
    spec = q.spec
    codes = q.codes.numpy()
    unsigned = (codes.astype(np.int16) + (spec.code_max if spec.symmetric else 0)).astype(np.uint8)
    side = side_bits(q.scales) + (0 if q.offsets is None else side_bits(q.offsets))
    coded = 8 * min(_zstd_len(pack_codes(unsigned, spec.bits)), _ans_len(codes)) if codes.size else 0
    return Cost(qz.storage_bits(q), coded + side, 2 if q.offsets is None else 3)


def sign_cost(code: sc.SignCode) -> Cost:
    side = side_bits(code.scales)
    if code.kept is None:
        packed = np.packbits(code.negative.numpy().reshape(-1)).tobytes()
        coded = 8 * min(len(packed), _zstd_len(packed))
    else:
        codes = sc.sign_codes(code).numpy()
        coded = 8 * min(_zstd_len(pack_codes((codes + 1).astype(np.uint8), 2)), _ans_len(codes))
    return Cost(sc.sign_storage_bits(code), coded + side, 2)


def any_cost(code) -> Cost:
    return sign_cost(code) if isinstance(code, sc.SignCode) else quant_cost(code)


def lowrank_cost(entry: lr.LowRankTensor) -> Cost:
    cost = Cost()
    if entry.factors is not None:
        for block in entry.factors.left + entry.factors.right:
            cost += quant_cost(block)
        # a format stores a tensor's factor codes in one section and their scales in another
        cost.sections = 2
    for code in (entry.fallback, entry.residual):
        if code is not None:
            cost += any_cost(code)
    return cost


def float_cost(tensor: torch.Tensor, bits: int = 32) -> Cost:
    """A tensor kept in full at `bits` bits per value (the rivals' uncompressed tensors): no coding."""
    return Cost(tensor.numel() * bits, tensor.numel() * bits, 1)


# --------------------------------------------------------------------------- encoders: taus -> (values, cost)


def encode_quant(spec: qz.QuantSpec, matrix: bool = False):
    """q* of every tensor (matrix: of its (d0, d1*...) view, groups along the input dimensions)."""
    def encode(taus):
        values, cost = {}, Cost()
        for name, tau in taus.items():
            q = qz.quantize(lr.matrix_view(tau) if matrix else tau, spec)
            values[name] = qz.dequantize(q).reshape(tau.shape)
            cost += quant_cost(q)
        return values, cost
    return encode


def encode_sign(spec: sc.SignSpec, vectors: qz.QuantSpec | None = None):
    """A sign code for every tensor (vectors: another quantizer for tensors of fewer than two dimensions)."""
    def encode(taus):
        values, cost = {}, Cost()
        for name, tau in taus.items():
            if vectors is not None and tau.dim() < 2:
                q = qz.quantize(tau, vectors)
                values[name] = qz.dequantize(q)
                cost += quant_cost(q)
                continue
            code = sc.sign_quantize(tau, spec)
            values[name] = sc.sign_dequantize(code)
            cost += sign_cost(code)
        return values, cost
    return encode


def encode_lowrank(spec: lr.LowRankSpec):
    def encode(taus):
        entries = lr.lowrank_task(taus, spec)
        values, cost = {}, Cost()
        for name, entry in entries.items():
            values[name] = lr.lowrank_decode(entry)
            cost += lowrank_cost(entry)
        return values, cost
    return encode


def encode_split(chosen, encode_chosen, encode_rest):
    """`encode_chosen` for the tensors whose name `chosen(name)` accepts, `encode_rest` for the others."""
    def encode(taus):
        values, cost = encode_rest({n: t for n, t in taus.items() if not chosen(n)})
        more_values, more = encode_chosen({n: t for n, t in taus.items() if chosen(n)})
        cost += more
        return {**values, **more_values}, cost
    return encode


EMBEDDING_AND_PROJECTION = ("conv1.weight", "positional_embedding", "proj")
PATCH_CONV = "conv1.weight"  # the patch embedding: (128, 3, 7, 7), the tensor low rank keeps worst


def encode_residual_of(first, second):
    """`first`, then `second` on what `first` misses (a residual code)."""
    def encode(taus):
        values, cost = first(taus)
        rest, more = second({n: taus[n].to(torch.float32) - values[n] for n in taus})
        cost += more
        return {n: values[n] + rest[n] for n in taus}, cost
    return encode


# --------------------------------------------------------------------------- the rivals


def tsv_c(taus: dict, n_tasks: int, *, conv_as_matrix: bool = False):
    """Task Singular Vectors, compression (arXiv 2412.00081): the top floor(r/T) singular triplets of each 2-D
    task matrix (at least one), float32; other tensors in full. conv_as_matrix: also the 4-D patch convolution,
    seen as (out, in*kh*kw) (a variant; the paper's method applies to 2-D layers)."""
    values, cost = {}, Cost()
    for name, tau in taus.items():
        is_matrix = tau.dim() == 2 or (conv_as_matrix and tau.dim() > 2)
        if not is_matrix:
            values[name] = tau.to(torch.float32)
            cost += float_cost(tau)
            continue
        m, n = tau.shape[0], tau[0].numel()
        k = max(1, min(m, n) // n_tasks)
        u, s, vh = torch.linalg.svd(tau.reshape(m, n).to(torch.float64), full_matrices=False)
        values[name] = ((u[:, :k] * s[:k]) @ vh[:k]).to(torch.float32).reshape(tau.shape)
        cost += Cost(32 * k * (m + n + 1), 32 * k * (m + n + 1), 3)
    return values, cost


def bitdelta(taus: dict):
    """BitDelta (arXiv 2402.10193) without its scale distillation: each linear weight matrix as sign(delta) times
    one float16 scale, the mean |delta| of the matrix; embeddings and 1-D tensors in full (float32)."""
    values, cost = {}, Cost()
    for name, tau in taus.items():
        if tau.dim() != 2 or "embedding" in name:
            values[name] = tau.to(torch.float32)
            cost += float_cost(tau)
            continue
        scale = tau.to(torch.float32).abs().mean().to(torch.float16).to(torch.float32)
        values[name] = torch.where(tau < 0, -scale, scale)
        cost += Cost(tau.numel() + 16, tau.numel() + 16, 2)
    return values, cost


# --------------------------------------------------------------------------- points


@dataclass
class Point:
    label: str
    kind: str  # "q1", "sign", "low-rank", "combination", "rival", "reference", "auto"
    test: dict
    payload_bits: dict  # task -> coded bits of that task's payload
    packed_bits: dict  # task -> packed bits
    sections: int = 0  # archive sections it would need (manifest estimate), 0 for the rivals
    shared_bytes: int = 0  # bytes beyond the base shared by every task (a tall archive without its base)
    real_bytes: int | None = None  # a real archive's size, when the point is one
    real_base_bytes: int = 0
    choice: dict = field(default_factory=dict)
    task_sections: dict = field(default_factory=dict)  # task -> sections, where tasks differ (the automatic choice)


class Probe:
    """The 20-task (largest) family: per-task encodings are the same at 8, 14 and 20 tasks (the tasks are the
    first N of one order), so each is computed once and the points for fewer tasks are its prefixes."""

    def __init__(self, bench: Bench, store: Path | None = None):
        self.bench = bench
        # per (label, task) results kept on disk between runs: a run over the first tasks of a family still
        # training fills it, the full run then computes only what is missing (the encodings are deterministic)
        self.store = store
        self.stored = json.loads(store.read_text()) if store is not None and store.exists() else {}
        self.fr = Frontier(bench)
        self.tasks = bench.tasks
        self.base = bench.base_state
        self.params = sum(v.numel() for v in self.base.values())
        self.points: dict[tuple, Point] = {}  # (label, n_tasks or None) -> point
        self.val: dict[tuple, dict] = {}  # label -> task -> val accuracy (the automatic choice)
        self.seconds: dict = {}

    def taus(self, task: str) -> dict:
        tuned = self.bench.family.load(task)
        return {n: tuned[n].to(torch.float32) - b.to(torch.float32) for n, b in self.base.items() if b.is_floating_point()}

    def state(self, values: dict) -> dict:
        return {n: (b.to(torch.float32) + values[n]).to(b.dtype) if n in values else b for n, b in self.base.items()}

    def run(self, label: str, kind: str, encode, *, tasks=None, n_key=None, with_val=False, log=True) -> Point:
        start = time.perf_counter()
        tasks = tasks or self.tasks
        test, coded, packed, sections = {}, {}, {}, 0
        for task in tasks:
            known = self.stored.get(label, {}).get(task)
            if known is not None and known.get("cost_version") != COST_VERSION:
                # the accuracy stands (the same encoding); the bits are counted again
                _, cost = encode(self.taus(task))
                known.update(coded=cost.coded, packed=cost.packed, sections=cost.sections, cost_version=COST_VERSION)
            if known is None or (with_val and known["val"] is None):
                values, cost = encode(self.taus(task))
                state = self.state(values)
                known = {"test": self.fr.on_test(task, state), "val": self.fr.on_val(task, state) if with_val else None,
                         "coded": cost.coded, "packed": cost.packed, "sections": cost.sections,
                         "cost_version": COST_VERSION}
                self.stored.setdefault(label, {})[task] = known
            test[task], coded[task], packed[task] = known["test"], known["coded"], known["packed"]
            if with_val:
                self.val.setdefault(label, {})[task] = known["val"]
            sections = max(sections, known["sections"])
        if self.store is not None:
            self.store.write_text(json.dumps(self.stored))
        point = Point(label, kind, test, coded, packed, sections if kind != "rival" else 0)
        self.points[(label, n_key)] = point
        self.seconds[label] = round(time.perf_counter() - start, 1)
        if log:
            ft = self.bench.finetuned["test"]
            norm = [test[t] / ft[t] for t in tasks]
            self.bench.log(f"  {label:58s} {statistics.mean(coded.values()) / self.params:6.3f} b/w  "
                           f"{statistics.mean(norm):.2%} (min {min(norm):.2%})  [{self.seconds[label]} s]")
        return point


def real_point(probe: Probe, label: str, name: str, n_tasks: int, **pack_options) -> Point:
    """A real archive of the first n_tasks (benchmarks.frontier.pack_point), as a Point."""
    bench = copy.copy(probe.bench)  # the same family and work folder, its first n_tasks
    bench.tasks = probe.tasks[:n_tasks]
    bench.task_paths = {t: probe.bench.task_paths[t] for t in bench.tasks}
    bench.finetuned = {split: {t: acc[t] for t in bench.tasks} for split, acc in probe.bench.finetuned.items()}
    bench.finetuned_bytes = sum(Path(path).stat().st_size for path in bench.task_paths.values())
    sub = Frontier(bench)
    p = pack_point(sub, label, "tall" if "tall" in name else "quantized", name, **pack_options)
    task_bytes = p.settings["task_bytes"]
    point = Point(label, "reference", dict(p.test), {t: 8 * task_bytes[t] for t in sub.tasks},
                  {t: 8 * task_bytes[t] for t in sub.tasks}, 0, real_bytes=p.bytes, real_base_bytes=p.base_bytes)
    point.choice = {"lambdas": p.settings.get("lambdas"), "sections": p.settings["sections"],
                    "overhead_bytes": p.overhead_bytes}
    probe.points[(label, n_tasks)] = point
    return point


# --------------------------------------------------------------------------- the grid


def q1_grid():
    return [("q1 g128 (sign + bf16 scale per 128)", "q1", encode_sign(sc.SignSpec(128))),
            ("q1 per row", "q1", encode_sign(sc.SignSpec(None))),
            ("q1 per tensor", "q1", encode_sign(sc.SignSpec(sc.TENSOR))),
            ("q1 g128, 1-D tensors q8", "q1", encode_sign(sc.SignSpec(128), vectors=Q8)),
            ("q1 per tensor, 1-D tensors q8", "q1", encode_sign(sc.SignSpec(sc.TENSOR), vectors=Q8))]


def sign_grid():
    return [(f"sparse sign {d:g} g128", "sign", encode_sign(sc.SignSpec(128, density=d))) for d in (0.2, 0.3, 0.5)]


def lowrank_grid():
    def spec(**kw):
        return encode_lowrank(lr.LowRankSpec(**kw))
    rows = []
    for bits in (4, 3):
        for energy in (0.85, 0.9, 0.95):
            rows.append((f"low-rank energy {energy:g}, {bits}-bit factors", "low-rank",
                         spec(budget=None, energy=energy, rest_bits=bits)))
    rows.append(("low-rank energy 0.92, 4-bit factors", "low-rank", spec(budget=None, energy=0.92, rest_bits=4)))
    rows.append(("low-rank energy 0.9, 8-bit factors", "low-rank", spec(budget=None, energy=0.9, rest_bits=8)))
    rows.append(("low-rank energy 0.9, 4-bit; conv1, pos-emb, proj q4", "low-rank",
                 encode_split(lambda n: n in EMBEDDING_AND_PROJECTION, encode_quant(Q4),
                              spec(budget=None, energy=0.9, rest_bits=4))))
    for energy in (0.85, 0.88, 0.9, 0.92, 0.95):
        rows.append((f"low-rank energy {energy:g}, 4-bit; conv1 q3", "low-rank",
                     encode_split(lambda n: n == PATCH_CONV, encode_quant(Q3, matrix=True),
                                  spec(budget=None, energy=energy, rest_bits=4))))
    rows.append(("low-rank energy 0.95 attention, 0.9 other, 4-bit", "low-rank",
                 encode_split(lambda n: ".attn." in n, spec(budget=None, energy=0.95, rest_bits=4),
                              spec(budget=None, energy=0.9, rest_bits=4))))
    rows.append(("low-rank energy 0.9, 8b x4 then 3-bit factors", "low-rank",
                 spec(budget=None, energy=0.9, tiers=((4, 8),), rest_bits=3)))
    rows.append(("low-rank energy 0.9, 8b x2, 4b x8, then 2-bit (Delta-CoMe-like)", "low-rank",
                 spec(budget=None, energy=0.9, tiers=((2, 8), (8, 4)), rest_bits=2)))
    rows.append(("low-rank energy 0.9, 4-bit factors, no refit", "low-rank",
                 spec(budget=None, energy=0.9, rest_bits=4, refit=False)))
    rows.append(("low-rank energy 0.9, 4-bit factors, mse clip", "low-rank",
                 spec(budget=None, energy=0.9, rest_bits=4, factor_method="mse")))
    for budget in (0.75, 1.0):
        rows.append((f"low-rank {budget:g} b/w per tensor, 4-bit factors", "low-rank", spec(budget=budget, rest_bits=4)))
        rows.append((f"low-rank {budget:g} b/w per task (allocated), 4-bit", "low-rank",
                     spec(budget=budget, rest_bits=4, allocation="task")))
    return rows


def combination_grid():
    def spec(**kw):
        return encode_lowrank(lr.LowRankSpec(**kw))
    return [("low-rank energy 0.85 4-bit + sparse sign 0.1 residual", "combination",
             spec(budget=None, energy=0.85, rest_bits=4, residual=sc.SignSpec(128, density=0.1))),
            ("low-rank energy 0.9 3-bit + ternary (q2 sym) residual", "combination",
             spec(budget=None, energy=0.9, rest_bits=3, residual=qz.QuantSpec(2, 128))),
            ("low-rank 0.25 b/w 4-bit + q1 g128 residual", "combination",
             spec(budget=0.25, rest_bits=4, residual=sc.SignSpec(128))),
            ("q1 g128 + its residual as sparse sign 0.1", "combination",
             encode_residual_of(encode_sign(sc.SignSpec(128)), encode_sign(sc.SignSpec(128, density=0.1))))]


def reference_grid():
    return [("q2 (asym g128, probe count)", "reference", encode_quant(Q2)),
            ("q2 ternary (sym g128, probe count)", "reference", encode_quant(qz.QuantSpec(2, 128))),
            ("q3 (sym g128, probe count)", "reference", encode_quant(Q3)),
            ("q4 (sym g128, probe count)", "reference", encode_quant(Q4)),
            ("q8 (sym g128, probe count)", "reference", encode_quant(Q8))]


AUTO_CANDIDATES = ("q1 g128 (sign + bf16 scale per 128)", "low-rank energy 0.85, 4-bit; conv1 q3",
                   "low-rank energy 0.88, 4-bit; conv1 q3", "low-rank energy 0.9, 4-bit; conv1 q3",
                   "low-rank energy 0.92, 4-bit; conv1 q3", "low-rank energy 0.95, 4-bit; conv1 q3",
                   "q2 (asym g128, probe count)",
                   "q3 (sym g128, probe count)", "q4 (sym g128, probe count)", "q8 (sym g128, probe count)")


def auto_point(probe: Probe, tolerance: float, candidates=AUTO_CANDIDATES, label=None) -> Point:
    """Per task the candidate of fewest coded bits whose VAL accuracy is within `tolerance` of the fine-tuned
    model's (select_representation's rule), q8 when none is; its test accuracy is then read."""
    ft_val = probe.bench.finetuned["val"]
    label = label or f"auto {100 * tolerance:g}% on val (sub-2-bit candidates + q2..q8)"
    test, coded, packed, choice, sections = {}, {}, {}, {}, {}
    for task in probe.tasks:
        ranked = sorted((probe.points[(c, None)].payload_bits[task], c) for c in candidates)
        pick = next((c for _, c in ranked if probe.val[c][task] >= ft_val[task] - tolerance * abs(ft_val[task])),
                    "q8 (sym g128, probe count)")
        p = probe.points[(pick, None)]
        test[task], coded[task], packed[task], choice[task] = p.test[task], p.payload_bits[task], p.packed_bits[task], pick
        sections[task] = p.sections
    point = Point(label, "auto", test, coded, packed, max(sections.values()), choice=choice, task_sections=sections)
    probe.points[(label, None)] = point
    return point


# --------------------------------------------------------------------------- tall and tall + residual (per N)


def tall_points(probe: Probe, n_tasks: int, residuals) -> None:
    """tall, TIES mtv, bits-ctx masks, lambda on val: a real archive of the first n_tasks; then each residual
    encoder on theta_t - (the task as that archive rebuilds it)."""
    label = "tall TIES bits-ctx, lambda on val (real archive)"
    sub_tasks = probe.tasks[:n_tasks]
    point = real_point(probe, label, f"tall-{n_tasks}", n_tasks, merge="ties",
                       lambdas=tallzip.select_lambdas(probe.fr.on_val), codecs={"mask": "bits-ctx"})
    lambdas = point.choice["lambdas"]
    path = probe.bench.work_dir / f"tall-keep-{n_tasks}.tallz"
    sub = {t: probe.bench.task_paths[t] for t in sub_tasks}
    tallzip.pack(sub, probe.bench.base_path, path, merge="ties", lambdas=lambdas, codecs={"mask": "bits-ctx"},
                 device=probe.bench.device, force=True)
    archive_bytes = path.stat().st_size
    with tallzip.open(path) as arc:
        rebuilt = {t: arc.load(t) for t in sub_tasks}
    path.unlink()
    for res_label, encode in residuals:
        lab = f"tall + {res_label} residual"
        test, coded, packed, sections = {}, {}, {}, 0
        for task in sub_tasks:
            tuned = probe.bench.family.load(task)
            residual = {n: tuned[n].to(torch.float32) - rebuilt[task][n].to(torch.float32) for n in probe.base}
            values, cost = encode(residual)
            state = {n: (rebuilt[task][n].to(torch.float32) + values[n]).to(tuned[n].dtype) for n in probe.base}
            test[task] = probe.fr.on_test(task, state)
            coded[task], packed[task] = cost.coded, cost.packed
            sections = max(sections, cost.sections)
        p = Point(lab, "combination", test, coded, packed, sections, real_bytes=archive_bytes,
                  real_base_bytes=point.real_base_bytes, choice={"tall_overhead_bytes": point.choice["overhead_bytes"]})
        probe.points[(lab, n_tasks)] = p
        ft = probe.bench.finetuned["test"]
        probe.bench.log(f"  [{n_tasks} tasks] {lab:48s} {statistics.mean(coded.values()) / probe.params:6.3f} b/w "
                        f"residual, {statistics.mean(test[t] / ft[t] for t in sub_tasks):.2%}")


# --------------------------------------------------------------------------- aggregation


def manifest_model(probe: Probe, n_tasks: int) -> tuple[float, float]:
    """(fixed bytes, bytes per section) of the archive's manifest and header, solved from the real q2 and tall
    archives of n_tasks: overhead = fixed + per_section * sections (their sections counted from the manifest)."""
    q2 = probe.points[("every task q2 (real archive)", n_tasks)]
    tall = probe.points[("tall TIES bits-ctx, lambda on val (real archive)", n_tasks)]
    n_tensors = sum(1 for v in probe.base.values() if v.is_floating_point())
    q2_sections = n_tensors + 3 * n_tasks * n_tensors  # base; codes, scales, offsets per task tensor
    tall_sections = 2 * n_tensors + n_tasks * n_tensors  # base, mtv; one mask per task tensor
    a = np.array([[1.0, q2_sections], [1.0, tall_sections]])
    b = np.array([q2.choice["overhead_bytes"], tall.choice["overhead_bytes"]], dtype=float)
    fixed, per_section = np.linalg.solve(a, b)
    return float(fixed), float(per_section)


def summarize(probe: Probe, n_tasks: int) -> list[dict]:
    tasks = probe.tasks[:n_tasks]
    ft = {t: probe.bench.finetuned["test"][t] for t in tasks}
    files = sum(Path(probe.bench.task_paths[t]).stat().st_size for t in tasks)
    base_bytes = probe.points[("every task q2 (real archive)", n_tasks)].real_base_bytes
    fixed, per_section = manifest_model(probe, n_tasks)
    n_tensors = sum(1 for v in probe.base.values() if v.is_floating_point())
    rows = []
    for (label, key), p in probe.points.items():
        if key not in (None, n_tasks):
            continue
        norm = {t: p.test[t] / ft[t] for t in tasks}
        payload = sum(p.payload_bits[t] for t in tasks) / 8
        packed = sum(p.packed_bits[t] for t in tasks) / 8
        if p.real_bytes is not None and p.kind == "reference":  # a real archive: its bytes
            total, base, manifest = p.real_bytes, p.real_base_bytes, p.choice["overhead_bytes"]
            payload = packed = total - base - manifest
        elif p.real_bytes is not None:  # tall + residual: the real tall archive, then the residual's sections
            tall_payload = p.real_bytes - p.real_base_bytes - p.choice["tall_overhead_bytes"]
            manifest = p.choice["tall_overhead_bytes"] + per_section * p.sections * n_tasks
            total, base = p.real_bytes + payload + per_section * p.sections * n_tasks, p.real_base_bytes
            payload, packed = payload + tall_payload, packed + tall_payload
        else:
            task_sections = sum(p.task_sections[t] for t in tasks) if p.task_sections else p.sections * n_tasks
            manifest = 0.0 if p.kind == "rival" else fixed + per_section * (n_tensors + task_sections)
            base = base_bytes
            total = base + payload + manifest
        rows.append({"label": label, "kind": p.kind, "n_tasks": n_tasks,
                     "bits_per_weight": 8 * payload / n_tasks / probe.params,
                     "packed_bits_per_weight": 8 * packed / n_tasks / probe.params,
                     "normalized": statistics.mean(norm.values()), "min_task": min(norm.values()),
                     "worst_task": min(norm, key=norm.get),
                     "bytes": round(total), "base_bytes": base, "manifest_bytes": round(manifest),
                     "ratio": files / total, "ratio_base_ref": files / (total - base),
                     "ratio_sections": files / max(payload, 1),
                     "per_task_normalized": norm, "choice": {t: p.choice[t] for t in tasks} if p.kind == "auto" else {},
                     "sections_per_task": p.sections, "manifest_model": {"fixed": fixed, "per_section": per_section}})
    rows.sort(key=lambda r: -r["ratio"])
    return rows


def meets(row) -> bool:
    return row["ratio"] >= GOAL["ratio"] and row["normalized"] >= GOAL["normalized"] and row["min_task"] >= GOAL["min_task"]


def format_table(rows: list[dict], n_tasks: int) -> str:
    head = (f"{'':1s} {'point':62s} {'b/w/task':>8s} {'packed':>6s} {'self-cont.':>10s} {'base-ref':>8s} "
            f"{'sections':>8s} {'normalized':>10s} {'min task':>8s}")
    lines = [f"N = {n_tasks} tasks", head, "-" * len(head)]
    for r in rows:
        lines.append(f"{'G' if meets(r) else ' '} {r['label'][:62]:62s} {r['bits_per_weight']:8.3f} "
                     f"{r['packed_bits_per_weight']:6.3f} {r['ratio']:9.2f}x {r['ratio_base_ref']:7.2f}x "
                     f"{r['ratio_sections']:7.2f}x {r['normalized']:10.2%} {r['min_task']:8.2%}")
    return "\n".join(lines)


def goal_lines(rows: list[dict], n_tasks: int) -> list[str]:
    out = []
    good = [r for r in rows if r["normalized"] >= GOAL["normalized"] and r["min_task"] >= GOAL["min_task"]]
    best = max(good, key=lambda r: r["ratio"], default=None)
    if best:
        verdict = "MET" if best["ratio"] >= GOAL["ratio"] else "NOT MET"
        out.append(f"{n_tasks} tasks, >= 12x self-contained at >= 99.5% with no task under 99%: {verdict}; best such "
                   f"point '{best['label']}' {best['ratio']:.2f}x ({best['bits_per_weight']:.3f} b/w per task), "
                   f"{best['normalized']:.2%}, min {best['min_task']:.2%}")
    fast = [r for r in rows if r["ratio"] >= GOAL["ratio"]]
    top = max(fast, key=lambda r: (r["min_task"] >= GOAL["min_task"], r["normalized"]), default=None)
    if top:
        out.append(f"{n_tasks} tasks, most accurate point at >= 12x: '{top['label']}' {top['ratio']:.2f}x, "
                   f"{top['normalized']:.2%}, min {top['min_task']:.2%} ({top['worst_task']})")
    return out


def _front(rows, ratio_key):
    """Rows no other row beats on both ratio (higher) and normalized accuracy (higher)."""
    front, best = [], -1.0
    for r in sorted(rows, key=lambda r: (-r[ratio_key], -r["normalized"])):
        if r["normalized"] > best:
            front.append(r)
            best = r["normalized"]
    return front


def plot(results: dict, path: Path) -> None:
    """Per number of tasks (columns): the self-contained ratio (top) and the --base-ref ratio (bottom) against
    normalized accuracy; o = every task >= 99%, x = some task under it; the Pareto front and the rivals named."""
    from matplotlib.figure import Figure

    colours = {"q1": "tab:red", "sign": "tab:orange", "low-rank": "tab:green", "combination": "tab:purple",
               "rival": "black", "reference": "tab:blue", "auto": "tab:brown"}
    fig = Figure(figsize=(20, 12), layout="constrained")
    axes = fig.subplots(2, len(results), squeeze=False)
    for column, (n, rows) in enumerate(results.items()):
        for row_index, (key, what) in enumerate((("ratio", "self-contained"), ("ratio_base_ref", "--base-ref"))):
            ax = axes[row_index][column]
            for r in rows:
                ax.scatter(r[key], 100 * r["normalized"], c=colours.get(r["kind"], "grey"), s=30,
                           marker="o" if r["min_task"] >= GOAL["min_task"] else "x")
            named = {id(r): r for r in _front(rows, key)}
            named.update({id(r): r for r in rows if r["kind"] == "rival" or "real archive" in r["label"]})
            for r in named.values():
                if r["normalized"] >= 0.93:
                    ax.annotate(r["label"][:44], (r[key], 100 * r["normalized"]), fontsize=6.5, alpha=0.8,
                                xytext=(3, 2), textcoords="offset points")
            if key == "ratio":
                ax.axvline(GOAL["ratio"], color="grey", ls=":")
            ax.axhline(100 * GOAL["normalized"], color="grey", ls=":")
            ax.set_xscale("log")
            ax.set_ylim(93, 100.5)
            ax.set_xlabel(f"{what} ratio vs {n} fp32 files (log)")
            ax.set_ylabel("normalized test accuracy (%)")
            ax.set_title(f"{n} tasks, {what} (x: some task under 99%)")
    handles = [axes[0][0].scatter([], [], c=c, label=k) for k, c in colours.items()]
    fig.legend(handles=handles, loc="outside lower center", ncols=len(colours))
    fig.savefig(path, dpi=100)


# --------------------------------------------------------------------------- main


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, nargs="+", default=[8, 14, 20])
    parser.add_argument("--cache-dir", type=Path, default=None, help="the family's cache (benchmarks.family)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="only q1 g128, one low-rank row and the references")
    parser.add_argument("--out", type=Path, default=RESULTS / "lowbit_frontier.json")
    parser.add_argument("--store", type=Path, default=None,
                        help="keep per-task results here (JSON) and reuse them: the encodings are deterministic")
    parser.add_argument("--plot-only", action="store_true", help="redraw the PNG from --out's JSON and stop")
    parser.add_argument("--first", type=int, default=None, metavar="K",
                        help="only the per-task points of the first K tasks already built in --cache-dir (no "
                             "training, nothing per N), into --store: to start while the family still trains")
    args = parser.parse_args(argv)
    command = "python -m benchmarks.lowbit " + " ".join(sys.argv[1:] if argv is None else argv)
    if args.plot_only:
        plot(json.loads(args.out.read_text())["runs"], args.out.with_suffix(".png"))
        return 0
    print(f"$ {command}", flush=True)
    start = time.perf_counter()
    n_max = max(args.tasks)
    if args.first is not None:
        family = Family(args.cache_dir, [task.name for task in TASKS[:args.first]])
    else:
        family = build_family(n_max, args.cache_dir, config=PRESETS["cpu"], num_threads=args.threads)
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="tallzip-lowbit-") as work_dir:
        bench = Bench(family, Path(work_dir))
        probe = Probe(bench, args.store)
        print(f"{len(probe.tasks)} tasks, {probe.params:,} weights per checkpoint", flush=True)
        grids = reference_grid() + q1_grid()
        if not args.quick:
            grids += sign_grid() + lowrank_grid() + combination_grid()
        else:
            grids += [lowrank_grid()[1]]
        for label, kind, encode in grids:
            probe.run(label, kind, encode, with_val=label in AUTO_CANDIDATES)
        probe.run("BitDelta (rival; no scale distillation)", "rival", bitdelta)
        if args.first is not None:
            print(f"per-task points of the first {args.first} tasks stored in {args.store}")
            return 0
        for n in args.tasks:
            probe.run(f"TSV-C (rival), T = {n}", "rival", lambda taus, n=n: tsv_c(taus, n), tasks=probe.tasks[:n], n_key=n)
            probe.run(f"TSV-C (rival), T = {n}, conv as matrix", "rival",
                      lambda taus, n=n: tsv_c(taus, n, conv_as_matrix=True), tasks=probe.tasks[:n], n_key=n)
        if not args.quick:
            for tol in (0.005, 0.0):
                auto_point(probe, tol)
        residuals = [("low-rank 0.1 b/w (4-bit)", encode_lowrank(lr.LowRankSpec(budget=0.1, rest_bits=4))),
                     ("low-rank 0.25 b/w (4-bit)", encode_lowrank(lr.LowRankSpec(budget=0.25, rest_bits=4))),
                     ("q1 g128", encode_sign(sc.SignSpec(128))),
                     ("sparse sign 0.05", encode_sign(sc.SignSpec(128, density=0.05)))]
        for n in args.tasks:
            real_point(probe, "every task q2 (real archive)", f"q2-{n}", n, keep="q2")
            tall_points(probe, n, residuals if not args.quick else residuals[:1])
        results = {n: summarize(probe, n) for n in args.tasks}
    print()
    for n, rows in results.items():
        print(format_table(rows, n))
        print()
    lines = [line for n, rows in results.items() for line in goal_lines(rows, n)]
    print("\n".join(lines))
    elapsed = round(time.perf_counter() - start)
    print(f"elapsed {elapsed} s")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"command": command, "params": probe.params, "goal": GOAL, "verdicts": lines,
                                    "seconds": probe.seconds, "elapsed_seconds": elapsed,
                                    "runs": {str(n): rows for n, rows in results.items()}}, indent=1) + "\n")
    plot(results, args.out.with_suffix(".png"))
    print(f"wrote {args.out} and {args.out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
