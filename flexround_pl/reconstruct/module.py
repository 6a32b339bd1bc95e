"""``BlockReconstruction``: the LightningModule of one block.

It only wires things together: a frozen FP teacher block, the student (the same
block with quantized layers), the reconstruction loss and one Adam group over
every learnable quantizer parameter with cosine decay, as in the FlexRound
paper and the authors' code. The teacher's outputs are computed once per block
into the :class:`~flexround_pl.reconstruct.cache.CalibrationCache`; no step
re-runs the teacher.

With activation quantization, the LSQ step sizes are a second Adam group with
their own learning rate (same cosine schedule), and training steps apply QDrop
(``qdrop_p``): the block input mixes quantized and FP inputs element-wise and
each activation quantizer randomly keeps its FP input. Validation always runs
on the quantized inputs with every activation quantized.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import lightning as L
import torch
from torch import Tensor, nn

from flexround_pl.quant.activation import (
    activation_parameters,
    calibrate_activations,
    qdrop,
)
from flexround_pl.quant.surgery import (
    learnable_parameters,
    set_hard,
    total_regularization,
)
from flexround_pl.reconstruct.cache import CalibrationCache, block_output, to_device


def reconstruction_loss(pred: Tensor, target: Tensor, mask: Optional[Tensor] = None) -> Tensor:
    """Squared error summed over features, averaged over samples (and tokens / pixels).

    Features are the last dimension of transformer outputs ``[B, T, H]`` and the
    channel dimension of conv outputs ``[B, C, H, W]`` (QDrop's ``lp_loss``).
    ``mask`` (``[B, T]``, text only): per-position weights of the average,
    the padding mask (0 / 1) or :meth:`CalibrationCache.weigh_positions`'
    weights (``reconstruction.token_loss``): ``sum(w * err) / sum(w)``.
    """
    err = (pred.float() - target.float()).pow(2)
    per_position = err.sum(1) if err.dim() == 4 else err.sum(-1)
    if mask is not None and per_position.shape == mask.shape:
        m = mask.to(per_position.dtype)
        return (per_position * m).sum() / m.sum().clamp_min(1)
    return per_position.mean()


class BlockReconstruction(L.LightningModule):
    """Reconstruct one block: minimize ``loss(student(x_q), teacher(x_fp))``.

    Args:
        teacher: the FP block, frozen (used to fill the cache's targets).
        student: the block with quantized layers; only quantizer parameters train.
        lr: Adam learning rate (one group), cosine-decayed to 0 over ``max_steps``.
        tag: prefix of the logged metrics, e.g. ``block_03`` (a shared
            TensorBoard logger restarts its step at 0 for every block).
        act_lr: Adam learning rate of the activation step sizes (second group).
        qdrop_p: QDrop probability of keeping quantization in training steps
            (block input and every activation quantizer); 1 = no drop.
        val_metric: the logged name of the validation loss (hard rounding),
            ``{tag}/calibration_loss`` or ``{tag}/holdout_loss``.
        driver_validates_at: a step whose validation is skipped here (the last
            one: the driver scores it in the pass that feeds the next block).
    """

    def __init__(
        self,
        teacher: nn.Module,
        student: nn.Module,
        lr: float,
        tag: str = "block",
        act_lr: Optional[float] = None,
        qdrop_p: float = 1.0,
        val_metric: Optional[str] = None,
        driver_validates_at: Optional[int] = None,
    ) -> None:
        super().__init__()
        self.driver_validates_at = driver_validates_at
        self.validated_step: Optional[int] = None  # the step of the latest validation computed here
        self.val_metric = val_metric or f"{tag}/calibration_loss"
        self.teacher = teacher.requires_grad_(False)
        self.student = student
        self.lr = lr
        self.tag = tag
        self.act_lr = lr if act_lr is None else act_lr
        self.qdrop_p = float(qdrop_p)
        self.weight_params = learnable_parameters(student)
        self.act_params = activation_parameters(student)
        self.params = self.weight_params + self.act_params  # what KeepBestParameters snapshots
        if not self.weight_params:
            raise ValueError(f"{tag}: the student has no learnable quantizer parameters (method 'rtn'?)")

    def train(self, mode: bool = True) -> "BlockReconstruction":
        # PTQ keeps both blocks in eval mode: no dropout, BatchNorm statistics frozen.
        super().train(mode)
        self.teacher.eval()
        self.student.eval()
        return self

    def forward(self, batch: dict[str, Any]) -> Tensor:
        return block_output(self.student(batch["q_inputs"], *batch["args"], **batch["kwargs"]))

    def mixed_input(self, batch: dict[str, Any]) -> Tensor:
        """QDrop block input: ``where(rand < p, q_inputs, fp_inputs)`` element-wise."""
        q, p = batch["q_inputs"], self.qdrop_p
        if p >= 1.0:
            return q
        fp = batch["fp_inputs"].to(q.dtype)
        if p <= 0.0:
            return fp
        return torch.where(torch.rand(q.shape, device=q.device) < p, q, fp)

    def training_forward(self, batch: dict[str, Any]) -> Tensor:
        """Student output of a training step: QDrop on the input and inside the block."""
        with qdrop(self.student, self.qdrop_p):
            return block_output(self.student(self.mixed_input(batch), *batch["args"], **batch["kwargs"]))

    def _progress(self) -> float:
        total = self.trainer.max_steps if self.trainer.max_steps and self.trainer.max_steps > 0 else 1
        return min(1.0, self.global_step / total)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        rec = reconstruction_loss(self.training_forward(batch), batch["targets"], batch.get("loss_mask"))
        reg = total_regularization(self.student, self._progress())
        self.log(f"{self.tag}/loss", rec, prog_bar=True)
        if reg.requires_grad or reg.item() != 0:
            self.log(f"{self.tag}/regularization", reg)
        return rec + reg

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        if self.global_step == self.driver_validates_at:
            return  # scored by the driver's advance pass, which computes the same outputs
        self.validated_step = self.global_step
        set_hard(self.student, True)
        try:
            # fp32 even under bf16-mixed: KeepBestParameters compares this with the driver's fp32 losses
            with torch.autocast(self.device.type, enabled=False):
                loss = reconstruction_loss(self(batch), batch["targets"], batch.get("loss_mask"))
        finally:
            set_hard(self.student, False)
        # under DDP each rank validates its shard: average the ranks' means (equal shard sizes)
        distributed = self._trainer is not None and self.trainer.world_size > 1
        self.log(self.val_metric, loss, batch_size=batch["q_inputs"].shape[0], sync_dist=distributed)

    def configure_optimizers(self) -> Any:
        groups = [{"params": self.weight_params, "lr": self.lr}]
        if self.act_params:
            groups.append({"params": self.act_params, "lr": self.act_lr})
        optimizer = torch.optim.Adam(groups, lr=self.lr)
        total = max(1, self.trainer.max_steps)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * min(step, total) / total))
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


@torch.no_grad()
def block_loss(block: nn.Module, batches: Any, device: torch.device) -> float:
    """Sample-weighted mean of :func:`reconstruction_loss` over ``batches``, as validation logs it."""
    mean = LossMean()
    for batch in batches:
        batch = to_device(batch, device)
        pred = block_output(block(batch["q_inputs"], *batch["args"], **batch["kwargs"]))
        mean.add(pred, batch["targets"], batch.get("loss_mask"))
    return mean.value


class LossMean:
    """Sample-weighted mean of :func:`reconstruction_loss` over batches (``value``; 0 before any batch)."""

    def __init__(self) -> None:
        self.total, self.count = 0.0, 0

    def add(self, pred: Tensor, target: Tensor, mask: Optional[Tensor] = None) -> None:
        n = pred.shape[0]
        self.total += float(reconstruction_loss(pred, target, mask)) * n
        self.count += n

    @property
    def value(self) -> float:
        return self.total / max(self.count, 1)



@torch.no_grad()
def calibrate_block_activations(
    block: nn.Module, cache: CalibrationCache, device: torch.device, batch_size: int, max_samples: int
) -> int:
    """Initialize the block's activation quantizers on the quantized inputs of the first ``max_samples`` samples."""
    n = min(len(cache), max_samples)

    def run() -> None:
        for start in range(0, n, batch_size):
            index = torch.arange(start, min(start + batch_size, n))
            args, kwargs = to_device(cache.call_args(index), device)
            block(cache.q_inputs[index].to(device), *args, **kwargs)

    return calibrate_activations(block, run)


@torch.no_grad()
def calibrate_model_activations(
    net: nn.Module, run_model: Any, make_batches: Any, max_samples: int
) -> int:
    """Initialize activation quantizers still uncalibrated under ``net`` (layers outside every block).

    ``run_model(inputs)`` runs the whole model on one batch (labels removed);
    ``make_batches()`` returns a fresh iterable of calibration batches. At most
    ``max_samples`` samples are used. Returns the number of quantizers initialized.
    """

    def run() -> None:
        seen = 0
        for batch in make_batches():
            if seen >= max_samples:
                break
            inputs = {k: v for k, v in batch.items() if k != "labels"}
            run_model(inputs)
            seen += len(next(iter(inputs.values())))

    return calibrate_activations(net, run)
