"""Bit packing, the quantized checkpoint, the plain-FP export and the validate / test subcommands."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

from flexround_pl.export import packing
from flexround_pl.export.checkpoint import (
    CheckpointError,
    apply_quantized,
    read_metadata,
    read_quantized,
    save_quantized,
)
from flexround_pl.export.fake_quant import dequantized_state_dict, export_fake_quant
from flexround_pl.quant import QuantConfig, harden_modules, quantize_modules, quantized_layers
from flexround_pl.quant.config import GridConfig

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# ----------------------------------------------------------------------------- packing


@pytest.mark.parametrize("bits", range(1, 9))
def test_pack_unpack_is_exact_for_random_values_and_odd_lengths(bits, monkeypatch):
    gen = torch.Generator().manual_seed(bits)
    for chunk in (packing._CHUNK, 8, 24):  # small chunks: values straddle chunk boundaries too
        monkeypatch.setattr(packing, "_CHUNK", chunk)
        for n in (0, 1, 2, 3, 5, 7, 8, 9, 13, 31, 100, 257):
            values = torch.randint(0, 1 << bits, (n,), generator=gen)
            packed = packing.pack(values, bits)
            assert packed.dtype == torch.uint8 and packed.numel() == (n * bits + 7) // 8
            assert torch.equal(packing.unpack(packed, bits, n).long(), values)
    extremes = torch.tensor([0, (1 << bits) - 1] * 5)
    assert torch.equal(packing.unpack(packing.pack(extremes, bits), bits, 10).long(), extremes)


def test_packing_layout_is_dense_little_endian():
    assert packing.pack(torch.tensor([1, 2, 3, 15]), 4).tolist() == [0x21, 0xF3]  # two per byte, low nibble first
    assert packing.pack(torch.tensor([1, 2, 3, 0, 3]), 2).tolist() == [0b00111001, 0b11]  # four per byte
    assert packing.pack(torch.tensor([7] * 8), 3).tolist() == [255, 255, 255]  # 8 values in 3 bytes
    assert packing.pack(torch.tensor([5, 200]), 8).tolist() == [5, 200]


@pytest.mark.parametrize("bits", range(2, 9))
def test_signed_and_unsigned_codes_round_trip(bits):
    lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    signed = torch.randint(lo, hi + 1, (3, 7)).to(torch.int8)
    signed[0, 0], signed[0, 1] = lo, hi
    out = packing.unpack_codes(packing.pack_codes(signed, bits), bits, (3, 7), torch.int8)
    assert out.dtype == torch.int8 and torch.equal(out, signed)
    unsigned = torch.randint(0, 1 << bits, (5, 3)).to(torch.uint8)
    out = packing.unpack_codes(packing.pack_codes(unsigned, bits), bits, (5, 3), torch.uint8)
    assert out.dtype == torch.uint8 and torch.equal(out, unsigned)


def test_packing_rejects_out_of_range_values_and_wrong_sizes():
    with pytest.raises(ValueError, match="out of range"):
        packing.pack(torch.tensor([0, 16]), 4)
    with pytest.raises(ValueError, match="need"):
        packing.unpack(torch.zeros(3, dtype=torch.uint8), 4, 7)


# ----------------------------------------------------------------------------- checkpoint round trips


def _tiny_bert(seed: int = 0) -> nn.Module:
    import transformers

    torch.manual_seed(seed)
    config = transformers.BertConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=16, num_labels=3,
    )
    return transformers.BertForSequenceClassification(config).eval()


def _quantize(net: nn.Module, cfg: QuantConfig, root: str = "bert.encoder", seed: int = 0) -> nn.Module:
    quantize_modules(net.get_submodule(root), cfg, prefix=root)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # move the learned parameters so the codes are not plain RTN
        for _, layer in quantized_layers(net):
            for p in layer.quantizer.parameters():
                if p.requires_grad:
                    p.add_(torch.randn(p.shape, generator=gen) * 0.3)
    harden_modules(net)
    return net


GRIDS = {  # bits -> (symmetric, granularity): every grid kind shows up
    2: (True, "tensor"), 3: (False, "channel"), 4: (True, "group"), 5: (True, "channel"),
    6: (False, "group"), 7: (False, "tensor"), 8: (True, "channel"),
}


@pytest.mark.parametrize("method", ["rtn", "flexround", "adaround"])
@pytest.mark.parametrize("bits", range(2, 9))
def test_save_load_round_trip_gives_identical_codes_and_outputs(tmp_path, method, bits):
    symmetric, granularity = GRIDS[bits]
    grid = GridConfig(bits=bits, symmetric=symmetric, granularity=granularity, group_size=16, lp_candidates=4)
    net = _quantize(_tiny_bert(), QuantConfig(method=method, weight=grid), seed=bits)
    x = torch.randint(0, 64, (2, 9))
    expected = net(x).logits

    path = str(tmp_path / "q.safetensors")
    size = save_quantized(net, path, {"method": method})
    meta, state = read_quantized(path)
    assert meta["method"] == method and len(meta["layers"]) == 6
    assert all(info["bits"] == bits and info["granularity"] == granularity for info in meta["layers"].values())

    fresh = _tiny_bert(seed=123)  # other weights: everything must come from the file
    apply_quantized(fresh, meta, state)
    assert torch.equal(fresh(x).logits, expected)
    for (name, a), (_, b) in zip(quantized_layers(net), quantized_layers(fresh)):
        assert b.hardened and torch.equal(a.codes, b.codes) and a.codes.dtype == b.codes.dtype, name
        assert torch.equal(a.scale, b.scale) and torch.equal(a.zero_point, b.zero_point)
    # codes really are packed: the file holds about bits/8 bytes per weight
    numel = sum(layer.codes.numel() for _, layer in quantized_layers(net))
    fp_rest = sum(t.numel() * t.element_size() for k, t in net.state_dict().items() if not k.endswith(".codes"))
    assert size < fp_rest + numel * bits / 8 + 16_000  # + header (JSON metadata)


class _ConvNet(nn.Module):
    """Conv2d (grouped too), HF Conv1D, a Linear under two parents, and FP tied tensors."""

    def __init__(self, seed: int) -> None:
        from transformers.pytorch_utils import Conv1D

        super().__init__()
        torch.manual_seed(seed)
        shared = nn.Linear(6, 6)
        self.body = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, groups=8), nn.Flatten(1),
            Conv1D(12, 8 * 4 * 4), nn.Linear(12, 6), shared,
        )
        self.tail = nn.Sequential(nn.ReLU(), shared)
        self.emb = nn.Embedding(6, 6)
        self.head = nn.Linear(6, 6, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.tail(self.body(x)))


def test_conv_conv1d_shared_and_tied_tensors_round_trip(tmp_path):
    net = _ConvNet(0).eval()
    cfg = QuantConfig(method="flexround", weight=GridConfig(bits=3, granularity="channel", lp_candidates=4))
    quantize_modules(net, cfg, keep_fp=[r"^head$"])
    harden_modules(net)
    x = torch.randn(2, 3, 6, 6)
    expected = net(x)

    path = str(tmp_path / "q.safetensors")
    save_quantized(net, path)
    meta, state = read_quantized(path)
    assert set(meta["layers"]) == {"body.0", "body.2", "body.4", "body.5", "body.6", "tail.1"}
    assert "head.weight" in meta["aliases"] or "emb.weight" in meta["aliases"]  # tied: stored once
    assert "tail.1.codes" in meta["aliases"] or "body.6.codes" in meta["aliases"]  # shared layer: stored once
    fresh = _ConvNet(1).eval()
    apply_quantized(fresh, meta, state)
    assert fresh.body[6] is fresh.tail[1] and fresh.head.weight is fresh.emb.weight
    assert torch.equal(fresh(x), expected)


@pytest.fixture()
def saved_checkpoint(tmp_path):
    net = _quantize(_tiny_bert(), QuantConfig(method="rtn", weight=GridConfig(bits=4, lp_candidates=4)))
    path = str(tmp_path / "q.safetensors")
    save_quantized(net, path)
    return path


def test_corrupt_truncated_and_foreign_files_give_clear_errors(tmp_path, saved_checkpoint):
    data = open(saved_checkpoint, "rb").read()

    flipped = tmp_path / "flipped.safetensors"
    flipped.write_bytes(data[:-10] + bytes([data[-10] ^ 0x55]) + data[-9:])  # one tensor byte changed
    with pytest.raises(CheckpointError, match="checksum mismatch"):
        read_quantized(str(flipped))

    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        read_quantized(str(truncated))

    header_cut = tmp_path / "header.safetensors"
    header_cut.write_bytes(data[:20])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        read_quantized(str(header_cut))

    from safetensors.torch import save_file

    foreign = tmp_path / "foreign.safetensors"
    save_file({"w": torch.zeros(2)}, str(foreign))
    with pytest.raises(CheckpointError, match="not a flexround_pl quantized checkpoint"):
        read_metadata(str(foreign))

    with pytest.raises(CheckpointError, match="does not exist"):
        read_quantized(str(tmp_path / "missing.safetensors"))


def test_checkpoint_refuses_a_model_it_does_not_fit(saved_checkpoint):
    import transformers

    meta, state = read_quantized(saved_checkpoint)
    other = transformers.BertForSequenceClassification(
        transformers.BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                intermediate_size=32, max_position_embeddings=16, num_labels=3)
    )
    with pytest.raises(CheckpointError, match="weight shape"):
        apply_quantized(other, meta, state)


def test_dequantized_state_dict_has_the_fp_keys(saved_checkpoint):
    fp = _tiny_bert()
    meta, state = read_quantized(saved_checkpoint)
    net = _tiny_bert()
    apply_quantized(net, meta, state)
    plain = dequantized_state_dict(net)
    assert set(plain) == set(fp.state_dict())
    fp.load_state_dict(plain)
    x = torch.randint(0, 64, (2, 5))
    assert torch.equal(fp(x).logits, net(x).logits)


def test_cnn_export_is_a_plain_torchvision_state_dict(tmp_path):
    import torchvision

    from flexround_pl.models.cnn import prepare_mobilenet_v2

    torch.manual_seed(0)
    net = torchvision.models.mobilenet_v2(num_classes=5, width_mult=0.25).eval()
    with torch.no_grad():  # non-trivial BatchNorm statistics to fold
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    prepare_mobilenet_v2(net)
    quantize_modules(net, QuantConfig(method="rtn", weight=GridConfig(bits=4, granularity="channel", init="minmax")))
    harden_modules(net)
    out = export_fake_quant(net, str(tmp_path / "export"))
    plain = torchvision.models.mobilenet_v2(num_classes=5, width_mult=0.25).eval()
    plain.load_state_dict(torch.load(os.path.join(out, "model_state_dict.pt")), strict=True)
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(plain(x), net(x), rtol=1e-4, atol=1e-5)
    assert json.loads(open(os.path.join(out, "flexround_export.json")).read())["format"] == "torch_state_dict"


# ----------------------------------------------------------------------------- through the CLI


@pytest.fixture(scope="module")
def fitted(tmp_path_factory, tiny_bert_dir, write_config):
    """One ``fit`` on the tiny BERT (FlexRound W3): the CLI object and its config."""

    from flexround_pl.cli import FlexRoundCLI

    tmp = tmp_path_factory.mktemp("fit")
    cfg = write_config(tmp, tiny_bert_dir)
    cli = FlexRoundCLI(args=["fit", "--config", cfg, "--trainer.max_steps", "8"])
    return cli, cfg, tmp / "run"


def _inputs(n: int = 4) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, 2000, (n, 12), generator=gen)
    ids[:, 0] = 101
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def test_fit_writes_a_packed_checkpoint_and_reports_sizes(fitted):
    cli, _, run = fitted
    results = json.loads((run / "results.json").read_text())
    size = results["size_mb"]
    assert size["quantized"] == pytest.approx(os.path.getsize(run / "quantized.safetensors") / 2**20)
    assert 0 < size["quantized"] < size["fp"]
    weights = results["quantized_weights_mb"]
    assert weights["packed"] < weights["fp"] * 3.5 / 32  # 3-bit codes + a few scales
    meta = read_metadata(str(run / "quantized.safetensors"))
    assert meta["method"] == "flexround" and meta["w_bits"] == 3 and meta["architecture"] == "bert"
    assert meta["library_version"] and meta["quantized_metrics"] == results["quantized"]
    assert len(meta["layers"]) == 12 and meta["config"]["model.quant.weight.bits"] == 3


def test_validate_and_test_reproduce_the_fit_exactly(fitted, capfd):
    from flexround_pl.cli import FlexRoundCLI, main

    cli, cfg, run = fitted
    results = json.loads((run / "results.json").read_text())
    capfd.readouterr()
    val = FlexRoundCLI(args=["validate", "--config", str(run / "config.yaml")])
    assert val.results["quantized"] == results["quantized"] and val.results["fp"] == results["fp"]
    with torch.no_grad():
        assert torch.equal(val.model.net(**_inputs()).logits, cli.model.net(**_inputs()).logits)
    out = capfd.readouterr().out
    assert "FP validate metrics" in out and "quantized validate metrics" in out

    assert main(["test", "--config", cfg, "--ckpt_path", str(run / "quantized.safetensors")]) == 0
    assert "quantized test metrics: accuracy=" in capfd.readouterr().out


def test_validate_refuses_another_quant_config_and_a_corrupt_file(fitted, tmp_path, capfd):
    from flexround_pl.cli import main

    _, cfg, run = fitted
    capfd.readouterr()
    assert main(["validate", "--config", cfg, "--model.quant.weight.bits", "4"]) == 2
    err = capfd.readouterr().err.strip().splitlines()
    assert err[-1].startswith("flexround_pl: error:") and "model.quant.weight.bits: 3 in the checkpoint" in err[-1]

    bad = tmp_path / "bad.safetensors"
    bad.write_bytes((run / "quantized.safetensors").read_bytes()[:1000])
    assert main(["validate", "--config", cfg, "--ckpt_path", str(bad)]) == 2
    assert "truncated or corrupt" in capfd.readouterr().err


def test_export_loads_with_plain_transformers_and_matches(fitted, tmp_path):
    cli, _, run = fitted
    inputs = _inputs()
    with torch.no_grad():
        expected = cli.model.net(**inputs).logits
    torch.save({"inputs": inputs, "expected": expected}, tmp_path / "io.pt")
    script = textwrap.dedent(
        f"""
        import sys, torch, transformers
        model = transformers.AutoModelForSequenceClassification.from_pretrained({str(run / 'export')!r}).eval()
        tok = transformers.AutoTokenizer.from_pretrained({str(run / 'export')!r})
        io = torch.load({str(tmp_path / 'io.pt')!r})
        with torch.no_grad():
            got = model(**io["inputs"]).logits
        assert not any(m.startswith("flexround_pl") for m in sys.modules), "flexround_pl was imported"
        assert tok("hello world")["input_ids"]
        assert torch.equal(got, io["expected"]), (got, io["expected"])
        print("EXPORT_OK")
        """
    )
    env = dict(os.environ, OMP_NUM_THREADS=str(torch.get_num_threads()), HF_HUB_OFFLINE="1")
    env.pop("PYTHONPATH", None)
    proc = subprocess.run(
        [sys.executable, "-c", script], cwd=str(tmp_path), env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0 and "EXPORT_OK" in proc.stdout, proc.stderr[-3000:]


def test_activation_step_sizes_and_nupes_exponents_round_trip(tmp_path):
    """Every tensor a hardened layer persists comes back (state dict driven, not a fixed list)."""
    from flexround_pl.quant.activation import calibrate_activations
    from flexround_pl.quant.config import ActivationConfig

    net = _tiny_bert()
    cfg = QuantConfig(
        method="nupes", weight=GridConfig(bits=4, lp_candidates=4), activation=ActivationConfig(bits=4, init="minmax")
    )
    quantize_modules(net.bert.encoder, cfg, prefix="bert.encoder")
    x = torch.randint(0, 64, (2, 9))
    with torch.no_grad():
        calibrate_activations(net, lambda: net(x))
    harden_modules(net)
    expected = net(x).logits

    path = str(tmp_path / "q.safetensors")
    save_quantized(net, path)
    meta, state = read_quantized(path)
    layer = "bert.encoder.layer.0.attention.self.query"
    assert meta["layers"][layer]["act_bits"] == 4 and meta["layers"][layer]["exponent"]
    assert {f"{layer}.act_quant.scale", f"{layer}.exponent"} <= set(state)
    fresh = _tiny_bert(seed=5)
    apply_quantized(fresh, meta, state, cfg)
    assert torch.equal(fresh(x).logits, expected)
