"""Layer wrappers and model surgery (flexround_pl.quant.layers / surgery)."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from flexround_pl.quant import (
    GridConfig,
    QuantConfig,
    QuantConv1D,
    QuantConv2d,
    QuantizedLayer,
    QuantLinear,
    harden_modules,
    learnable_parameters,
    quantize_modules,
    quantized_layers,
    set_hard,
    total_regularization,
)

METHODS = ["rtn", "flexround", "adaround", "lrq"]


def _cfg(method="flexround", **grid):
    return QuantConfig(method=method, weight=GridConfig(**grid))


def _cases():
    torch.manual_seed(0)
    return {
        "linear": (nn.Linear(16, 8), torch.randn(2, 3, 16)),
        "conv": (nn.Conv2d(4, 6, 3, stride=2, padding=1, dilation=1), torch.randn(2, 4, 9, 9)),
        "conv_reflect_dilated": (
            nn.Conv2d(4, 4, 3, padding=2, dilation=2, padding_mode="reflect", bias=False),
            torch.randn(1, 4, 8, 8),
        ),
        "depthwise": (nn.Conv2d(6, 6, 3, padding="same", groups=6), torch.randn(2, 6, 7, 7)),
        "conv1d": (Conv1D(12, 16), torch.randn(2, 5, 16)),
    }


WRAPPER = {nn.Linear: QuantLinear, nn.Conv2d: QuantConv2d, Conv1D: QuantConv1D}


def _plain_rtn(w_grid: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    """Independent reference: symmetric round-to-nearest, ``s * clamp(round(W / s), -2^(b-1), 2^(b-1) - 1)``.

    ``w_grid`` in the grid layout (output channels first); per-channel ``scale`` broadcasts as
    ``[out, 1, ...]``, per-group ``scale`` ``[out, n_groups, 1]`` against ``w_grid`` viewed as groups.
    """
    view = w_grid.reshape(*scale.shape[:-1], -1) if scale.dim() == 3 and w_grid.dim() == 2 else w_grid
    codes = torch.round(view / scale).clamp(-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
    return (scale * codes).reshape(w_grid.shape)


def _with_weight(fp: nn.Module, weight_fp_layout: torch.Tensor) -> nn.Module:
    import copy

    ref = copy.deepcopy(fp)
    with torch.no_grad():
        ref.weight.copy_(weight_fp_layout)
    return ref


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("case", list(_cases()))
def test_8bit_wrappers_at_init_compute_the_plain_rtn_layer(case, method):
    """At initialization every method's hard weight is round-to-nearest on its grid (FlexRound: S2 = 1,
    AdaRound: h(V) = the fractional part), so the wrapper's output must equal the FP layer with the
    plain-RTN weight written here, to float tolerance: a wrong rounding rule or clamp fails this."""
    fp, x = _cases()[case]
    q = WRAPPER[type(fp)].from_float(fp, _cfg(method, bits=8, granularity="channel"))
    assert q.weight.shape == fp.weight.shape and not q.weight.requires_grad
    w_grid = fp.weight.detach().t() if q.transposed else fp.weight.detach()
    expected_w = _plain_rtn(w_grid, q.quantizer.scale().detach(), 8)
    reference = _with_weight(fp, expected_w.t() if q.transposed else expected_w)
    with torch.no_grad():
        expected = reference(x)
        set_hard(q, True)
        torch.testing.assert_close(q(x), expected, rtol=1e-5, atol=1e-6)
    q.harden()
    torch.testing.assert_close(q.dequantize(), reference.weight.detach(), rtol=0, atol=1e-7)
    torch.testing.assert_close(q(x), expected, rtol=1e-5, atol=1e-6)
    with torch.no_grad():  # and 8 bits are close to FP: within half a step per weight
        assert (q.dequantize() - fp.weight).abs().max() <= q.scale.max() / 2 + 1e-7


def test_conv1d_is_quantized_per_output_feature():
    fp = Conv1D(6, 10)  # weight [in=10, out=6]
    with torch.no_grad():
        fp.weight.mul_(torch.logspace(-2, 0, 6))  # very different output columns
    q = QuantConv1D.from_float(fp, _cfg("rtn", bits=4, granularity="channel"))
    assert q.quantizer.grid.scale_shape() == (6, 1)
    q.harden()
    assert q.codes.shape == (6, 10)  # grid layout [out, in]
    assert q.weight.shape == (10, 6)  # dequantized cache in HF layout
    torch.testing.assert_close(q.dequantize(), fp.weight.detach(), atol=0.07 * fp.weight.abs().amax(0).max().item(), rtol=0)


@pytest.mark.parametrize("case", ["linear", "conv", "depthwise", "conv1d"])
@pytest.mark.parametrize("granularity", ["tensor", "channel", "group"])
def test_flexround_harden_is_exact(case, granularity):
    fp, x = _cases()[case]
    group_size = {"linear": 4, "conv": 4, "depthwise": 9, "conv1d": 8}[case]
    cfg = _cfg("flexround", bits=3, symmetric=False, granularity=granularity, group_size=group_size)
    q = WRAPPER[type(fp)].from_float(fp, cfg)
    with torch.no_grad():  # move away from RTN
        for p in learnable_parameters(q):
            p.add_(0.2 * torch.randn_like(p))
    before, w_before = q(x), q.quantized_weight()
    q.harden()
    assert torch.equal(q.quantized_weight(), w_before)
    assert torch.equal(q(x), before)
    assert q.codes.dtype == torch.uint8 and q.scale.dtype == torch.float32
    assert q.codes.max() <= 7 and "weight" not in q.state_dict()
    assert all(not p.requires_grad for p in q.parameters())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("method", METHODS + ["nupes"])
@pytest.mark.parametrize("case", ["linear", "conv", "conv1d"])
def test_hard_rounding_validation_computes_the_hardened_layer_bit_for_bit(case, method, dtype):
    """The driver keeps a validated block's outputs as the next block's inputs: a resumed run, which
    reloads the codes, must see the same inputs, so hard mode without gradients is the hardened layer."""
    fp, x = _cases()[case]
    fp, x = fp.to(dtype), x.to(dtype)
    cfg = _cfg(method, bits=3, symmetric=False, granularity="group" if case != "conv" else "channel", group_size=4)
    q = WRAPPER[type(fp)].from_float(fp, cfg)
    with torch.no_grad():  # move away from the initial grid, across rounding boundaries
        for p in learnable_parameters(q):
            p.add_(0.3 * torch.randn_like(p))
    q.quantizer.hard = True
    with torch.no_grad():
        validated = q(x)
    q.harden()
    assert q.weight.dtype == dtype and q.weight.is_contiguous()
    assert torch.equal(q(x), validated)


def test_symmetric_group_codes_are_int8_and_equal_plain_rtn():
    fp, x = _cases()["linear"]
    q = QuantLinear.from_float(fp, _cfg("rtn", bits=8, granularity="group", group_size=8))
    scale = q.quantizer.scale().detach().clone()
    q.harden()
    assert q.codes.dtype == torch.int8 and q.scale.shape == (8, 2, 1) and q.grid_cfg.bits == 8
    groups = fp.weight.detach().reshape(8, 2, 8)  # [out, groups, group_size]
    expected_codes = torch.round(groups / scale).clamp(-128, 127).to(torch.int8).reshape(8, 16)
    assert torch.equal(q.codes, expected_codes)
    torch.testing.assert_close(q.dequantize(), (scale * expected_codes.reshape(8, 2, 8).float()).reshape(8, 16),
                               rtol=0, atol=0)
    torch.testing.assert_close(q(x), x @ q.dequantize().t() + fp.bias.detach(), rtol=1e-5, atol=1e-6)


def test_hardened_state_dict_loads_into_a_fresh_wrapper():
    fp, x = _cases()["conv"]
    a = QuantConv2d.from_float(fp, _cfg("flexround", bits=4, granularity="channel"))
    with torch.no_grad():
        a.quantizer.log_S2.add_(0.3 * torch.randn_like(a.quantizer.log_S2))
    a.harden()
    b = QuantConv2d.from_float(fp, _cfg("flexround", bits=4, granularity="channel"))
    b.load_state_dict(a.state_dict())
    assert b.hardened and b.quantizer is None
    assert torch.equal(b(x), a(x))


@pytest.mark.parametrize("case", ["linear", "conv", "conv1d"])
def test_autocast_bf16_keeps_fp32_scales_and_backward_works(case):
    fp, x = _cases()[case]
    q = WRAPPER[type(fp)].from_float(fp, _cfg("flexround", bits=4, granularity="channel"))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = q(x)
        ref = fp(x)
    assert out.dtype == ref.dtype == torch.bfloat16
    out.float().pow(2).sum().backward()
    for p in learnable_parameters(q):
        assert p.dtype == torch.float32 and p.grad is not None and p.grad.dtype == torch.float32
    assert torch.isfinite(q.quantizer.log_S2.grad).all()
    # bf16 input without autocast: the weight is cast to the input dtype
    assert q(x.bfloat16()).dtype == torch.bfloat16


def _toy_model():
    torch.manual_seed(0)
    return nn.ModuleDict(
        {
            "stem": nn.Conv2d(3, 4, 3),
            "body": nn.Sequential(nn.Linear(8, 8), nn.ReLU(), Conv1D(8, 8)),
            "attn": nn.MultiheadAttention(8, 2),
            "head": nn.Linear(8, 2),
            "norm": nn.LayerNorm(8),
        }
    )


def test_quantize_modules_respects_keep_fp_and_eight_bit():
    m = _toy_model()
    cfg = _cfg("flexround", bits=4)
    cfg.keep_fp = [r"^body\.2$"]
    names = quantize_modules(m, cfg, keep_fp=[r"head"], eight_bit=[r"^stem$"])
    assert names == ["stem", "body.0"]
    assert isinstance(m["head"], nn.Linear) and isinstance(m["body"][2], Conv1D)
    assert type(m["attn"].out_proj) is not QuantLinear  # MHA reads out_proj.weight directly
    assert m["stem"].grid_cfg.bits == 8 and m["body"][0].grid_cfg.bits == 4
    assert [n for n, _ in quantized_layers(m)] == ["stem", "body.0"]
    # qualified names with a prefix; already-wrapped layers are left alone
    names = quantize_modules(m, _cfg("rtn"), prefix="model.layers.0", keep_fp=[r"^model\.layers\.0\.head$"])
    assert names == ["model.layers.0.body.2"]
    assert isinstance(m["body"][2], QuantConv1D)


def test_module_helpers_adaround():
    m = _toy_model()
    quantize_modules(m, _cfg("adaround", bits=4), keep_fp=["stem"])
    layers = [l for _, l in quantized_layers(m)]
    params = learnable_parameters(m)
    assert len(params) == len(layers) == 3 and all(p.requires_grad for p in params)
    assert total_regularization(m, 0.1).item() == 0
    reg = total_regularization(m, 0.5)
    assert reg.item() > 0 and reg.requires_grad
    set_hard(m, True)
    assert all(l.quantizer.hard for l in layers)
    harden_modules(m)
    assert all(l.hardened for l in layers) and learnable_parameters(m) == []
    assert [n for n, p in m.named_parameters() if p.requires_grad and "attn" not in n and "norm" not in n
            and "stem" not in n] == []
    x = torch.randn(2, 8)
    assert m["body"](x).shape == (2, 8)


def test_shared_module_gets_one_wrapper():
    lin = nn.Linear(4, 4)
    m = nn.ModuleDict({"a": nn.Sequential(lin), "b": nn.Sequential(lin)})
    names = quantize_modules(m, _cfg("rtn"))
    assert names == ["a.0", "b.0"] and m["a"][0] is m["b"][0]
    assert isinstance(m["a"][0], QuantizedLayer)


def test_module_aliased_under_one_parent_is_swapped_everywhere():
    lin = nn.Linear(4, 4)
    parent = nn.Module()
    parent.proj = lin
    parent.alias = lin  # e.g. a tied / re-exported projection
    names = quantize_modules(parent, _cfg("rtn"))
    assert names == ["proj", "alias"]
    assert parent.proj is parent.alias and isinstance(parent.alias, QuantizedLayer)


@pytest.mark.parametrize("case", ["linear", "conv", "conv1d"])
def test_for_loading_builds_no_quantizer_and_loads_any_methods_codes(case, monkeypatch):
    """The load-only wrapper (resume, checkpoints) starts with empty codes / scale / zero point and builds
    no quantizer, so no grid search runs; loading a hardened FlexRound layer's state makes it that layer."""
    import flexround_pl.quant.layers as layers

    fp, x = _cases()[case]
    saved = WRAPPER[type(fp)].from_float(fp, _cfg("flexround", bits=4, granularity="channel"))
    with torch.no_grad():
        saved.quantizer.log_S2.add_(0.3 * torch.randn_like(saved.quantizer.log_S2))
    saved.harden()

    def no_quantizer(*args, **kwargs):
        raise AssertionError("for_loading() built a quantizer")

    monkeypatch.setattr(layers, "build_quantizer", no_quantizer)
    shell = WRAPPER[type(fp)].for_loading(fp, _cfg("rtn", bits=4, granularity="channel"))
    assert shell.quantizer is None and shell.codes.numel() == 0 and shell.scale.numel() == 0
    assert set(shell.state_dict()) == set(saved.state_dict())
    shell.load_state_dict(saved.state_dict())
    assert not shell.awaiting_load and shell.codes.dtype == saved.codes.dtype
    assert torch.equal(shell.codes, saved.codes) and torch.equal(shell(x), saved(x))
