"""The accuracy benchmark's pipeline on a tiny real family (seconds): every row, checked by hand.

The numbers are checked against independent computations: accuracies by a plain forward pass,
the TALL rebuild and the merges by their formulas in numpy, the selections by argmax.
"""
import json
import os
import warnings

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import tallzip
from benchmarks import accuracy as bench_module, accuracy_report
from benchmarks.sizes import storage
from benchmarks.accuracy import Bench, compression_rows, merging_rows, reference_rows, scaled, select_alpha
from benchmarks.family import PRESETS, FinetuneRegressionWarning, build_family
from benchmarks.vit import VisionTransformer, classify
from tallzip.options import StoreOptions

ALPHAS = (0.0, 0.5, 1.0)  # a short grid keeps the test fast; the benchmark uses 0.0, 0.1, ..., 1.0


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FinetuneRegressionWarning)  # a few training steps: expected
        family = build_family(2, tmp_path_factory.mktemp("family"), config=PRESETS["tiny"], log=None)
    b = Bench(family, tmp_path_factory.mktemp("work"), log=None)
    reference_rows(b)
    archives = compression_rows(b)
    merging_rows(b, archives, ALPHAS)
    b.archives = archives
    return b


def row(b, label):
    return next(r for r in b.rows if r.label == label)


def accuracy_by_hand(family, task, state, split):
    """A forward pass with a fresh model and the task's frozen head (independent of Family.evaluate)."""
    model = VisionTransformer(family.config.vit)
    model.load_state_dict(state)
    model.eval()
    images, labels = family.split(task, split)
    weight, bias = family.head(task)
    with torch.no_grad():
        predicted = classify(model(images), weight, bias).argmax(1)
    return float((predicted == labels).double().mean())


def numpy_state(path):
    return {k: v.numpy().astype(np.float32) for k, v in load_file(str(path)).items()}


def test_finetuned_row_is_exactly_one_and_base_row_is_the_mean_ratio(bench):
    finetuned = row(bench, "fine-tuned (one model per task)")
    assert finetuned.normalized_test == 1.0 and finetuned.normalized_val == 1.0
    base = row(bench, "base (pretrained)")
    fam = bench.family
    for split, got in (("test", base.normalized_test), ("val", base.normalized_val)):
        ratios = [accuracy_by_hand(fam, t, fam.load(), split) / accuracy_by_hand(fam, t, fam.load(t), split)
                  for t in fam.tasks]
        assert got == pytest.approx(sum(ratios) / len(ratios), abs=1e-12)


def test_storage_is_bytes_on_disk(bench):
    files = [bench.family.task_paths[t] for t in bench.tasks]
    assert row(bench, "fine-tuned (one model per task)").storage_bytes == sum(os.path.getsize(p) for p in files)
    assert row(bench, "base (pretrained)").storage_bytes == os.path.getsize(bench.family.base_path)
    selected = row(bench, "TALL masks, sum mtv, lambda on val")
    assert selected.storage_bytes == os.path.getsize(bench.archives["sum"])
    # The bfloat16 mtv takes fewer bytes than the fp32 one, with the same lambdas.
    bf16 = row(bench, "TALL masks, sum mtv as bfloat16, lambda on val")
    assert bf16.storage_bytes < selected.storage_bytes and bf16.settings["lambdas"] == selected.settings["lambdas"]


def test_tall_row_is_the_formula_rebuilt_and_lambda_is_the_argmax(bench):
    selected = row(bench, "TALL masks, sum mtv, lambda on val")
    fam = bench.family
    base = numpy_state(fam.base_path)
    tasks = {t: numpy_state(fam.task_paths[t]) for t in bench.tasks}
    for task in bench.tasks:
        scores = {float(k): v for k, v in selected.settings["lambda_scores"][task].items()}
        best = max(scores.values())
        first_best = next(lam for lam in sorted(scores) if scores[lam] == best)
        lam = selected.settings["lambdas"][task]
        assert lam == first_best
        # base + m * mtv, m = |base - theta| > lam * |(base + mtv) - theta|, in plain numpy
        rebuilt = {}
        for name, b in base.items():
            mtv = sum(tasks[t][name] - b for t in bench.tasks)
            theta = tasks[task][name]
            mask = np.abs(b - theta) > np.float32(lam) * np.abs((b + mtv) - theta)
            rebuilt[name] = torch.from_numpy(np.where(mask, b + mtv, b).astype(np.float32))
        assert selected.test[task] == pytest.approx(accuracy_by_hand(fam, task, rebuilt, "test"), abs=1e-12)
        assert scores[lam] == pytest.approx(accuracy_by_hand(fam, task, rebuilt, "val"), abs=1e-12)


def test_select_lambdas_picks_the_first_best_score(bench, tmp_path):
    # Scores by call order (candidates are tried in order per task): 0.4 and 0.5 tie, the first wins.
    planned = [0.1, 0.7, 0.9, 0.9, 0.2]
    calls = []

    def score(task, state):
        calls.append((task, state))
        return planned[(len(calls) - 1) % len(planned)]

    selector = tallzip.select_lambdas(score)
    tallzip.pack(bench.task_paths, bench.base_path, tmp_path / "a.tallz", store=StoreOptions(lambdas=selector))
    assert len(calls) == len(bench.tasks) * len(planned)
    assert tallzip.open(tmp_path / "a.tallz").lambdas == {t: 0.4 for t in bench.tasks}
    assert selector.scores[bench.tasks[0]] == dict(zip((0.2, 0.3, 0.4, 0.5, 0.6), planned))


def test_alpha_shortcut_equals_a_direct_merge_and_the_formula(bench):
    ta = row(bench, "task arithmetic")
    alpha = ta.settings["alpha"]
    assert ta.settings["val_by_alpha"].keys() == {f"{a:g}" for a in ALPHAS}
    scores = {float(a): s for a, s in ta.settings["val_by_alpha"].items()}
    assert alpha == max(ALPHAS, key=lambda a: (scores[a], -ALPHAS.index(a)))
    base = bench.base_state
    for a in (0.5, 1.0):
        direct = tallzip.merge(bench.task_paths, base=bench.base_path, method="task-arithmetic", alpha=a)
        vector_at_one = tallzip.merge(bench.task_paths, base=bench.base_path, method="task-arithmetic", alpha=1.0)
        shortcut = scaled(base, {n: vector_at_one[n] - base[n] for n in base}, a)
        tasks = [load_file(str(bench.family.task_paths[t])) for t in bench.tasks]
        for name in base:
            formula = base[name].numpy() + a * sum(t[name].numpy() - base[name].numpy() for t in tasks)
            np.testing.assert_allclose(shortcut[name].numpy(), direct[name].numpy(), rtol=0, atol=1e-6)
            np.testing.assert_allclose(direct[name].numpy(), formula, rtol=0, atol=1e-6)
    # The row's test accuracy is that of base + alpha * V, evaluated independently.
    merged = {n: base[n] + alpha * sum(t[n] - base[n] for t in tasks) for n in base}
    fam = bench.family
    for task in bench.tasks:
        assert ta.test[task] == pytest.approx(accuracy_by_hand(fam, task, merged, "test"), abs=1e-12)


def test_select_alpha_is_the_argmax():
    base, vector = {"w": torch.zeros(3)}, {"w": torch.ones(3)}
    best, scores = select_alpha(lambda s: -abs(float(s["w"].mean()) - 0.3), base, vector, bench_module.ALPHAS)
    assert best == 0.3 and len(scores) == 11
    best, _ = select_alpha(lambda s: 1.0, base, vector, (0.0, 0.5, 1.0))  # all tie: the first
    assert best == 0.0


def test_weight_averaging_is_the_mean_of_the_finetuned_weights(bench):
    average = row(bench, "weight averaging")
    assert average.settings["alpha"] == 1.0
    tasks = [load_file(str(bench.family.task_paths[t])) for t in bench.tasks]
    mean = {n: sum(t[n] for t in tasks) / len(tasks) for n in tasks[0]}
    for task in bench.tasks:
        assert average.test[task] == pytest.approx(accuracy_by_hand(bench.family, task, mean, "test"), abs=1e-12)


def test_consensus_from_the_archive_equals_the_folder_route(bench):
    assert bench.extra["consensus_archive_vs_folder_max_abs_diff"] == 0.0


def test_outputs_feed_the_storage_benchmark_and_results_md(bench, tmp_path, monkeypatch):
    bench.extra["agreement"] = tallzip.agreement(tallzip.open(bench.archives["sum"]))
    md = tmp_path / "RESULTS.md"
    md.write_text("# Benchmark results\n\n## Storage (issue 7)\n\nkeep me\n\n## Accuracy (issue 4)\n\nintro\n\n"
                  "### 99 tasks\n\nanother setting's table\n\n## Later section\n\nme too\n")
    table = accuracy_report.write_outputs(bench, {"total": 1.0}, "python -m benchmarks.accuracy --test", tmp_path, md)
    assert "TALL masks, sum mtv, lambda on val" in table
    assert all((tmp_path / name).stat().st_size > 0 for name in accuracy_report.plot_names(len(bench.tasks)))
    monkeypatch.setattr(storage, "ACCURACY_JSON", tmp_path / "accuracy.json")
    found = storage.accuracy_lookup()
    n = len(bench.tasks)
    assert found == {(n, "float32"): row(bench, "TALL masks, sum mtv, lambda on val").normalized_test,
                     (n, "bfloat16"): row(bench, "TALL masks, sum mtv as bfloat16, lambda on val").normalized_test}
    # Writing again replaces this setting's table and leaves the other sections alone.
    accuracy_report.write_outputs(bench, {"total": 2.0}, "python -m benchmarks.accuracy --test", tmp_path, md)
    text = md.read_text()
    assert "keep me" in text and "me too" in text and "another setting's table" in text
    assert text.count(f"### {n} tasks") == 1 and text.count("## Accuracy (issue 4)") == 1
    assert (text.index("## Storage") < text.index("## Accuracy (issue 4)") < text.index(f"### {n} tasks")
            < text.index("### 99 tasks") < text.index("## Later section"))
    assert "total 2 s" in text and "total 1 s" not in text
    assert list(json.loads((tmp_path / "accuracy.json").read_text())["runs"]) == [str(n)]


# --- the storage-accuracy frontier (issue 13) ------------------------------------------------------------

from benchmarks import frontier as frontier_module, frontier_report  # noqa: E402
from benchmarks.frontier_report import SECTION_TITLE as FRONTIER_TITLE, write_frontier_outputs  # noqa: E402


@pytest.fixture(scope="module")
def frontier(bench, tmp_path_factory):
    b = Bench(bench.family, tmp_path_factory.mktemp("frontier"), log=lambda *a: None)
    return frontier_module.run_frontier(b, alphas=ALPHAS, tolerances=(0.005,))


class P:  # a point as pareto_front sees it
    def __init__(self, name, size, acc):
        self.label, self.bytes, self.normalized = name, size, acc


def test_pareto_front_by_hand_and_against_the_definition():
    points = [P("a", 10, 0.5), P("b", 20, 0.4), P("c", 20, 0.9), P("d", 30, 0.9), P("e", 40, 0.95),
              P("f", 5, 0.3), P("a2", 10, 0.5), P("g", 50, 0.94)]
    # by hand: b is beaten by c (same size, better), d by c (smaller, as good), a2 ties a (the first kept),
    # g by e (smaller, better); f, a, c, e remain, smallest first
    assert [p.label for p in frontier_module.pareto_front(points)] == ["f", "a", "c", "e"]
    rng = np.random.default_rng(3)
    for _ in range(20):
        pts = [P(str(i), int(s), float(a)) for i, (s, a) in
               enumerate(zip(rng.integers(1, 8, 12), rng.integers(0, 6, 12) / 5))]
        dominated = {p.label for p in pts for q in pts if q is not p and q.bytes <= p.bytes
                     and q.normalized >= p.normalized and (q.bytes < p.bytes or q.normalized > p.normalized)}
        undominated = [p for p in pts if p.label not in dominated]
        # exact duplicates are equal: the definition keeps both, the front the first of them
        distinct = {(p.bytes, p.normalized) for p in undominated}
        got = frontier_module.pareto_front(pts)
        assert {(p.bytes, p.normalized) for p in got} == distinct and len(got) == len(distinct)


def test_frontier_points_against_independent_computations(frontier):
    import zstandard
    b = frontier.bench
    fam = b.family
    points = {p.label: p for p in frontier.points}
    ft = {t: accuracy_by_hand(fam, t, fam.load(t), "test") for t in b.tasks}
    for p in frontier.points:  # the paper's metric, by hand
        assert p.normalized == pytest.approx(sum(p.test[t] / ft[t] for t in b.tasks) / len(b.tasks), abs=1e-12)
        assert p.min_task == pytest.approx(min(p.test[t] / ft[t] for t in b.tasks), abs=1e-12)
    files = [open(fam.task_paths[t], "rb").read() for t in b.tasks]
    assert points["zstd -19 of the files"].bytes == sum(len(zstandard.ZstdCompressor(level=19).compress(d)) for d in files)
    params = sum(v.size for v in numpy_state(fam.base_path).values())
    assert points["paper's layout (base + fp32 mtv + 1-bit masks)"].bytes == 8 * params + len(b.tasks) * -(-params // 8)
    exact = points["every task exact"]
    assert exact.representations == {t: "exact" for t in b.tasks} and exact.normalized == 1.0
    for rep in ("q8", "q4", "q3", "q2"):
        assert points[f"every task {rep}"].representations == {t: rep for t in b.tasks}
    # the automatic choice: each task's representation is the first candidate within 0.5% of its val score
    # (tall only if the tall tasks' savings against their fallbacks, in nominal bits, pay for the bf16 mtv)
    auto = points["auto 0.5% on val"]
    choice = auto.settings["choice"]
    first = {}
    for task, scores in choice["scores"].items():
        floor = scores["finetuned"] * (1 - 0.005)
        within = [rep for rep in ("tall", "q2", "q3", "q4", "q8") if scores.get(rep, -1) >= floor]
        first[task] = within[0] if within else "exact"
    tall_tasks = [t for t, rep in first.items() if rep == "tall"]
    if tall_tasks and len(tall_tasks) * 1.25 <= 16:  # the fallbacks were evaluated and weighed
        nominal = {"q2": 2.25, "q3": 3.125, "q4": 4.125, "q8": 8.125, "exact": 32.0}
        fallbacks = choice["mtv_weighed"]["fallbacks"]
        if sum(nominal[fallbacks[t]] - 1 for t in tall_tasks) <= 16:
            first.update(fallbacks)
    assert auto.representations == first
    assert "tall" not in points["auto 0.5% on val, no tall"].settings["choice"]["candidates"]


def test_emr_rebuild_is_the_formula_in_numpy(frontier):
    b = frontier.bench
    fam = b.family
    base = numpy_state(fam.base_path)
    tasks = [numpy_state(fam.task_paths[t]) for t in b.tasks]
    names = list(base)
    flat = np.concatenate([base[n].reshape(-1) for n in names])
    taus = np.stack([np.concatenate([t[n].reshape(-1) for n in names]) - flat for t in tasks])
    sign = np.sign(taus.sum(0))
    unified = sign * np.where(taus * sign > 0, np.abs(taus), 0).max(0)
    states, got_unified, masks, rescalers = frontier_module.emr_rebuild(
        {n: torch.from_numpy(v) for n, v in base.items()}, [{n: torch.from_numpy(v) for n, v in t.items()} for t in tasks])
    np.testing.assert_array_equal(got_unified.numpy(), unified)
    emr = next(p for p in frontier.points if p.label.startswith("EMR"))
    for i, task in enumerate(b.tasks):
        mask = taus[i] * unified > 0
        rescaler = np.abs(taus[i]).astype(np.float64).sum() / np.abs(mask * unified).astype(np.float64).sum()
        assert rescalers[i] == pytest.approx(rescaler, rel=1e-5)
        np.testing.assert_array_equal(masks[i].numpy(), mask)
        rebuilt = flat + np.float32(rescalers[i]) * mask * unified
        offset = 0
        for n in names:
            np.testing.assert_allclose(states[i][n].numpy().reshape(-1), rebuilt[offset:offset + base[n].size], atol=1e-6)
            offset += base[n].size
        assert emr.test[task] == accuracy_by_hand(fam, task, states[i], "test")


def test_targets_say_not_met_when_short(frontier):
    fr = frontier_module.Frontier(frontier.bench)
    ft = frontier.bench.finetuned["test"]
    n_bytes = frontier.bench.finetuned_bytes
    worse = {t: 0.98 * v for t, v in ft.items()}
    fr.add("close", "quantized", n_bytes // 20, 0, worse)          # 20x but 98%
    fr.add("good", "quantized", n_bytes // 10, n_bytes // 40, ft)   # 100% at 10x, 13.3x without the base
    lines = frontier_module.targets_met(fr)
    assert "self-contained: >= 99.5% (no task under 99%) at >= 12x: NOT MET" in lines[0] and "'good'" in lines[0]
    assert "base not counted: >= 99.5% (no task under 99%) at >= 12x: MET" in lines[2]


def test_frontier_outputs(frontier, tmp_path):
    md = tmp_path / "RESULTS.md"
    md.write_text("# Benchmark results\n\n## Accuracy (issue 4)\n\nkeep me\n")
    table = write_frontier_outputs(frontier, "python -m benchmarks.accuracy --only frontier", {}, tmp_path, md)
    n = len(frontier.tasks)
    assert (tmp_path / f"frontier-{n}tasks.png").stat().st_size > 0
    data = json.loads((tmp_path / "frontier.json").read_text())["runs"][str(n)]
    assert {p["label"] for p in data["points"]} == {p.label for p in frontier.points}
    text = md.read_text()
    assert "keep me" in text and text.index("## Accuracy (issue 4)") < text.index(FRONTIER_TITLE)
    assert f"### {n} tasks" in text and "every task q2" in table
    (tmp_path / f"frontier-{n}tasks.png").unlink()
    frontier_report.replot(tmp_path)  # plotted again from the JSON alone (python -m benchmarks.accuracy --replot)
    assert (tmp_path / f"frontier-{n}tasks.png").stat().st_size > 0
