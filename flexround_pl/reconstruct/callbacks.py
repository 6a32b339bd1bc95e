"""Callbacks the driver adds to every block's trainer."""

from __future__ import annotations

import math
from typing import Optional

import lightning as L
import torch
from lightning.pytorch.callbacks import EarlyStopping

from flexround_pl.reconstruct.config import ReconstructionConfig


class KeepBestParameters(L.Callback):
    """Remember the learnable parameters with the lowest validation loss.

    The validation loss is the loss with hard rounding (what the hardened
    block will compute) on the held-out calibration samples, or on all of
    them without ``reconstruction.holdout``. ``initial_loss`` is the loss of the
    initial grid (round-to-nearest), so the driver, which compares ``best``
    with the loss after the last step and calls :meth:`restore` when it is
    lower, never ends a block worse than RTN.
    """

    def __init__(self, monitor: str, initial_loss: float) -> None:
        self.monitor = monitor
        self.best = initial_loss
        self.best_step = 0
        self.last: Optional[tuple[int, float]] = None  # (step, loss) of the latest validation
        self._params: list[torch.Tensor] = []
        self._snapshot: Optional[list[torch.Tensor]] = None

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._params = list(pl_module.params)
        self._snapshot = [p.detach().clone() for p in self._params]

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if getattr(pl_module, "validated_step", trainer.global_step) != trainer.global_step:
            return  # the module left this validation to the driver: the metric is an earlier one
        value = trainer.callback_metrics.get(self.monitor)
        if value is None:
            return
        value = float(value)
        self.last = (trainer.global_step, value)
        if math.isfinite(value) and value < self.best:
            self.best, self.best_step = value, trainer.global_step
            self._snapshot = [p.detach().clone() for p in self._params]

    def restore(self) -> None:
        """Copy the best parameters back into the block's quantizers (after ``fit``)."""
        if self._snapshot is None:
            return
        with torch.no_grad():
            for p, saved in zip(self._params, self._snapshot):
                p.copy_(saved)


def holdout_callbacks(recon: ReconstructionConfig, metric: str) -> list[L.Callback]:
    """Early stopping on the held-out loss (``reconstruction.patience`` evaluations without improvement)."""
    if recon.patience <= 0:
        return []
    return [EarlyStopping(monitor=metric, patience=recon.patience, mode="min", check_on_train_epoch_end=False)]
