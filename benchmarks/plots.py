"""PNG plots of ``methods.py`` / ``compare`` results: per-block loss curves and metric vs bits.

    python benchmarks/plots.py benchmarks/results/demo/summary.json [more summary or compare.json ...] --out DIR

A thin wrapper over :mod:`flexround_pl.plots` (what ``python -m flexround_pl
compare`` draws) for several summaries at once, e.g. the older ``summary.json``
files under ``benchmarks/results/``. The run directories must still exist
(rows record ``run_dir``; TensorBoard logs under ``<run>/tensorboard``).
"""

from __future__ import annotations

import argparse
import json
import os

from flexround_pl.plots import plot_loss_curves, plot_metric_vs_bits


def load_rows(paths: list[str]) -> list[dict]:
    rows = []
    for path in paths:
        with open(path) as f:
            summary = json.load(f)
        base = os.path.dirname(os.path.abspath(path))
        for row in summary["rows"]:
            run_dir = row.get("run_dir") or os.path.join(base, f"{row['method']}_w{row['w_bits']}")
            rows.append({**row, "run_dir": run_dir})
    if not rows:
        raise SystemExit("plots.py: error: no rows in the given summaries")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("summaries", nargs="+", help="summary.json (methods.py) or compare.json files")
    parser.add_argument("--out", required=True, help="directory for the PNG files")
    args = parser.parse_args()
    for path in args.summaries:
        if not os.path.isfile(path):
            raise SystemExit(f"plots.py: error: {path} does not exist; run benchmarks/methods.py first")
    rows = load_rows(args.summaries)
    os.makedirs(args.out, exist_ok=True)
    written = [plot_loss_curves(rows, b, args.out) for b in sorted({r["w_bits"] for r in rows})]
    written.append(plot_metric_vs_bits(rows, args.out))
    print("\n".join(written))


if __name__ == "__main__":
    main()
