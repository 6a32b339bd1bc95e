"""LSQ activation quantizers (flexround_pl.quant.activation): gradient, calibration, layers."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from flexround_pl.quant import (
    ActivationConfig,
    ActivationQuantizer,
    GridConfig,
    QuantConfig,
    QuantLinear,
    activation_parameters,
    calibrate_activations,
    quantize_modules,
)



def _calibrated(x: torch.Tensor, bits=4, **cfg) -> ActivationQuantizer:
    q = ActivationQuantizer(bits, ActivationConfig(bits=bits, **cfg))
    calibrate_activations(q, lambda: q(x))
    return q


def _stats(q):
    return float(q.scale.detach()), float(q.zero_point), float(q.qmin), float(q.qmax)


def test_lsq_step_size_gradient_matches_finite_differences():
    """Autograd d loss / d s (STE) == LSQ's formula == central differences of the STE surrogate.

    The surrogate freezes the rounding at s0 and keeps its first-order term,
    ``round(x/s) ~ round(x/s0) + (x/s - x/s0)`` (what the straight-through
    estimator differentiates) for inputs whose code is inside the closed range;
    clipped inputs keep their end code. Its true derivative at s0 is
    the STE gradient, so a finite difference on it checks the implementation
    independently of autograd. LSQ's gradient scale g multiplies the result.
    """
    torch.manual_seed(0)
    x = torch.randn(4, 8, 16, dtype=torch.float64).float() * 1.5 + 0.3
    c = torch.randn_like(x)  # loss = sum(c * x_hat)
    q = _calibrated(x, bits=4, init="minmax")
    with torch.no_grad():
        q.scale.mul_(0.7)  # make sure some inputs clip on both sides
    s0, zp, qmin, qmax = _stats(q)

    x_hat = q(x)
    (c * x_hat).sum().backward()
    autograd = q.scale.grad.item()
    g = 1.0 / math.sqrt(x.numel() * qmax)

    xd, cd = x.double(), c.double()
    v = xd / s0
    code = torch.round(v) + zp
    inside = (code >= qmin) & (code <= qmax)
    below = code < qmin
    formula = torch.where(inside, torch.round(v) - v, torch.where(below, qmin - zp, qmax - zp))
    assert inside.any() and below.any() and (code > qmax).any()
    assert ((code == qmin) | (code == qmax)).any()  # codes exactly on the range's ends count as inside
    analytic = g * float((cd * formula).sum())

    q0 = torch.round(xd / s0) + zp

    def surrogate(s: float) -> float:
        # inputs whose code is in the (closed) range follow the linearized rounding, the others stay clipped
        codes = torch.where(inside, q0 + (xd / s - xd / s0), torch.clamp(q0, qmin, qmax))
        return float((cd * s * (codes - zp)).sum())

    h = 1e-6 * s0
    fd = g * (surrogate(s0 + h) - surrogate(s0 - h)) / (2 * h)
    assert autograd == pytest.approx(analytic, rel=1e-4, abs=1e-6)
    assert autograd == pytest.approx(fd, rel=1e-4, abs=1e-6)
    # and the straight-through gradient is not the (zero-almost-everywhere) true one
    assert abs(analytic) > 1e-3


def test_lsq_input_gradient_is_straight_through_inside_the_range_only():
    x = torch.linspace(-3, 3, 101, requires_grad=True)
    q = _calibrated(torch.linspace(-1, 1, 50), bits=4, init="minmax")
    q(x).sum().backward()
    s, zp, qmin, qmax = _stats(q)
    codes = torch.round(x.detach() / s) + zp
    expected = ((codes >= qmin) & (codes <= qmax)).float()
    torch.testing.assert_close(x.grad, expected)


def test_minmax_init_asymmetric_and_symmetric_unsigned_signed():
    torch.manual_seed(0)
    relu = torch.rand(1000) * 3.0  # >= 0
    s, zp, qmin, qmax = _stats(_calibrated(relu, bits=8, init="minmax"))
    assert (zp, qmin, qmax) == (0.0, 0.0, 255.0) and s == pytest.approx(relu.max().item() / 255)
    s, zp, qmin, qmax = _stats(_calibrated(relu, bits=4, init="minmax", symmetric=True))
    assert (zp, qmin, qmax) == (0.0, 0.0, 15.0)  # unsigned: all calibration inputs >= 0
    signed = torch.randn(1000)
    s, zp, qmin, qmax = _stats(_calibrated(signed, bits=4, init="minmax", symmetric=True))
    assert (zp, qmin, qmax) == (0.0, -8.0, 7.0)
    s, zp, qmin, qmax = _stats(_calibrated(signed, bits=4, init="minmax"))
    lo, hi = signed.min().item(), signed.max().item()
    assert (qmin, qmax) == (0.0, 15.0) and s == pytest.approx((hi - lo) / 15) and zp == round(-lo / s)


@pytest.mark.parametrize("symmetric", [False, True])
def test_mse_init_clips_outliers_and_beats_minmax(symmetric):
    torch.manual_seed(0)
    x = torch.distributions.Laplace(0.0, 1.0).sample((4096,))
    x[0] = 40.0  # one outlier
    mse = _calibrated(x, bits=4, init="mse", symmetric=symmetric)
    mm = _calibrated(x, bits=4, init="minmax", symmetric=symmetric)
    assert float(mse.scale.detach()) < float(mm.scale.detach())
    with torch.no_grad():
        assert (mse(x) - x).pow(2).sum() < (mm(x) - x).pow(2).sum()


def test_calibration_over_several_batches_uses_all_of_them():
    q = ActivationQuantizer(8, ActivationConfig(bits=8, init="minmax"))
    batches = [torch.tensor([0.0, 1.0]), torch.tensor([-2.0, 0.5]), torch.tensor([3.0])]
    calibrate_activations(q, lambda: [q(b) for b in batches])
    s, zp, _, _ = _stats(q)
    assert s == pytest.approx(5.0 / 255) and zp == round(2.0 / s)


def test_lsq_runs_in_fp32_under_autocast():
    """Under bf16 autocast the quantizer must divide, round and clamp in fp32: the output equals the
    plain fp32 formula written here, and differs from the same formula evaluated in bf16."""
    torch.manual_seed(0)
    x = torch.randn(64, 32)
    q = _calibrated(x, bits=8)
    xb = x.bfloat16()
    s, z, qmin, qmax = (float(v) for v in _stats(q))

    def plain(values: torch.Tensor, step, zero) -> torch.Tensor:  # s * (clamp(round(x / s) + z) - z)
        return step * (torch.clamp(torch.round(values / step) + zero, qmin, qmax) - zero)

    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = q(xb)
    assert out.dtype == torch.bfloat16
    expected = plain(xb.float(), torch.tensor(s), torch.tensor(z)).to(torch.bfloat16)
    assert torch.equal(out, expected)
    in_bf16 = plain(xb, torch.tensor(s, dtype=torch.bfloat16), torch.tensor(z, dtype=torch.bfloat16))
    assert not torch.equal(out, in_bf16)  # the check can tell fp32 from bf16 arithmetic
    out.float().sum().backward()
    assert q.scale.dtype == torch.float32 and q.scale.grad.dtype == torch.float32


def test_uncalibrated_quantizer_refuses_to_run():
    q = ActivationQuantizer(8, ActivationConfig(bits=8))
    with pytest.raises(RuntimeError, match="calibration"):
        q(torch.randn(3))


def _act_cfg(bits=8, method="flexround"):
    return QuantConfig(method=method, weight=GridConfig(bits=4), activation=ActivationConfig(bits=bits))


def test_layers_get_input_quantizers_eight_bit_layers_too_and_none_by_default():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    quantize_modules(net, _act_cfg(bits=4), eight_bit=[r"^2$"])
    assert net[0].act_quant.bits == 4 and net[2].act_quant.bits == 8
    plain = nn.Sequential(nn.Linear(8, 8))
    quantize_modules(plain, QuantConfig())
    assert plain[0].act_quant is None
    x = torch.randn(16, 8)
    assert calibrate_activations(net, lambda: net(x)) == 2
    assert len(activation_parameters(net)) == 2
    # the ReLU output feeding layer 2 is unsigned: the whole asymmetric range, zero point 0
    assert float(net[2].act_quant.zero_point) == 0.0


def test_quantized_input_reaches_the_layer_and_hardened_state_dict_is_complete():
    torch.manual_seed(0)
    fp = nn.Linear(16, 8)
    layer = QuantLinear.from_float(fp, _act_cfg(bits=4))
    x = torch.randn(32, 16)
    calibrate_activations(layer, lambda: layer(x))
    with torch.no_grad():
        expected = nn.functional.linear(layer.act_quant(x), layer.quantized_weight(), layer.bias)
        torch.testing.assert_close(layer(x), expected, rtol=0, atol=0)
    layer.harden()
    assert not layer.act_quant.scale.requires_grad
    state = layer.state_dict()
    assert {"act_quant.scale", "act_quant.zero_point", "act_quant.qmin", "act_quant.qmax",
            "act_quant.initialized", "codes", "scale", "zero_point"} <= set(state)
    fresh = QuantLinear.from_float(nn.Linear(16, 8), _act_cfg(bits=4))
    fresh.load_state_dict(state)
    assert fresh.hardened
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), layer(x), rtol=0, atol=0)


# ---- per-token dynamic quantization (granularity: token) ----------------------


def _token_quantizer(bits=8, feature_dim=-1, **cfg) -> ActivationQuantizer:
    return ActivationQuantizer(bits, ActivationConfig(bits=bits, granularity="token", **cfg), feature_dim=feature_dim)


@pytest.mark.parametrize("symmetric", [False, True])
def test_per_token_grid_follows_each_token_so_an_outlier_token_costs_the_others_nothing(symmetric):
    torch.manual_seed(0)
    x = torch.randn(2, 6, 32)
    x[0, 0, 3] = 2000.0  # one massive activation (as at token 0 of LLMs)
    q = _token_quantizer(bits=8, symmetric=symmetric)
    err = (q(x) - x).abs()
    levels = 2**8 - 1 if not symmetric else 2**7 - 1
    lo, hi = x.amin(-1, keepdim=True).clamp_max(0), x.amax(-1, keepdim=True).clamp_min(0)
    step = (hi - lo) / levels if not symmetric else torch.maximum(hi, -lo * levels / 2**7) / levels
    assert bool((err <= step / 2 + 1e-6).all())  # every element rounds to its token's grid
    others = torch.ones(2, 6, dtype=torch.bool)
    others[0, 0] = False
    per_tensor = _calibrated(x, bits=8, init="minmax", symmetric=symmetric)
    with torch.no_grad():
        assert float(err[others].max()) < 0.05 * float((per_tensor(x) - x).abs()[others].max())


def test_per_token_of_a_conv_input_is_per_pixel_over_channels():
    torch.manual_seed(0)
    x = torch.randn(2, 8, 5, 5)
    x[:, :, 0, 0] *= 100  # one loud pixel
    q = _token_quantizer(bits=4, feature_dim=1)
    step = (x.amax(1, keepdim=True).clamp_min(0) - x.amin(1, keepdim=True).clamp_max(0)) / 15
    assert bool(((q(x) - x).abs() <= step / 2 + 1e-5).all())


def test_per_token_needs_no_calibration_learns_nothing_and_passes_gradients_straight_through():
    layer = QuantLinear(nn.Linear(16, 8), QuantConfig(weight=GridConfig(bits=4), activation=ActivationConfig(bits=8, granularity="token")))
    assert activation_parameters(layer) == []
    assert calibrate_activations(layer, lambda: layer(torch.randn(3, 16))) == 0
    x = torch.randn(3, 16, requires_grad=True)
    y = layer.act_quant(x)
    y.sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))
    assert "per-token dynamic" in repr(layer.act_quant)


def test_per_token_qdrop_p0_is_fp_and_p1_is_fully_quantized():
    torch.manual_seed(0)
    x = torch.randn(4, 16)
    q = _token_quantizer(bits=4)
    full = q(x)
    assert not torch.equal(full, x)
    q.drop_p = 0.0
    assert torch.equal(q(x), x)
    q.drop_p = 1.0
    assert torch.equal(q(x), full)
    q.drop_p = 0.5
    mixed = q(x)
    assert bool(((mixed == full) | (mixed == x)).all()) and not torch.equal(mixed, full)


def test_activation_granularity_is_validated():
    with pytest.raises(ValueError, match="activation.granularity"):
        ActivationConfig(bits=8, granularity="channel")
