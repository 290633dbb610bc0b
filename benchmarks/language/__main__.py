"""python -m benchmarks.language [--config cpu|small|tiny] [--threads 2] [--report-only]  (see __init__.py)"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from . import report


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.language", description=__doc__)
    parser.add_argument("--config", default="cpu", help="family size: cpu (the benchmark's), small, tiny")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (one: on two cores shared with other jobs, two threads ran 4-10x slower than one)")
    parser.add_argument("--cache", type=Path, default=None, help="family cache root (default /work/cache/language)")
    parser.add_argument("--report-only", action="store_true", help="redraw from benchmarks/results/language.json")
    parser.add_argument("--json", type=Path, default=None, help="where the results go (default benchmarks/results/language.json)")
    args = parser.parse_args(argv)
    out_json = args.json or (report.JSON_PATH if args.config == "cpu" else report.RESULTS / f"language-{args.config}.json")
    if args.report_only:
        result = json.loads(out_json.read_text())
        report.plots(result, out_json.stem)
        print(report.text(result))
        return 0
    try:
        from . import corpora, family, rows
        import torch
    except ImportError as exc:
        print(f"error: the language benchmark needs the lang extra ({exc.name} is missing): "
              "pip install torch==2.13.0 -e '.[lang]'", file=sys.stderr)
        return 1
    if args.config not in family.CONFIGS:
        print(f"error: unknown --config {args.config!r} (expected one of {', '.join(family.CONFIGS)})", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    config = family.CONFIGS[args.config]
    log = lambda m: print(time.strftime("%H:%M:%S"), m, flush=True)  # noqa: E731
    try:
        folder = family.build(config, **({"root": args.cache} if args.cache else {}), log=log, threads=args.threads)
    except corpora.MissingCorpus as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    log(f"family {folder}")
    result = rows.run(folder, folder / "runs", log)
    result["command"] = "python -m benchmarks.language" + ("" if args.config == "cpu" else f" --config {args.config}")
    result["calibration"] = report.calibration(result)
    report.write(result, out_json)
    report.plots(result, out_json.stem)
    print(report.text(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
