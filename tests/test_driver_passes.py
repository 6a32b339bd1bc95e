"""The end of a block: one pass over the calibration set scores the last step and feeds the next block.

``driver._select_harden_and_advance`` against independent references: a
hardened copy of the block run over the cache's inputs (the next block's
inputs, bit for bit) and ``block_loss`` (the scores).
"""

from __future__ import annotations

import copy

import pytest
import torch
import transformers

from flexround_pl.models import find_architecture
from flexround_pl.quant.config import QuantConfig
from flexround_pl.quant.surgery import harden_modules, learnable_parameters, quantize_modules, quantized_layers, set_hard
from flexround_pl.reconstruct.cache import CalibrationCache, block_output
from flexround_pl.reconstruct.callbacks import KeepBestParameters
from flexround_pl.reconstruct.data import BlockDataModule, holdout_split
from flexround_pl.reconstruct.driver import _select_harden_and_advance
from flexround_pl.reconstruct.module import block_loss

CPU = torch.device("cpu")


class _Params:
    """What KeepBestParameters reads from the LightningModule: its ``params``."""

    def __init__(self, params):
        self.params = params


def _block_and_cache(tiny_bert_dir):
    model = transformers.AutoModelForSequenceClassification.from_pretrained(tiny_bert_dir).eval()
    arch = find_architecture(model)
    block = arch.blocks(model)[0][1]
    torch.manual_seed(0)
    ids = torch.randint(5, 90, (10, 12))
    batches = [{"input_ids": ids[i:i + 5], "attention_mask": torch.ones(5, 12, dtype=torch.long)} for i in (0, 5)]
    cache = CalibrationCache.capture(lambda inp: arch.forward(model, inp), block, batches)
    cache.compute_targets(copy.deepcopy(block), CPU, batch_size=4)
    quantize_modules(block, QuantConfig(method="flexround"))
    return block, cache


def _train_a_little(block):
    """Stand-in for training: parameters moved off their initial values, across rounding boundaries."""
    with torch.no_grad():
        for p in learnable_parameters(block):
            p.add_(0.3 * torch.randn_like(p))


def _hardened_outputs(block, inputs, cache):
    """Reference: a hardened copy of ``block`` run over ``inputs`` in one batch."""
    ref = copy.deepcopy(block)
    set_hard(ref, True)
    harden_modules(ref)
    args, kwargs = cache.call_args(torch.arange(len(cache)))
    with torch.no_grad():
        return ref, block_output(ref(inputs, *args, **kwargs))


def _count_calls(block):
    calls = []
    handle = block.register_forward_hook(lambda m, a, o: calls.append(a[0].shape[0]))
    return calls, handle


def _keep(block, best: float, best_step: int = 0) -> KeepBestParameters:
    keep = KeepBestParameters("loss", initial_loss=best)
    keep.on_fit_start(None, _Params(learnable_parameters(block)))  # snapshot: the "best" parameters
    keep.best_step = best_step
    return keep


def test_last_step_kept_in_one_pass_and_its_outputs_are_the_hardened_blocks(tiny_bert_dir):
    block, cache = _block_and_cache(tiny_bert_dir)
    keep = _keep(block, best=float("inf"))
    _train_a_little(block)
    inputs = cache.q_inputs.clone()
    ref, expected = _hardened_outputs(block, inputs, cache)
    all_rows = block_loss(ref, BlockDataModule(cache, 4, 4, 0).calibration_dataloader(), CPU)
    calls, handle = _count_calls(block)

    loss_end, best_step = _select_harden_and_advance(block, cache, CPU, 4, keep, steps=7, holdout=[])
    handle.remove()
    assert sum(calls) == len(cache)  # every sample once: the scoring pass is the advance
    assert best_step == 7
    assert torch.equal(cache.q_inputs, expected)
    assert loss_end == pytest.approx(all_rows, rel=1e-6)
    assert all(layer.hardened for _, layer in quantized_layers(block))
    for (_, a), (_, b) in zip(quantized_layers(block), quantized_layers(ref)):
        assert torch.equal(a.codes, b.codes)


def test_an_earlier_better_step_is_restored_and_the_block_run_again(tiny_bert_dir):
    block, cache = _block_and_cache(tiny_bert_dir)
    keep = _keep(block, best=0.0, best_step=3)  # nothing scores below 0: the snapshot wins
    at_snapshot = copy.deepcopy(block)
    _train_a_little(block)
    inputs = cache.q_inputs.clone()
    ref, expected = _hardened_outputs(at_snapshot, inputs, cache)
    calls, handle = _count_calls(block)

    _, best_step = _select_harden_and_advance(block, cache, CPU, 4, keep, steps=7, holdout=[])
    handle.remove()
    assert sum(calls) == 2 * len(cache)  # scored, then run again with the restored parameters
    assert best_step == 3
    assert torch.equal(cache.q_inputs, expected)
    for (_, a), (_, b) in zip(quantized_layers(block), quantized_layers(ref)):
        assert torch.equal(a.codes, b.codes)


def test_with_a_holdout_the_last_step_is_judged_on_the_held_out_samples(tiny_bert_dir):
    block, cache = _block_and_cache(tiny_bert_dir)
    _train_a_little(block)
    _, held_out = holdout_split(len(cache), 0.3, 0)
    ref, _ = _hardened_outputs(block, cache.q_inputs.clone(), cache)
    dm = BlockDataModule(cache, 4, 4, 0, holdout=0.3, holdout_seed=0)
    assert dm.holdout_indices == held_out
    held = block_loss(ref, dm.val_dataloader(), CPU)
    every = block_loss(ref, dm.calibration_dataloader(), CPU)
    assert abs(held - every) > 0.01 * every
    # between the two losses the rules disagree: the held-out one keeps the last step iff held < every
    keep = _keep(block, best=(held + every) / 2, best_step=2)
    _, best_step = _select_harden_and_advance(block, cache, CPU, 4, keep, steps=9, holdout=held_out)
    assert best_step == (9 if held < every else 2)
