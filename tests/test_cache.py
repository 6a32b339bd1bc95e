"""The calibration cache captures exactly what the blocks see, and pushes forward correctly."""

import copy

import torch
import transformers

from flexround_pl.models import find_architecture
from flexround_pl.reconstruct.cache import CalibrationCache, block_output


def _batches(n_batches=3, batch=4, length=12, pad_from=9):
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n_batches):
        ids = torch.randint(1000, 2000, (batch, length), generator=g)
        mask = torch.ones(batch, length, dtype=torch.long)
        mask[0, pad_from:] = 0  # one padded sample per batch
        out.append({"input_ids": ids, "attention_mask": mask, "labels": torch.zeros(batch, dtype=torch.long)})
    return out


def test_capture_and_push_forward_match_the_model(tiny_bert_dir):
    model = transformers.AutoModelForSequenceClassification.from_pretrained(tiny_bert_dir).eval()
    arch = find_architecture(model)
    blocks = arch.blocks(model)
    batches = _batches()
    before = [arch.forward(model, {k: v for k, v in b.items() if k != "labels"}) for b in batches]

    cache = CalibrationCache.capture(lambda inp: arch.forward(model, inp), blocks[0][1], batches)
    assert len(cache) == 12
    assert cache.loss_mask is not None and cache.loss_mask.sum() == 12 * 12 - 3 * 3

    # What the last block really receives, recorded independently with a hook.
    seen = []
    h = blocks[-1][1].register_forward_hook(lambda m, a, o: seen.append(block_output(o)))
    with torch.no_grad():
        for b in batches:
            arch.forward(model, {k: v for k, v in b.items() if k != "labels"})
    h.remove()

    for _, block in blocks:
        cache.compute_targets(block, torch.device("cpu"), batch_size=5)
        cache.advance(copy.deepcopy(block), torch.device("cpu"), batch_size=5)
    torch.testing.assert_close(cache.fp_inputs, torch.cat(seen), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(cache.q_inputs, torch.cat(seen), atol=1e-5, rtol=1e-5)

    # Capture left the model untouched (hook removed).
    after = [arch.forward(model, {k: v for k, v in b.items() if k != "labels"}) for b in batches]
    for x, y in zip(before, after):
        torch.testing.assert_close(x, y)


def test_batch_gathers_per_sample_extras(tiny_bert_dir):
    model = transformers.AutoModelForSequenceClassification.from_pretrained(tiny_bert_dir).eval()
    arch = find_architecture(model)
    cache = CalibrationCache.capture(lambda inp: arch.forward(model, inp), arch.blocks(model)[0][1], _batches())
    cache.compute_targets(arch.blocks(model)[0][1], torch.device("cpu"), batch_size=4)
    idx = torch.tensor([4, 0])
    batch = cache.batch(idx)
    assert batch["q_inputs"].shape[0] == 2 and batch["targets"].shape[0] == 2
    out = block_output(arch.blocks(model)[0][1](batch["q_inputs"], *batch["args"], **batch["kwargs"]))
    torch.testing.assert_close(out, batch["targets"], atol=1e-5, rtol=1e-5)


def test_padded_and_unpadded_batches_mix(tiny_bert_dir):
    """A batch without padding gets mask None from transformers; it must still replay correctly."""
    model = transformers.AutoModelForSequenceClassification.from_pretrained(tiny_bert_dir).eval()
    arch = find_architecture(model)
    batches = _batches(n_batches=2)
    batches[0]["attention_mask"][:] = 1  # no padding at all in the first batch
    batches.append({k: v[:1] for k, v in _batches(n_batches=1)[0].items()})  # a last batch of one sample
    cache = CalibrationCache.capture(lambda inp: arch.forward(model, inp), arch.blocks(model)[0][1], batches)
    assert len(cache) == 9
    block = arch.blocks(model)[0][1]
    seen = []
    h = block.register_forward_hook(lambda m, a, o: seen.append(block_output(o)))
    with torch.no_grad():
        for b in batches:
            arch.forward(model, {k: v for k, v in b.items() if k != "labels"})
    h.remove()
    cache.compute_targets(block, torch.device("cpu"), batch_size=3)
    torch.testing.assert_close(cache.targets, torch.cat(seen), atol=1e-5, rtol=1e-5)


def test_advance_scores_exactly_like_block_loss(tiny_bert_dir):
    """The driver's fused advance + loss equals block_loss over the validation loader, bit for bit."""
    from flexround_pl.quant.config import QuantConfig
    from flexround_pl.quant.surgery import harden_modules, quantize_modules
    from flexround_pl.reconstruct.data import BlockDataModule
    from flexround_pl.reconstruct.driver import _advance_and_score
    from flexround_pl.reconstruct.module import block_loss

    model = transformers.AutoModelForSequenceClassification.from_pretrained(tiny_bert_dir).eval()
    arch = find_architecture(model)
    block = arch.blocks(model)[0][1]
    cache = CalibrationCache.capture(lambda inp: arch.forward(model, inp), block, _batches())
    cache.compute_targets(copy.deepcopy(block), torch.device("cpu"), batch_size=5)
    quantize_modules(block, QuantConfig(method="rtn"))
    harden_modules(block)
    expected = block_loss(block, BlockDataModule(cache, 4, 5, 0).val_dataloader(), torch.device("cpu"))
    assert expected > 0
    assert _advance_and_score(cache, block, torch.device("cpu"), 5) == expected
    assert cache.targets is None  # advanced: the targets became the next block's FP inputs
