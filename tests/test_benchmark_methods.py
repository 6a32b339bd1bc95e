"""benchmarks/methods.py --collect: tabulate finished runs, refuse a missing one."""

from __future__ import annotations

import json
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
import methods  # noqa: E402


def _results(a_bits, a_granularity):
    return {
        "method": "flexround", "w_bits": 4, "a_bits": a_bits, "a_granularity": a_granularity,
        "granularity": "channel", "max_steps": 40, "lr": 0.01, "fp": {"perplexity": 16.5},
        "quantized": {"perplexity": 20.1, "fp_agreement": 0.75}, "seconds_total": 12.0, "peak_rss_mb": 100.0,
    }


def test_collect_tabulates_finished_runs_with_their_activation_bits(tmp_path, monkeypatch):
    run = tmp_path / "flexround_w4"
    run.mkdir()
    (run / "results.json").write_text(json.dumps(_results(8, "token")))
    monkeypatch.setattr(sys, "argv", ["methods.py", "--config", "c.yaml", "--methods", "flexround",
                                      "--out", str(tmp_path), "--collect", "--", "--trainer.max_steps", "40"])
    methods.main()
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["overrides"] == ["--trainer.max_steps", "40"]
    assert summary["rows"][0]["run_dir"] == str(run)
    row = (tmp_path / "summary.md").read_text().splitlines()[2]
    assert row.startswith("| flexround | 4 | 8/token | channel | 40 | 0.01 |")


def test_table_marks_a_metric_a_run_lacks(tmp_path):
    old = _results(8, "tensor")  # a run from before fp_kl existed
    new = {**old, "quantized": {**old["quantized"], "fp_kl": 0.0012}}
    lines = methods.table([old, new]).splitlines()
    assert "fp_kl" in lines[0] and "nan" not in "".join(lines)
    assert lines[2].split(" | ")[-4] == "—" and lines[3].split(" | ")[-4] == "0.0012"


def test_collect_refuses_a_run_that_has_not_finished(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["methods.py", "--config", "c.yaml", "--methods", "rtn",
                                      "--out", str(tmp_path), "--collect"])
    with pytest.raises(SystemExit, match="--collect found no finished run"):
        methods.main()
    assert not (tmp_path / "summary.json").exists()
