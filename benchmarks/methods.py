"""Quality benchmark: one config, several methods and bit-widths, equal iterations.

    python benchmarks/methods.py --config configs/demo.yaml --methods rtn adaround flexround --bits 4 3
    python benchmarks/methods.py --config configs/smollm2_wiki.yaml --bits 4 3 -- --trainer.max_steps 100

The product's ``python -m flexround_pl compare`` (:mod:`flexround_pl.compare`)
with the runs and the report under ``benchmarks/results/<config name>`` by
default: ``compare.md``, ``compare.json`` and the PNG plots. Arguments after
``--`` are passed to every run; finished runs are reused; ``--collect`` runs
nothing and tabulates the finished runs already in ``--out``.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

from flexround_pl import compare
from flexround_pl.compare import split_overrides  # noqa: F401  (benchmarks/quality.py uses it from here)


def read_one(root: str) -> dict:
    """The finished run in ``root`` (its ``results.json`` and ``run_dir``); exits when there is none."""
    results = compare.read_run(root)
    if results is None:
        sys.exit(f"methods.py: --collect found no finished run at {os.path.join(root, 'results.json')}: "
                 "run it first (drop --collect)")
    return results


def run_one(config: str, method: str, bits: int, root: str, extra: list[str]) -> dict:
    """One ``fit`` in its own process (benchmarks/quality.py times each run apart); its results + wall seconds."""
    cmd = [sys.executable, "-m", "flexround_pl", *compare.fit_args(config, method, bits, root, extra)]
    print("$", " ".join(cmd), flush=True)
    start = time.perf_counter()
    subprocess.run(cmd, check=True)
    results = read_one(root)
    results["wall_seconds"] = time.perf_counter() - start
    return results


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    config = argv[argv.index("--config") + 1] if "--config" in argv[:-1] else "run"
    default_out = os.path.join("benchmarks", "results", os.path.splitext(os.path.basename(config))[0])
    return compare.main(argv, prog="benchmarks/methods.py", default_out=default_out)


if __name__ == "__main__":
    sys.exit(main())
