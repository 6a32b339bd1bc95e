"""The end-of-fit report: FP vs quantized, RTN block losses at the start, greedy text of causal LMs."""

from __future__ import annotations

import json

import pytest
import torch
import transformers

from flexround_pl import report


def _greedy(model, tokenizer, prompt: str, steps: int) -> str:
    """Greedy decoding written out: argmax of the last position, appended, until EOS or ``steps`` tokens."""
    eos = model.config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos])
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    start = ids.shape[1]
    with torch.no_grad():
        for _ in range(steps):
            token = model(input_ids=ids).logits[0, -1].argmax()
            ids = torch.cat([ids, token.view(1, 1)], dim=1)
            if int(token) in eos:
                break
    return tokenizer.decode(ids[0, start:], skip_special_tokens=True)


def test_causal_lm_fit_reports_fp_and_quantized_greedy_text_side_by_side(tmp_path, capsys, tiny_tokenizer,
                                                                         write_lm_config):
    from flexround_pl.cli import main
    from test_causal_lm import _save_tiny

    model_dir = _save_tiny("llama", tmp_path, tiny_tokenizer())
    assert main(["fit", "--config", write_lm_config(tmp_path, model_dir, max_steps=5)]) == 0
    printed = capsys.readouterr().out
    results = json.loads((tmp_path / "run" / "results.json").read_text())

    samples = results["generations"]
    assert [s["prompt"] for s in samples] == list(report.PROMPTS)
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    fp = transformers.AutoModelForCausalLM.from_pretrained(model_dir).eval()
    exported = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "export" / "fake_quant").eval()  # dequantized
    for s in samples:
        assert s["fp"] == _greedy(fp, tokenizer, s["prompt"], report.MAX_NEW_TOKENS)
        assert s["quantized"] == _greedy(exported, tokenizer, s["prompt"], report.MAX_NEW_TOKENS)
        assert f"FP:        {s['fp']!r}" in printed and f"quantized: {s['quantized']!r}" in printed

    # the summary table: FP and quantized perplexity as in results.json, each block's RTN start -> end
    assert "| FP " in printed and f"{results['fp']['perplexity']:.4g}" in printed
    assert f"{results['quantized']['perplexity']:.4g}" in printed and "RTN loss (start)" in printed
    for block in results["blocks"]:
        assert f"| {block['name']} " in printed and f"{block['loss_start'] / block['loss_end']:.2f}x" in printed


def test_summary_of_a_classifier_has_no_generations_and_rtn_runs_have_no_block_table():
    base = {"method": "rtn", "w_bits": 4, "a_bits": None, "granularity": "tensor", "model": "m",
            "fp": {"accuracy": 0.9}, "quantized": {"accuracy": 0.8, "fp_agreement": 0.85},
            "blocks": [{"name": "b0", "loss_start": 2.0, "loss_end": 2.0, "steps": 0}]}
    text = report.summary(base)
    row = next(line for line in text.splitlines() if line.startswith("| rtn W4 tensor "))
    assert [c.strip() for c in row.strip("|").split("|")] == ["rtn W4 tensor", "0.8", "0.85"]
    assert "RTN loss" not in text and "prompt:" not in text
    flex = {**base, "method": "flexround", "blocks": [{"name": "b0", "loss_start": 2.0, "loss_end": 0.5, "steps": 9},
                                                      {"name": "b1", "loss_start": 1.0, "loss_end": 1.0, "steps": 9}]}
    lines = report.summary(flex).splitlines()
    assert any(line.startswith("| b0 ") and "4.00x" in line for line in lines)
    assert any(line.startswith("| sum ") and "| 3 " in line and "2.00x" in line for line in lines)


def test_rtn_baseline_row_equals_a_separate_rtn_run_on_the_same_grid(tmp_path, capsys, tiny_tokenizer,
                                                                     write_lm_config):
    """``results["rtn"]`` of a FlexRound run is what ``fit --model.quant.method rtn`` gets on the same config."""
    from flexround_pl.cli import main
    from test_causal_lm import _save_tiny

    model_dir = _save_tiny("llama", tmp_path, tiny_tokenizer())
    config = write_lm_config(tmp_path, model_dir, max_steps=5)
    assert main(["fit", "--config", config]) == 0
    printed = capsys.readouterr().out
    flex = json.loads((tmp_path / "run" / "results.json").read_text())
    assert main(["fit", "--config", config, "--model.quant.method", "rtn",
                 "--trainer.default_root_dir", str(tmp_path / "rtn")]) == 0
    rtn = json.loads((tmp_path / "rtn" / "results.json").read_text())

    assert "rtn" not in rtn  # an RTN run is its own baseline
    assert set(flex["rtn"]) == set(rtn["quantized"]) >= {"perplexity", "fp_agreement"}
    for name, value in rtn["quantized"].items():
        assert flex["rtn"][name] == pytest.approx(value, rel=1e-6, abs=1e-9), name
    assert flex["rtn"]["perplexity"] != flex["quantized"]["perplexity"]  # the trained model is another model
    row = next(line for line in printed.splitlines() if line.startswith("| rtn W3 channel (same grid) "))
    assert f"{flex['rtn']['perplexity']:.4g}" in row
    assert "rtn_eval" in flex["phases"]


def test_rtn_baseline_is_skipped_with_a_reason_when_activations_are_quantized(tmp_path, capsys, tiny_tokenizer,
                                                                               write_lm_config):
    from flexround_pl.cli import main
    from test_causal_lm import _save_tiny

    model_dir = _save_tiny("llama", tmp_path, tiny_tokenizer())
    config = write_lm_config(tmp_path, model_dir, max_steps=2)
    assert main(["fit", "--config", config, "--model.quant.activation.bits", "8"]) == 0
    printed = capsys.readouterr().out
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert "rtn" not in results and "rtn_eval" not in results["phases"]
    assert "RTN baseline not evaluated: activations are quantized" in printed
