"""``reconstruction.token_loss``: how a text block's positions weigh in its reconstruction loss."""

from __future__ import annotations

import json

import pytest
import torch

from flexround_pl.reconstruct.cache import CalibrationCache
from flexround_pl.reconstruct.config import ReconstructionConfig
from flexround_pl.reconstruct.module import reconstruction_loss


def _cache_with_targets(targets: torch.Tensor, mask: torch.Tensor) -> CalibrationCache:
    cache = CalibrationCache(torch.zeros_like(targets), ((), {}), [], mask)
    cache.targets = targets
    return cache


def _targets() -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    targets = torch.randn(3, 5, 8)
    targets[:, 0] *= 400.0  # an attention-sink-like first position: ~400x the others' norm
    mask = torch.ones(3, 5, dtype=torch.bool)
    mask[2, 4] = False  # one padding position
    return targets, mask


def test_drop_massive_leaves_out_the_huge_positions_and_padding():
    targets, mask = _targets()
    cache = _cache_with_targets(targets, mask)
    cache.weigh_positions("drop_massive", massive_ratio=20.0)
    expected = mask.clone()
    expected[:, 0] = False
    assert torch.equal(cache.loss_weights(torch.arange(3)), expected.float())


def test_relative_weighs_each_position_by_its_inverse_squared_norm():
    targets, mask = _targets()
    cache = _cache_with_targets(targets, mask)
    cache.weigh_positions("relative")
    pred = targets + 0.1 * torch.randn_like(targets)
    index = torch.tensor([0, 2])
    loss = reconstruction_loss(pred[index], targets[index], cache.batch(index)["loss_mask"])
    # written out: sum_t |e_t|^2 / |y_t|^2  /  sum_t 1 / |y_t|^2  over the non-padding positions
    num = den = 0.0
    for b in index.tolist():
        for t in range(5):
            if mask[b, t]:
                y2 = float(targets[b, t].double().pow(2).sum())
                num += float((pred[b, t] - targets[b, t]).double().pow(2).sum()) / y2
                den += 1.0 / y2
    assert float(loss) == pytest.approx(num / den, rel=1e-5)
    # plain MSE of the same batch is dominated by the huge first position; the relative loss is not
    plain = reconstruction_loss(pred[index], targets[index], mask[index])
    assert float(plain) != pytest.approx(float(loss), rel=0.01)


def test_mse_keeps_the_padding_mask_and_other_blocks_are_untouched():
    targets, mask = _targets()
    cache = _cache_with_targets(targets, mask)
    cache.weigh_positions("mse")
    assert torch.equal(cache.loss_weights(torch.arange(3)), mask)
    conv = _cache_with_targets(torch.randn(2, 4, 3, 3), None)  # a CNN block: [N, C, H, W], no positions
    conv.weigh_positions("relative")
    assert conv.loss_weights(torch.arange(2)) is None


def test_config_refuses_an_unknown_token_loss_and_a_ratio_below_one():
    with pytest.raises(ValueError, match="token_loss must be"):
        ReconstructionConfig(token_loss="l1")
    with pytest.raises(ValueError, match="massive_ratio must be > 1"):
        ReconstructionConfig(massive_ratio=0.5)


def test_drop_massive_without_massive_positions_is_plain_mse_through_the_cli(tmp_path, tiny_tokenizer,
                                                                            write_lm_config):
    """A tiny random LM has no position 20x the median norm: drop_massive must reproduce mse bit for bit,
    while relative trains to other codes."""
    from flexround_pl.cli import main
    from test_causal_lm import _save_tiny

    model_dir = _save_tiny("llama", tmp_path, tiny_tokenizer())
    config = write_lm_config(tmp_path, model_dir, max_steps=6)
    runs = {}
    for loss in ("mse", "drop_massive", "relative"):
        root = tmp_path / loss
        assert main(["fit", "--config", config, "--model.reconstruction.token_loss", loss,
                     "--trainer.default_root_dir", str(root), "--model.evaluate_rtn", "false"]) == 0
        runs[loss] = json.loads((root / "results.json").read_text())
    assert runs["drop_massive"]["quantized"] == runs["mse"]["quantized"]
    assert [b["loss_end"] for b in runs["drop_massive"]["blocks"]] == [b["loss_end"] for b in runs["mse"]["blocks"]]
    assert [b["loss_end"] for b in runs["relative"]["blocks"]] != [b["loss_end"] for b in runs["mse"]["blocks"]]
    assert all(b["loss_end"] < b["loss_start"] for b in runs["relative"]["blocks"])
