"""The language benchmark's rows, every one on the family's own files through tallzip's public API.

- merges (one model for every task): task arithmetic, TIES, Consensus TA, Consensus TIES (k = 2), alpha chosen
  on validation (`tallzip.merge`; Consensus from the archives packed with the validation lambdas);
- archives (`tallzip.pack`, then `tallzip extract --all` and `AutoModelForCausalLM.from_pretrained` of each
  extracted folder, which must report no missing or unexpected keys): tall with the sum and the TIES mtv
  (lambda per task on validation from 0.2..0.6, `tallzip.select_lambdas`), tall at the default lambda, q8, q4,
  q3, q2, exact (asserted bit-identical), and the automatic choice (`tallzip.select_representation`);
- rivals (rivals.py): BitDelta-style, BitX-style, zipnn; references: the fine-tunes, the base, zstd of the files.
Each archive row also carries, per task, data-free statistics of the rebuild (tallness.fidelity).
"""
from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
import zstandard

import tallzip

from benchmarks.fixtures.lossless import zipnn_bytes

from . import family as family_mod
from . import rivals, tallness
from .scoring import Family, folder_state

ALPHAS = (0.05, 0.1, 0.2, 0.3, 0.4, 0.6, 0.8, 1.0)  # every alpha costs 8 validation scores
QUANTIZED = ("q8", "q4", "q3", "q2")
AUTO_TOLERANCE = 0.005


def _files_bytes(folder: Path, pattern: str = "*") -> int:
    return sum(p.stat().st_size for p in folder.rglob(pattern) if p.is_file())


def tallzip_cli(*args) -> str:
    """Run the `tallzip` command (the installed CLI, as a user would); its stdout, or a one-line failure."""
    done = subprocess.run([sys.executable, "-m", "tallzip.cli.main", *map(str, args)], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"tallzip {' '.join(map(str, args))}: {done.stderr.strip()}")
    return done.stdout


class Bench:
    def __init__(self, folder: Path, work: Path, log=print):
        self.folder, self.work, self.log = Path(folder), Path(work), log
        self.work.mkdir(parents=True, exist_ok=True)
        self.fam = Family(folder)
        self.tasks = self.fam.tasks
        self.base_dir, self.tasks_dir = self.folder / "base", self.folder / "tasks"
        self.base = folder_state(self.base_dir)
        self.states = {t: folder_state(self.tasks_dir / t) for t in self.tasks}
        self.names = [n for n, v in self.base.items() if v.is_floating_point()]
        self.flat_base = tallness.flat(self.base, self.names)
        self.flat_tasks = {t: tallness.flat(s, self.names) for t, s in self.states.items()}
        self.folders_bytes = sum(_files_bytes(self.tasks_dir / t) for t in self.tasks)
        self.weights_bytes = sum(_files_bytes(self.tasks_dir / t, "*.safetensors") for t in self.tasks)
        self.base_bytes = _files_bytes(self.base_dir, "*.safetensors")
        self.rows: list[dict] = []
        self.extra: dict = {}
        self.evaluations = 0

    # ----------------------------------------------------------------- scoring

    def val_quality(self, task: str, state) -> float:
        self.evaluations += 1
        return self.fam.quality(task, self.fam.score(task, state, "val"), "val")

    def test_entry(self, task: str, weights) -> dict:
        self.evaluations += 1
        score = self.fam.score(task, weights, "test")
        return {"score": score, "quality": self.fam.quality(task, score, "test")}

    def add(self, label: str, kind: str, nbytes: int | None, per_task: dict, **settings) -> dict:
        qualities = [per_task[t]["quality"] for t in self.tasks]
        row = {"label": label, "kind": kind, "bytes": nbytes,
               "ratio": (self.folders_bytes / nbytes) if nbytes else None,
               "mean_quality": sum(qualities) / len(qualities), "worst_quality": min(qualities),
               "worst_task": min(self.tasks, key=lambda t: per_task[t]["quality"]), "tasks": per_task, **settings}
        for kind_name in ("generative", "classification"):
            qs = [per_task[t]["quality"] for t in self.tasks if self.fam.kind(t) == kind_name]
            row[f"mean_{kind_name}"] = sum(qs) / len(qs) if qs else None
        self.rows.append(row)
        self.log(f"  {label}: mean {row['mean_quality']:.4f}, worst {row['worst_quality']:.4f} ({row['worst_task']})"
                 + (f", {nbytes:,} bytes, {row['ratio']:.2f}x" if nbytes else ""))
        return row

    # ----------------------------------------------------------------- references

    def reference_rows(self) -> None:
        self.add("the task folders (bf16, sharded)", "reference", self.folders_bytes,
                 {t: self.test_entry(t, self.states[t]) for t in self.tasks}, weights_bytes=self.weights_bytes)
        self.add("base (pretrained, no fine-tune)", "reference", None,
                 {t: self.test_entry(t, self.base) for t in self.tasks})
        zstd = sum(len(zstandard.ZstdCompressor(level=3).compress(p.read_bytes()))
                   for p in self.tasks_dir.rglob("*") if p.is_file())
        self.extra["zstd3_task_folders_bytes"] = zstd

    # ----------------------------------------------------------------- merges

    def _best_alpha(self, label: str, merged_at) -> None:
        """Choose alpha by the mean validation quality over the tasks; the row is that model on test."""
        best = None
        curve = {}
        for alpha in ALPHAS:
            state = merged_at(alpha)
            mean = sum(self.val_quality(t, state) for t in self.tasks) / len(self.tasks)
            curve[alpha] = mean
            if best is None or mean > best[0]:
                best = (mean, alpha, state)
        _, alpha, state = best
        self.add(label, "merge", None, {t: self.test_entry(t, state) for t in self.tasks}, alpha=alpha,
                 val_curve=curve)

    def merge_rows(self, sum_archive: Path, ties_archive: Path) -> None:
        folder, base = str(self.tasks_dir), str(self.base_dir)
        self._best_alpha("task arithmetic", lambda a: tallzip.merge(folder, base=base, method="task-arithmetic", alpha=a))
        self._best_alpha("TIES", lambda a: tallzip.merge(folder, base=base, method="ties", alpha=a))
        self._best_alpha("Consensus TA (k=2)", lambda a: tallzip.merge(str(sum_archive), method="consensus-ta", k=2, alpha=a))
        self._best_alpha("Consensus TIES (k=2)", lambda a: tallzip.merge(str(ties_archive), method="consensus-ties", k=2, alpha=a))

    # ----------------------------------------------------------------- archives

    def pack_row(self, label: str, name: str, *, exact: bool = False, **options) -> dict:
        """Pack the family, extract every task into folders (the `tallzip extract --all` command for exact, the
        same code through the Python API for the others, to spare a process start per row), load each
        extracted folder with from_pretrained (no missing or unexpected keys) and score it on test."""
        path = self.work / f"{name}.tallz"
        path.unlink(missing_ok=True)
        start = time.time()
        tallzip.pack(str(self.tasks_dir), base=str(self.base_dir), output=str(path), **options)
        pack_s = time.time() - start
        archive = tallzip.open(str(path))
        out = self.work / f"{name}.extract"
        shutil.rmtree(out, ignore_errors=True)
        if exact:
            tallzip_cli("extract", path, "--all", "-o", out)
        else:
            archive.extract_all(str(out))
        per_task = {}
        for t in self.tasks:
            model = family_mod.load_model(out / t)  # raises on missing / unexpected keys
            state = folder_state(out / t)
            if exact:
                same = set(state) == set(self.states[t]) and all(
                    state[n].dtype == v.dtype and torch.equal(state[n].view(torch.uint8), v.view(torch.uint8))
                    for n, v in self.states[t].items())
                if not same:
                    raise AssertionError(f"{name}: task {t} is not bit-identical after extract")
            entry = self.test_entry(t, model)
            entry["representation"] = archive.representation(t)
            entry["lambda"] = archive.lambdas.get(t)
            entry.update(tallness.fidelity(self.flat_base, self.flat_tasks[t], tallness.flat(state, self.names)))
            per_task[t] = entry
        shutil.rmtree(out, ignore_errors=True)
        sections = {}
        for sec in archive.manifest["sections"]:
            sections[sec["role"]] = sections.get(sec["role"], 0) + sec["length"]
        nbytes = path.stat().st_size
        no_base = nbytes - sections.get("base", 0)
        return self.add(label, "archive", nbytes, per_task, pack_s=pack_s, no_base_bytes=no_base,
                        ratio_no_base=self.folders_bytes / no_base, archive=str(path), sections=sections,
                        kept=_kept({t: archive.representation(t) for t in self.tasks}),
                        options={k: str(v) for k, v in options.items() if k != "keep" or isinstance(v, str)})

    def archive_rows(self) -> tuple[Path, Path]:
        def lambdas():
            return tallzip.select_lambdas(self.val_quality)
        self.pack_row("tall, sum mtv, default lambda 0.4 (tallzip's default)", "tall-default")
        sum_row = self.pack_row("tall, sum mtv, lambda on val", "tall-sum", lambdas=lambdas())
        ties_row = self.pack_row("tall, TIES mtv, lambda on val", "tall-ties", lambdas=lambdas(), merge="ties")
        for rep in QUANTIZED:
            self.pack_row(f"every task {rep}", rep, keep=rep)
        self.pack_row("every task exact", "exact", exact=True, keep="exact")
        selector = tallzip.select_representation(self.val_quality, tolerance=AUTO_TOLERANCE)
        row = self.pack_row(f"auto {AUTO_TOLERANCE:.1%} on val (select_representation)", "auto", keep=selector)
        row["selector_scores"] = selector.scores
        return Path(sum_row["archive"]), Path(ties_row["archive"])

    # ----------------------------------------------------------------- rivals

    def rival_rows(self) -> None:
        per_task, nbytes = {}, self.base_bytes
        for t in self.tasks:
            state, task_bytes = rivals.bitdelta_rebuild(self.base, self.states[t])
            entry = self.test_entry(t, state)
            entry.update(tallness.fidelity(self.flat_base, self.flat_tasks[t], tallness.flat(state, self.names)))
            per_task[t] = entry
            nbytes += task_bytes
        self.add("BitDelta-style (sign bits + mean |delta| per block matrix; base as its file)", "rival", nbytes,
                 per_task, no_base_bytes=nbytes - self.base_bytes,
                 ratio_no_base=self.folders_bytes / (nbytes - self.base_bytes))
        bitx = {t: rivals.bitx_bytes(self.base, self.states[t]) for t in self.tasks}
        roundtrip = all(rivals.bitx_roundtrip(self.base[n], self.states[t][n]) for t in self.tasks for n in self.names
                        if self.base[n].dtype == torch.bfloat16)
        side = sum(_files_bytes(self.tasks_dir / t) - _files_bytes(self.tasks_dir / t, "*.safetensors") for t in self.tasks)
        side_zstd = sum(len(zstandard.ZstdCompressor(level=3).compress(p.read_bytes()))
                        for t in self.tasks for p in (self.tasks_dir / t).iterdir() if p.suffix != ".safetensors")
        self.extra["bitx"] = {"tensor_bytes_per_task": bitx, "tensor_bytes": sum(bitx.values()), "roundtrip": roundtrip,
                              "side_files_bytes": side, "side_files_zstd3": side_zstd}
        zipnn_base = zipnn_bytes((p.read_bytes() for p in sorted(self.base_dir.glob("*.safetensors"))), "bfloat16")
        zipnn_tasks = zipnn_bytes((p.read_bytes() for p in sorted(self.tasks_dir.rglob("*.safetensors"))), "bfloat16")
        self.extra["zipnn"] = ({"base_bytes": zipnn_base[0], "task_weight_bytes": zipnn_tasks[0],
                                "roundtrip": zipnn_base[1] and zipnn_tasks[1], "version": zipnn_tasks[2]}
                               if zipnn_tasks else "not installed (pip install zipnn==0.5.4 builds from source)")
        exact = {t: self.states[t] for t in self.tasks}
        for label, base_cost in (("BitX-style (XOR with the base; exponent / sign+mantissa streams, zstd-3)",
                                  zipnn_base[0] if zipnn_base else self.base_bytes),):
            self.add(label, "rival lossless", base_cost + sum(bitx.values()) + side_zstd,
                     {t: {"score": self.fam.meta["scores"]["finetuned"][t]["test"], "quality": 1.0,
                          "rel_l2": 0.0, "energy_kept": 1.0, "cosine": 1.0} for t in exact},
                     no_base_bytes=sum(bitx.values()) + side_zstd,
                     ratio_no_base=self.folders_bytes / (sum(bitx.values()) + side_zstd),
                     note="base counted as zipnn of its files (as small as a lossless base gets here)")
        if zipnn_tasks:
            self.add(f"zipnn {zipnn_tasks[2]} of the files (each task file alone)", "rival lossless",
                     zipnn_base[0] + zipnn_tasks[0] + side_zstd,
                     {t: {"score": self.fam.meta["scores"]["finetuned"][t]["test"], "quality": 1.0,
                          "rel_l2": 0.0, "energy_kept": 1.0, "cosine": 1.0} for t in exact},
                     no_base_bytes=zipnn_tasks[0] + side_zstd,
                     ratio_no_base=self.folders_bytes / (zipnn_tasks[0] + side_zstd), roundtrip=zipnn_tasks[1])

    # ----------------------------------------------------------------- why tall

    def diagnosis(self, sum_row: dict) -> dict:
        lambdas = {t: sum_row["tasks"][t]["lambda"] for t in self.tasks}
        diag = tallness.tall_diagnosis(self.flat_base, self.flat_tasks, lambdas)
        for t in self.tasks:
            diag["tasks"][t]["quality_tall_sum"] = sum_row["tasks"][t]["quality"]
        self.extra["tall_diagnosis"] = diag
        return diag


def _kept(reps: dict) -> str:
    counts = {}
    for r in reps.values():
        counts[r] = counts.get(r, 0) + 1
    return " ".join(f"{n}x{r}" for r, n in sorted(counts.items(), key=lambda x: -x[1]))


def run(folder: Path, work: Path, log=print) -> dict:
    bench = Bench(folder, work, log)
    start = time.time()
    log("references")
    bench.reference_rows()
    log("archives")
    sum_archive, ties_archive = bench.archive_rows()
    log("merges")
    bench.merge_rows(sum_archive, ties_archive)
    log("rivals")
    bench.rival_rows()
    sum_row = next(r for r in bench.rows if r["label"] == "tall, sum mtv, lambda on val")
    bench.diagnosis(sum_row)
    return {"family": str(folder), "family_meta": bench.fam.meta, "folders_bytes": bench.folders_bytes,
            "weights_bytes": bench.weights_bytes, "base_bytes": bench.base_bytes, "rows": bench.rows,
            "extra": bench.extra, "evaluations": bench.evaluations, "seconds": time.time() - start}
