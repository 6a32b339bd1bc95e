"""``weight.init: output``: the grid searched on the layer's output error ``e^T H e`` (issue 15)."""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from torch import nn

from flexround_pl.quant import GridConfig, QuantConfig, UniformGrid, quantize_modules, quantized_layers
from flexround_pl.reconstruct.cache import CalibrationCache
from flexround_pl.reconstruct.config import ReconstructionConfig
from flexround_pl.reconstruct.data import holdout_split

VOCAB = 48  # >= the tiny tokenizer's 45 ids


def _tiny_llama(seed: int = 0) -> nn.Module:
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, bos_token_id=1, eos_token_id=1, use_cache=False,
    )
    torch.manual_seed(seed)
    return transformers.AutoModelForCausalLM.from_config(config).eval()


def _psd(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n, 2 * n, generator=g, dtype=torch.float64) * torch.rand(n, 1, generator=g, dtype=torch.float64)
    return a @ a.t() / (2 * n)


# ---------------------------------------------------------------------- the grid against a brute force


def _reference_grid(w: torch.Tensor, h: torch.Tensor, cfg: GridConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Step and zero point of every row / group minimizing ``(q(w) - w) @ H @ (q(w) - w)``, float64, one loop
    per unit and candidate: ``alpha = 1`` first, then ``(n-1)/n ... 1/n``; the first minimum wins.

    ``cfg.search_stride = s > 1``: that minimum over ``k = n, n - s, n - 2s, ...`` (``alpha = k / n``) first,
    then over the window ``k0 - s + 1 .. k0 + s - 1`` around its ``k0``, widest first again."""
    w, h = w.double(), h.double()
    qmin, qmax = cfg.qmin, cfg.qmax
    n = cfg.lp_candidates
    c_out, c_in = w.shape
    if cfg.granularity == "tensor":
        units = [(slice(None), slice(None))]
    elif cfg.granularity == "channel":
        units = [(slice(r, r + 1), slice(None)) for r in range(c_out)]
    else:
        gs = cfg.group_size
        units = [(slice(r, r + 1), slice(g * gs, (g + 1) * gs)) for r in range(c_out) for g in range(c_in // gs)]
    steps, zps = [], []
    for rows, cols in units:
        block = w[rows, cols]
        hb = h[cols, cols]  # group: its diagonal block of H
        lo0, hi0 = min(block.min().item(), 0.0), max(block.max().item(), 0.0)

        def score(k: int) -> tuple[float, float, float]:
            alpha = 1.0 if k == n else k / n
            lo, hi = lo0 * alpha, hi0 * alpha
            if cfg.symmetric:
                step, zp = max(hi / qmax, lo / qmin), 0.0
            else:
                step = (hi - lo) / (qmax - qmin)
                zp = min(max(round(-lo / step), qmin), qmax)
            err = 0.0
            for r in range(block.shape[0]):
                e = step * (torch.clamp(torch.round(block[r] / step) + zp, qmin, qmax) - zp) - block[r]
                err += float(e @ hb @ e)
            return err, step, zp

        def first_minimum(ks: list[int]) -> tuple[int, tuple[float, float, float]]:
            scored = [(k, score(k)) for k in ks]  # widest range first
            return min(scored, key=lambda ks_: ks_[1][0])  # min() keeps the first of equal errors

        s_ = cfg.search_stride
        k0, best = first_minimum(list(range(n, 0, -s_)))
        if s_ > 1:
            k0, best = first_minimum(list(range(min(n, k0 + s_ - 1), max(1, k0 - s_ + 1) - 1, -1)))
        steps.append(best[1])
        zps.append(best[2])
    shape = {"tensor": (1, 1), "channel": (c_out, 1), "group": (c_out, c_in // max(cfg.group_size, 1), 1)}
    return (torch.tensor(steps, dtype=torch.float64).reshape(shape[cfg.granularity]),
            torch.tensor(zps, dtype=torch.float64).reshape(shape[cfg.granularity]))


@pytest.mark.parametrize("granularity", ["tensor", "channel", "group"])
@pytest.mark.parametrize("symmetric", [True, False])
def test_the_output_grid_is_the_brute_force_minimum_of_e_h_e(granularity, symmetric):
    torch.manual_seed(1)
    w = torch.randn(6, 16) * torch.linspace(0.2, 2.0, 16)  # unequal columns: H's weighting matters
    h = _psd(16, seed=2)
    cfg = GridConfig(bits=3, symmetric=symmetric, granularity=granularity, group_size=4, init="output",
                     lp_candidates=20, search_stride=1)
    grid = UniformGrid(w, cfg, hessian=h.float())
    step, zp = _reference_grid(w, h, cfg)
    torch.testing.assert_close(grid.step().double(), step, rtol=1e-5, atol=0)
    assert torch.equal(grid.zero_point.double(), zp)
    minmax = UniformGrid(w, GridConfig(bits=3, symmetric=symmetric, granularity=granularity, group_size=4,
                                       init="minmax"))
    assert not torch.equal(grid.log_scale, minmax.log_scale)  # the search moved something


@pytest.mark.parametrize("granularity", ["tensor", "channel", "group"])
@pytest.mark.parametrize("symmetric", [True, False])
def test_a_search_stride_scores_every_sth_candidate_then_each_units_neighbours(granularity, symmetric, monkeypatch):
    torch.manual_seed(5)
    w = torch.randn(8, 16) * torch.linspace(0.2, 2.0, 16)
    h = _psd(16, seed=6)
    common = dict(bits=3, symmetric=symmetric, granularity=granularity, group_size=4, init="output", lp_candidates=30)
    scored = []
    score = UniformGrid._output_error
    monkeypatch.setattr(UniformGrid, "_output_error", lambda self, *a: scored.append(1) or score(self, *a))
    strided = UniformGrid(w, GridConfig(search_stride=4, **common), hessian=h.float())
    assert len(scored) == 8 + 2 * 3  # k = 30, 26, ..., 2, then 3 neighbours on either side: 14 of 30
    step, zp = _reference_grid(w, h, GridConfig(search_stride=4, **common))
    torch.testing.assert_close(strided.step().double(), step, rtol=1e-5, atol=0)
    assert torch.equal(strided.zero_point.double(), zp)


@pytest.mark.parametrize("granularity", ["tensor", "channel", "group"])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("shape", [(12, 32), (6, 4, 2, 2)])
def test_with_an_identity_hessian_the_output_grid_is_the_l2_grid(granularity, symmetric, shape):
    torch.manual_seed(3)
    w = torch.randn(*shape)
    c_in = w[0].numel()
    common = dict(bits=4, symmetric=symmetric, granularity=granularity, group_size=8)
    output = UniformGrid(w, GridConfig(init="output", search_stride=1, **common), hessian=torch.eye(c_in))
    l2 = UniformGrid(w, GridConfig(init="lp", lp_norm=2.0, **common))
    assert torch.equal(output.log_scale, l2.log_scale) and torch.equal(output.zero_point, l2.zero_point)


def test_without_a_hessian_the_output_grid_is_lp_and_a_wrong_shape_is_refused():
    torch.manual_seed(4)
    w = torch.randn(8, 16)
    lp = UniformGrid(w, GridConfig(init="lp", granularity="channel"))
    fallback = UniformGrid(w, GridConfig(init="output", granularity="channel"))
    assert torch.equal(fallback.log_scale, lp.log_scale)
    with pytest.raises(ValueError, match=r"must be \[16, 16\]"):
        UniformGrid(w, GridConfig(init="output"), hessian=torch.eye(8))
    # the other inits never read a Hessian
    assert torch.equal(UniformGrid(w, GridConfig(init="lp", granularity="channel"), hessian=torch.eye(8)).log_scale,
                       lp.log_scale)


# ---------------------------------------------------------------------- a real block


def _block_inputs(model: nn.Module, block: nn.Module, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every Linear input of ``block`` (by local name) while ``model`` runs ``ids``: ``[tokens, C_in]``."""
    xs: dict[str, list[torch.Tensor]] = {}
    handles = [
        m.register_forward_hook(lambda mod, args, out, n=n: xs.setdefault(n, []).append(args[0].reshape(-1, args[0].shape[-1])))
        for n, m in block.named_modules() if isinstance(m, nn.Linear)
    ]
    with torch.no_grad():
        model(input_ids=ids)
    for hd in handles:
        hd.remove()
    return {n: torch.cat(v) for n, v in xs.items()}


@pytest.mark.parametrize("bits", [3, 4])
def test_on_a_llama_block_every_layer_output_error_is_at_most_min_max_and_lp(bits, tiny_tokenizer, make_text):
    model = _tiny_llama()
    block = model.model.layers[0]
    ids = tiny_tokenizer()(make_text(40, 5), return_tensors="pt")["input_ids"][:, :256].reshape(4, 64)
    xs = _block_inputs(model, block, ids)
    assert len(xs) == 7
    hessians = {n: 2 * x.t() @ x / x.shape[0] for n, x in xs.items()}

    def layer_errors(init: str) -> dict[str, float]:
        copy = _tiny_llama().model.layers[0]
        cfg = QuantConfig(method="rtn", weight=GridConfig(bits=bits, granularity="channel", init=init))
        quantize_modules(copy, cfg, hessians=hessians if init == "output" else None)
        errors = {}
        for n, layer in quantized_layers(copy):
            with torch.no_grad():
                errors[n] = float((xs[n] @ layer.quantized_weight().t() - xs[n] @ layer.weight.t()).pow(2).sum())
        return errors

    output, minmax, lp = layer_errors("output"), layer_errors("minmax"), layer_errors("lp")
    assert set(output) == set(xs)
    for n in output:
        assert output[n] <= minmax[n] * (1 + 1e-5) and output[n] <= lp[n] * (1 + 1e-5), (n, output[n], minmax[n], lp[n])
    assert sum(output.values()) < 0.99 * sum(minmax.values())


class _TwoLayerBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc, self.head, self.act = nn.Linear(4, 6), nn.Linear(6, 3), nn.ReLU()

    def forward(self, x, attention_mask=None):
        return self.head(self.act(self.fc(x)))


def test_grid_init_hessians_use_the_training_samples_of_the_fp_block_only():
    from flexround_pl.reconstruct.gptq_hessian import grid_init_hessians

    torch.manual_seed(0)
    inputs, block = torch.randn(8, 3, 4), _TwoLayerBlock()
    recon = ReconstructionConfig(holdout=0.25, eval_batch_size=3)
    quant = QuantConfig(weight=GridConfig(init="output"))
    h = grid_init_hessians(block, CalibrationCache(inputs, ((), {}), []), torch.device("cpu"), quant, recon, keep_fp=[r"head$"], prefix="b")
    assert set(h) == {"fc"}  # the FP layer gets none
    train, held = holdout_split(8, 0.25, recon.seed)
    assert len(held) == 2
    rows = inputs[train].reshape(-1, 4)
    torch.testing.assert_close(h["fc"], 2 * rows.t() @ rows / rows.shape[0])
    assert grid_init_hessians(block, CalibrationCache(inputs, ((), {}), []), torch.device("cpu"), QuantConfig(), recon) == {}


def test_fp_input_hessians_come_with_the_targets_from_the_fp_training_samples():
    """``weight.output_inputs: fp``: the targets pass sums each layer's ``X^T X`` on the FP inputs
    (not the quantized ones), training samples only, padding left out; the targets do not change."""
    from flexround_pl.reconstruct.gptq_hessian import targets_and_fp_hessians

    torch.manual_seed(0)
    inputs, block = torch.randn(8, 3, 4), _TwoLayerBlock()
    mask = torch.ones(8, 3, dtype=torch.long)
    mask[::3, 2] = 0
    recon = ReconstructionConfig(holdout=0.25, eval_batch_size=3)
    cache = CalibrationCache(inputs, ((), {}), [], mask)
    cache.q_inputs = inputs + 1.0  # the quantized network's inputs: not these
    h = targets_and_fp_hessians(block, ["fc", "head"], cache, torch.device("cpu"), recon)
    train, _ = holdout_split(8, 0.25, recon.seed)
    x = inputs[train][mask[train].bool()]  # [rows, 4]
    torch.testing.assert_close(h["fc"], 2 * x.t() @ x / x.shape[0])
    hidden = torch.relu(block.fc(x)).detach()
    torch.testing.assert_close(h["head"], 2 * hidden.t() @ hidden / hidden.shape[0])
    with torch.no_grad():
        torch.testing.assert_close(cache.targets, block(inputs), rtol=0, atol=0)
    assert not block._forward_hooks and not block.fc._forward_hooks  # hooks removed


# ---------------------------------------------------------------------- end to end


def _save_tiny_llama(directory, tokenizer) -> str:
    path = str(directory / "llama")
    _tiny_llama().save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.mark.parametrize("method", ["flexround", "rtn", "gptq"])
def test_cli_fit_with_the_output_grid(method, tmp_path, tiny_tokenizer, write_lm_config, monkeypatch, capfd):
    from flexround_pl.cli import main
    from flexround_pl.reconstruct import driver, gptq_hessian

    given: list[set[str]] = []  # the layers of each block that got a Hessian for their grid
    computed: list[int] = []  # calls of layer_hessians: GPTQ reuses the grid's Hessians
    real_init, real_layer = driver.grid_init_hessians, gptq_hessian.layer_hessians

    def spy_init(*args, **kwargs):
        h = real_init(*args, **kwargs)
        given.append(set(h))
        return h

    def spy_layer(*args, **kwargs):
        computed.append(1)
        return real_layer(*args, **kwargs)

    monkeypatch.setattr(driver, "grid_init_hessians", spy_init)
    monkeypatch.setattr(gptq_hessian, "layer_hessians", spy_layer)
    model_dir = _save_tiny_llama(tmp_path, tiny_tokenizer())
    config = write_lm_config(tmp_path, model_dir, max_steps=10)
    assert main(["fit", "--config", config, "--export", "false", "--model.quant.method", method,
                 "--model.quant.weight.init", "output"]) == 0
    out = capfd.readouterr().out

    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["grid_init"] == "output" and "rtn" not in results
    assert len(results["blocks"]) == 2 and all(b["quantized_layers"] == 7 for b in results["blocks"])
    assert len(given) == 2 and all(len(names) == 7 for names in given)
    assert len(computed) == 2  # once per block, GPTQ included
    if method == "flexround":
        assert "RTN baseline not evaluated: the grid init is output-aware" in out
        for block in results["blocks"]:
            assert block["loss_end"] < block["loss_start"], block


def test_nupes_refuses_the_output_grid_in_one_line(tmp_path, tiny_bert_dir, write_config, refused):
    from flexround_pl.cli import main

    config = write_config(tmp_path, tiny_bert_dir)
    assert main(["fit", "--config", config, "--model.quant.method", "nupes", "--model.quant.weight.init", "output"]) == 2
    refused("method 'nupes' searches a grid of its own on the weight error: use weight.init lp or minmax")
    assert not (tmp_path / "run").exists()
    with pytest.raises(ValueError, match="weight.init output"):
        QuantConfig(method="nupes", weight=GridConfig(init="output"))
    with pytest.raises(ValueError, match="'minmax', 'lp' or 'output'"):
        GridConfig(init="hessian")
    with pytest.raises(ValueError, match="method 'nupes' searches a grid of its own"):
        QuantConfig(method="nupes", weight=GridConfig(search_stride=4))  # it would be ignored: refused instead


def test_cli_output_grid_from_fp_inputs_needs_no_pass_of_its_own(tmp_path, tiny_tokenizer, write_lm_config, monkeypatch):
    """Block 0's FP and quantized inputs are the same, so its grid Hessians are too, bit for bit; after
    it they differ. With ``fp`` no Hessian pass runs (``grid_init_hessians`` is not called)."""
    from flexround_pl.cli import main
    from flexround_pl.reconstruct import driver

    seen: dict[str, list[dict]] = {"quantized": [], "fp": []}
    real_init, real_fp = driver.grid_init_hessians, driver.targets_and_fp_hessians
    monkeypatch.setattr(driver, "grid_init_hessians",
                        lambda *a, **k: seen["quantized"].append(real_init(*a, **k)) or seen["quantized"][-1])
    monkeypatch.setattr(driver, "targets_and_fp_hessians",
                        lambda *a, **k: seen["fp"].append(real_fp(*a, **k)) or seen["fp"][-1])
    model_dir = _save_tiny_llama(tmp_path, tiny_tokenizer())
    losses = {}
    for inputs in ("quantized", "fp"):
        (tmp_path / inputs).mkdir()
        config = write_lm_config(tmp_path / inputs, model_dir, max_steps=5)
        assert main(["fit", "--config", config, "--export", "false", "--model.quant.weight.init", "output",
                     "--model.quant.weight.output_inputs", inputs]) == 0
        losses[inputs] = [b["loss_end"] for b in json.loads((tmp_path / inputs / "run" / "results.json").read_text())["blocks"]]
    assert len(seen["quantized"]) == 2 and len(seen["fp"]) == 2  # one call per block each, nothing else
    first_q, first_fp = seen["quantized"][0], seen["fp"][0]
    assert set(first_q) == set(first_fp) and len(first_q) == 7
    assert all(torch.equal(first_q[n], first_fp[n]) for n in first_q)
    assert losses["quantized"][0] == losses["fp"][0]
    second_q, second_fp = seen["quantized"][1], seen["fp"][1]
    assert any(not torch.equal(second_q[n], second_fp[n]) for n in second_q)
