"""LRQ (quant/lrq.py): the same guarantees as FlexRound's (tests/test_quant_core.py).

Init equals round-to-nearest bit for bit, the gradient of every factor equals
an independent autograd reference written here, and the layer hardens to
integer codes whose dequantized weight is the soft one.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from flexround_pl.quant import GridConfig, LRQConfig, LRQQuantizer, QuantConfig, QuantConv2d, QuantLinear
from flexround_pl.quant.lrq import lrq_rank
from flexround_pl.quant.surgery import learnable_parameters
from tests.test_quant_core import SHAPES, _weight  # FlexRound's shapes and weights


def _rtn_reference(w, log_scale, zero_point, qmin, qmax, granularity, group_size):
    """Plain ``s1 * (clamp(round(W / s1) + zp) - zp)``, written here, on the grid's step."""
    v = w.reshape(w.shape[0], -1, group_size) if granularity == "group" else w
    s1 = torch.exp(log_scale)
    q = torch.clamp(torch.round(v / s1) + zero_point, qmin, qmax)
    return (s1 * (q - zero_point)).reshape(w.shape), q.reshape(w.shape)


@pytest.mark.parametrize("name,shape,is_conv,group_size", SHAPES)
@pytest.mark.parametrize("granularity", ["tensor", "channel", "group"])
@pytest.mark.parametrize("symmetric", [True, False])
def test_lrq_at_init_is_rtn_bit_for_bit(name, shape, is_conv, group_size, granularity, symmetric):
    w = _weight(shape)
    cfg = GridConfig(bits=3, symmetric=symmetric, granularity=granularity, group_size=group_size)
    q = LRQQuantizer(w, cfg, LRQConfig(rank=2), is_conv=is_conv)
    w_hat, codes = _rtn_reference(w, q.grid.log_scale, q.grid.zero_point, cfg.qmin, cfg.qmax, granularity, group_size)
    assert torch.equal(q(w), w_hat)
    assert torch.equal(q.codes(w), codes.to(torch.int16))
    assert q.U2.abs().sum() > 0  # U2 is random, L2 = 0 makes the product exactly 0


def test_rank_default_and_cap():
    assert lrq_rank(4096, 4096, None) == 1024  # the paper's Llama-2-7B rank
    assert lrq_rank(576, 1536, None) == 144
    assert lrq_rank(8, 3, 100) == 3
    q = LRQQuantizer(_weight((12, 16)), GridConfig(), LRQConfig(), False)
    assert (q.L2.shape, q.U2.shape, q.r2.shape, q.c2.shape) == ((12, 3), (3, 16), (12, 1), (1, 16))
    n_params = sum(p.numel() for p in q.parameters())
    assert n_params < 12 * 16  # fewer than FlexRound's one scale per weight
    with pytest.raises(ValueError, match="lrq.rank"):
        LRQConfig(rank=0)


@pytest.mark.parametrize("granularity,group_size", [("channel", 16), ("group", 4)])
def test_gradient_of_every_factor_matches_an_autograd_reference(granularity, group_size):
    torch.manual_seed(0)
    w = _weight((6, 16))
    cfg = GridConfig(bits=4, symmetric=False, granularity=granularity, group_size=group_size, init="minmax")
    q = LRQQuantizer(w, cfg, LRQConfig(rank=3), False)
    with torch.no_grad():  # away from init, so every factor matters
        for p in (q.L2, q.r2, q.c2):
            p.copy_(0.3 * torch.randn_like(p))
    G = torch.randn_like(w)
    (G * q(w)).sum().backward()

    # reference in float64: the formula of the paper with a textbook STE and clamp
    ref = {n: p.detach().double().clone().requires_grad_(True) for n, p in q.named_parameters()}
    zp = q.grid.zero_point.double()
    v = w.double().reshape(6, -1, group_size) if granularity == "group" else w.double()
    rest = (ref["L2"] @ ref["U2"] + ref["r2"] + ref["c2"]).reshape(v.shape)
    x = v / (torch.exp(ref["log_s1"]) * torch.exp(rest))
    r = x + (torch.round(x) - x).detach() + zp
    codes = torch.where((r >= q.qmin) & (r <= q.qmax), r, r.detach().clamp(q.qmin, q.qmax))
    w_hat = torch.exp(ref["log_s1"]) * (codes - zp)
    (G.double().reshape(v.shape) * w_hat).sum().backward()
    for n, p in q.named_parameters():
        torch.testing.assert_close(p.grad.double(), ref[n].grad, rtol=1e-4, atol=1e-6, msg=n)
    assert q.L2.grad.abs().sum() > 0 and q.U2.grad.abs().sum() > 0


@pytest.mark.parametrize("case", ["linear", "conv"])
def test_lrq_layer_hardens_to_codes(case):
    torch.manual_seed(0)
    fp = nn.Linear(16, 8) if case == "linear" else nn.Conv2d(4, 6, 3, padding=1)
    x = torch.randn(2, 5, 16) if case == "linear" else torch.randn(2, 4, 7, 7)
    cfg = QuantConfig(method="lrq", weight=GridConfig(bits=3, symmetric=False, granularity="channel"))
    layer = (QuantLinear if case == "linear" else QuantConv2d).from_float(fp, cfg)
    assert isinstance(layer.quantizer, LRQQuantizer)
    with torch.no_grad():
        for p in learnable_parameters(layer):
            p.add_(0.2 * torch.randn_like(p))
    before, w_before = layer(x), layer.quantized_weight()
    layer.harden()
    assert layer.codes.dtype == torch.uint8 and int(layer.codes.max()) <= 7
    assert torch.equal(layer.quantized_weight(), w_before)
    assert torch.equal(layer(x), before)
    c_out = fp.weight.shape[0]
    w_ref = layer.scale.reshape(c_out, 1) * (layer.codes.float().reshape(c_out, -1) - layer.zero_point.reshape(c_out, 1))
    assert torch.equal(layer.dequantize().reshape(c_out, -1), w_ref)
