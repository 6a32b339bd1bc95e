"""Quality per CPU-second: RTN / GPTQ / AdaRound / FlexRound / LRQ (and AutoRound) on one config, one budget.

    python benchmarks/quality.py --config configs/smollm2_wiki.yaml --bits 4 3 --steps 40 \\
        --methods rtn gptq adaround flexround lrq autoround \\
        -- --data.init_args.seq_length 256 --data.init_args.num_calibration 64 \\
           --data.init_args.num_eval_windows 64 --model.reconstruction.batch_size 2

Each (method, bits, steps) is one ``python -m flexround_pl fit`` run through
``methods.run_one`` (arguments after ``--`` go to every run); RTN and GPTQ
train nothing, so they run once per bit-width whatever ``--steps``. Rows are
merged into ``--out`` (default ``benchmarks/results/<config>/quality.json``;
a row with the same method, bits, granularity, group size, steps, start
and lr is replaced), a list of

    {method, bits, granularity, group_size, steps, perplexity, fp_perplexity,
     fp_agreement, cpu_seconds, peak_rss_mb}

``cpu_seconds`` is the quantization phase only (``results.json`` ->
``phases.quantize.cpu_seconds``: calibration cache, blocks, hardening; no
evaluation). ``quality.png`` beside it plots perplexity against those seconds,
one panel per (bits, granularity), one line per method.

AutoRound runs through ``benchmarks/autoround.py`` in its own venv
(``--autoround_python``, default ``/tmp/arvenv/bin/python``, install steps in
that file) with the same windows, iterations and batch size, taken from the
``--`` overrides; without that venv it is skipped with a message. ``--collect``
runs nothing and re-reads the finished runs in the output directory;
``--from_summary`` adds the rows of a ``methods.py`` summary.json (their
``cpu_seconds`` is null when the runs predate per-phase timings).
``--init_from gptq`` starts FlexRound / LRQ from GPTQ's compensated weights
(rows and run directories carry ``init_from``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from typing import Optional

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import methods as methods_bench  # noqa: E402

METHODS = ("rtn", "gptq", "adaround", "flexround", "lrq", "autoround")
TRAINS_NOTHING = ("rtn", "gptq")
KEY = ("method", "bits", "granularity", "group_size", "steps", "init_from", "lr", "recipe")


def _override(extra: list[str], name: str, default: Optional[str] = None) -> Optional[str]:
    """The value of ``--name VALUE`` (or ``--name=VALUE``) among the fit overrides, the last one wins."""
    value = default
    for i, arg in enumerate(extra):
        if arg == name and i + 1 < len(extra):
            value = extra[i + 1]
        elif arg.startswith(name + "="):
            value = arg.split("=", 1)[1]
    return value


def _init_from(run_dir: Optional[str]) -> str:
    """``model.quant.init_from`` of a finished run (its saved ``config.yaml``), ``rtn`` before the key existed."""
    path = os.path.join(run_dir or "", "config.yaml")
    if not run_dir or not os.path.isfile(path):
        return "rtn"
    import yaml

    with open(path) as f:
        config = yaml.safe_load(f)
    return ((config.get("model") or {}).get("quant") or {}).get("init_from") or "rtn"


def row_from_results(results: dict, recipe: str = "default") -> dict:
    """One quality row from a ``fit`` run's ``results.json`` (``recipe``: the ``--recipe`` label of its overrides)."""
    phases = results.get("phases") or {}
    granularity = results["granularity"]
    return {
        "method": results["method"],
        "bits": results["w_bits"],
        "granularity": granularity,
        "group_size": results.get("group_size") if granularity == "group" else None,
        "steps": 0 if results["method"] in TRAINS_NOTHING else results["max_steps"],
        "perplexity": results["quantized"].get("perplexity"),
        "fp_perplexity": results["fp"].get("perplexity"),
        "fp_agreement": results["quantized"].get("fp_agreement"),
        "cpu_seconds": phases.get("quantize", {}).get("cpu_seconds"),
        "peak_rss_mb": results.get("peak_rss_mb"),
        "lr": None if results["method"] in TRAINS_NOTHING else results.get("lr"),
        "init_from": _init_from(results.get("run_dir")),
        "recipe": recipe,
        "run_dir": results.get("run_dir"),
    }


def row_from_autoround(result: dict) -> dict:
    group = result["group_size"]
    return {
        "method": "autoround", "bits": result["bits"], "granularity": "channel" if group == -1 else "group",
        "group_size": None if group == -1 else group, "steps": result["iters"],
        "perplexity": result["quantized"]["perplexity"], "fp_perplexity": result.get("fp", {}).get("perplexity"),
        "fp_agreement": result["quantized"].get("fp_agreement"), "cpu_seconds": result["quantize_cpu_seconds"],
        "peak_rss_mb": result["peak_rss_mb"], "lr": result.get("lr"), "init_from": "rtn", "recipe": "default",
        "run_dir": None,
    }


def run_dir_name(method: str, bits: int, granularity: str, group_size: Optional[int], steps: int,
                 init_from: str = "rtn", recipe: str = "default") -> str:
    grid = "channel" if granularity == "channel" else f"g{group_size}" if granularity == "group" else granularity
    start = "" if init_from == "rtn" else f"_from_{init_from}"
    tag = "" if recipe == "default" else f"_{recipe}"
    return f"{method}{start}_w{bits}_{grid}_s{steps}{tag}"


def merge(rows: list[dict], new: list[dict]) -> list[dict]:
    """``rows`` with ``new`` added; a new row replaces an old one with the same key."""
    def key(r: dict) -> tuple:
        missing = {"init_from": "rtn", "recipe": "default"}  # rows of older files lack some keys
        return tuple(r.get(k, missing.get(k)) for k in KEY)

    keys = {key(r) for r in new}
    kept = [r for r in rows if key(r) not in keys]
    return sorted(kept + new, key=lambda r: (-r["bits"], r["granularity"], r["group_size"] or 0,
                                             METHODS.index(r["method"]) if r["method"] in METHODS else 99,
                                             r.get("init_from", "rtn") != "rtn", r["steps"]))


def table(rows: list[dict]) -> str:
    head = ["method", "W", "granularity", "steps", "perplexity", "× FP", "fp_agreement", "quantize CPU-s", "peak RSS (MB)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        ratio = r["perplexity"] / r["fp_perplexity"] if r.get("fp_perplexity") else None
        grid = r["granularity"] + (f" {r['group_size']}" if r["group_size"] else "")
        start = r.get("init_from", "rtn")
        lr = f", lr {r['lr']:g}" if r.get("lr") else ""
        recipe = "" if r.get("recipe", "default") == "default" else f", {r['recipe']}"
        cells = [r["method"] + ("" if start == "rtn" else f" (from {start})") + lr + recipe, str(r["bits"]), grid, str(r["steps"]), f"{r['perplexity']:.2f}",
                 "—" if ratio is None else f"{ratio:.2f}",
                 "—" if r.get("fp_agreement") is None else f"{r['fp_agreement']:.4f}",
                 "—" if r.get("cpu_seconds") is None else f"{r['cpu_seconds']:.0f}",
                 "—" if r.get("peak_rss_mb") is None else f"{r['peak_rss_mb']:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(rows: list[dict], path: str) -> None:
    """Perplexity vs quantization CPU-seconds, one panel per (bits, granularity), log-scaled perplexity."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from flexround_pl.plots import COLORS

    timed = [r for r in rows if r.get("cpu_seconds") is not None and r.get("perplexity") is not None]
    panels = sorted({(r["bits"], r["granularity"], r["group_size"] or 0) for r in timed}, key=lambda p: (-p[0], p[1], p[2]))
    if not panels:
        print("quality.py: no row has quantization CPU-seconds: nothing to plot", file=sys.stderr)
        return
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.2), squeeze=False)
    for ax, (bits, gran, group) in zip(axes[0], panels):
        sel = [r for r in timed if (r["bits"], r["granularity"], r["group_size"] or 0) == (bits, gran, group)]
        def curve(r: dict) -> tuple:
            return r["method"], r.get("init_from", "rtn"), r.get("recipe", "default")

        curves = sorted({curve(r) for r in sel},
                        key=lambda c: (METHODS.index(c[0]) if c[0] in METHODS else 99, c[1] != "rtn", c[2]))
        for method, start, recipe in curves:
            pts = sorted((r["cpu_seconds"], r["perplexity"], r["steps"]) for r in sel if curve(r) == (method, start, recipe))
            color = COLORS.get(method)
            label = method + ("" if start == "rtn" else f" from {start}") + ("" if recipe == "default" else f", {recipe}")
            plain = start == "rtn" and recipe == "default"
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-" if plain else "s--", color=color, label=label)
            for x, y, steps in pts:
                if steps:
                    ax.annotate(str(steps), (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7, color=color)
        fp = next((r["fp_perplexity"] for r in sel if r.get("fp_perplexity")), None)
        if fp:
            ax.axhline(fp, color="black", ls="--", lw=1, label="FP")
        ax.set_yscale("log")
        ax.set_xlabel("quantization CPU-seconds")
        ax.set_ylabel("perplexity")
        ax.set_title(f"W{bits} {gran}" + (f" {group}" if group else "") + " (labels: steps/block)")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_autoround(python: str, bits: int, steps: int, granularity: str, group_size: Optional[int],
                  extra: list[str], out_dir: str) -> Optional[dict]:
    if not os.path.isfile(python):
        print(f"quality.py: skipping autoround: no AutoRound venv at {python} "
              "(install steps in benchmarks/autoround.py, or pass --autoround_python)", file=sys.stderr)
        return None
    out = os.path.join(out_dir, f"autoround_w{bits}_{'channel' if granularity == 'channel' else f'g{group_size}'}_s{steps}.json")
    cmd = [python, os.path.join(os.path.dirname(os.path.abspath(__file__)), "autoround.py"),
           "--bits", str(bits), "--group_size", str(-1 if granularity == "channel" else group_size),
           "--iters", str(steps), "--num_calibration", _override(extra, "--data.init_args.num_calibration", "128"),
           "--seq_length", _override(extra, "--data.init_args.seq_length", "512"),
           "--batch_size", _override(extra, "--model.reconstruction.batch_size", "4"),
           "--num_eval_windows", _override(extra, "--data.init_args.num_eval_windows", "32"), "--out", out]
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)
    with open(out) as f:
        return json.load(f)


def main(argv: Optional[list[str]] = None) -> None:
    argv, extra = methods_bench.split_overrides(list(sys.argv[1:] if argv is None else argv))
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--methods", nargs="+", default=None, choices=METHODS,
                        help="default: all, or none with --merge / --from_summary (then it only merges)")
    parser.add_argument("--bits", nargs="+", type=int, default=[4])
    parser.add_argument("--steps", nargs="+", type=int, default=[40], help="steps per block of the learned methods")
    parser.add_argument("--granularity", default="channel", choices=("channel", "group"))
    parser.add_argument("--group_size", type=int, default=64)
    parser.add_argument("--init_from", default="rtn", choices=("rtn", "gptq"),
                        help="quant.init_from of the learned methods FlexRound / LRQ (gptq: start from GPTQ's weights)")
    parser.add_argument("--recipe", default="default",
                        help="a label for the overrides after -- (e.g. 'relative' for --model.reconstruction.token_loss "
                             "relative): rows and run directories carry it, so variants of one method sit side by side")
    parser.add_argument("--out", default=None, help="quality.json path (runs go in its directory)")
    parser.add_argument("--autoround_python", default="/tmp/arvenv/bin/python")
    parser.add_argument("--collect", action="store_true", help="run nothing: re-read the finished runs")
    parser.add_argument("--from_summary", nargs="*", default=[], help="methods.py summary.json files to add")
    parser.add_argument("--merge", nargs="*", default=[],
                        help="other quality.json files whose rows to add (runs made in parallel with their own --out)")
    args = parser.parse_args(argv)

    name = os.path.splitext(os.path.basename(args.config))[0]
    out = args.out or os.path.join("benchmarks", "results", name, "quality.json")
    out_dir = os.path.dirname(os.path.abspath(out))
    os.makedirs(out_dir, exist_ok=True)
    rows: list[dict] = []
    if os.path.isfile(out):
        with open(out) as f:
            rows = json.load(f)
    grid = ["--model.quant.weight.granularity", args.granularity]
    if args.granularity == "group":
        grid += ["--model.quant.weight.group_size", str(args.group_size)]
    group_size = args.group_size if args.granularity == "group" else None

    new: list[dict] = []
    for path in args.from_summary:
        with open(path) as f:
            new += [row_from_results(r) for r in json.load(f)["rows"]]
    for path in args.merge:
        with open(path) as f:
            new = merge(new, json.load(f))
    if args.methods is None:
        args.methods = [] if args.merge or args.from_summary else list(METHODS)
    for bits in args.bits:
        for method in args.methods:
            for steps in ([0] if method in TRAINS_NOTHING else args.steps):
                if method == "autoround":
                    if not args.collect:
                        result = run_autoround(args.autoround_python, bits, steps, args.granularity, group_size,
                                               extra, out_dir)
                        if result is not None:
                            new.append(row_from_autoround(result))
                    continue
                start = args.init_from if method in ("flexround", "lrq") else "rtn"
                root = os.path.join(out_dir, run_dir_name(method, bits, args.granularity, group_size, steps, start,
                                                          args.recipe))
                if args.collect:
                    results = methods_bench.read_one(root)
                else:
                    run_extra = [*grid, "--trainer.max_steps", str(steps), "--model.quant.init_from", start, *extra]
                    results = methods_bench.run_one(args.config, method, bits, root, run_extra)
                new.append(row_from_results(results, args.recipe))
    rows = merge(rows, new)
    with open(out, "w") as f:
        json.dump(rows, f, indent=2)
    md = table(rows)
    with open(os.path.splitext(out)[0] + ".md", "w") as f:
        f.write(md + "\n")
    print(md)
    plot(rows, os.path.splitext(out)[0] + ".png")


if __name__ == "__main__":
    main()
