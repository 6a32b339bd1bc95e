"""Grids and quantizers (flexround_pl.quant): exactness, gradients, ranges."""

from __future__ import annotations

import pytest
import torch

from flexround_pl.quant import (
    AdaRoundConfig,
    AdaRoundQuantizer,
    FlexRoundConfig,
    FlexRoundQuantizer,
    GridConfig,
    RoundToNearest,
    UniformGrid,
)

# (name, weight shape, is_conv, group_size dividing the flattened input dims)
SHAPES = [
    ("linear", (12, 16), False, 4),
    ("conv", (8, 4, 3, 3), True, 9),
    ("depthwise", (6, 1, 3, 3), True, 3),
]


def _weight(shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g) * torch.exp(0.5 * torch.randn(shape, generator=g))


@pytest.mark.parametrize("name,shape,is_conv,group_size", SHAPES)
@pytest.mark.parametrize("granularity", ["tensor", "channel", "group"])
@pytest.mark.parametrize("symmetric", [True, False])
def test_flexround_at_init_is_rtn_bit_for_bit(name, shape, is_conv, group_size, granularity, symmetric):
    w = _weight(shape)
    cfg = GridConfig(bits=3, symmetric=symmetric, granularity=granularity, group_size=group_size)
    rtn = RoundToNearest(w, cfg)
    flex = FlexRoundQuantizer(w, cfg, FlexRoundConfig(), is_conv=is_conv)
    assert torch.equal(rtn.grid.log_scale, flex.log_s1)
    assert torch.equal(rtn(w), flex(w))
    assert torch.equal(rtn.codes(w), flex.codes(w))
    assert (flex.log_s4 is not None) == is_conv


def _flex_8bit(w, is_conv=False):
    cfg = GridConfig(bits=8, granularity="tensor", init="minmax")
    return FlexRoundQuantizer(w, cfg, FlexRoundConfig(), is_conv=is_conv)


def test_reciprocal_rule_gradient_matches_hand_derivation():
    # L = sum(G * W_hat), W_hat = s1 * clamp(round(W / D)), D = s1 * S2 * s3.
    # With the STE, dL/dlogS2 = G * s1 * d(W/D)/dlogS2 = -G * s1 * W / D
    # (where round(W/D) is inside [qmin, qmax]; 0 where clamped).
    torch.manual_seed(0)
    w = _weight((6, 10))
    q = _flex_8bit(w)
    with torch.no_grad():
        q.log_S2.copy_(0.3 * torch.randn_like(q.log_S2))
        q.log_s3.copy_(0.3 * torch.randn_like(q.log_s3))
    G = torch.randn_like(w)
    (G * q(w)).sum().backward()

    w64, s1 = w.double(), q.log_s1.detach().double().exp()
    D = s1 * (q.log_S2.detach().double() + q.log_s3.detach().double()).exp()
    r = torch.round(w64 / D)
    inside = (r >= q.qmin) & (r <= q.qmax)
    expected = torch.where(inside, -G.double() * s1 * w64 / D, torch.zeros_like(w64))
    torch.testing.assert_close(q.log_S2.grad.double(), expected, rtol=1e-5, atol=1e-7)
    # s3 multiplies every S2 of its row: its gradient is the row sum
    torch.testing.assert_close(q.log_s3.grad, q.log_S2.grad.sum(1, keepdim=True), rtol=1e-5, atol=1e-6)


def test_reciprocal_rule_larger_weights_get_larger_updates():
    # At init D = s1, so for equal upstream gradients dL/dlogS2 = -W exactly (up to fp).
    w = torch.tensor([[0.01, -0.05, 0.2, -0.4, 0.8, 1.6]])
    q = _flex_8bit(w)
    q(w).sum().backward()
    g = q.log_S2.grad
    torch.testing.assert_close(g, -w, rtol=1e-5, atol=1e-7)
    order = torch.argsort(w.abs().flatten())
    assert torch.all(torch.diff(g.abs().flatten()[order]) > 0)


def test_conv_s4_gradient_is_sum_over_its_input_channel():
    torch.manual_seed(0)
    w = _weight((4, 3, 2, 2))
    q = _flex_8bit(w, is_conv=True)
    assert q.log_s4.shape == (1, 3, 1, 1) and q.log_s3.shape == (4, 1, 1, 1)
    (torch.randn_like(w) * q(w)).sum().backward()
    torch.testing.assert_close(q.log_s4.grad, q.log_S2.grad.sum((0, 2, 3), keepdim=True), rtol=1e-5, atol=1e-6)


def test_round_has_straight_through_gradient_to_s1():
    w = _weight((5, 8))
    q = _flex_8bit(w)
    q(w).pow(2).sum().backward()
    assert q.log_s1.grad is not None and q.log_s1.grad.abs().item() > 0


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("granularity", ["tensor", "channel", "group"])
def test_codes_stay_in_range_when_scales_are_pushed(symmetric, granularity):
    torch.manual_seed(0)
    w = _weight((8, 12))
    cfg = GridConfig(bits=3, symmetric=symmetric, granularity=granularity, group_size=4)
    q = FlexRoundQuantizer(w, cfg, FlexRoundConfig(), is_conv=False)
    opt = torch.optim.Adam(q.parameters(), lr=0.1)
    for _ in range(20):  # push every weight outward: scales shrink, codes saturate
        opt.zero_grad()
        (-q(w).pow(2).sum()).backward()
        opt.step()
    codes = q.codes(w)
    assert codes.shape == w.shape
    assert codes.min() >= cfg.qmin and codes.max() <= cfg.qmax
    assert codes.min() == cfg.qmin or codes.max() == cfg.qmax  # saturated indeed
    # forward is exactly the dequantized codes
    v = q.grid.group_view(codes.float())
    deq = q.grid.ungroup(q.scale() * (v - q.grid.zero_point), w.shape)
    assert torch.equal(q(w).detach(), deq)


def test_asymmetric_zero_point_uses_the_whole_unsigned_range():
    w = torch.rand(4, 32) + 0.1  # all positive
    cfg = GridConfig(bits=4, symmetric=False, granularity="channel", init="minmax")
    q = RoundToNearest(w, cfg)
    assert (cfg.qmin, cfg.qmax) == (0, 15)
    assert torch.all(q.grid.zero_point == 0)
    codes = q.codes(w)
    assert torch.all(codes.amax(1) == 15) and torch.all(codes.amin(1) >= 0)
    assert (codes.amin(1) > 0).all()  # min(W) > 0.1 sits above code 0: no code is spent on negatives
    neg = RoundToNearest(-w, cfg)  # all negative: zero point at the top
    assert torch.all(neg.grid.zero_point == 15) and torch.all(neg.codes(-w).amin(1) == 0)
    mixed = RoundToNearest(w - 0.6, cfg)
    zp = mixed.grid.zero_point
    assert torch.all((zp > 0) & (zp < 15)) and torch.equal(zp, zp.round())
    err = (mixed(w - 0.6) - (w - 0.6)).abs().max()
    assert err <= mixed.scale().max() / 2 + 1e-6


def test_symmetric_range_is_signed():
    cfg = GridConfig(bits=3)
    assert (cfg.qmin, cfg.qmax) == (-4, 3)
    w = torch.tensor([[-1.0, -0.5, 0.0, 0.5, 0.75]])
    q = RoundToNearest(w, GridConfig(bits=3, init="minmax"))
    assert torch.all(q.grid.zero_point == 0)
    assert q.codes(w).min() == -4  # the most negative weight uses qmin


@pytest.mark.parametrize("bits", [0, 1, 9, 16])
def test_bits_outside_2_to_8_raise(bits):
    with pytest.raises(ValueError, match="from 2 to 8"):
        GridConfig(bits=bits)


def test_group_size_must_divide_input_dim():
    cfg = GridConfig(granularity="group", group_size=5)
    with pytest.raises(ValueError, match=r"group_size=5.*divides 16"):
        UniformGrid(torch.randn(3, 16), cfg)
    # conv: the flattened input dims (4*3*3 = 36) are grouped
    with pytest.raises(ValueError, match="36 input elements"):
        UniformGrid(torch.randn(2, 4, 3, 3), cfg)


def test_group_view_layout():
    w = torch.arange(2 * 12, dtype=torch.float32).reshape(2, 3, 2, 2)
    grid = UniformGrid(w, GridConfig(granularity="group", group_size=4))
    v = grid.group_view(w)
    assert v.shape == (2, 3, 4) and grid.scale_shape() == (2, 3, 1)
    assert torch.equal(v[0, 1], torch.tensor([4.0, 5.0, 6.0, 7.0]))  # consecutive elements
    assert torch.equal(grid.ungroup(v, w.shape), w)


def _lp_error(q, w, p=2.4):
    return (q(w) - w).abs().pow(p).sum().item()


@pytest.mark.parametrize("granularity", ["tensor", "channel", "group"])
@pytest.mark.parametrize("symmetric", [True, False])
def test_lp_search_is_no_worse_than_minmax(granularity, symmetric):
    w = torch.randn(8, 32, generator=torch.Generator().manual_seed(3))  # clipping the tails pays off
    base = dict(bits=3, symmetric=symmetric, granularity=granularity, group_size=8)
    mm = RoundToNearest(w, GridConfig(init="minmax", **base))
    lp = RoundToNearest(w, GridConfig(init="lp", **base))
    e_mm, e_lp = _lp_error(mm, w), _lp_error(lp, w)
    assert e_lp <= e_mm
    if granularity == "tensor":
        assert e_lp < 0.9 * e_mm
        assert lp.scale().item() < mm.scale().item()


def test_lp_search_per_channel_is_independent():
    w = torch.cat([_weight((1, 64), seed=1) ** 3, 0.01 * _weight((1, 64), seed=2)])
    cfg = GridConfig(bits=4, granularity="channel")
    both = RoundToNearest(w, cfg).scale().flatten()
    alone = torch.cat([RoundToNearest(w[i : i + 1], cfg).scale().flatten() for i in range(2)])
    assert torch.equal(both, alone)


def test_all_zero_channel_is_harmless():
    w = torch.zeros(3, 8)
    w[0] = torch.randn(8)
    for q in (RoundToNearest(w, GridConfig(granularity="channel")),
              FlexRoundQuantizer(w, GridConfig(granularity="channel"), FlexRoundConfig(), False)):
        out = q(w)
        assert torch.isfinite(out).all() and torch.equal(out[1:], w[1:])


# ---- AdaRound --------------------------------------------------------------


def test_adaround_init_reproduces_the_weight():
    w = _weight((6, 16))
    q = AdaRoundQuantizer(w, GridConfig(bits=4, init="minmax"), AdaRoundConfig())
    torch.testing.assert_close(q(w), w, rtol=0, atol=1e-5)  # h(V) = frac(W/s1)
    q.hard = True
    hard = q(w)
    assert torch.equal(hard, q.grid.ungroup(q.scale() * q.codes(w).float(), w.shape))
    # hard rounding of h = frac is round-half-up: equal to RTN off exact ties
    assert torch.equal(q.codes(w), RoundToNearest(w, GridConfig(bits=4, init="minmax")).codes(w))


def test_adaround_scale_is_fixed_and_only_V_is_learned():
    q = AdaRoundQuantizer(_weight((4, 8)), GridConfig(bits=4), AdaRoundConfig())
    names = [n for n, p in q.named_parameters() if p.requires_grad]
    assert names == ["V"]


def test_adaround_regularizer_schedule():
    cfg = AdaRoundConfig(reg_weight=0.5, beta_start=20, beta_end=2, warmup=0.2)
    w = _weight((4, 8))
    q = AdaRoundQuantizer(w, GridConfig(bits=4), cfg)
    assert q.regularization(0.0).item() == 0 and q.regularization(0.19).item() == 0
    assert q.beta(0.2) == pytest.approx(20) and q.beta(0.6) == pytest.approx(11)
    assert q.beta(1.0) == pytest.approx(2)
    h = q.h().detach()
    expected = 0.5 * (1 - (2 * h - 1).abs().pow(11)).sum()
    torch.testing.assert_close(q.regularization(0.6), expected)
    q.regularization(0.6).backward()
    assert q.V.grad is not None
    # a fully decided rounding costs nothing
    with torch.no_grad():
        q.V.copy_(torch.where(q.V > 0, 10.0, -10.0))
    assert q.regularization(0.9).item() == 0


def test_learn_s1_false_freezes_the_grid():
    w = _weight((4, 8))
    q = FlexRoundQuantizer(w, GridConfig(), FlexRoundConfig(learn_s1=False), False)
    names = {n for n, p in q.named_parameters() if p.requires_grad}
    assert names == {"log_S2", "log_s3"}
