"""NUPES power-grid weight quantizer (flexround_pl.quant.nupes)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from flexround_pl.quant import (
    GridConfig,
    NUPESConfig,
    NUPESQuantizer,
    QuantConfig,
    QuantConv2d,
    QuantLinear,
    learnable_parameters,
)
from flexround_pl.quant.nupes import _InversePower, _Power, inverse_power, power
from flexround_pl.quant.rtn import RoundToNearest

MODES = [("data_free", "additive"), ("data_driven", "additive"), ("data_driven", "flexround")]



def _laplace(shape, seed=0, scale=0.05):
    g = torch.Generator().manual_seed(seed)
    u = torch.rand(shape, generator=g) - 0.5
    return -scale * torch.sign(u) * torch.log1p(-2 * u.abs())


@pytest.mark.parametrize("mode,rounding", MODES)
@pytest.mark.parametrize(
    "granularity,symmetric,init",
    [("tensor", True, "lp"), ("channel", False, "lp"), ("group", True, "minmax"), ("channel", True, "minmax")],
)
def test_exponent_one_is_the_uniform_quantizer_bit_for_bit(mode, rounding, granularity, symmetric, init):
    w = _laplace((8, 32))
    grid = GridConfig(bits=3, granularity=granularity, group_size=16, symmetric=symmetric, init=init)
    rtn = RoundToNearest(w, grid)
    nupes = NUPESQuantizer(w, grid, NUPESConfig(mode=mode, rounding=rounding, exponent_min=1.0, exponent_max=1.0))
    assert nupes.exponent().item() == 1.0
    assert torch.equal(nupes.grid.log_scale, rtn.grid.log_scale)
    assert torch.equal(nupes.grid.zero_point, rtn.grid.zero_point)
    assert torch.equal(nupes.codes(w), rtn.codes(w))
    with torch.no_grad():
        assert torch.equal(nupes(w), rtn(w))


def _mse(q, w):
    with torch.no_grad():
        return (q(w) - w).pow(2).sum().item()


@pytest.mark.parametrize(
    "bits,dist,granularity",
    [(3, "laplace", "tensor"), (4, "laplace", "channel"), (3, "gaussian", "channel"), (4, "gaussian", "tensor")],
)
def test_data_free_beats_uniform_rtn_on_bell_shaped_weights(bits, dist, granularity):
    if dist == "laplace":
        w = _laplace((32, 128))
    else:
        w = 0.05 * torch.randn(32, 128, generator=torch.Generator().manual_seed(0))
    grid = GridConfig(bits=bits, granularity=granularity)  # RTN on the Lp-searched grid
    rtn = RoundToNearest(w, grid)
    nupes = NUPESQuantizer(w, grid, NUPESConfig(mode="data_free"))
    assert not list(nupes.parameters())  # nothing to learn
    a = nupes.exponent().item()
    assert 0.2 <= a < 1.0
    assert _mse(nupes, w) < (0.97 if dist == "gaussian" else 0.9) * _mse(rtn, w)
    errors = nupes.search_errors
    assert a == pytest.approx(min(errors, key=errors.get)) and errors[1.0] > min(errors.values())


def _reference_search(w, grid_cfg, cfg):
    """The data-free search written plainly (one candidate range at a time, out of place)."""
    from dataclasses import replace

    from flexround_pl.quant.grid import UniformGrid, fake_quant, group_view, reduce_dims
    from flexround_pl.quant.nupes import _candidates

    v = group_view(w.float(), grid_cfg)
    dims = reduce_dims(v, grid_cfg)
    helper = UniformGrid(w, replace(grid_cfg, init="minmax"))
    n = grid_cfg.lp_candidates
    alphas = [1.0] + (torch.linspace(1.0 / n, 1.0, n).flip(0)[1:].tolist() if grid_cfg.init == "lp" else [])

    def evaluate(a):
        t = power(v, a)
        lo, hi = t.amin(dim=dims, keepdim=True).clamp_max(0), t.amax(dim=dims, keepdim=True).clamp_min(0)
        best = None
        for alpha in alphas:
            log_step, zp = helper._step_and_zero(lo * alpha, hi * alpha)
            q = fake_quant(t, torch.exp(log_step), zp, helper.qmin, helper.qmax)
            err = (inverse_power(q, a) - v).abs().pow(grid_cfg.lp_norm).sum(dim=dims, keepdim=True)
            if best is None:
                best = [err, log_step, zp]
            else:
                better = err < best[0]
                best = [torch.where(better, x, b) for x, b in zip((err, log_step, zp), best)]
        return float(best[0].double().sum()), best[1], best[2]

    results = {a: evaluate(a) for a in _candidates(cfg.exponent_min, cfg.exponent_max, cfg.exponent_candidates)}
    best = min(results, key=lambda k: results[k][0])
    step = (cfg.exponent_max - cfg.exponent_min) / (cfg.exponent_candidates - 1)
    for a in _candidates(max(cfg.exponent_min, best - step), min(cfg.exponent_max, best + step), 9):
        results.setdefault(a, evaluate(a))
    best = min(results, key=lambda k: (results[k][0], -k))
    return best, results[best][1], results[best][2], {k: r[0] for k, r in sorted(results.items())}


@pytest.mark.parametrize(
    "shape,grid_kw",
    [
        ((12, 40), dict(bits=3, granularity="channel", symmetric=False)),
        ((12, 40), dict(bits=4, granularity="tensor", symmetric=True)),
        ((6, 4, 3, 3), dict(bits=4, granularity="channel", symmetric=True)),
        ((8, 64), dict(bits=4, granularity="group", group_size=16, symmetric=False, init="minmax")),
    ],
)
def test_data_free_search_matches_a_plain_reference_bit_for_bit(shape, grid_kw):
    """The batched, in-place search is an optimization only: same exponent and grid.

    Errors agree to float32 summation order (a batched sum over a 4-D conv
    weight reduces in another order than the plain one)."""
    from flexround_pl.quant.nupes import search_grid

    w = _laplace(shape, seed=3)
    w.view(-1)[:5] = 0.0
    grid_cfg = GridConfig(lp_candidates=30, **grid_kw)
    cfg = NUPESConfig(mode="data_free", exponent_candidates=5)
    a, log_scale, zero_point, errors = search_grid(w, grid_cfg, cfg)
    ra, rlog, rzp, rerrors = _reference_search(w, grid_cfg, cfg)
    assert a == ra < 1.0 and errors == pytest.approx(rerrors, rel=1e-6, abs=0)
    assert torch.equal(log_scale, rlog) and torch.equal(zero_point, rzp)


def _tricky_weight():
    w = _laplace((6, 40), seed=1)
    w[0] = 0.0  # an all-zero output channel
    w[1, :8] = torch.tensor([0.0, -0.0, 1e-30, -1e-40, 1e-38, -1e-12, 1e-8, 3e-7])
    return w


@pytest.mark.parametrize("rounding", ["additive", "flexround"])
@pytest.mark.parametrize("exponent", [0.2, 1.0, 1.8])
@pytest.mark.parametrize("granularity", ["tensor", "channel"])
def test_codes_in_range_and_finite_gradients_at_and_near_zero(rounding, exponent, granularity):
    w = _tricky_weight()
    grid = GridConfig(bits=3, granularity=granularity)
    cfg = NUPESConfig(mode="data_driven", rounding=rounding, exponent_min=exponent, exponent_max=exponent)
    q = NUPESQuantizer(w, grid, cfg)
    c = torch.randn_like(w)
    (c * q(w)).sum().backward()
    params = dict(q.named_parameters())
    assert "a" in params
    for name, p in params.items():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert params["a"].grad.abs() > 0
    codes = q.codes(w)
    assert codes.min() >= q.qmin and codes.max() <= q.qmax
    assert torch.isfinite(q(w)).all() and (q(w)[0] == 0).all()
    # push the rounding parameters hard: the codes must stay in range
    with torch.no_grad():
        for name, p in params.items():
            if name != "a":
                p.add_(torch.randn_like(p) * 5)
    codes = q.codes(w)
    assert codes.min() >= q.qmin and codes.max() <= q.qmax
    w_hat = q(w)
    assert torch.isfinite(w_hat).all()
    (c * w_hat).sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in q.parameters())


def test_an_all_zero_weight_is_harmless():
    w = torch.zeros(4, 8)
    q = NUPESQuantizer(w, GridConfig(bits=4), NUPESConfig())
    out = q(w)
    out.sum().backward()
    assert (out == 0).all() and all(torch.isfinite(p.grad).all() for p in q.parameters())


def test_power_gradients_match_autograd_away_from_zero_and_are_bounded_near_it():
    torch.manual_seed(0)
    x = (torch.rand(200, dtype=torch.float64) + 0.05) * torch.sign(torch.randn(200, dtype=torch.float64))
    for a0 in (0.3, 0.8, 1.4):
        a = torch.tensor(a0, dtype=torch.float64, requires_grad=True)
        c = torch.randn_like(x)
        (c * _Power.apply(x, a)).sum().backward()
        ref_a = a.detach().clone().requires_grad_()
        (c * torch.sign(x) * x.abs().pow(ref_a)).sum().backward()
        assert a.grad.item() == pytest.approx(ref_a.grad.item(), rel=1e-9)

        u = x.clone().requires_grad_()
        b = torch.tensor(a0, dtype=torch.float64, requires_grad=True)
        floor = torch.tensor(1e-3, dtype=torch.float64)
        (c * _InversePower.apply(u, b, floor)).sum().backward()
        u_ref = x.clone().requires_grad_()
        b_ref = b.detach().clone().requires_grad_()
        (c * torch.sign(u_ref) * u_ref.abs().pow(1 / b_ref)).sum().backward()
        torch.testing.assert_close(u.grad, u_ref.grad)
        assert b.grad.item() == pytest.approx(b_ref.grad.item(), rel=1e-9)

    # |x^a log x| <= 1 / (e a) on (0, 1), exactly 0 at 0
    tiny = torch.tensor([0.0, 1e-45, 1e-30, 1e-12, 1e-3])
    a = torch.tensor(0.2, requires_grad=True)
    grads = [torch.autograd.grad(_Power.apply(t.reshape(1), a).sum(), a)[0].item() for t in tiny]
    assert grads[0] == 0.0 and all(abs(g) <= 1 / (2.718281828 * 0.2) + 1e-6 for g in grads)


def test_exponent_is_projected_into_its_range():
    w = _laplace((8, 32))
    q = NUPESQuantizer(w, GridConfig(bits=3), NUPESConfig(exponent_min=0.4, exponent_max=0.9))
    with torch.no_grad():
        q.a.fill_(5.0)
    q(w)
    assert q.a.item() == pytest.approx(0.9) and q.exponent().item() == pytest.approx(0.9)
    with torch.no_grad():
        q.a.fill_(-1.0)
    assert q.exponent().item() == pytest.approx(0.4)


def _cfg(**nupes):
    return QuantConfig(method="nupes", weight=GridConfig(bits=3, granularity="channel"), nupes=NUPESConfig(**nupes))


@pytest.mark.parametrize("mode,rounding", MODES)
@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_harden_dequantizes_through_the_inverse_power_and_state_dict_is_complete(mode, rounding, kind):
    torch.manual_seed(0)
    if kind == "linear":
        fp, x, cls = nn.Linear(32, 8), torch.randn(4, 32), QuantLinear
    else:
        fp, x, cls = nn.Conv2d(4, 6, 3, padding=1), torch.randn(2, 4, 6, 6), QuantConv2d
    with torch.no_grad():
        fp.weight.copy_(_laplace(tuple(fp.weight.shape)))
    layer = cls.from_float(fp, _cfg(mode=mode, rounding=rounding))
    if learnable_parameters(layer):  # move away from the initialization
        opt = torch.optim.Adam(learnable_parameters(layer), lr=0.05)
        for _ in range(3):
            opt.zero_grad()
            (layer(x) - fp(x)).pow(2).sum().backward()
            opt.step()
    with torch.no_grad():
        soft = layer(x)
        soft_w = layer.quantized_weight()
    a = layer.quantizer.exponent().item()
    assert a != 1.0
    layer.harden()
    assert layer.exponent.item() == a
    state = layer.state_dict()
    assert set(state) == {"bias", "codes", "scale", "zero_point", "exponent"}
    u = layer.scale * (layer.codes.float().reshape(layer.grid_shape) - layer.zero_point)
    torch.testing.assert_close(layer.dequantize(), torch.sign(u) * u.abs().pow(1 / layer.exponent), rtol=0, atol=0)
    assert torch.equal(layer.dequantize(), soft_w)
    with torch.no_grad():
        assert torch.equal(layer(x), soft)
    fresh = cls.from_float(fp, _cfg(mode=mode, rounding=rounding))
    fresh.load_state_dict(state)
    assert fresh.hardened and fresh.exponent.item() == a
    with torch.no_grad():
        assert torch.equal(fresh(x), soft)


def test_data_driven_training_beats_the_data_free_grid_on_a_layer():
    torch.manual_seed(0)
    fp = nn.Linear(64, 32)
    with torch.no_grad():
        fp.weight.copy_(_laplace((32, 64)))
    x = torch.randn(256, 8) @ torch.randn(8, 64) / 8**0.5 + 0.1 * torch.randn(256, 64)
    with torch.no_grad():
        y = fp(x)
    free = QuantLinear.from_float(fp, _cfg(mode="data_free"))
    for rounding in ("additive", "flexround"):
        layer = QuantLinear.from_float(fp, _cfg(mode="data_driven", rounding=rounding))
        a0 = layer.quantizer.exponent().item()
        opt = torch.optim.Adam(learnable_parameters(layer), lr=3e-3)
        for _ in range(60):
            opt.zero_grad()
            F.mse_loss(layer(x), y).backward()
            opt.step()
        with torch.no_grad():
            assert F.mse_loss(layer(x), y) < 0.8 * F.mse_loss(free(x), y), rounding
        assert layer.quantizer.exponent().item() != a0  # the exponent is learned


def test_power_and_inverse_power_on_hand_computed_values():
    """``sign(x)|x|^a`` and its inverse ``sign(u)|u|^(1/a)``: sign kept, zero fixed, the exponent's direction."""
    x = torch.tensor([-8.0, -1.0, 0.0, 0.25, 27.0])
    torch.testing.assert_close(power(x, 1 / 3), torch.tensor([-2.0, -1.0, 0.0, 0.25 ** (1 / 3), 3.0]))
    torch.testing.assert_close(inverse_power(torch.tensor([-2.0, 0.0, 0.5, 3.0]), 0.5),
                               torch.tensor([-4.0, 0.0, 0.25, 9.0]))
    assert torch.equal(power(x, 1.0), x) and torch.equal(inverse_power(x, 1.0), x)
    torch.testing.assert_close(inverse_power(power(x, 0.37), 0.37), x)


def test_config_validation():
    with pytest.raises(ValueError, match="mode"):
        NUPESConfig(mode="free")
    with pytest.raises(ValueError, match="rounding"):
        NUPESConfig(rounding="adaround")
    with pytest.raises(ValueError, match="exponent"):
        NUPESConfig(exponent_min=0.0)
    with pytest.raises(ValueError, match="exponent"):
        NUPESConfig(exponent_min=0.9, exponent_max=0.5)


@pytest.mark.parametrize("mode,rounding", MODES)
def test_cli_nupes(tmp_path, tiny_bert_dir, mode, rounding, write_config):
    import json

    from conftest import hf_classifier_metrics

    from flexround_pl.cli import main

    cfg = write_config(tmp_path, tiny_bert_dir, nupes={"mode": mode, "rounding": rounding})
    assert main(["fit", "--config", cfg, "--model.quant.method", "nupes"]) == 0
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["method"] == "nupes" and results["w_bits"] == 3 and results["a_bits"] is None
    ref = hf_classifier_metrics((tiny_bert_dir, str(tmp_path / "run" / "export")), str(tmp_path / "eval.csv"), 16)
    assert results["quantized"]["accuracy"] == pytest.approx(ref["accuracy"], abs=1.01 / ref["n"])
    assert results["quantized"]["fp_agreement"] == pytest.approx(ref["fp_agreement"], abs=1.01 / ref["n"])
    for block in results["blocks"]:
        assert block["quantized_layers"] == 6
        if mode == "data_free":  # the searched grid, nothing trained
            assert block["steps"] == 0
            assert block["loss_end"] == pytest.approx(block["loss_start"], rel=1e-5)
        else:
            assert block["steps"] == 30
            assert block["loss_end"] < block["loss_start"], block
