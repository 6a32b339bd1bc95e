"""The README's quick-start job on the real offline demo model, shortened (slow: minutes)."""

from __future__ import annotations

import json
import os

import pytest

from flexround_pl.cli import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_demo_config_runs_end_to_end(tmp_path):
    run = tmp_path / "demo"
    code = main([
        "fit", "--config", os.path.join(ROOT, "configs", "demo.yaml"),
        "--trainer.max_steps", "8",
        "--data.init_args.num_calibration", "64",
        "--data.init_args.num_eval", "200",
        "--trainer.default_root_dir", str(run),
    ])
    assert code == 0
    results = json.loads((run / "results.json").read_text())
    assert results["method"] == "flexround" and results["w_bits"] == 4 and results["granularity"] == "tensor"
    assert len(results["blocks"]) == 6
    assert all(b["loss_end"] <= b["loss_start"] for b in results["blocks"])
    assert results["fp"]["accuracy"] > 0.85  # the cached fine-tuned classifier (0.928 on all 500 eval articles)
    assert results["quantized"]["accuracy"] > 0.8
    assert (run / "quantized.safetensors").exists() and (run / "export" / "fake_quant" / "config.json").exists()
