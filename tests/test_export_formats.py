"""Serving formats: each export reloaded by its ordinary loader gives our dequantized weights and logits.

Tiny random Llama (q/k permutation for GGUF), GPT-2 (Conv1D) and OPT models,
quantized round-to-nearest in process (the formats only see hardened codes:
which method chose them does not matter), saved as ``quantized.safetensors``
and exported from there as ``fit`` does. Every layout is checked twice: by
an unpacker written here from the format's spec, and by the loader users run
(transformers + compressed-tensors / gptqmodel, gguf-py and transformers' GGUF
loader). Refusals go through the CLI: one line, exit 2, nothing written.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
import transformers

from flexround_pl.export import get_format
from flexround_pl.export.checkpoint import save_quantized
from flexround_pl.export.codes import QuantizedCodes
from flexround_pl.export.formats import ExportContext
from flexround_pl.export.run import export_formats, round_scales
from flexround_pl.models import find_architecture  # registers the adapters
from flexround_pl.quant import QuantConfig, harden_modules, quantize_modules, quantized_layers
from flexround_pl.quant.config import GridConfig

VOCAB = 48
CONFIGS = {
    "llama": lambda: transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=True),
    "gpt2": lambda: transformers.GPT2Config(vocab_size=VOCAB, n_positions=64, n_embd=64, n_layer=2, n_head=2),
    "opt": lambda: transformers.OPTConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, ffn_dim=128,
                                          num_attention_heads=2, max_position_embeddings=64),
}


def quantized_tiny(name: str, bits: int, symmetric: bool, group: int | None, seed: int = 0):
    """A tiny causal LM with every block Linear / Conv1D hardened RTN, s1 in fp16; ``(net, arch)``."""
    torch.manual_seed(seed)
    config = CONFIGS[name]()
    config.use_cache = False
    net = transformers.AutoModelForCausalLM.from_config(config).eval()
    arch = find_architecture(net)
    net = arch.prepare(net)
    grid = GridConfig(bits=bits, symmetric=symmetric, granularity="group" if group else "channel",
                      group_size=group or 128, init="minmax")
    quantize_modules(net, QuantConfig(method="rtn", weight=grid), keep_fp=arch.keep_fp)
    harden_modules(net)
    round_scales(net)
    return net, arch


def export(tmp_path, net, arch, formats: list[str]) -> QuantizedCodes:
    ckpt = str(tmp_path / "quantized.safetensors")
    save_quantized(net, ckpt, {"method": "rtn"})
    export_formats(ckpt, str(tmp_path), [get_format(f) for f in formats], ExportContext(net, arch, None, None, print))
    return QuantizedCodes(ckpt)


def grid_weights(net) -> dict[str, torch.Tensor]:
    """Our dequantized weights in grid layout ``[out, in]`` (Conv1D transposed back)."""
    return {n: (m.weight.t() if m.transposed else m.weight).detach().float() for n, m in quantized_layers(net)}


def logits(model, seed: int = 1) -> torch.Tensor:
    ids = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def bit_stream_values(words: np.ndarray, bits: int, count: int) -> np.ndarray:
    """The first ``count`` ``bits``-bit values of little-endian int32 ``words`` read as one bit stream (numpy)."""
    stream = np.unpackbits(words.astype("<i4").view(np.uint8), bitorder="little")[: count * bits]
    return (stream.reshape(count, bits).astype(np.int64) << np.arange(bits)).sum(1)


SCHEMES = [(4, True, None), (4, True, 32), (3, True, None), (3, True, 32), (4, False, 32), (3, False, None)]
IDS = [f"W{b}-{'sym' if s else 'asym'}-{'g' + str(g) if g else 'channel'}" for b, s, g in SCHEMES]


# ----------------------------------------------------------------------------- GPTQ


def unpack_gptq(tensors: dict[str, torch.Tensor], prefix: str, bits: int, n_out: int, n_in: int, v1: bool):
    """W from qweight / qzeros / scales / g_idx, per the AutoGPTQ layout (independent of our packer)."""
    qweight = tensors[prefix + "qweight"].numpy()  # [in*b/32, out]
    q = np.stack([bit_stream_values(qweight[:, o], bits, n_in) for o in range(n_out)])  # [out, in]
    qzeros = tensors[prefix + "qzeros"].numpy()  # [groups, out*b/32]
    z = np.stack([bit_stream_values(row, bits, n_out) for row in qzeros]) + (1 if v1 else 0)  # [groups, out]
    scales = tensors[prefix + "scales"].float().numpy()
    g_idx = tensors[prefix + "g_idx"].numpy()
    return torch.from_numpy(scales[g_idx].T * (q - z[g_idx].T)).float()


def read_shards(directory) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    index = json.loads(open(os.path.join(directory, "model.safetensors.index.json")).read())
    out = {}
    for shard in sorted(set(index["weight_map"].values())):
        out.update(load_file(os.path.join(directory, shard)))
    return out


@pytest.mark.parametrize("bits,symmetric,group", SCHEMES, ids=IDS)
@pytest.mark.parametrize("name", ["llama", "opt"])
def test_gptq_layout_holds_our_weights(tmp_path, name, bits, symmetric, group):
    net, arch = quantized_tiny(name, bits, symmetric, group)
    export(tmp_path, net, arch, ["gptq"])
    directory = tmp_path / "export" / "gptq"
    qcfg = json.loads((directory / "config.json").read_text())["quantization_config"]
    assert qcfg["checkpoint_format"] == ("gptq" if symmetric else "gptq_v2") and qcfg["bits"] == bits
    assert qcfg["group_size"] == (group or -1) and qcfg["sym"] is symmetric and qcfg["desc_act"] is False
    tensors = read_shards(directory)
    for layer, w in grid_weights(net).items():
        got = unpack_gptq(tensors, layer + ".", bits, *w.shape, v1=symmetric)
        assert torch.equal(got, w), layer  # fp16 s1 since hardening: bit for bit


def _load_gptqmodel(directory, **kw):
    pytest.importorskip("gptqmodel", reason="reloading GPTQ / AWQ needs the [export] extra (gptqmodel, optimum)")
    return transformers.AutoModelForCausalLM.from_pretrained(str(directory), device_map="cpu", **kw).eval()


@pytest.mark.parametrize("bits,symmetric,group", [(4, True, 32), (3, False, None)], ids=["W4-sym-g32", "W3-asym-channel"])
def test_gptq_reloads_with_transformers_and_gptqmodel(tmp_path, bits, symmetric, group):
    net, arch = quantized_tiny("llama", bits, symmetric, group)
    export(tmp_path, net, arch, ["gptq"])
    qc = transformers.GPTQConfig(bits=bits, backend="torch")  # the pure-torch kernel: nothing to compile
    model = _load_gptqmodel(tmp_path / "export" / "gptq", quantization_config=qc)
    for layer, w in grid_weights(net).items():  # the loader's own dequantization, in fp16
        got = model.get_submodule(layer).dequantize_weight().float().t()  # gptqmodel returns [in, out]
        assert torch.equal(got, w.half().float()), layer
    ref = logits(net)
    assert (logits(model) - ref).abs().max() < 2e-3 * ref.abs().max()  # fp16 compute


# ----------------------------------------------------------------------------- AWQ

AWQ_REVERSE = [0, 4, 1, 5, 2, 6, 3, 7]  # column j of 8 sits in nibble AWQ_REVERSE[j]


def unpack_awq(words: torch.Tensor) -> np.ndarray:
    w = words.numpy().astype(np.int64) & 0xFFFFFFFF
    nibbles = np.stack([(w >> (4 * k)) & 0xF for k in range(8)], axis=-1)  # [rows, cols/8, 8] by nibble
    return nibbles[:, :, AWQ_REVERSE].reshape(w.shape[0], -1)


@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
def test_awq_layout_and_reload(tmp_path, symmetric):
    net, arch = quantized_tiny("llama", 4, symmetric, 32)
    export(tmp_path, net, arch, ["awq"])
    directory = tmp_path / "export" / "awq"
    tensors = read_shards(directory)
    for layer, w in grid_weights(net).items():
        q = unpack_awq(tensors[layer + ".qweight"])  # [in, out]
        z = unpack_awq(tensors[layer + ".qzeros"])  # [groups, out]
        s = tensors[layer + ".scales"].float().numpy()
        g = np.arange(q.shape[0]) // 32
        assert torch.equal(torch.from_numpy(s[g] * (q - z[g])).float().t(), w), layer
    model = _load_gptqmodel(directory, quantization_config=transformers.AwqConfig(bits=4, backend="torch_awq"))
    ref = logits(net)
    assert (logits(model) - ref).abs().max() < 2e-3 * ref.abs().max()


# ----------------------------------------------------------------------------- compressed-tensors


@pytest.mark.parametrize("bits,group", [(4, None), (4, 32), (3, None), (3, 32), (8, None), (2, 32)])
@pytest.mark.parametrize("name", ["llama", "opt"])
def test_compressed_tensors_reloads_bit_for_bit(tmp_path, name, bits, group):
    pytest.importorskip("compressed_tensors", reason="reloading compressed-tensors needs the [export] extra")
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

    net, arch = quantized_tiny(name, bits, True, group)
    export(tmp_path, net, arch, ["compressed_tensors"])
    directory = tmp_path / "export" / "compressed_tensors"
    tensors = read_shards(directory)
    for layer, w in grid_weights(net).items():
        q = unpack_from_int32(tensors[layer + ".weight_packed"], bits, w.shape).float()  # compressed-tensors' own
        s = tensors[layer + ".weight_scale"].float()
        assert torch.equal(s.repeat_interleave(w.shape[1] // s.shape[1], dim=1) * q, w), layer
    dense = transformers.CompressedTensorsConfig(run_compressed=False)  # decompress: weights to compare
    model = transformers.AutoModelForCausalLM.from_pretrained(str(directory), quantization_config=dense).eval()
    for layer, w in grid_weights(net).items():
        assert torch.equal(model.get_submodule(layer).weight.float(), w), layer
    assert torch.equal(logits(model), logits(net))  # fp32 end to end: the same computation
    ignore = json.loads((directory / "config.json").read_text())["quantization_config"]["ignore"]
    assert "lm_head" in ignore


# ----------------------------------------------------------------------------- GGUF


@pytest.mark.parametrize("bits,symmetric,group", [*SCHEMES, (8, True, 64)], ids=[*IDS, "W8-sym-g64"])
@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_gguf_blocks_hold_our_weights(tmp_path, name, bits, symmetric, group):
    import gguf

    net, arch = quantized_tiny(name, bits, symmetric, group)
    export(tmp_path, net, arch, ["gguf"])
    reader = gguf.GGUFReader(str(tmp_path / "export" / "gguf" / "model.gguf"))
    expected = "Q8_0" if bits > 4 else ("Q4_0" if symmetric else "Q4_1")
    by_name = {t.name: t for t in reader.tensors}
    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA if name == "llama" else gguf.MODEL_ARCH.GPT2, 2)
    for layer, w in grid_weights(net).items():
        t = by_name[name_map.get_name(layer + ".weight", try_suffixes=(".weight",))]
        assert t.tensor_type.name == expected
        got = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type)).float().reshape(w.shape)
        if name == "llama" and layer.endswith(("q_proj", "k_proj")):  # undo llama.cpp's rotary row order
            heads = 4 if layer.endswith("q_proj") else 2
            got = got.reshape(heads, got.shape[0] // heads // 2, 2, -1).transpose(1, 2).reshape(w.shape)
        if expected == "Q4_1":  # m = -s1 * z rounded to fp16 once more: half an fp16 ulp of m
            m = (net.get_submodule(layer).scale * net.get_submodule(layer).zero_point).abs().max()
            assert (got - w).abs().max() <= m * 2**-11 * 1.01 + 1e-6, layer
        else:
            assert torch.equal(got, w), layer
    assert reader.fields["general.architecture"].contents() == ("llama" if name == "llama" else "gpt2")


def test_gguf_reloads_with_transformers_bit_for_bit(tmp_path):
    net, arch = quantized_tiny("llama", 4, True, 32)
    export(tmp_path, net, arch, ["gguf"])
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(tmp_path / "export" / "gguf"), gguf_file="model.gguf", dtype=torch.float32).eval()
    for layer, w in grid_weights(net).items():
        assert torch.equal(model.get_submodule(layer).weight.float(), w), layer
    assert torch.equal(logits(model), logits(net))


# ----------------------------------------------------------------------------- fake_quant and exactness


def test_fake_quant_is_bitwise_and_exactness_is_recorded(tmp_path):
    net, arch = quantized_tiny("gpt2", 3, False, 32)
    export(tmp_path, net, arch, ["fake_quant", "gguf"])
    model = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "export" / "fake_quant")).eval()
    assert torch.equal(logits(model), logits(net))
    info = json.loads((tmp_path / "export" / "gguf" / "flexround_export.json").read_text())
    assert info["s1_fp16_max_rel_change"] == 0.0 and "bit for bit" in info["exact"]


def test_a_run_with_fp32_steps_is_rounded_at_export_and_says_so(tmp_path):
    torch.manual_seed(0)
    net, arch = quantized_tiny("llama", 4, True, 32)
    for _, layer in quantized_layers(net):  # fp32 steps, as a run that exported no fp16 format keeps them
        layer.scale.mul_(1 + 2**-15)
    codes = export(tmp_path, net, arch, ["gguf"])
    info = json.loads((tmp_path / "export" / "gguf" / "flexround_export.json").read_text())
    assert 0 < info["s1_fp16_max_rel_change"] <= 2**-11 and "rounded to fp16 here" in info["exact"]
    assert codes.layer("model.layers.0.mlp.up_proj").fp16_scale_change() > 0


# ----------------------------------------------------------------------------- through the CLI

_SMALL_LLAMA = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2)


@pytest.fixture(scope="module")
def llama_config(tmp_path_factory):
    from conftest import new_tiny_tokenizer as tiny_tokenizer
    from conftest import write_lm_run_config as _write_config

    tmp = tmp_path_factory.mktemp("fmt")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=VOCAB, max_position_embeddings=64, bos_token_id=1, eos_token_id=1,
                                      **_SMALL_LLAMA)
    transformers.LlamaForCausalLM(config).save_pretrained(str(tmp / "llama"))
    tiny_tokenizer().save_pretrained(str(tmp / "llama"))
    return tmp, _write_config(tmp, str(tmp / "llama"), max_steps=4)


ALL = "[fake_quant, gptq, awq, compressed_tensors, gguf]"


def test_fit_writes_every_format_and_export_rewrites_them_from_the_checkpoint(llama_config, capfd):
    from flexround_pl.cli import main

    tmp, config = llama_config
    group = ["--model.quant.weight.granularity", "group", "--model.quant.weight.group_size", "32",
             "--model.quant.weight.bits", "4"]
    assert main(["fit", "--config", config, *group, "--export.formats", ALL]) == 0
    run = tmp / "run"
    results = json.loads((run / "results.json").read_text())
    for fmt in ("fake_quant", "gptq", "awq", "compressed_tensors", "gguf"):
        assert results["size_mb"][f"export/{fmt}"] > 0 and (run / "export" / fmt / "flexround_export.json").exists()
    info = json.loads((run / "export" / "gptq" / "flexround_export.json").read_text())
    assert (info["w_bits"], info["granularity"], info["group_size"]) == (4, "group", 32)
    assert "bit for bit" in info["exact"] and info["s1_fp16_max_rel_change"] == 0.0  # fp16 s1 since hardening
    sizes = results["size_mb"]
    assert sizes["export/gguf"] < sizes["export/fake_quant"] and sizes["export/compressed_tensors"] < sizes["fp"]
    # the run's own model is what every file holds: fake-quant reload = the run's quantized metric path
    fake = transformers.AutoModelForCausalLM.from_pretrained(str(run / "export" / "fake_quant")).eval()
    ct = transformers.AutoModelForCausalLM.from_pretrained(str(run / "export" / "compressed_tensors")).eval()
    assert torch.equal(logits(fake), logits(ct))

    before = {f: os.path.getmtime(run / "export" / f / "flexround_export.json") for f in ("gguf",)}
    assert main(["export", "--config", str(run / "config.yaml"), "--export.formats", "[gguf]"]) == 0
    assert os.path.getmtime(run / "export" / "gguf" / "flexround_export.json") > before["gguf"]
    gguf_model = transformers.AutoModelForCausalLM.from_pretrained(
        str(run / "export" / "gguf"), gguf_file="model.gguf", dtype=torch.float32).eval()
    assert torch.equal(logits(gguf_model), logits(fake))
    assert not list(run.glob("export/.tmp-export-*"))


REFUSALS = {
    "awq 3-bit": (["--model.quant.weight.bits", "3", "--model.quant.weight.granularity", "group",
                   "--model.quant.weight.group_size", "32", "--export.formats", "[awq]"], "not 3-bit"),
    "gguf group 16": (["--model.quant.weight.granularity", "group", "--model.quant.weight.group_size", "16",
                       "--export.formats", "[gguf]"], "multiple of 32, not 16"),
    "activations in a weight-only format": (["--model.quant.activation.bits", "8", "--export.formats", "[gptq]"],
                                            "stores weights only"),
    "nupes codes": (["--model.quant.method", "nupes", "--export.formats", "[gguf]"], "power-function grid"),
    "asymmetric compressed-tensors": (["--model.quant.weight.symmetric", "false",
                                       "--export.formats", "[compressed_tensors]"], "do not reload"),
    "awq per channel": (["--model.quant.weight.bits", "4", "--export.formats", "[awq]"], "group-wise scales only"),
    "gptq with an FP layer in a block": (["--model.quant.keep_fp", '["down_proj"]', "--export.formats", "[gptq]"],
                                         "stays FP"),
    "unknown format": (["--export.formats", "[onnx]"], "unknown export format 'onnx'"),
}


@pytest.mark.parametrize("case", sorted(REFUSALS))
def test_refused_combinations_give_one_line_exit_2_and_write_nothing(case, llama_config, tmp_path, capfd):
    from flexround_pl.cli import main

    tmp, config = llama_config
    args, expected = REFUSALS[case]
    root = tmp_path / "refused"
    capfd.readouterr()
    assert main(["fit", "--config", config, "--trainer.default_root_dir", str(root), *args]) == 2
    err = capfd.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("flexround_pl: error:")]
    assert len(errors) == 1 and "Traceback" not in err, err
    assert expected in errors[0], errors[0]
    assert not root.exists()


def test_export_subcommand_refuses_before_writing(llama_config, tmp_path, capfd):
    """A finished per-channel W3 run: AWQ cannot hold it; nothing is written, and the run is untouched."""
    from flexround_pl.cli import main

    tmp, config = llama_config
    root = tmp_path / "w3"
    assert main(["fit", "--config", config, "--trainer.default_root_dir", str(root), "--trainer.max_steps", "2",
                 "--export", "false"]) == 0
    assert not (root / "export").exists()
    capfd.readouterr()
    assert main(["export", "--config", str(root / "config.yaml"), "--export.formats", "[gguf, awq]"]) == 2
    err = capfd.readouterr().err
    assert "export format 'awq'" in err and err.count("flexround_pl: error:") == 1
    assert not (root / "export").exists()
    assert main(["export", "--config", str(root / "config.yaml"), "--export.formats", "[gguf, gptq]"]) == 0
    assert (root / "export" / "gguf" / "model.gguf").exists() and (root / "export" / "gptq" / "config.json").exists()
    sizes = json.loads((root / "results.json").read_text())["size_mb"]
    assert 0 < sizes["export/gguf"] < sizes["fp"] and 0 < sizes["export/gptq"] < sizes["fp"]


# ----------------------------------------------------------------------------- lazy runs


def test_lazy_run_exports_one_block_at_a_time(llama_config, tmp_path, monkeypatch):
    """Each shard written holds one block (or what is outside the blocks); the lazy model is never materialized."""
    import flexround_pl.export.hf_files as hf_files
    from flexround_pl.cli import main
    from flexround_pl.models import lazy

    tmp, config = llama_config
    written: list[int] = []
    real_save = __import__("safetensors.torch", fromlist=["save_file"]).save_file

    def recording_save(tensors, path, metadata=None):
        written.append(sum(t.numel() * t.element_size() for t in tensors.values()))
        return real_save(tensors, path, metadata=metadata)

    monkeypatch.setattr("safetensors.torch.save_file", recording_save)
    monkeypatch.setattr(lazy, "materialize", lambda *a, **k: pytest.fail("the export materialized the lazy model"))
    root = tmp_path / "lazy"
    assert main(["fit", "--config", config, "--trainer.default_root_dir", str(root), "--trainer.max_steps", "2",
                 "--model.source.init_args.lazy", "true", "--export.formats", "[fake_quant, gptq]"]) == 0
    fp = transformers.LlamaForCausalLM.from_pretrained(str(tmp / "llama"))
    block = sum(t.numel() * t.element_size() for t in fp.model.layers[0].state_dict().values())
    outside = sum(t.numel() * t.element_size() for k, t in fp.state_dict().items() if ".layers." not in k)
    # the last save_file calls are the export's: fake_quant, then gptq, each one shard per block + the rest
    export_shards = written[-2 * (len(fp.model.layers) + 1):]
    assert len(export_shards) == 2 * 3 and max(export_shards) <= max(block, outside)
    assert hf_files.INDEX_NAME in os.listdir(root / "export" / "gptq")


def test_gguf_carries_a_byte_level_bpe_tokenizer(tmp_path):
    """A BPE tokenizer goes into the GGUF metadata; transformers rebuilds it from there and encodes the same."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from conftest import random_text as make_text

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator([make_text(200, 1)], trainers.BpeTrainer(
        vocab_size=120, special_tokens=["<|endoftext|>"]))
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>", bos_token="<|endoftext|>")
    net, arch = quantized_tiny("llama", 4, True, 32)
    net.resize_token_embeddings(max(VOCAB, len(tok)))
    ckpt = str(tmp_path / "quantized.safetensors")
    save_quantized(net, ckpt, {"method": "rtn"})
    export_formats(ckpt, str(tmp_path), [get_format("gguf")], ExportContext(net, arch, tok, None, print))
    info = json.loads((tmp_path / "export" / "gguf" / "flexround_export.json").read_text())
    assert info["tokenizer"] == "byte-level BPE from tokenizer.json"
    back = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "export" / "gguf"), gguf_file="model.gguf")
    text = "the river and the mountain"
    assert back(text)["input_ids"][-len(tok(text)["input_ids"]):] == tok(text)["input_ids"]
