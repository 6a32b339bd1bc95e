"""``python -m flexround_pl compare``: one config, several methods and bit-widths, one report.

    python -m flexround_pl compare --config configs/demo.yaml --methods rtn adaround flexround --bits 4 3
    python -m flexround_pl compare --config configs/smollm2_wiki.yaml --bits 4 -- --trainer.max_steps 40

Each (method, bits) is one ``fit`` run in ``<out>/<method>_w<bits>/`` with the
same config and the overrides after ``--``; ``--out`` defaults to
``runs/compare/<config name>``. Then it writes, in ``<out>``:

* ``compare.md``: the table (task metrics, ``fp_agreement``, steps, time, RSS);
* ``compare.json``: ``config``, ``overrides`` and one row per run (its
  ``results.json`` plus ``run_dir``);
* ``metric_vs_bits.png`` and ``loss_curves_w<bits>.png`` (:mod:`flexround_pl.plots`).

A run whose ``results.json`` exists is reused, never re-run; an interrupted
one resumes after its last finished block (``fit`` does that). Each run
directory records the command that made it (``compare_run.json``, written when
the run finished): a finished run made with other settings, or not by
``compare``, is refused, so a table never mixes settings. ``--collect`` runs
nothing and tabulates the finished runs as they are (a missing one is an error). Methods and bits are
checked up front by the config's own validation (any method ``fit`` accepts).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
from typing import Any, Optional

from flexround_pl.utils import write_json_atomic

RUN_RECORD = "compare_run.json"


class CompareError(ValueError):
    """Bad arguments or an unusable run directory (the CLI prints one error line, exit 2)."""


class RunFailed(RuntimeError):
    """A ``fit`` run exited non-zero; it has printed its own error line."""

    def __init__(self, method: str, bits: int, code: int) -> None:
        super().__init__(f"the {method} W{bits} run failed (exit {code}); finished runs are kept: re-run the same "
                         "compare command to resume")
        self.code = code


def _a_bits(row: dict) -> str:
    """Activation bits, ``16`` for FP activations, ``/token`` for per-token dynamic."""
    if row.get("a_bits") is None:
        return "16"
    return f"{row['a_bits']}" + ("/token" if row.get("a_granularity") == "token" else "")


def table(rows: list[dict]) -> str:
    """The markdown table of ``rows`` (``results.json`` dicts); a metric a run lacks shows as ``—``."""
    metrics = sorted({k for r in rows for k in r["quantized"]})
    fp_metrics = sorted({k for r in rows for k in r["fp"]})  # fp_agreement exists only for the quantized model
    head = (["method", "W", "A", "granularity", "steps/block", "lr"] + [f"FP {m}" for m in fp_metrics] + metrics
            + ["time (s)", "CPU (s)", "peak RSS (MB)"])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["method"], str(r["w_bits"]), _a_bits(r), r["granularity"], str(r["max_steps"] if r["method"] != "rtn" else 0),
                 "—" if r["method"] == "rtn" else f"{r['lr']:g}"]
        cells += [f"{r['fp'][m]:.4f}" if m in r["fp"] else "—" for m in fp_metrics]
        cells += [f"{r['quantized'][m]:.4f}" if m in r["quantized"] else "—" for m in metrics]
        cpu = r.get("cpu_seconds_total")
        cells += [f"{r['seconds_total']:.0f}", "—" if cpu is None else f"{cpu:.0f}", f"{r['peak_rss_mb']:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def read_run(root: str) -> Optional[dict]:
    """The finished run in ``root`` (its ``results.json`` plus ``run_dir``), or ``None``."""
    path = os.path.join(root, "results.json")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        results = json.load(f)
    results["run_dir"] = os.path.abspath(root)
    return results


def split_overrides(argv: list[str]) -> tuple[list[str], list[str]]:
    """``(own arguments, fit overrides)``: the overrides are everything after ``--``."""
    if "--" not in argv:
        return argv, []
    i = argv.index("--")
    return argv[:i], argv[i + 1:]


def fit_args(config: str, method: str, bits: int, root: str, overrides: list[str]) -> list[str]:
    return ["fit", "--config", config, "--model.quant.method", method, "--model.quant.weight.bits", str(bits),
            "--trainer.default_root_dir", root, *overrides]


def _check_record(root: str, args: list[str]) -> None:
    path = os.path.join(root, RUN_RECORD)
    if os.path.isfile(path):
        with open(path) as f:
            recorded = json.load(f).get("args")
        if recorded != args:
            raise CompareError(
                f"{root} holds a run made with other settings ({' '.join(recorded or [])}); "
                "pass another --out, or delete that run directory"
            )
    elif os.path.isfile(os.path.join(root, "results.json")):
        raise CompareError(f"{root} holds a run not made by compare; pass another --out, or delete that run directory")


def check_arguments(config: str, methods: list[str], bits: list[int], collect: bool = False) -> None:
    """Up front, before any run: the config exists (unless only collecting), every method and bit-width is one
    ``fit`` accepts."""
    from flexround_pl.quant.config import QuantConfig, validate_bits

    if not collect and not os.path.isfile(config):
        raise CompareError(f"config {config!r} does not exist; pass a YAML file such as configs/demo.yaml")
    for method in methods:
        QuantConfig(method=method)  # the config's own validation: the message names the accepted methods
    for b in bits:
        validate_bits(b, "--bits")
    if len(set(methods)) != len(methods) or len(set(bits)) != len(bits):
        raise CompareError("--methods and --bits must not repeat a value")


def run_all(config: str, methods: list[str], bits: list[int], out: str, overrides: list[str],
            collect: bool = False, log: Any = print) -> list[dict]:
    """Every (bits, method) run's results, running the missing ones in this process."""
    from flexround_pl.cli import main as cli_main

    check_arguments(config, methods, bits, collect)
    plan = [(b, m, os.path.join(out, f"{m}_w{b}")) for b in bits for m in methods]
    if collect:  # tabulate what is there, as it is
        missing = [root for _, _, root in plan if read_run(root) is None]
        if missing:
            raise CompareError(f"--collect found no finished run in {', '.join(missing)}: run them first (drop --collect)")
    else:
        for b, m, root in plan:
            _check_record(root, fit_args(config, m, b, root, overrides))
    rows = []
    for i, (b, m, root) in enumerate(plan):
        args = fit_args(config, m, b, root, overrides)
        done = read_run(root)
        if done is not None:
            log(f"compare: run {i + 1}/{len(plan)} {m} W{b}: finished before, reused ({root})")
            rows.append(done)
            continue
        log(f"compare: run {i + 1}/{len(plan)} {m} W{b} -> {root}\n$ python -m flexround_pl {' '.join(args)}")
        code = cli_main(args)
        gc.collect()
        if code != 0:
            raise RunFailed(m, b, code)
        # recorded once finished: a run refused up front leaves nothing; an interrupted one is guarded by
        # fit itself (it resumes the same configuration only)
        write_json_atomic(os.path.join(root, RUN_RECORD), {"args": args})
        rows.append(read_run(root))
    return rows


def write_report(rows: list[dict], out: str, config: str, overrides: list[str]) -> list[str]:
    """``compare.md``, ``compare.json`` and the PNG plots in ``out``; returns the paths written."""
    from flexround_pl import plots

    os.makedirs(out, exist_ok=True)
    md = table(rows)
    with open(os.path.join(out, "compare.md"), "w") as f:
        f.write(md + "\n")
    write_json_atomic(os.path.join(out, "compare.json"), {"config": config, "overrides": overrides, "rows": rows})
    pngs = [plots.plot_loss_curves(rows, b, out) for b in sorted({r["w_bits"] for r in rows})]
    pngs.append(plots.plot_metric_vs_bits(rows, out))
    return [os.path.join(out, "compare.md"), os.path.join(out, "compare.json"), *pngs]


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # the CLI's one-line error format, exit 2
        print(f"flexround_pl: error: {message} (see {self.prog} --help)", file=sys.stderr)
        raise SystemExit(2)


def parser(prog: str = "python -m flexround_pl compare", default_out: Optional[str] = None) -> argparse.ArgumentParser:
    p = _Parser(prog=prog, description="Run fit for several methods and bit-widths of one config "
                                "(finished runs reused), then write compare.md, compare.json and PNG plots.",
                                epilog="Arguments after -- are passed to every fit run (any LightningCLI override).")
    p.add_argument("--config", required=True, help="the YAML config every run starts from")
    p.add_argument("--methods", nargs="+", default=["rtn", "adaround", "flexround"], help="quantization methods")
    p.add_argument("--bits", nargs="+", type=int, default=[4], help="weight bit-widths")
    p.add_argument("--out", default=default_out,
                   help="directory of the runs and the report (default runs/compare/<config name>)")
    p.add_argument("--collect", action="store_true", help="run nothing: report the finished runs in --out")
    return p


def main(argv: Optional[list[str]] = None, prog: str = "python -m flexround_pl compare",
         default_out: Optional[str] = None) -> int:
    argv, overrides = split_overrides(list(sys.argv[2:] if argv is None else argv))
    try:
        args = parser(prog, default_out).parse_args(argv)
    except SystemExit as e:  # argparse already printed usage / help
        return int(e.code or 0)
    name = os.path.splitext(os.path.basename(args.config))[0]
    out = os.path.abspath(args.out or os.path.join("runs", "compare", name))
    try:
        rows = run_all(args.config, args.methods, args.bits, out, overrides, collect=args.collect)
        written = write_report(rows, out, args.config, overrides)
    except ValueError as err:
        print(f"flexround_pl: error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    except RunFailed as err:
        if err.code != 2:  # exit 2: fit refused its input and said why in one line already
            print(f"flexround_pl: error: {err}", file=sys.stderr)
        return err.code
    print(table(rows))
    print("\n".join(["compare: wrote"] + [f"  {p}" for p in written]))
    return 0
