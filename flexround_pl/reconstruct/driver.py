"""The block driver: walk the network block by block, reconstruct, harden, move on.

For each block (BRECQ granularity, given by the architecture adapter):

1. copy the FP block as the frozen teacher and fill the cache's targets once;
2. swap its layers for quantized ones (the student) and measure the
   round-to-nearest loss;
3. train the quantizers with a *fresh* Lightning ``Trainer`` (re-using one
   trainer with ``max_steps`` silently trains nothing after the first fit);
4. keep the parameters with the lowest full-calibration loss, harden the
   block (integer codes fixed once) and push the cache forward: the last
   step's hard-rounding pass is scored and, unless an earlier step was
   better, kept as the next block's inputs (no second pass).

Only the current block is ever on the accelerator.
"""

from __future__ import annotations

import copy
import dataclasses
import gc
import math
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Optional, Sequence

import lightning as L
import torch
from torch import nn

from flexround_pl import progress
from flexround_pl.models import lazy
from flexround_pl.models.adapter import Architecture
from flexround_pl.quant.config import QuantConfig
from flexround_pl.quant.surgery import (
    harden_modules,
    learnable_parameters,
    quantize_modules,
    set_hard,
)
from flexround_pl.reconstruct.cache import CalibrationCache
from flexround_pl.reconstruct.callbacks import KeepBestParameters, holdout_callbacks
from flexround_pl.reconstruct.config import ReconstructionConfig
from flexround_pl.reconstruct.data import BlockDataModule
from flexround_pl.reconstruct.gptq_hessian import (
    compensate_block,
    grid_init_hessians,
    hessians_from_fp_inputs,
    output_grid_layers,
    targets_and_fp_hessians,
    uses_layer_hessians,
)
from flexround_pl.reconstruct.module import (
    BlockReconstruction,
    LossMean,
    block_loss,
    calibrate_block_activations,
)

if TYPE_CHECKING:
    from flexround_pl.reconstruct.resume import RunState

#: ``make_trainer(tag, callbacks, val_check_interval)`` -> a new Trainer for one block.
TrainerFactory = Callable[[str, list, Optional[int]], L.Trainer]


class DivergenceError(RuntimeError):
    """A block's reconstruction loss became NaN / inf (the CLI exits 1; finished blocks stay saved)."""


def divergence_message(
    index: int, total: int, name: str, step: int, value: float, precision: str, lr: float
) -> str:
    """``block 3/12 (name) diverged at iteration 17: ...`` with the likely cause (``index`` 0-based)."""
    if "16" in precision and "bf16" not in precision:
        cause = f"an fp16 overflow (trainer.precision={precision}): use bf16-mixed or 32-true"
    elif step == 0:
        cause = "non-finite block inputs or FP outputs (an overflow in the model itself?): use 32-true precision"
    else:
        cause = f"a learning rate too large for this block (reconstruction.lr={lr:g}): lower it, or use 32-true precision"
    when = "before any training" if step == 0 else f"at iteration {step}"
    return (
        f"block {index + 1}/{total} ({name}) diverged {when}: the reconstruction loss is {value}. "
        f"Likely cause: {cause}. "
        "The blocks finished before it are saved in the run directory (resume/): re-running the same command "
        "resumes at this block; after changing the configuration add --fresh true"
    )


class FiniteLossGuard(L.Callback):
    """Stop a block's training with :class:`DivergenceError` at the first non-finite loss."""

    def __init__(self, index: int, total: int, name: str, lr: float) -> None:
        self.index, self.total, self.name, self.lr = index, total, name, lr

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if isinstance(loss, torch.Tensor) and not bool(torch.isfinite(loss.detach()).all()):
            raise DivergenceError(
                divergence_message(self.index, self.total, self.name, trainer.global_step,
                                   float(loss.detach().float().sum()), str(trainer.precision), self.lr)
            )


def _check_finite(loss: float, index: int, total: int, name: str, step: int, lr: float) -> None:
    if not math.isfinite(loss):
        raise DivergenceError(divergence_message(index, total, name, step, loss, "", lr))


@dataclass
class BlockResult:
    name: str
    loss_start: Optional[float]  # None: trained without reconstruction.validate_initial
    loss_end: float
    seconds: float
    steps: int
    best_step: int
    quantized_layers: int


def _hard_loss(block: nn.Module, batches, device: torch.device) -> float:
    set_hard(block, True)
    try:
        return block_loss(block, batches, device)
    finally:
        set_hard(block, False)


class _OutputScores:
    """``each`` of :meth:`CalibrationCache.apply` / ``advance``: the loss of the block's outputs against
    the cache's targets, on every sample (``every``) and on the ``rows`` given (``chosen``; the holdout).

    The same batches and arithmetic as :func:`block_loss` on the block's
    validation loader, without running the block over the calibration set twice.
    """

    def __init__(self, cache: CalibrationCache, device: torch.device, rows: Sequence[int] = ()) -> None:
        self.cache, self.device = cache, device
        self.rows = torch.tensor(sorted(rows), dtype=torch.long) if rows else None
        self.every, self.chosen = LossMean(), LossMean()

    def __call__(self, index: torch.Tensor, out: torch.Tensor) -> None:
        assert self.cache.targets is not None
        target, weights = self.cache.targets[index].to(self.device), self.cache.loss_weights(index)
        weights = weights.to(self.device) if weights is not None else None
        self.every.add(out, target, weights)
        if self.rows is not None:
            mine = torch.isin(index, self.rows).to(out.device)
            if bool(mine.any()):
                self.chosen.add(out[mine], target[mine], None if weights is None else weights[mine])

    @property
    def selection(self) -> float:
        """The loss that picks the best step: on the held-out rows, or on every sample."""
        return (self.chosen if self.rows is not None else self.every).value


def _advance_and_score(cache: CalibrationCache, block: nn.Module, device: torch.device, batch_size: int) -> float:
    """``cache.advance`` through the hardened block, returning its loss on the same outputs."""
    scores = _OutputScores(cache, device)
    cache.advance(block, device, batch_size, each=scores)
    return scores.every.value


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
    state: Optional["RunState"] = None,
) -> list[BlockResult]:
    """Quantize every block of ``model`` in place; returns one result per block.

    ``state``: the run's resume state; finished blocks are reloaded (and pushed
    through the cache) instead of trained, and every newly finished block is
    saved there. Every block starts by seeding all RNGs with
    ``recon.seed + i``, so it trains the same whether or not earlier blocks
    were resumed (bitwise on CPU; see :mod:`flexround_pl.reconstruct.resume` for GPUs).
    Raises :class:`DivergenceError` at a non-finite loss.
    """
    blocks = arch.blocks(model)
    keep_fp = tuple(arch.keep_fp) + tuple(quant.keep_fp)
    eight_bit = quant.eight_bit_patterns(arch.eight_bit)
    results = []
    for i, (name, block) in enumerate(blocks):
        start = time.perf_counter()
        where = f"block {i + 1}/{len(blocks)} {name}"
        L.seed_everything(recon.seed + i, verbose=False)

        # quiet unless slow: the grid search, activation calibration, targets and RTN loss before training
        preparing = progress.Heartbeat(f"{where}: preparing", announce=False).start()
        lazy.pin(block)  # a lazily loaded block: resident (read from the shards) until released below
        teacher = copy.deepcopy(block).eval().requires_grad_(False).to(device)
        saved = state.finished(i, name) if state is not None else None
        fp_hessians = _compute_targets(teacher, cache, device, quant, recon, keep_fp, name, reloaded=saved is not None)
        if saved is not None:
            del teacher
            assert state is not None
            results.append(_reload_finished_block(state, i, name, block, saved, cache, quant, keep_fp, eight_bit,
                                                  device, recon.eval_batch_size))
            preparing.stop()
            log(f"{where}: finished by an earlier run, reloaded")
            continue

        # weight.init output: every layer's grid is searched on its output error, from the FP block's
        # Hessians, before the swap, so every method starts from that grid
        hessians = fp_hessians if fp_hessians is not None else grid_init_hessians(
            teacher, cache, device, quant, recon, keep_fp, name)
        swapped = quantize_modules(block, quant, keep_fp=keep_fp, eight_bit=eight_bit, prefix=name,
                                   hessians=hessians)
        block.to(device)
        if uses_layer_hessians(quant):  # GPTQ: codes (method gptq) or starting weights (init_from gptq)
            compensate_block(block, teacher, cache, device, quant, recon, hessians)
        del hessians
        calibrate_block_activations(block, cache, device, recon.eval_batch_size, quant.activation.init_samples)
        dm = BlockDataModule(cache, recon.batch_size, recon.eval_batch_size, recon.seed + i, recon.holdout, recon.seed)
        loss_start: Optional[float] = None
        keep: Optional[KeepBestParameters] = None  # the validations' record; None: nothing trained
        steps = 0
        if learnable_parameters(block) and max_steps > 0:
            loss_start, steps, keep = _train_block(
                i, len(blocks), name, block, teacher, dm, quant, recon, make_trainer, max_steps, device,
                [progress.BlockProgress(where, max_steps, stops=preparing)],
            )
        preparing.stop()  # without training (RTN, data-free NUPES): here
        loss_end, best_step = _select_harden_and_advance(block, cache, device, recon.eval_batch_size, keep, steps,
                                                         dm.holdout_indices)
        _check_finite(loss_end, i, len(blocks), name, steps, recon.lr)
        block.cpu()
        del teacher

        if keep is None:
            loss_start = loss_end  # nothing trained: the initial grid is the final one
        result = BlockResult(name, loss_start, loss_end,
                             time.perf_counter() - start, steps, best_step, len(swapped))
        results.append(result)
        if state is not None:
            state.save_block(i, name, block, dataclasses.asdict(result))
        lazy.release(block)  # lazy: the dequantized weight caches go back to meta, the codes stay
        start_text = "" if loss_start is None else f"{loss_start:.4g} -> "
        log(f"{where}: {len(swapped)} layers, loss {start_text}{loss_end:.4g} ({result.seconds:.1f} s, "
            f"peak RSS {progress.peak_rss_mb():.0f} MB)")
    return results


def _compute_targets(
    teacher: nn.Module, cache: CalibrationCache, device: torch.device, quant: QuantConfig,
    recon: ReconstructionConfig, keep_fp: tuple[str, ...], name: str, reloaded: bool,
) -> Optional[dict]:
    """The block's FP targets (and per-position loss weights) in the cache.

    With ``weight.output_inputs: fp`` and a block not ``reloaded`` (resumed), the same pass
    sums the output grid's Hessians, returned (else None: they come from
    their own pass, :func:`grid_init_hessians`, or are not needed).
    """
    hessians = None
    if not reloaded and hessians_from_fp_inputs(quant):
        names = output_grid_layers(teacher, quant, keep_fp, name)
        hessians = targets_and_fp_hessians(teacher, names, cache, device, recon)
    else:
        cache.compute_targets(teacher, device, recon.eval_batch_size)
    cache.weigh_positions(recon.token_loss, recon.massive_ratio)
    return hessians


def _reload_finished_block(
    state: "RunState", index: int, name: str, block: nn.Module, saved: dict, cache: CalibrationCache,
    quant: QuantConfig, keep_fp: tuple[str, ...], eight_bit: tuple[str, ...], device: torch.device, batch_size: int,
) -> BlockResult:
    """Block ``index`` was finished by an earlier run: load its hardened state and push the cache through it."""
    quantize_modules(block, quant, keep_fp=keep_fp, eight_bit=eight_bit, prefix=name, load_only=True)
    state.load_block(index, block)
    block.to(device)
    cache.advance(block, device, batch_size)
    block.cpu()
    lazy.release(block)
    return BlockResult(**{f.name: saved.get(f.name) for f in dataclasses.fields(BlockResult)})


def _train_block(
    index: int, total: int, name: str, block: nn.Module, teacher: nn.Module, dm: BlockDataModule,
    quant: QuantConfig, recon: ReconstructionConfig, make_trainer: TrainerFactory, max_steps: int,
    device: torch.device, callbacks: Sequence[L.Callback] = (),
) -> tuple[Optional[float], int, KeepBestParameters]:
    """Train the block's quantizers with a fresh trainer (plus ``callbacks``), remembering the best parameters.

    Returns ``(loss_start, steps, keep)``: the hard (RTN-init) loss before
    training (None without ``reconstruction.validate_initial``), the iterations run and the validations' record, from which
    :func:`_select_harden_and_advance` picks the parameters to harden. The
    validation after the last step is not the trainer's: that pass is the
    cache's advance (one pass over the calibration set fewer per block).
    """
    tag = f"block_{index:02d}"
    loss_start, initial = None, math.inf  # without validate_initial: the last step is kept unless one before it won
    if recon.validate_initial:
        loss_start = _hard_loss(block, dm.calibration_dataloader(), device)
        _check_finite(loss_start, index, total, name, 0, recon.lr)
        initial = _hard_loss(block, dm.val_dataloader(), device) if dm.holdout_indices else loss_start
    metric = recon.selection_metric(tag)  # holdout_loss, or calibration_loss without a holdout
    module = BlockReconstruction(
        teacher, block, recon.lr, tag=tag, act_lr=quant.activation.lr,
        qdrop_p=recon.effective_qdrop_p(quant.activation.bits is not None), val_metric=metric,
        driver_validates_at=max_steps,
    )
    keep = KeepBestParameters(metric, initial)
    # validations before the last step only: evaluations 1 means the driver's one, after it
    interval = math.ceil(max_steps / recon.evaluations) if recon.evaluations > 1 else None
    if interval is not None and interval >= max_steps:
        interval = None
    trainer = make_trainer(
        tag, [keep, FiniteLossGuard(index, total, name, recon.lr), *holdout_callbacks(recon, metric), *callbacks],
        interval,
    )
    trainer.fit(module, datamodule=dm)
    steps = trainer.global_step
    block.to(device)
    # the trainer, the module and the data module reference each other: free the teacher copy,
    # gradients and optimizer states now, not whenever the cyclic GC runs (they pile up over blocks)
    dm.trainer = None
    del module, trainer
    gc.collect()
    return loss_start, steps, keep


def _select_harden_and_advance(
    block: nn.Module, cache: CalibrationCache, device: torch.device, batch_size: int,
    keep: Optional[KeepBestParameters], steps: int, holdout: Sequence[int],
) -> tuple[float, int]:
    """Keep the last or the best validated parameters, harden the block, push the cache through it.

    Returns ``(loss_end, best_step)``, ``loss_end`` on every calibration
    sample. After training, the last step's hard-rounding outputs *are* the
    hardened block's (:meth:`QuantizedLayer.hard_weight`), so one pass both
    scores the last step (on the held-out samples with a ``holdout``) and,
    when no earlier validation beat it, becomes the next block's inputs. Only
    when one did (rare: none of 600 SmolLM2 blocks with ``evaluations: 1``)
    are the best parameters restored and the block run again.
    """
    if keep is None:  # nothing trained (RTN, data-free NUPES)
        return _harden_and_advance(block, cache, device, batch_size), 0
    if keep.last is not None and keep.last[0] == steps:  # the trainer validated the last step (early stopping)
        best_step = steps
        if not math.isfinite(keep.last[1]) or keep.best < keep.last[1]:
            keep.restore()
            best_step = keep.best_step
        return _harden_and_advance(block, cache, device, batch_size), best_step
    scores = _OutputScores(cache, device, holdout)
    set_hard(block, True)
    outputs = cache.apply(block, cache.q_inputs, device, batch_size, each=scores)
    last = scores.selection
    if math.isfinite(last) and not keep.best < last:
        harden_modules(block)
        cache.advance_to(outputs)
        return scores.every.value, steps
    del outputs
    keep.restore()
    return _harden_and_advance(block, cache, device, batch_size), keep.best_step


def _harden_and_advance(block: nn.Module, cache: CalibrationCache, device: torch.device, batch_size: int) -> float:
    """Fix the block's integer codes once, push the cache's inputs through it; returns its final loss."""
    set_hard(block, True)
    harden_modules(block)
    return _advance_and_score(cache, block, device, batch_size)


def quantize_outside_blocks(model: nn.Module, arch: Architecture, quant: QuantConfig) -> list[str]:
    """Round-to-nearest for quantizable layers outside every block that are not kept FP.

    They have no block to be reconstructed in; most adapters keep such layers
    (heads, embeddings) in FP, so this is usually empty. They have no
    calibration Hessian either: with ``weight.init: output`` their grid is
    ``lp``'s (:class:`~flexround_pl.quant.grid.UniformGrid`).
    """
    return round_to_nearest(model, arch, quant)


def round_to_nearest(model: nn.Module, arch: Architecture, quant: QuantConfig) -> list[str]:
    """RTN on ``quant``'s grid for every quantizable layer not yet quantized and not kept FP, hardened.

    After the blocks: the layers outside them. On an FP copy: the whole RTN
    model a run is compared with (``pipeline``'s RTN baseline), layer for
    layer what the blocks would get (the same names, FP and 8-bit patterns).
    """
    keep_fp = tuple(arch.keep_fp) + tuple(quant.keep_fp)
    rtn = quant.as_rtn()
    swapped = quantize_modules(model, rtn, keep_fp=keep_fp, eight_bit=quant.eight_bit_patterns(arch.eight_bit))
    harden_modules(model)
    return swapped
