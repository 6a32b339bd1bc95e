"""The block driver: walk the network block by block, reconstruct, harden, move on.

For each block (BRECQ granularity, given by the architecture adapter):

1. copy the FP block as the frozen teacher and fill the cache's targets once;
2. swap its layers for quantized ones (the student) and measure the
   round-to-nearest loss;
3. train the quantizers with a *fresh* Lightning ``Trainer`` (re-using one
   trainer with ``max_steps`` silently trains nothing after the first fit);
4. keep the parameters with the lowest full-calibration loss, harden the
   block (integer codes fixed once) and push the cache forward.

Only the current block is ever on the accelerator.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import time
from dataclasses import dataclass
from typing import Callable, Optional

import lightning as L
import torch
from torch import nn

from flexround_pl.models.adapter import Architecture
from flexround_pl.quant.config import QuantConfig
from flexround_pl.quant.surgery import harden_modules, learnable_parameters, quantize_modules, set_hard
from flexround_pl.reconstruct.cache import CalibrationCache
from flexround_pl.reconstruct.callbacks import KeepBestParameters
from flexround_pl.reconstruct.config import ReconstructionConfig
from flexround_pl.reconstruct.data import BlockDataModule
from flexround_pl.reconstruct.module import BlockReconstruction, block_loss

#: ``make_trainer(tag, callbacks, val_check_interval)`` -> a new Trainer for one block.
TrainerFactory = Callable[[str, list, Optional[int]], L.Trainer]


@dataclass
class BlockResult:
    name: str
    loss_start: float
    loss_end: float
    seconds: float
    steps: int
    best_step: int
    quantized_layers: int


def _hard_loss(block: nn.Module, dm: BlockDataModule, device: torch.device) -> float:
    set_hard(block, True)
    try:
        return block_loss(block, dm.val_dataloader(), device)
    finally:
        set_hard(block, False)


def quantize_blocks(
    model: nn.Module,
    arch: Architecture,
    cache: CalibrationCache,
    quant: QuantConfig,
    recon: ReconstructionConfig,
    make_trainer: TrainerFactory,
    max_steps: int,
    device: torch.device,
    log: Callable[[str], None] = print,
) -> list[BlockResult]:
    """Quantize every block of ``model`` in place; returns one result per block."""
    blocks = arch.blocks(model)
    keep_fp = tuple(arch.keep_fp) + tuple(quant.keep_fp)
    results = []
    for i, (name, block) in enumerate(blocks):
        start = time.perf_counter()
        tag = f"block_{i:02d}"

        teacher = copy.deepcopy(block).eval().requires_grad_(False).to(device)
        cache.compute_targets(teacher, device, recon.eval_batch_size)
        swapped = quantize_modules(block, quant, keep_fp=keep_fp, eight_bit=arch.eight_bit, prefix=name)
        block.to(device)
        dm = BlockDataModule(cache, recon.batch_size, recon.eval_batch_size, recon.seed + i)
        loss_start = _hard_loss(block, dm, device)

        best_step, steps = 0, 0
        if learnable_parameters(block) and max_steps > 0:
            module = BlockReconstruction(teacher, block, recon.lr, tag=tag)
            keep = KeepBestParameters(f"{tag}/val_loss", loss_start)
            interval = math.ceil(max_steps / recon.evaluations) if recon.evaluations else None
            trainer = make_trainer(tag, [keep], interval)
            trainer.fit(module, datamodule=dm)
            steps = trainer.global_step
            block.to(device)
            last = _hard_loss(block, dm, device)
            if keep.best < last:
                keep.restore(module)
                best_step = keep.best_step
            else:
                best_step = steps

        set_hard(block, True)
        harden_modules(block)
        loss_end = block_loss(block, dm.val_dataloader(), device)
        cache.advance(block, device, recon.eval_batch_size)
        block.cpu()
        del teacher

        result = BlockResult(name, loss_start, loss_end, time.perf_counter() - start, steps, best_step, len(swapped))
        results.append(result)
        log(
            f"block {i + 1}/{len(blocks)} {name}: {len(swapped)} layers, loss {loss_start:.4g} -> "
            f"{loss_end:.4g} ({result.seconds:.1f} s)"
        )
    return results


def quantize_outside_blocks(model: nn.Module, arch: Architecture, quant: QuantConfig) -> list[str]:
    """Round-to-nearest for quantizable layers outside every block that are not kept FP.

    They have no block to be reconstructed in; most adapters keep such layers
    (heads, embeddings) in FP, so this is usually empty.
    """
    keep_fp = tuple(arch.keep_fp) + tuple(quant.keep_fp)
    rtn = dataclasses.replace(quant, method="rtn")
    swapped = quantize_modules(model, rtn, keep_fp=keep_fp, eight_bit=arch.eight_bit)
    harden_modules(model)
    return swapped
