"""``HFModel(lazy=True)``: the model is read from its safetensors shards block by block.

Tiny random-init models saved in several shards: the lazy run must give the
eager run's metrics and codes, and never hold more than about one FP block.
"""

from __future__ import annotations

import glob
import json
import os
import shutil

import pytest
import torch
import transformers
from test_causal_lm import SMALL, VOCAB  # noqa: E402  (tests/ is on sys.path under pytest)

from flexround_pl.cli import FlexRoundCLI, main
from flexround_pl.export.checkpoint import read_quantized
from flexround_pl.models import find_architecture, lazy

STEPS = 10


def _tiny(name: str) -> torch.nn.Module:
    """Llama (3 blocks, untied head, rotary buffers) or GPT-2 (Conv1D, head tied to the embeddings)."""
    if name == "llama":
        config = transformers.LlamaConfig(max_position_embeddings=64, **{**SMALL, "num_hidden_layers": 3})
    else:
        config = transformers.GPT2Config(n_positions=64, n_embd=32, n_layer=2, n_head=2)
    config.vocab_size = VOCAB
    config.bos_token_id = config.eos_token_id = config.pad_token_id = 1
    config.use_cache = False
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(config).eval()


def _save_sharded(name: str, path: str, tokenizer) -> str:
    _tiny(name).save_pretrained(path, max_shard_size="20KB")
    tokenizer.save_pretrained(path)
    assert len(glob.glob(os.path.join(path, "*.safetensors"))) >= 3
    assert os.path.isfile(os.path.join(path, lazy.INDEX_FILE))
    return path


def _meta(module: torch.nn.Module) -> bool:
    return all(p.is_meta for p in module.parameters())


# ---------------------------------------------------------------------- the model itself


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_a_forward_holds_one_block_and_matches_the_eager_model(tmp_path, name, tiny_tokenizer):
    path = _save_sharded(name, str(tmp_path / name), tiny_tokenizer())
    eager = transformers.AutoModelForCausalLM.from_pretrained(path, dtype="float32").eval()
    model = lazy.load(path, "causal-lm")
    assert lazy.is_lazy(model) and not lazy.is_lazy(eager)
    blocks = find_architecture(model).blocks(model)
    assert all(_meta(b) for _, b in blocks)
    emb = model.get_input_embeddings().weight
    assert not emb.is_meta and (model.lm_head.weight is emb) == (name == "gpt2")  # ties kept

    outside = lazy.resident_nbytes(model)
    block_bytes = sum(p.numel() * p.element_size() for p in eager.get_submodule(blocks[0][0]).parameters())
    seen = []
    for _, block in blocks:  # registered after the lazy hooks: sees the block materialized
        block.register_forward_pre_hook(lambda m, a: seen.append(lazy.resident_nbytes(model)))
    ids = torch.randint(0, VOCAB, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, eager(input_ids=ids).logits)
    assert seen == [outside + block_bytes] * len(blocks)
    assert lazy.resident_nbytes(model) == outside and all(_meta(b) for _, b in blocks)

    from flexround_pl.export.checkpoint import state_dict_nbytes

    assert lazy.fp_nbytes(model) == state_dict_nbytes(eager)
    model.to("cpu")  # moving a lazy model moves what is resident
    with torch.inference_mode():
        assert torch.equal(model(input_ids=ids).logits, eager(input_ids=ids).logits)


# ---------------------------------------------------------------------- the CLI, lazy vs eager


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def runs(request, tmp_path_factory, tiny_tokenizer, write_lm_config):
    """The same config fitted eagerly and lazily; the lazy run records what is resident at every pin."""
    name = request.param
    tmp = tmp_path_factory.mktemp(f"lazy_{name}")
    model_dir = _save_sharded(name, str(tmp / "model"), tiny_tokenizer())
    cfg = write_lm_config(tmp, model_dir, max_steps=STEPS)
    assert main(["fit", "--config", cfg, "--trainer.default_root_dir", str(tmp / "eager")]) == 0

    loaded, pins = [], []
    real_load, real_pin = lazy.load, lazy.pin

    def load(*args, **kwargs):
        loaded.append(real_load(*args, **kwargs))
        return loaded[-1]

    def pin(block):
        net = loaded[-1]
        blocks = [b for _, b in find_architecture(net).blocks(net)]
        k = blocks.index(block)
        pins.append({"index": k, "later_on_meta": all(_meta(b) for b in blocks[k + 1:]),
                     "resident": lazy.resident_nbytes(net)})
        real_pin(block)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(lazy, "load", load)
        mp.setattr(lazy, "pin", pin)
        args = ["fit", "--config", cfg, "--trainer.default_root_dir", str(tmp / "lazy"),
                "--model.source.init_args.lazy", "true"]
        assert main(args) == 0
    return {"name": name, "tmp": tmp, "cfg": cfg, "pins": pins, "eager_model": _tiny(name)}


def _results(run) -> dict:
    return json.loads((run / "results.json").read_text())


def _assert_same_codes(a, b) -> None:
    sa, sb = read_quantized(str(a / "quantized.safetensors"))[1], read_quantized(str(b / "quantized.safetensors"))[1]
    assert set(sa) == set(sb)
    for key in sa:
        assert sa[key].dtype == sb[key].dtype and torch.equal(sa[key], sb[key]), key


def _assert_same_metrics(a: dict, b: dict) -> None:
    for part in ("fp", "quantized"):
        assert set(a[part]) == set(b[part])
        for k in a[part]:
            assert a[part][k] == pytest.approx(b[part][k], abs=1e-5), (part, k)


def test_lazy_fit_gives_the_eager_metrics_codes_and_export(runs):
    tmp = runs["tmp"]
    eager, lazy_ = _results(tmp / "eager"), _results(tmp / "lazy")
    _assert_same_metrics(lazy_, eager)
    assert [(b["name"], b["loss_end"]) for b in lazy_["blocks"]] == [(b["name"], b["loss_end"]) for b in eager["blocks"]]
    assert lazy_["size_mb"] == eager["size_mb"]
    _assert_same_codes(tmp / "lazy", tmp / "eager")
    exported = transformers.AutoModelForCausalLM.from_pretrained(str(tmp / "lazy" / "export"))
    reference = transformers.AutoModelForCausalLM.from_pretrained(str(tmp / "eager" / "export"))
    ids = torch.randint(0, VOCAB, (2, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(exported(input_ids=ids).logits, reference(input_ids=ids).logits)


def test_lazy_fit_never_holds_the_whole_fp_model(runs):
    model = runs["eager_model"]
    blocks = find_architecture(model).blocks(model)
    block_bytes = sum(p.numel() * p.element_size() for p in blocks[0][1].parameters())
    in_blocks = {id(p) for _, b in blocks for p in b.parameters()}
    outside = sum(p.numel() * p.element_size() for p in model.parameters() if id(p) not in in_blocks)
    outside += sum(b.numel() * b.element_size() for b in model.buffers())
    pins = runs["pins"]
    assert [p["index"] for p in pins] == list(range(len(blocks)))
    for p in pins:
        assert p["later_on_meta"], p  # block k is reconstructed while every later block is on meta
        # outside parts + at most one FP block + the quantized blocks (int8 codes: a quarter of fp32, + norms, scales)
        assert p["resident"] <= outside + block_bytes + p["index"] * block_bytes // 2, p


def test_lazy_validate_reproduces_the_fit(runs):
    run = runs["tmp"] / "lazy"
    val = FlexRoundCLI(args=["validate", "--config", runs["cfg"], "--trainer.default_root_dir", str(run),
                             "--model.source.init_args.lazy", "true"])
    assert lazy.is_lazy(val.model.net)
    _assert_same_metrics(val.results, _results(run))


def test_lazy_fit_resumes_after_the_last_saved_block(runs):
    tmp = runs["tmp"]
    run = tmp / "lazy_resumed"
    shutil.copytree(tmp / "lazy", run)
    state = json.loads((run / "resume" / "state.json").read_text())
    last = max(state["blocks"], key=int)
    del state["blocks"][last]  # as if killed during the last block
    (run / "resume" / "state.json").write_text(json.dumps(state))
    for name in ("results.json", "quantized.safetensors"):
        os.remove(run / name)
    args = ["fit", "--config", runs["cfg"], "--trainer.default_root_dir", str(run), "--model.source.init_args.lazy", "true"]
    assert main(args) == 0
    results = _results(run)
    assert results["resumed_blocks"] == int(last)
    _assert_same_metrics(results, _results(tmp / "eager"))
    _assert_same_codes(run, tmp / "eager")


# ---------------------------------------------------------------------- bad inputs


def _fused_moe_dir(path: str, tokenizer) -> str:
    """A causal LM no adapter can serve: GPT-OSS's experts are fused 3-D tensors models/moe.py cannot split."""
    config = transformers.GptOssConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=2, head_dim=8,
    )
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def _mixtral_dir(path: str, tokenizer) -> str:
    """Mixtral's experts are split into Linear layers after loading, which a lazy model cannot do."""
    config = transformers.MixtralConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=2,
    )
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def _no_safetensors_dir(path: str, tokenizer) -> str:
    model = _tiny("llama")
    model.config.save_pretrained(path)
    torch.save(model.state_dict(), os.path.join(path, "pytorch_model.bin"))
    tokenizer.save_pretrained(path)
    return path


@pytest.mark.parametrize(
    "make, message",
    [
        (_no_safetensors_dir, "lazy: true needs the model as \\*.safetensors files"),
        (_fused_moe_dir, "GptOssForCausalLM: the experts of model.layers.0.mlp.experts .* are fused 3-D tensors"),
        (_mixtral_dir, "mixture-of-experts layers are unfused into Linear layers after loading, .* set lazy: false"),
    ],
    ids=["no_safetensors", "no_adapter", "lazy_moe"],
)
def test_bad_lazy_inputs_fail_in_one_line_and_write_nothing(
    tmp_path, capfd, make, message, tiny_tokenizer, write_lm_config
):
    model_dir = make(str(tmp_path / "model"), tiny_tokenizer())
    cfg = write_lm_config(tmp_path, model_dir)
    capfd.readouterr()
    assert main(["fit", "--config", cfg, "--model.source.init_args.lazy", "true"]) == 2
    err = capfd.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("flexround_pl: error: "), err
    assert __import__("re").search(message, err[0]), err[0]
    assert not (tmp_path / "run").exists()
