"""Below two bits per weight on the language family (issue 22): q1 sign codes, quantized low-rank factors, their
combination and the TSV-C and BitDelta rivals on the 8 full fine-tunes of benchmarks/language.

Each point rebuilds every task as base + decoded task vector, rounded to the folders' bf16 (as an extracted
archive is), and scores it on the test split with the benchmark's own evaluation (scoring.Family: gain kept on the
generative tasks, normalized accuracy on the classification ones; "quality", 100% = the fine-tune). The encoders,
the bit counting and the rivals are benchmarks/lowbit.py's (imported, one home): codes entropy-coded (the smaller
of zstd -19 of the packed codes and the archive's planes+ans codec), scales at their width or zstd'd.

Ratios are against the 8 task folders (weights and side files, 86,375,944 bytes). "self-contained" = the base
section and the side files ("file" sections) of the family's real q2 archive + the coded payload + the manifest,
estimated as fixed + bytes per section x sections, solved (least squares) from the real q2, tall and exact
archives in the family's runs/ folder; "--base-ref" = the same without the base section; "sections" = the payload
alone. Rivals: base + side files + payload, no manifest (as their papers count them). Rows "(real archive)" are
the language benchmark's own archives (benchmarks/results/language.json), their bytes as written.

The rivals on an LLM: BitDelta (benchmarks.lowbit.bitdelta) on the decoder blocks' linear matrices, the embedding,
the head and the norms kept in full at the files' 16 bits, as the paper keeps them; TSV-C (benchmarks.lowbit.tsv_c,
T = 8) on every 2-D matrix (embedding and head included), 1-D tensors in full at 16 bits, factors counted at 32 bits
as the function (the paper) counts them.

Usage: python -m benchmarks.language.lowbit [--family DIR] [--store FILE] [--only TEXT ...] [--plot-only]
Writes benchmarks/results/lowbit_language.json and lowbit_language.png; per (point, task) results are kept in
--store so that an interrupted run resumes (the encodings are deterministic).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks import lowbit as vision
from tallzip.ops import lowrank as lr
from tallzip.ops import quantize as qz
from tallzip.ops import signcode as sc

from . import report, tallness
from .scoring import Family, folder_state

OUT = report.RESULTS / "lowbit_language.json"
STORE = Path("/work/cache/i22l/lowbit-language/store.json")
FAMILY = Path("/work/cache/language/cpu-05773139c9")
ENERGIES = (0.85, 0.9, 0.92, 0.95, 0.98)
REFERENCE_ROWS = ("every task q2", "every task q3", "every task q4", "every task q8", "every task exact",
                  "tall, TIES mtv, lambda on val", "tall, sum mtv, default lambda 0.4 (tallzip's default)",
                  "auto 0.5% on val (select_representation)")  # language.json's


def is_embedding(name: str) -> bool:
    return "embed_tokens" in name


def is_head(name: str) -> bool:
    return name.startswith("lm_head")


def is_embedding_or_head(name: str) -> bool:
    """The token embedding and the LM head: 4096 x 256 each, 40% of this model's weights."""
    return is_embedding(name) or is_head(name)


def keep_full(taus: dict):
    """Tensors kept in full at the files' 16 bits (the rivals' uncompressed tensors)."""
    cost = vision.Cost()
    for tau in taus.values():
        cost += vision.float_cost(tau, 16)
    return dict(taus), cost


# --------------------------------------------------------------------------- the grid


def lowrank(energy: float, bits: int = 4, **more):
    return vision.encode_lowrank(lr.LowRankSpec(budget=None, energy=energy, rest_bits=bits, **more))


def mean_row_apart(encode):
    """A matrix's mean row kept at 16 bits, `encode` of the rest. Tried on the LM head: its mean row (the same
    vector added to every vocabulary row, a logit shift the softmax does not see) holds 44-88% of the head's
    task-vector energy here, so an energy rule on the raw head keeps rank 2-10; measured, taking it apart does not
    make the rest low rank enough (RESULTS.md, "Language rows")."""
    def encode_apart(taus):
        means = {n: t.mean(dim=0, keepdim=True).to(torch.bfloat16).to(torch.float32) for n, t in taus.items()}
        values, cost = encode({n: t - means[n] for n, t in taus.items()})
        for n, mean in means.items():
            values[n] = values[n] + mean
            cost += vision.float_cost(mean, 16)
        return values, cost
    return encode_apart


def head_apart(label: str, encode_rest, encode_head):
    """A point whose LM head is `encode_head` of its rows less their mean (mean row kept at 16 bits)."""
    return (f"{label}; head mean row apart", vision.encode_split(is_head, mean_row_apart(encode_head), encode_rest))


QUANT = {"q2": vision.Q2, "q3": vision.Q3, "q4": vision.Q4}
WHERE = {"embedding + head": is_embedding_or_head, "embedding": is_embedding, "head": is_head}


def with_quant(label: str, kind: str, encode, where: str, quant: str):
    """A point whose embedding and/or head (`where`) are q* instead of `encode`."""
    return (f"{label}; {where} {quant}", kind, vision.encode_split(WHERE[where], vision.encode_quant(QUANT[quant]), encode))


def grid(matrices: set) -> list[tuple[str, str, object]]:
    """(label, kind, encode) of every point measured here."""
    points = [("q1 per tensor", "q1", vision.encode_sign(sc.SignSpec(sc.TENSOR))),
              ("q1 per row", "q1", vision.encode_sign(sc.SignSpec(None))),
              ("q1 g128 (sign + bf16 scale per 128)", "q1", vision.encode_sign(sc.SignSpec(128)))]
    points.append(with_quant("q1 g128", "q1", vision.encode_sign(sc.SignSpec(128)), "embedding + head", "q3"))
    points += [(f"low-rank energy {e:g}, 4-bit factors", "low-rank", lowrank(e)) for e in ENERGIES]
    points.append(("low-rank energy 0.95, 3-bit factors", "low-rank", lowrank(0.95, 3)))
    for e, where, quant in ((0.9, "embedding + head", "q3"), (0.9, "embedding + head", "q2"),
                            (0.92, "embedding + head", "q3"), (0.95, "embedding + head", "q3"),
                            (0.95, "embedding + head", "q2"), (0.95, "embedding + head", "q4"),
                            (0.95, "embedding", "q3"), (0.98, "embedding + head", "q3"),
                            (0.98, "embedding", "q3"), (0.98, "embedding + head", "q4"), (0.98, "embedding", "q4")):
        points.append(with_quant(f"low-rank energy {e:g}, 4-bit", "low-rank", lowrank(e), where, quant))
    points.append(with_quant("low-rank energy 0.98, 3-bit", "low-rank", lowrank(0.98, 3), "embedding", "q3"))
    for e in (0.9, 0.92, 0.95, 0.98):
        points.append(with_quant(f"low-rank energy {e:g}, 4-bit", "low-rank", lowrank(e), "head", "q3"))
        label, encode = head_apart(f"low-rank energy {e:g}, 4-bit", lowrank(e), lowrank(e))
        points.append((label, "low-rank", encode))
    for e in (0.95, 0.97, 0.98):
        embedding_q2 = vision.encode_split(is_embedding, vision.encode_quant(vision.Q2), lowrank(e))
        points.append(with_quant(f"low-rank energy {e:g}, 4-bit; embedding q2", "low-rank", embedding_q2, "head", "q3"))
    embedding_09 = vision.encode_split(is_embedding, lowrank(0.9), lowrank(0.98))
    points.append(with_quant("low-rank energy 0.98, 4-bit; embedding at 0.9", "low-rank", embedding_09, "head", "q3"))
    label, encode = head_apart("low-rank energy 0.95, 3-bit", lowrank(0.95, 3), lowrank(0.95, 3))
    points.append((label, "low-rank", encode))
    label, encode = head_apart("low-rank energy 0.95 attention + MLP, 0.98 embedding + head, 4-bit",
                               vision.encode_split(is_embedding, lowrank(0.98), lowrank(0.95)), lowrank(0.98))
    points.append((label, "low-rank", encode))
    points.append(("low-rank 0.25 b/w 4-bit + q1 g128 residual", "combination",
                   vision.encode_lowrank(lr.LowRankSpec(budget=0.25, rest_bits=4, residual=sc.SignSpec(128)))))
    points.append(("low-rank energy 0.9 3-bit + ternary (q2 sym) residual", "combination",
                   lowrank(0.9, 3, residual=qz.QuantSpec(2, 128))))
    points.append(with_quant("low-rank energy 0.9, 4-bit + q1 g128 residual", "combination",
                             lowrank(0.9, residual=sc.SignSpec(128)), "embedding", "q3"))
    for name in ("q2", "q3", "q4"):
        points.append((f"{name} ({'asym' if name == 'q2' else 'sym'} g128, probe count)", "reference",
                       vision.encode_quant(QUANT[name])))
    points.append(("BitDelta (rival; block matrices, no scale distillation)", "rival",
                   vision.encode_split(lambda n: n in matrices and ".layers." in n, vision.bitdelta, keep_full)))
    points.append(("TSV-C (rival), T = 8", "rival",
                   vision.encode_split(lambda n: n in matrices, lambda taus: vision.tsv_c(taus, 8), keep_full)))
    return points


AUTO_TOLERANCE = 0.005
AUTO_CANDIDATES = ("low-rank energy 0.9, 4-bit; head mean row apart", "low-rank energy 0.92, 4-bit; head mean row apart",
                   "low-rank energy 0.95, 4-bit; head mean row apart", "low-rank energy 0.98, 4-bit; head mean row apart",
                   "low-rank energy 0.95, 4-bit; head q3", "low-rank energy 0.98, 4-bit; head q3",
                   "low-rank energy 0.95, 4-bit; embedding q2; head q3", "low-rank energy 0.97, 4-bit; embedding q2; head q3",
                   "low-rank energy 0.98, 4-bit; embedding q2; head q3",
                   "q2 (asym g128, probe count)", "q3 (sym g128, probe count)", "q4 (sym g128, probe count)")


def auto_entries(stored: dict, tasks: list, tolerance: float = AUTO_TOLERANCE) -> dict | None:
    """Per task the candidate of fewest coded bits whose VAL quality is >= 1 - tolerance (select_representation's
    rule on the benchmark's validation quality), q4 when none is; None until every candidate is measured."""
    if any(task not in stored.get(c, {}) for c in AUTO_CANDIDATES for task in tasks):
        return None
    out = {}
    for task in tasks:
        ranked = sorted((stored[c][task]["coded"], c) for c in AUTO_CANDIDATES)
        pick = next((c for _, c in ranked if stored[c][task]["val_quality"] >= 1 - tolerance),
                    "q4 (sym g128, probe count)")
        out[task] = dict(stored[pick][task], choice=pick)
    return out


# --------------------------------------------------------------------------- measuring


class Probe:
    """The family (base, tasks, evaluation) and the store of (point, task) results."""

    def __init__(self, folder: Path, store: Path, log=print):
        self.folder, self.store, self.log = Path(folder), Path(store), log
        self.fam = Family(folder)
        self.tasks = self.fam.tasks
        self.base = folder_state(self.folder / "base")
        self.names = [n for n, v in self.base.items() if v.is_floating_point()]
        self.params = sum(self.base[n].numel() for n in self.names)
        self.matrices = {n for n in self.names if self.base[n].dim() == 2}
        self.flat_base = tallness.flat(self.base, self.names)
        self.stored = json.loads(self.store.read_text()) if self.store.exists() else {}
        self._states = {}

    def examples_lost(self, task: str, quality: float) -> int:
        """Test examples a classification rebuild gets wrong beyond the fine-tune's (negative: more right): the
        scale of the noise in normalized accuracy (one example is 1.5-3.7 points here)."""
        finetuned = self.fam.meta["scores"]["finetuned"][task]["test"]["accuracy"]
        count = self.fam.data(task)["test"]["input_ids"].shape[0]
        return round((1 - quality) * finetuned * count)

    def save(self) -> None:
        self.store.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.store.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.stored))
        tmp.replace(self.store)

    def tuned(self, task: str) -> dict:
        if task not in self._states:
            self._states[task] = folder_state(self.folder / "tasks" / task)
        return self._states[task]

    def taus(self, task: str) -> dict:
        tuned = self.tuned(task)
        return {n: tuned[n].to(torch.float32) - self.base[n].to(torch.float32) for n in self.names}

    def state(self, values: dict) -> dict:
        return {n: (b.to(torch.float32) + values[n]).to(b.dtype) if n in values else b for n, b in self.base.items()}

    def run(self, label: str, encode) -> dict:
        """Every task of one point (from the store where already measured): quality, data-free fidelity, bits."""
        known = self.stored.setdefault(label, {})
        start = time.perf_counter()
        for task in self.tasks:
            if task in known and "val_quality" in known[task]:
                continue
            t0 = time.perf_counter()
            values, cost = encode(self.taus(task))
            state = self.state(values)
            entry = known.get(task)
            if entry is None:
                score = self.fam.score(task, state, "test")
                entry = {"score": score, "quality": self.fam.quality(task, score, "test"),
                         "coded": cost.coded, "packed": cost.packed, "sections": cost.sections}
                entry.update(tallness.fidelity(self.flat_base, tallness.flat(self.tuned(task), self.names),
                                               tallness.flat(state, self.names)))
            # the validation quality (benchmarks.language.scoring:evaluate's): what the automatic choice reads
            entry["val_quality"] = self.fam.quality(task, self.fam.score(task, state, "val"), "val")
            entry["seconds"] = round(time.perf_counter() - t0, 1)
            known[task] = entry
            self.save()
        qualities = [known[t]["quality"] for t in self.tasks]
        bits = statistics.mean(known[t]["coded"] for t in self.tasks) / self.params
        self.log(f"  {label:60s} {bits:6.3f} b/w  mean {statistics.mean(qualities):.2%} worst {min(qualities):.2%}"
                 f"  [{time.perf_counter() - start:.0f} s]")
        return known

    def embedding_study(self) -> dict:
        """Data-free: the embedding and the head of every task under low rank (4-bit factors, each energy) and
        under q2 / q3 / q4: coded bits per weight, the rank, and the relative L2 error (mean over tasks)."""
        if "_embedding" in self.stored:
            return self.stored["_embedding"]
        coders = [(f"low-rank e{e:g} 4-bit", lowrank(e)) for e in ENERGIES]
        coders += [("low-rank e0.95 3-bit", lowrank(0.95, 3)), ("q2 asym g128", vision.encode_quant(vision.Q2)),
                   ("q3 g128", vision.encode_quant(vision.Q3)), ("q4 g128", vision.encode_quant(vision.Q4))]
        out = {}
        for name in (n for n in self.names if is_embedding_or_head(n)):
            for label, encode in coders:
                bits, errors, ranks = [], [], []
                for task in self.tasks:
                    tau = self.taus(task)[name]
                    values, cost = encode({name: tau})
                    bits.append(cost.coded / tau.numel())
                    errors.append(float((values[name] - tau).norm() / tau.norm()))
                    if label.startswith("low-rank"):  # the energy rule's rank (before its fallback test)
                        spectrum = torch.linalg.svdvals(tau.to(torch.float64))
                        ranks.append(lr.rank_for_energy(spectrum, float((spectrum ** 2).sum()),
                                                        float(label.split()[1][1:])))
                out[f"{name} | {label}"] = {"bits_per_weight": statistics.mean(bits), "rel_l2": statistics.mean(errors),
                                            "rank": statistics.mean(ranks) if ranks else None,
                                            "rel_l2_per_task": dict(zip(self.tasks, errors))}
                self.log(f"  {name} {label:22s} {statistics.mean(bits):6.3f} b/w rel L2 {statistics.mean(errors):.3f}"
                         + (f" rank {statistics.mean(ranks):.0f}" if ranks else ""))
        self.stored["_embedding"] = out
        self.save()
        return out


# --------------------------------------------------------------------------- counting the archive around a payload


def archive_model(folder: Path) -> dict:
    """The base section, the side files' sections and the manifest (fixed + per section, least squares) of the
    family's real q2, tall (TIES) and exact archives."""
    import tallzip
    counts, overheads, base, files = [], [], None, None
    for name in ("q2", "tall-ties", "exact"):
        path = folder / "runs" / f"{name}.tallz"
        with tallzip.open(str(path)) as archive:
            sections = archive.manifest["sections"]
        counts.append(len(sections))
        overheads.append(path.stat().st_size - sum(s["length"] for s in sections))
        base = sum(s["length"] for s in sections if s["role"] == "base")
        files = (sum(s["length"] for s in sections if s["role"] == "file"), sum(s["role"] == "file" for s in sections))
    (fixed, per_section), *_ = np.linalg.lstsq(np.array([[1.0, c] for c in counts]), np.array(overheads, float),
                                               rcond=None)
    return {"base_bytes": base, "file_bytes": files[0], "file_sections": files[1], "fixed": float(fixed),
            "per_section": float(per_section), "fitted_from": dict(zip(("q2", "tall-ties", "exact"),
                                                                       zip(counts, overheads)))}


def make_row(probe: Probe, label: str, kind: str, quality: dict, *, payload: float, packed: float, total: float,
             base: int, manifest: float, folders: int, source: str, fidelity: dict | None = None) -> dict:
    tasks = probe.tasks
    by_kind = {k: [quality[t] for t in tasks if probe.fam.kind(t) == k] for k in ("generative", "classification")}
    lost = {t: probe.examples_lost(t, quality[t]) for t in tasks if probe.fam.kind(t) == "classification"}
    return {"label": label, "kind": kind, "source": source,
            "bits_per_weight": 8 * payload / len(tasks) / probe.params,
            "packed_bits_per_weight": 8 * packed / len(tasks) / probe.params,
            "normalized": statistics.mean(quality.values()), "min_task": min(quality.values()),
            "worst_task": min(quality, key=quality.get),
            "mean_generative": statistics.mean(by_kind["generative"]), "worst_generative": min(by_kind["generative"]),
            "mean_classification": statistics.mean(by_kind["classification"]),
            "worst_classification": min(by_kind["classification"]),
            "classification_examples_lost": lost, "most_examples_lost": max(lost.values()),
            "bytes": round(total), "base_bytes": base, "manifest_bytes": round(manifest), "payload_bytes": round(payload),
            "ratio": folders / total, "ratio_base_ref": folders / (total - base), "ratio_sections": folders / payload,
            "per_task_quality": quality, "per_task_fidelity": fidelity or {}}


def summarize(probe: Probe, labels: list[tuple[str, str]], model: dict, language: dict, measured: dict) -> list[dict]:
    """One row per label whose every task is in `measured` (label -> task -> entry), then the real archives."""
    folders, base, files = language["folders_bytes"], model["base_bytes"], model["file_bytes"]
    rows = []
    for label, kind in labels:
        known = measured.get(label, {})
        if any(t not in known for t in probe.tasks):
            continue  # not measured (yet)
        payload = sum(known[t]["coded"] for t in probe.tasks) / 8
        packed = sum(known[t]["packed"] for t in probe.tasks) / 8
        sections = len(probe.names) + model["file_sections"] + sum(known[t]["sections"] for t in probe.tasks)
        manifest = 0.0 if kind == "rival" else model["fixed"] + model["per_section"] * sections
        fidelity = {t: {k: known[t][k] for k in ("rel_l2", "energy_kept", "cosine")} for t in probe.tasks}
        rows.append(make_row(probe, label, kind, {t: known[t]["quality"] for t in probe.tasks}, payload=payload,
                             packed=packed, total=base + files + payload + manifest, base=base, manifest=manifest,
                             folders=folders, source="measured here", fidelity=fidelity))
        if kind == "auto":
            rows[-1]["choice"] = {t: known[t]["choice"] for t in probe.tasks}
    for row in language["rows"]:
        if row["label"] not in REFERENCE_ROWS:
            continue
        sections = row["sections"]
        payload = sum(sections.values()) - sections["base"] - sections.get("file", 0)
        rows.append(make_row(probe, f"{row['label']} (real archive)", "reference",
                             {t: row["tasks"][t]["quality"] for t in probe.tasks}, payload=payload, packed=payload,
                             total=row["bytes"], base=sections["base"], manifest=row["bytes"] - sum(sections.values()),
                             folders=folders, source="benchmarks/results/language.json"))
    rows.sort(key=lambda r: -r["ratio"])
    return rows


# --------------------------------------------------------------------------- reporting


def table(rows: list[dict]) -> str:
    head = (f"{'point':58s} {'b/w/task':>8s} {'packed':>6s} {'self-cont.':>10s} {'base-ref':>8s} {'sections':>8s} "
            f"{'mean':>7s} {'worst task':>21s} {'gen mean':>8s} {'gen worst':>9s} {'cls mean':>8s} {'lost':>4s}")
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['label'][:58]:58s} {r['bits_per_weight']:8.3f} {r['packed_bits_per_weight']:6.3f} "
                     f"{r['ratio']:9.2f}x {r['ratio_base_ref']:7.2f}x {r['ratio_sections']:7.2f}x "
                     f"{r['normalized']:7.1%} {r['min_task']:7.1%} ({r['worst_task'][:11]:>11s}) "
                     f"{r['mean_generative']:8.1%} {r['worst_generative']:9.1%} {r['mean_classification']:8.1%} "
                     f"{r['most_examples_lost']:4d}")
    return "\n".join(lines)


def holds(row: dict) -> bool:
    """Every generative task keeps >= 99% of its gain and no classification task loses more than 2 test examples
    (what q8 loses): the bar a noisy 50-200 example test split can tell."""
    return row["worst_generative"] >= 0.99 and row["most_examples_lost"] <= 2


def front(rows: list[dict], key: str) -> list[dict]:
    """Rows no other row beats on both ratio and mean quality."""
    out, best = [], -float("inf")
    for r in sorted(rows, key=lambda r: (-r[key], -r["normalized"])):
        if r["normalized"] > best:
            out.append(r)
            best = r["normalized"]
    return out


def plot(rows: list[dict], path: Path, params: int) -> None:
    """Self-contained (left) and --base-ref (right) ratio against the mean quality (o) and the worst task (v);
    a filled o holds the bar of `holds`; the front, the rivals, the real archives and the points that hold named."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter

    colours = {"q1": "tab:red", "low-rank": "tab:green", "combination": "tab:purple", "rival": "black",
               "reference": "tab:blue", "auto": "tab:brown"}
    fig = Figure(figsize=(18, 8), layout="constrained")
    axes = fig.subplots(1, 2)
    for ax, (key, what) in zip(axes, (("ratio", "self-contained"), ("ratio_base_ref", "--base-ref"))):
        named = {id(r): r for r in front(rows, key)}
        named.update({id(r): r for r in rows if r["kind"] == "rival" or "real archive" in r["label"] or holds(r)})
        for r in rows:
            c = colours.get(r["kind"], "grey")
            x, mean, worst = r[key], 100 * r["normalized"], 100 * r["min_task"]
            ax.plot([x, x], [worst, mean], color=c, alpha=0.25)
            ax.scatter(x, mean, c=c if holds(r) else "none", edgecolors=c, s=36)
            ax.scatter(x, worst, c=c, marker="v", s=12, alpha=0.5)
            if id(r) in named:
                ax.annotate(r["label"].replace(" (real archive)", "*").replace("every task ", "")
                            .replace("low-rank energy ", "lr e").replace(" factors", "")[:44], (x, mean),
                            fontsize=7, alpha=0.9, xytext=(3, 2), textcoords="offset points", rotation=20)
        ax.axhline(99, color="grey", ls=":")
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}x"))
        ax.xaxis.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:g}x"))
        ax.set_ylim(max(0.0, min(100 * r["min_task"] for r in rows) - 3), 112)
        ax.set_xlabel(f"{what} ratio against the 8 task folders (log)")
        ax.set_ylabel("quality % (o mean, v worst task): gain kept / normalized accuracy")
        ax.set_title(f"Language family (Llama {params / 1e6:.2f}M, 8 full fine-tunes), {what}\n* = real archive; "
                     "filled o: every generative task >= 99%, <= 2 classification examples lost", fontsize=9)
    handles = [axes[0].scatter([], [], c=c, label=k) for k, c in colours.items()]
    fig.legend(handles=handles, loc="outside lower center", ncols=len(colours))
    fig.savefig(path, dpi=100)


def embedding_table(study: dict) -> str:
    lines = [f"{'tensor | coder':52s} {'b/w':>6s} {'rank':>5s} {'rel L2':>7s}"]
    for key, v in study.items():
        rank = "" if v["rank"] is None else f"{v['rank']:.0f}"
        lines.append(f"{key:52s} {v['bits_per_weight']:6.3f} {rank:>5s} {v['rel_l2']:7.3f}")
    return "\n".join(lines)


# --------------------------------------------------------------------------- main


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.language.lowbit", description=__doc__.split("\n\n")[0])
    parser.add_argument("--family", type=Path, default=FAMILY, help="the language family's cache folder")
    parser.add_argument("--store", type=Path, default=STORE, help="per (point, task) results, reused (JSON)")
    parser.add_argument("--only", nargs="+", default=None, metavar="TEXT",
                        help="measure only the points whose label contains one of these (the report has every "
                             "point already in the store)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--plot-only", action="store_true", help="redraw the PNG from --out's JSON and stop")
    args = parser.parse_args(argv)
    if args.plot_only:
        result = json.loads(args.out.read_text())
        plot(result["rows"], args.out.with_suffix(".png"), result["params"])
        return 0
    command = "python -m benchmarks.language.lowbit " + " ".join(sys.argv[1:] if argv is None else argv)
    if not (args.family / "family.json").is_file() or not (args.family / "runs").is_dir():
        print(f"error: {args.family} is not a built language family with its runs/ archives "
              "(python -m benchmarks.language builds both)", file=sys.stderr)
        return 1
    torch.set_num_threads(args.threads)
    log = lambda m: print(time.strftime("%H:%M:%S"), m, flush=True)  # noqa: E731
    start = time.perf_counter()
    probe = Probe(args.family, args.store, log)
    language = json.loads(report.JSON_PATH.read_text())
    model = archive_model(args.family)
    log(f"{len(probe.tasks)} tasks, {probe.params:,} weights; manifest {model['fixed']:.0f} + "
        f"{model['per_section']:.1f} bytes per section")
    points = grid(probe.matrices)
    for label, _, encode in points:
        if args.only is None or any(text in label for text in args.only):
            probe.run(label, encode)
    if args.only is None or any("embedding" in text for text in args.only):
        log("embedding and head: low rank against q2 / q3 / q4")
        probe.embedding_study()
    auto_label = f"auto {AUTO_TOLERANCE:.1%} on val (cheapest candidate within it, per task)"
    measured = dict(probe.stored)
    auto = auto_entries(probe.stored, probe.tasks)
    if auto is not None:
        measured[auto_label] = auto
    labels = [(label, kind) for label, kind, _ in points] + [(auto_label, "auto")]
    rows = summarize(probe, labels, model, language, measured)
    missing = [label for label, _ in labels if label not in {r["label"] for r in rows}]
    print(table(rows))
    if "_embedding" in probe.stored:
        print(embedding_table(probe.stored["_embedding"]))
    if missing:
        print("not measured:", "; ".join(missing))
    args.out.write_text(json.dumps({"command": command, "family": str(args.family), "params": probe.params,
                                    "tasks": probe.tasks, "archive_model": model, "rows": rows,
                                    "embedding_study": probe.stored.get("_embedding"), "not_measured": missing,
                                    "elapsed_seconds": round(time.perf_counter() - start)}, indent=1) + "\n")
    plot(rows, args.out.with_suffix(".png"), probe.params)
    print(f"wrote {args.out} and {args.out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
