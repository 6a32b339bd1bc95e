"""benchmarks/methods.py (a wrapper over ``compare``) --collect: tabulate finished runs, refuse a missing one."""

from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
import methods  # noqa: E402

from flexround_pl.compare import table  # noqa: E402


def _results(a_bits, a_granularity):
    return {
        "method": "flexround", "w_bits": 4, "a_bits": a_bits, "a_granularity": a_granularity,
        "granularity": "channel", "max_steps": 40, "lr": 0.01, "fp": {"perplexity": 16.5},
        "quantized": {"perplexity": 20.1, "fp_agreement": 0.75}, "seconds_total": 12.0, "peak_rss_mb": 100.0,
        "blocks": [{"name": "layer.0", "loss_start": 2.0, "loss_end": 1.0, "steps": 40}],
    }


def test_collect_tabulates_finished_runs_with_their_activation_bits(tmp_path):
    run = tmp_path / "flexround_w4"
    run.mkdir()
    (run / "results.json").write_text(json.dumps(_results(8, "token")))
    code = methods.main(["--config", "c.yaml", "--methods", "flexround", "--out", str(tmp_path), "--collect",
                         "--", "--trainer.max_steps", "40"])
    assert code == 0
    summary = json.loads((tmp_path / "compare.json").read_text())
    assert summary["overrides"] == ["--trainer.max_steps", "40"]
    assert summary["rows"][0]["run_dir"] == str(run)
    row = (tmp_path / "compare.md").read_text().splitlines()[2]
    assert row.startswith("| flexround | 4 | 8/token | channel | 40 | 0.01 |")
    assert (tmp_path / "metric_vs_bits.png").exists() and (tmp_path / "loss_curves_w4.png").exists()


def test_table_marks_a_metric_a_run_lacks(tmp_path):
    old = _results(8, "tensor")  # a run from before fp_kl existed
    new = {**old, "quantized": {**old["quantized"], "fp_kl": 0.0012}}
    lines = table([old, new]).splitlines()
    assert "fp_kl" in lines[0] and "nan" not in "".join(lines)
    assert lines[2].split(" | ")[-5] == "—" and lines[3].split(" | ")[-5] == "0.0012"


def test_collect_refuses_a_run_that_has_not_finished(tmp_path, capsys):
    assert methods.main(["--config", "c.yaml", "--methods", "rtn", "--out", str(tmp_path), "--collect"]) == 2
    assert "--collect found no finished run" in capsys.readouterr().err
    assert not (tmp_path / "compare.json").exists()
