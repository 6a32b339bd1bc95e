"""QDrop during block reconstruction (BlockReconstruction.mixed_input / training_forward)."""

from __future__ import annotations

import copy
import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from flexround_pl.quant import (
    ActivationConfig,
    GridConfig,
    QuantConfig,
    activation_quantizers,
    calibrate_activations,
    qdrop,
    quantize_modules,
)
from flexround_pl.reconstruct.config import ReconstructionConfig
from flexround_pl.reconstruct.module import BlockReconstruction, block_loss, reconstruction_loss



class Block(nn.Module):
    def __init__(self, d=16):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)

    def forward(self, x):
        return x + self.fc2(torch.relu(self.fc1(x)))


def _setup(a_bits=4, p=0.5):
    torch.manual_seed(0)
    fp = Block().eval()
    fp_in = torch.randn(8, 5, 16)
    q_in = fp_in + 0.3 * torch.randn_like(fp_in)  # the quantized network's input differs
    with torch.no_grad():
        targets = fp(fp_in)
    cfg = QuantConfig(method="flexround", weight=GridConfig(bits=4),
                      activation=ActivationConfig(bits=a_bits))
    student = copy.deepcopy(fp)
    quantize_modules(student, cfg)
    if a_bits is not None:
        calibrate_activations(student, lambda: student(q_in))
    module = BlockReconstruction(copy.deepcopy(fp), student, lr=1e-3, act_lr=4e-5, qdrop_p=p)
    batch = {"q_inputs": q_in, "fp_inputs": fp_in, "args": (), "kwargs": {}, "targets": targets}
    return fp, cfg, module, batch


def _loss(module, batch, out):
    return reconstruction_loss(out, batch["targets"])


def test_p1_is_quantized_input_reconstruction():
    _, _, module, batch = _setup(p=1.0)
    assert module.mixed_input(batch) is batch["q_inputs"]
    torch.manual_seed(1)
    trained = module.training_forward(batch)
    with torch.no_grad():
        plain = module.student(batch["q_inputs"])  # every activation quantized, no drop
    assert torch.equal(trained, plain)
    assert _loss(module, batch, trained).item() == _loss(module, batch, plain).item()


def test_p0_is_fp_input_reconstruction_with_fp_activations():
    fp, cfg, module, batch = _setup(p=0.0)
    assert torch.equal(module.mixed_input(batch), batch["fp_inputs"])
    weight_only = copy.deepcopy(fp)
    quantize_modules(weight_only, QuantConfig(method="flexround", weight=GridConfig(bits=4)))
    trained = module.training_forward(batch)
    with torch.no_grad():
        reference = weight_only(batch["fp_inputs"])  # same weight grid, FP activations, FP inputs
    assert torch.equal(trained, reference)
    assert _loss(module, batch, trained).item() == _loss(module, batch, reference).item()


def test_half_drop_mixes_inputs_and_activations_elementwise():
    _, _, module, batch = _setup(p=0.5)
    q, fpi = batch["q_inputs"], batch["fp_inputs"]
    torch.manual_seed(0)
    mixed = module.mixed_input(batch)
    from_q, from_fp = mixed == q, mixed == fpi
    assert bool((from_q | from_fp).all())
    assert 0.35 < from_q.float().mean().item() < 0.65

    quantizer = activation_quantizers(module.student)[0]
    x = torch.randn(4000)
    with torch.no_grad():
        xq = quantizer.fake_quant(x)
        with qdrop(module.student, 0.5):
            dropped = quantizer(x)
        again = quantizer(x)  # outside the context: no drop
    kept = dropped == xq
    assert bool((kept | (dropped == x)).all()) and 0.45 < kept.float().mean().item() < 0.55
    assert torch.equal(again, xq) and quantizer.drop_p is None


def test_validation_never_drops():
    _, _, module, batch = _setup(p=0.5)
    with torch.no_grad():
        first = module(batch)
        torch.manual_seed(123)
        second = module(batch)
    assert torch.equal(first, second)
    loss = block_loss(module.student, [batch], torch.device("cpu"))
    assert loss == pytest.approx(reconstruction_loss(first, batch["targets"]).item())


def test_step_sizes_train_in_their_own_group_with_cosine_decay():
    _, _, module, batch = _setup(p=0.5)
    module.trainer = SimpleNamespace(max_steps=10)
    opt = module.configure_optimizers()
    optimizer, scheduler = opt["optimizer"], opt["lr_scheduler"]["scheduler"]
    assert [g["lr"] for g in optimizer.param_groups] == [1e-3, 4e-5]
    assert optimizer.param_groups[1]["params"] == module.act_params and len(module.act_params) == 2
    assert set(map(id, module.params)) == set(map(id, module.weight_params + module.act_params))
    torch.manual_seed(0)
    loss = _loss(module, batch, module.training_forward(batch))
    loss.backward()
    for p in module.act_params:
        assert p.grad is not None and torch.isfinite(p.grad) and p.grad != 0
    for _ in range(5):
        optimizer.step()
        scheduler.step()
    expected = 0.5 * (1 + math.cos(math.pi * 5 / 10))
    assert optimizer.param_groups[1]["lr"] == pytest.approx(4e-5 * expected)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(1e-3 * expected)


def test_without_activation_quantization_there_is_one_group():
    _, _, module, _ = _setup(a_bits=None, p=1.0)
    module.trainer = SimpleNamespace(max_steps=10)
    assert len(module.configure_optimizers()["optimizer"].param_groups) == 1


def test_qdrop_p_default_and_validation():
    assert ReconstructionConfig().effective_qdrop_p(activations_quantized=True) == 0.5
    assert ReconstructionConfig().effective_qdrop_p(activations_quantized=False) == 1.0
    assert ReconstructionConfig(qdrop_p=0.25).effective_qdrop_p(False) == 0.25
    with pytest.raises(ValueError, match="qdrop_p"):
        ReconstructionConfig(qdrop_p=1.5)


def test_cli_flexround_with_8bit_activations_and_qdrop(tmp_path, tiny_bert_dir, write_config):
    import json


    from flexround_pl.cli import main

    cfg = write_config(tmp_path, tiny_bert_dir, activation={"bits": 8})
    assert main(["fit", "--config", cfg]) == 0
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["method"] == "flexround" and results["w_bits"] == 3
    assert results["a_bits"] == 8 and results["qdrop_p"] == 0.5
    # W3A8 barely moves a tiny random BERT's logits (fp_kl ~1e-10): broken activation quantization
    # (a wrong step size, an unclamped range) would flip predictions
    assert results["quantized"]["fp_agreement"] >= 0.95
    assert abs(results["quantized"]["accuracy"] - results["fp"]["accuracy"]) <= 0.05
    for block in results["blocks"]:
        assert block["quantized_layers"] == 6 and block["steps"] == 30
        assert block["loss_end"] < block["loss_start"], block
