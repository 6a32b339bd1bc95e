"""benchmarks/quality.py: rows from finished runs, merging, the AutoRound hook."""

from __future__ import annotations

import json
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
import quality  # noqa: E402

FIELDS = {"method", "bits", "granularity", "group_size", "steps", "perplexity", "fp_perplexity", "fp_agreement",
          "cpu_seconds", "peak_rss_mb"}


def _results(method, bits, steps, ppl, cpu):
    return {
        "method": method, "w_bits": bits, "granularity": "channel", "group_size": 128, "max_steps": steps, "lr": 0.01,
        "fp": {"perplexity": 16.5}, "quantized": {"perplexity": ppl, "fp_agreement": 0.7},
        "phases": {"fp_eval": {"seconds": 9, "cpu_seconds": 50.0}, "quantize": {"seconds": 5, "cpu_seconds": cpu}},
        "peak_rss_mb": 100.0,
    }


def _finish(tmp_path, method, bits, steps, ppl, cpu):
    run = tmp_path / quality.run_dir_name(method, bits, "channel", None, steps)
    run.mkdir()
    (run / "results.json").write_text(json.dumps(_results(method, bits, steps, ppl, cpu)))


def test_collect_writes_the_rows_the_issue_asks_for_and_merges(tmp_path, capsys):
    _finish(tmp_path, "gptq", 4, 0, 25.0, 190.0)  # GPTQ trains nothing: one run whatever --steps
    _finish(tmp_path, "lrq", 4, 40, 19.0, 460.0)
    _finish(tmp_path, "lrq", 4, 10, 21.0, 200.0)
    out = tmp_path / "quality.json"
    out.write_text(json.dumps([{"method": "lrq", "bits": 4, "granularity": "channel", "group_size": None, "steps": 40, "lr": 0.01,
                                "perplexity": 99.0}, {"method": "rtn", "bits": 3, "granularity": "channel",
                                                      "group_size": None, "steps": 0, "perplexity": 700.0}]))
    quality.main(["--config", "c.yaml", "--methods", "gptq", "lrq", "--steps", "10", "40", "--collect", "--out", str(out)])
    rows = json.loads(out.read_text())
    assert [(r["method"], r["bits"], r["steps"]) for r in rows] == [("gptq", 4, 0), ("lrq", 4, 10), ("lrq", 4, 40), ("rtn", 3, 0)]
    lrq40 = rows[2]
    assert FIELDS <= set(lrq40) and lrq40["perplexity"] == 19.0  # the re-read run replaced the old row
    assert lrq40["cpu_seconds"] == 460.0 and lrq40["group_size"] is None and lrq40["fp_perplexity"] == 16.5
    assert lrq40["init_from"] == "rtn"
    assert "| gptq | 4 | channel | 0 | 25.00 | 1.52 |" in capsys.readouterr().out


def test_a_run_started_from_gptq_is_its_own_row(tmp_path):
    run = tmp_path / quality.run_dir_name("flexround", 4, "channel", None, 40, "gptq")
    run.mkdir()
    (run / "results.json").write_text(json.dumps(_results("flexround", 4, 40, 18.0, 500.0)))
    (run / "config.yaml").write_text("model:\n  quant:\n    init_from: gptq\n")
    _finish(tmp_path, "flexround", 4, 40, 19.0, 450.0)
    out = tmp_path / "quality.json"
    for start in ("rtn", "gptq"):
        quality.main(["--config", "c.yaml", "--methods", "flexround", "--collect", "--init_from", start, "--out", str(out)])
    rows = json.loads(out.read_text())
    assert [(r["init_from"], r["perplexity"]) for r in rows] == [("rtn", 19.0), ("gptq", 18.0)]


def test_autoround_without_its_venv_is_skipped_with_a_message(tmp_path, capsys):
    assert quality.run_autoround(str(tmp_path / "nope" / "python"), 4, 40, "channel", None, [], str(tmp_path)) is None
    assert "skipping autoround: no AutoRound venv" in capsys.readouterr().err


def test_fit_overrides_are_read_for_autoround():
    extra = ["--data.init_args.seq_length", "256", "--data.init_args.seq_length=128"]
    assert quality._override(extra, "--data.init_args.seq_length") == "128"
    assert quality._override(extra, "--model.reconstruction.batch_size", "4") == "4"


def test_plot_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    rows = [quality.row_from_results(_results("flexround", 4, s, 20.0 - s / 10, 10.0 * s)) for s in (10, 40)]
    rows.append(quality.row_from_results(_results("gptq", 4, 0, 25.0, 190.0)))
    quality.plot(rows, str(tmp_path / "q.png"))
    assert (tmp_path / "q.png").stat().st_size > 1000


def test_merge_adds_the_rows_of_parallel_lanes_without_running_anything(tmp_path):
    lane_a, lane_b, out = tmp_path / "a.json", tmp_path / "b.json", tmp_path / "quality.json"
    old = {"method": "lrq", "bits": 4, "granularity": "channel", "group_size": None, "steps": 40, "perplexity": 99.0}
    out.write_text(json.dumps([old, {**old, "method": "rtn", "steps": 0, "perplexity": 34.5}]))
    lane_a.write_text(json.dumps([{**old, "perplexity": 21.0}]))  # a re-run of the lrq row
    lane_b.write_text(json.dumps([{**old, "method": "flexround", "recipe": "relative", "perplexity": 19.1}]))
    quality.main(["--config", "c.yaml", "--merge", str(lane_a), str(lane_b), "--out", str(out)])
    rows = json.loads(out.read_text())
    assert [(r["method"], r["perplexity"]) for r in rows] == [("rtn", 34.5), ("flexround", 19.1), ("lrq", 21.0)]
