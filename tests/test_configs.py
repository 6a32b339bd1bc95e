"""Every shipped YAML in configs/ parses and validates (no model or data is loaded)."""

from __future__ import annotations

import glob
import os

import pytest
import yaml

from flexround_pl.cli import main

CONFIGS = sorted(glob.glob(os.path.join(os.path.dirname(__file__), "..", "configs", "*.yaml")))


def test_configs_exist():
    names = {os.path.basename(p) for p in CONFIGS}
    assert {"demo.yaml", "bert_glue.yaml"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_config_parses(path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", path, "--print_config"])
    assert exit_info.value.code == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    raw = yaml.safe_load(open(path))
    # What the file says is what the parser resolved.
    assert printed["trainer"]["max_steps"] == raw["trainer"]["max_steps"] > 0
    assert printed["model"]["source"]["class_path"] == raw["model"]["source"]["class_path"]
    assert printed["data"]["class_path"] == raw["data"]["class_path"]
    assert printed["model"]["quant"]["method"] == raw["model"]["quant"].get("method", "flexround")
    assert printed["trainer"]["default_root_dir"], "every config names its run directory"


def test_the_cli_builds_without_a_subcommand_for_scripts(tmp_path, tiny_tokenizer, write_lm_config):
    """``FlexRoundCLI(args=[...], run=False)`` (benchmarks/export_formats.py) parses and builds, runs nothing."""
    from flexround_pl.cli import FlexRoundCLI
    from test_causal_lm import _save_tiny

    config = write_lm_config(tmp_path, _save_tiny("llama", tmp_path, tiny_tokenizer()))
    cli = FlexRoundCLI(args=["--config", config], run=False)
    assert cli.subcommand is None and cli.model.quant.method == "flexround"
    assert not (tmp_path / "run").exists()
