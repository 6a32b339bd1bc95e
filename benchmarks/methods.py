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
import sys

from flexround_pl import compare


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    config = argv[argv.index("--config") + 1] if "--config" in argv[:-1] else "run"
    default_out = os.path.join("benchmarks", "results", os.path.splitext(os.path.basename(config))[0])
    return compare.main(argv, prog="benchmarks/methods.py", default_out=default_out)


if __name__ == "__main__":
    sys.exit(main())
