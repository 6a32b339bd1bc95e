"""Every user-facing input is checked up front: one clear line, exit 2, nothing written."""

from __future__ import annotations

import os

import pytest
import torch

from flexround_pl.cli import main


@pytest.fixture()
def config(tmp_path, tiny_bert_dir):
    from test_cli_bert import write_config

    return write_config(tmp_path, tiny_bert_dir)


CASES = {
    "unknown config key": (["--model.quant.bitz", "4"], "unrecognized arguments: --model.quant.bitz"),
    "bits out of range": (["--model.quant.weight.bits", "9"], "bits must be an integer from 2 to 8, got 9"),
    "bits not a number": (["--model.quant.weight.bits", "four"], '"model.quant.weight.bits": Expected a'),
    "unknown granularity": (["--model.quant.weight.granularity", "row"], "model.quant.weight.granularity"),
    "unknown method": (["--model.quant.method", "gptq"], '"model.quant.method"'),
    "group size vs layer shapes": (
        ["--model.quant.weight.granularity", "group", "--model.quant.weight.group_size", "24"],
        "group_size=24 does not divide the input size of 12 of 12 layers",
    ),
    "keep_fp not a regex": (["--model.quant.keep_fp", '["("]'], "is not a valid regular expression"),
    "nothing left to quantize": (["--model.quant.keep_fp", '["."]'], "no layer would be quantized"),
    "negative learning rate": (["--model.reconstruction.lr", "-1"], "reconstruction.lr must be positive"),
    "missing model directory": (["--model.source.init_args.name_or_path", "/nonexistent/model"], "does not exist"),
    "hub id while offline": (["--model.source.init_args.name_or_path", "bert-base-uncased"], "HF_HUB_OFFLINE"),
    "missing data file": (["--data.init_args.eval_file", "/nonexistent/eval.csv"], "eval_file '/nonexistent"),
    "unknown GLUE task": (
        ["--data.init_args.source", "glue", "--data.init_args.glue_task", "foo",
         "--data.init_args.train_file", "null", "--data.init_args.eval_file", "null"],
        "unknown GLUE task 'foo'",
    ),
    "no calibration samples": (["--data.init_args.num_calibration", "0"], "num_calibration must be >= 1, got 0"),
    "max_steps missing": (["--trainer.max_steps", "-1"], "trainer.max_steps is not set"),
    "bad precision": (["--trainer.precision", "7"], '"trainer.precision"'),
    "gpu without a gpu": (["--trainer.accelerator", "gpu"], "gpu"),
    "fit with ckpt_path": (["--ckpt_path", "x.ckpt"], "fit does not take --ckpt_path"),
    "lm-eval on a classifier": (["--eval.lm_eval.tasks", "[wiki_topic]"], "BertForSequenceClassification is not one"),
    "missing config file": (["--config", "/nonexistent/config.yaml"], "File does not exist"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_gives_one_clear_line_exit_2_and_writes_nothing(case, config, tmp_path, monkeypatch, refused):
    args, expected = CASES[case]
    if case == "gpu without a gpu" and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["fit", "--config", config, *args]) == 2
    refused(expected)
    assert not (tmp_path / "run").exists(), os.listdir(tmp_path / "run")


def test_run_dir_that_is_a_file_is_refused(config, tmp_path, capfd):
    target = tmp_path / "occupied"
    target.write_text("not a directory")
    assert main(["fit", "--config", config, "--trainer.default_root_dir", str(target)]) == 2
    assert "is a file, not a directory" in capfd.readouterr().err
    assert target.read_text() == "not a directory"


def test_validate_without_a_checkpoint_is_refused(config, tmp_path, capfd):
    assert main(["validate", "--config", config]) == 2
    err = capfd.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("flexround_pl: error: no quantized checkpoint at") and "run fit" in err
    assert not (tmp_path / "run").exists()
    assert main(["test", "--config", config, "--ckpt_path", str(tmp_path / "missing.safetensors")]) == 2
    assert "missing.safetensors" in capfd.readouterr().err
