"""Quality benchmark: one config, several methods and bit-widths, equal iterations.

Runs ``python -m flexround_pl fit`` once per (method, bits), reads each run's
``results.json``, prints a markdown table and writes the collected rows to JSON.

    python benchmarks/methods.py --config configs/demo.yaml --methods rtn adaround flexround --bits 4 3
    python benchmarks/methods.py --config configs/smollm2_wiki.yaml --bits 4 3 -- --trainer.max_steps 100

Arguments after ``--`` are passed to every run (any LightningCLI override).
``--collect`` runs nothing and tabulates the finished runs already in ``--out``
(give the same arguments, so the summary records the overrides).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time


def read_one(root: str) -> dict:
    """The finished run in ``root``: its ``results.json`` and ``run_dir`` (TensorBoard logs for plots.py)."""
    path = os.path.join(root, "results.json")
    if not os.path.isfile(path):
        sys.exit(f"methods.py: --collect found no finished run at {path}: run it first (drop --collect)")
    with open(path) as f:
        results = json.load(f)
    results["run_dir"] = os.path.abspath(root)
    return results


def run_one(config: str, method: str, bits: int, root: str, extra: list[str]) -> dict:
    cmd = [
        sys.executable, "-m", "flexround_pl", "fit", "--config", config,
        "--model.quant.method", method, "--model.quant.weight.bits", str(bits),
        "--trainer.default_root_dir", root, *extra,
    ]
    print("$", " ".join(cmd), flush=True)
    start = time.perf_counter()
    subprocess.run(cmd, check=True)
    results = read_one(root)
    results["wall_seconds"] = time.perf_counter() - start
    return results


def _a_bits(row: dict) -> str:
    """Activation bits, ``16`` for FP activations, ``/token`` for per-token dynamic."""
    if row.get("a_bits") is None:
        return "16"
    return f"{row['a_bits']}" + ("/token" if row.get("a_granularity") == "token" else "")


def table(rows: list[dict]) -> str:
    metrics = sorted({k for r in rows for k in r["quantized"]})
    fp_metrics = sorted({k for r in rows for k in r["fp"]})  # fp_agreement exists only for the quantized model
    head = ["method", "W", "A", "granularity", "steps/block", "lr"] + [f"FP {m}" for m in fp_metrics] + metrics + ["time (s)", "peak RSS (MB)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["method"], str(r["w_bits"]), _a_bits(r), r["granularity"], str(r["max_steps"] if r["method"] != "rtn" else 0),
                 "—" if r["method"] == "rtn" else f"{r['lr']:g}"]
        cells += [f"{r['fp'][m]:.4f}" if m in r["fp"] else "—" for m in fp_metrics]
        cells += [f"{r['quantized'][m]:.4f}" if m in r["quantized"] else "—" for m in metrics]  # e.g. fp_kl of an older run
        cells += [f"{r['seconds_total']:.0f}", f"{r['peak_rss_mb']:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def split_overrides(argv: list[str]) -> tuple[list[str], list[str]]:
    """``(own arguments, fit overrides)``: the overrides are everything after ``--``."""
    if "--" not in argv:
        return argv, []
    i = argv.index("--")
    return argv[:i], argv[i + 1:]


def main() -> None:
    argv, extra = split_overrides(sys.argv[1:])
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--methods", nargs="+", default=["rtn", "adaround", "flexround"])
    parser.add_argument("--bits", nargs="+", type=int, default=[4])
    parser.add_argument("--out", default=None, help="directory for runs and the JSON summary")
    parser.add_argument("--collect", action="store_true",
                        help="run nothing: tabulate the finished runs already in --out (e.g. after an interruption)")
    args = parser.parse_args(argv)

    name = os.path.splitext(os.path.basename(args.config))[0]
    out = args.out or os.path.join("benchmarks", "results", name)
    os.makedirs(out, exist_ok=True)
    rows = []
    for bits in args.bits:
        for method in args.methods:
            root = os.path.join(out, f"{method}_w{bits}")
            rows.append(read_one(root) if args.collect else run_one(args.config, method, bits, root, extra))
    summary = {"config": args.config, "overrides": extra, "rows": rows}
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    md = table(rows)
    with open(os.path.join(out, "summary.md"), "w") as f:
        f.write(md + "\n")
    print(md)


if __name__ == "__main__":
    main()
