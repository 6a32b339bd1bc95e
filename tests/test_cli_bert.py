"""The ``fit`` CLI end to end on a tiny random-init BERT classifier (seconds)."""

from __future__ import annotations

import json
import os

import pytest
import yaml

from conftest import hf_classifier_metrics
from flexround_pl.cli import main


@pytest.mark.parametrize("method", ["flexround", "adaround", "lrq"])
def test_fit_writes_results_and_every_block_improves(tmp_path, tiny_bert_dir, method, write_config):
    model_dir = tiny_bert_dir
    cfg = write_config(tmp_path, model_dir)
    assert main(["fit", "--config", cfg, "--model.quant.method", method]) == 0

    run = tmp_path / "run"
    results = json.loads((run / "results.json").read_text())
    assert results["method"] == method and results["w_bits"] == 3 and results["granularity"] == "tensor"
    assert set(results["fp"]) == {"accuracy"} and set(results["quantized"]) == {"accuracy", "fp_agreement", "fp_kl"}
    # the metrics against plain transformers on the eval CSV, FP model vs the plain-FP export (weight-only:
    # the export is the quantized model); one example of slack for float noise between batchings
    ref = hf_classifier_metrics((model_dir, str(run / "export" / "fake_quant")), str(tmp_path / "eval.csv"), max_length=16)
    assert results["fp"]["accuracy"] == pytest.approx(ref["fp_accuracy"], abs=1.01 / ref["n"])
    assert results["quantized"]["accuracy"] == pytest.approx(ref["accuracy"], abs=1.01 / ref["n"])
    assert results["quantized"]["fp_agreement"] == pytest.approx(ref["fp_agreement"], abs=1.01 / ref["n"])
    # A tiny random BERT's logits move ~1e-5 under W3 (true KL ~1e-10): what it can show is a
    # non-negative, tiny divergence (float32 noise used to give either sign here).
    assert 0.0 <= results["quantized"]["fp_kl"] < 1e-6
    assert [b["name"] for b in results["blocks"]] == ["bert.encoder.layer.0", "bert.encoder.layer.1"]
    for block in results["blocks"]:
        assert block["quantized_layers"] == 6  # q, k, v, attention output, intermediate, output
        assert block["loss_end"] < block["loss_start"], block
        assert block["steps"] == 30 and block["seconds"] > 0
    assert results["seconds_total"] > 0 and results["peak_rss_mb"] > 0
    assert set(results["phases"]) == {"fp_eval", "rtn_eval", "quantize", "quantized_eval"}
    assert sum(p["seconds"] for p in results["phases"].values()) <= results["seconds_total"]
    assert results["phases"]["quantize"]["seconds"] >= sum(b["seconds"] for b in results["blocks"])
    assert (run / "config.yaml").exists()
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["model"]["quant"]["method"] == method
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(run / "tensorboard"))


def test_rtn_trains_nothing_and_keeps_the_initial_loss(tmp_path, tiny_bert_dir, write_config):
    cfg = write_config(tmp_path, tiny_bert_dir)
    assert main(["fit", "--config", cfg, "--model.quant.method", "rtn"]) == 0
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    for block in results["blocks"]:
        assert block["steps"] == 0
        assert block["loss_end"] == pytest.approx(block["loss_start"], rel=1e-5)


def test_print_config_shows_overrides(tmp_path, tiny_bert_dir, capsys, write_config):
    cfg = write_config(tmp_path, tiny_bert_dir)
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", cfg, "--model.quant.weight.bits", "2", "--print_config"])
    assert exit_info.value.code == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["quant"]["weight"]["bits"] == 2
    assert not (tmp_path / "run").exists()


def test_subcommands(capsys):
    with pytest.raises(SystemExit):
        main(["fit", "--help"])
    out = capsys.readouterr().out
    assert "--fresh" in out and "--export" in out
    assert main(["predict"]) == 2  # no predict subcommand: one error line, exit 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "predict" in err[0]


@pytest.mark.parametrize("evaluations, validate_initial, hard_loss_passes", [(2, True, 1), (0, True, 1), (1, False, 0)])
def test_final_validation_is_the_advance_pass(tmp_path, tiny_bert_dir, monkeypatch, evaluations, validate_initial,
                                              hard_loss_passes, write_config):
    """Per block: the initial loss (unless validate_initial false), the trainer's validations before the
    last step, and one pass that scores the last step and feeds the next block: no other pass."""
    from flexround_pl.reconstruct import driver, module

    calls, validated = [], []
    original = driver._hard_loss
    monkeypatch.setattr(driver, "_hard_loss", lambda *a, **k: calls.append(1) or original(*a, **k))
    step = module.BlockReconstruction.validation_step

    def validation_step(self, batch, batch_idx):
        step(self, batch, batch_idx)
        if self.validated_step == self.global_step and batch_idx == 0:
            validated.append(self.global_step)

    monkeypatch.setattr(module.BlockReconstruction, "validation_step", validation_step)
    cfg = write_config(tmp_path, tiny_bert_dir)
    assert main(["fit", "--config", cfg, "--model.reconstruction.evaluations", str(evaluations),
                 "--model.reconstruction.validate_initial", str(validate_initial).lower()]) == 0
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    blocks = results["blocks"]
    assert len(calls) == hard_loss_passes * len(blocks)
    assert validated == ([15] * len(blocks) if evaluations == 2 else [])  # 30 steps: never at the last one
    assert all(b["best_step"] == 30 for b in blocks)
    if not validate_initial:
        assert all(b["loss_start"] is None for b in blocks)
        return
    assert all(b["loss_end"] < b["loss_start"] for b in results["blocks"])
