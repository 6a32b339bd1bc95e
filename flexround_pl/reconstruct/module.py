"""``BlockReconstruction``: the LightningModule of one block.

It only wires things together: a frozen FP teacher block, the student (the same
block with quantized layers), the reconstruction loss and one Adam group over
every learnable quantizer parameter with cosine decay, as in the FlexRound
paper and the authors' code. The teacher's outputs are computed once per block
into the :class:`~flexround_pl.reconstruct.cache.CalibrationCache`; no step
re-runs the teacher.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import lightning as L
import torch
from torch import Tensor, nn

from flexround_pl.quant.surgery import learnable_parameters, set_hard, total_regularization
from flexround_pl.reconstruct.cache import block_output, to_device


def reconstruction_loss(pred: Tensor, target: Tensor, mask: Optional[Tensor] = None) -> Tensor:
    """Squared error summed over features, averaged over samples (and tokens / pixels).

    Features are the last dimension of transformer outputs ``[B, T, H]`` and the
    channel dimension of conv outputs ``[B, C, H, W]`` (QDrop's ``lp_loss``).
    ``mask`` (``[B, T]``, text only) drops padding tokens from the average.
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
    """

    def __init__(self, teacher: nn.Module, student: nn.Module, lr: float, tag: str = "block") -> None:
        super().__init__()
        self.teacher = teacher.requires_grad_(False)
        self.student = student
        self.lr = lr
        self.tag = tag
        self.params = learnable_parameters(student)
        if not self.params:
            raise ValueError(f"{tag}: the student has no learnable quantizer parameters (method 'rtn'?)")

    def train(self, mode: bool = True) -> "BlockReconstruction":
        # PTQ keeps both blocks in eval mode: no dropout, BatchNorm statistics frozen.
        super().train(mode)
        self.teacher.eval()
        self.student.eval()
        return self

    def forward(self, batch: dict[str, Any]) -> Tensor:
        return block_output(self.student(batch["q_inputs"], *batch["args"], **batch["kwargs"]))

    def _progress(self) -> float:
        total = self.trainer.max_steps if self.trainer.max_steps and self.trainer.max_steps > 0 else 1
        return min(1.0, self.global_step / total)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        rec = reconstruction_loss(self(batch), batch["targets"], batch.get("loss_mask"))
        reg = total_regularization(self.student, self._progress())
        self.log(f"{self.tag}/loss", rec, prog_bar=True)
        if reg.requires_grad or reg.item() != 0:
            self.log(f"{self.tag}/regularization", reg)
        return rec + reg

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        set_hard(self.student, True)
        try:
            loss = reconstruction_loss(self(batch), batch["targets"], batch.get("loss_mask"))
        finally:
            set_hard(self.student, False)
        self.log(f"{self.tag}/val_loss", loss, batch_size=batch["q_inputs"].shape[0])

    def configure_optimizers(self) -> Any:
        optimizer = torch.optim.Adam(self.params, lr=self.lr)
        total = max(1, self.trainer.max_steps)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * min(step, total) / total))
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


@torch.no_grad()
def block_loss(block: nn.Module, batches: Any, device: torch.device) -> float:
    """Sample-weighted mean of :func:`reconstruction_loss` over ``batches``, as validation logs it."""
    total, count = 0.0, 0
    for batch in batches:
        batch = to_device(batch, device)
        pred = block_output(block(batch["q_inputs"], *batch["args"], **batch["kwargs"]))
        n = batch["q_inputs"].shape[0]
        total += float(reconstruction_loss(pred, batch["targets"], batch.get("loss_mask"))) * n
        count += n
    return total / max(count, 1)

