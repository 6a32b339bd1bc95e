"""GPTQ (quant/gptq.py, reconstruct/gptq_hessian.py) against a reference written here.

The reference is the textbook Optimal Brain Quantization loop of the paper's
Eq. (2)-(3), one column at a time with an explicit inverse Hessian that drops
each rounded column (no Cholesky factor, no lazy batches), in float64.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from flexround_pl.quant import GPTQConfig, GPTQQuantizer, GridConfig, QuantConfig, QuantLinear, RoundToNearest
from flexround_pl.quant.gptq import gptq_quantize, grid_per_weight
from flexround_pl.reconstruct.cache import CalibrationCache
from flexround_pl.reconstruct.gptq_hessian import layer_hessians


def _reference_gptq(w, h, step, zp, qmin, qmax, percdamp, act_order):
    w, h = w.double().clone(), h.double().clone()
    step, zp = step.double(), zp.double()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    h += percdamp * torch.mean(torch.diag(h)) * torch.eye(h.shape[0], dtype=h.dtype)
    h_inv = torch.linalg.inv(h)
    order = torch.argsort(torch.diag(h), descending=True).tolist() if act_order else range(w.shape[1])
    codes, compensated = torch.zeros_like(w), torch.zeros_like(w)
    for j in order:
        col = w[:, j].clone()
        q = torch.clamp(torch.round(col / step[:, j]) + zp[:, j], qmin, qmax)
        codes[:, j], compensated[:, j] = q, col
        err = (col - step[:, j] * (q - zp[:, j])) / h_inv[j, j]
        w -= err[:, None] * h_inv[j][None, :]
        h_inv -= h_inv[:, j:j + 1] @ h_inv[j:j + 1, :] / h_inv[j, j]
    return codes, compensated


def _data(c_out=8, c_in=12, n=200, seed=0):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(c_in, c_in, generator=g) * torch.linspace(0.1, 2.0, c_in)  # correlated, uneven features
    x = torch.randn(n, c_in, generator=g) @ mix
    w = torch.randn(c_out, c_in, generator=g)
    return w, x


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("granularity,symmetric", [("channel", True), ("group", False), ("tensor", False)])
@pytest.mark.parametrize("block_size", [1, 5, 128])
def test_gptq_equals_the_unbatched_reference(act_order, granularity, symmetric, block_size):
    w, x = _data()
    x[:, 3] = 0  # a dead input
    h = 2 * x.t() @ x / x.shape[0]
    grid_cfg = GridConfig(bits=3, symmetric=symmetric, granularity=granularity, group_size=4, init="minmax")
    grid = RoundToNearest(w, grid_cfg).grid
    step, zp = grid_per_weight(grid, tuple(w.shape))
    cfg = GPTQConfig(percdamp=0.01, act_order=act_order, block_size=block_size)
    codes, compensated = gptq_quantize(w, h, step, zp, grid.qmin, grid.qmax, cfg)
    ref_codes, ref_compensated = _reference_gptq(w, h, step, zp, grid.qmin, grid.qmax, 0.01, act_order)
    assert torch.equal(codes.double(), ref_codes)
    torch.testing.assert_close(compensated.double(), ref_compensated, rtol=1e-4, atol=1e-4)
    assert torch.all(codes[:, 3] == zp[:, 3])  # a dead input's weight is 0


@pytest.mark.parametrize("bits", [3, 4])
@pytest.mark.parametrize("granularity,symmetric", [("channel", True), ("channel", False), ("group", True)])
def test_gptq_layer_error_on_calibration_data_is_below_rtn(bits, granularity, symmetric):
    fp = nn.Linear(32, 16, bias=False)
    _, x = _data(c_in=32, n=512, seed=1)
    cfg = QuantConfig(method="gptq", weight=GridConfig(bits=bits, symmetric=symmetric, granularity=granularity,
                                                       group_size=8, init="minmax"))
    layer = QuantLinear.from_float(fp, cfg)
    assert isinstance(layer.quantizer, GPTQQuantizer) and not layer.quantizer.compensated
    with torch.no_grad():
        ref = fp(x)
        rtn_err = (layer(x) - ref).pow(2).sum()  # round-to-nearest until compensated
        layer.quantizer.compensate(layer.weight, 2 * x.t() @ x / x.shape[0])
        layer.harden()
        gptq_err = (layer(x) - ref).pow(2).sum()
    assert layer.codes.dtype == (torch.int8 if symmetric else torch.uint8)
    assert gptq_err < 0.9 * rtn_err, (gptq_err, rtn_err)


def test_layer_hessians_hook_the_teacher_and_skip_padding():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x, attention_mask=None):
            return self.fc(x)

    torch.manual_seed(0)
    inputs = torch.randn(5, 3, 4)
    mask = torch.ones(5, 3, dtype=torch.long)
    mask[:, 2] = 0
    h = layer_hessians(Block(), ["fc"], CalibrationCache(inputs, ((), {}), [], mask), torch.device("cpu"), batch_size=2)["fc"]
    rows = inputs[:, :2].reshape(-1, 4)
    torch.testing.assert_close(h, 2 * rows.t() @ rows / rows.shape[0])


def test_init_from_gptq_only_for_methods_that_start_from_a_weight():
    assert QuantConfig(method="lrq", init_from="gptq").init_from == "gptq"
    with pytest.raises(ValueError, match="init_from gptq needs a method"):
        QuantConfig(method="adaround", init_from="gptq")
    with pytest.raises(ValueError, match="gptq.percdamp"):
        GPTQConfig(percdamp=0)


def _fit(tmp_path, tiny_bert_dir, name, *overrides):
    from conftest import write_classifier_config

    from flexround_pl.cli import main

    root = tmp_path / name
    root.mkdir()
    cfg = write_classifier_config(root, tiny_bert_dir, weight={"bits": 3, "granularity": "channel", "init": "minmax"})
    assert main(["fit", "--config", cfg, "--export", "false", *overrides]) == 0
    return root / "run"


def test_cli_gptq_beats_rtn_per_block_and_init_from_gptq_starts_there(tmp_path, tiny_bert_dir):
    import json

    from safetensors.torch import load_file

    rtn = _fit(tmp_path, tiny_bert_dir, "rtn", "--model.quant.method", "rtn")
    gptq = _fit(tmp_path, tiny_bert_dir, "gptq", "--model.quant.method", "gptq", "--model.quant.gptq.act_order", "true")
    start = _fit(tmp_path, tiny_bert_dir, "start", "--model.quant.method", "flexround", "--model.quant.init_from",
                 "gptq", "--model.quant.gptq.act_order", "true", "--trainer.max_steps", "0")
    blocks = {k: json.loads((r / "results.json").read_text())["blocks"] for k, r in
              (("rtn", rtn), ("gptq", gptq), ("start", start))}
    for b_rtn, b_gptq in zip(blocks["rtn"], blocks["gptq"]):
        assert b_gptq["steps"] == 0 and b_gptq["loss_end"] < b_rtn["loss_end"], (b_gptq, b_rtn)
    # FlexRound from the GPTQ-compensated weights, before any step, is GPTQ: the same codes, scales, everything
    a, b = load_file(str(gptq / "quantized.safetensors")), load_file(str(start / "quantized.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [x["loss_end"] for x in blocks["start"]] == [x["loss_end"] for x in blocks["gptq"]]
