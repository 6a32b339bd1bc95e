"""``PTQModel``: the network being quantized, as LightningCLI's ``model``.

Its init arguments are the ``model:`` section of a config: where the weights
come from (``source``), how to quantize (``quant``) and how to reconstruct
(``reconstruction``). The block-by-block work happens in
:mod:`flexround_pl.pipeline`; this module only loads the network and evaluates
it with the data module's torchmetrics (``validate`` / ``test`` loops).
"""

from __future__ import annotations

from typing import Any, Optional

import lightning as L
import torch
from torch import nn

from flexround_pl.evaluate.agreement import FPAgreement
from flexround_pl.evaluate.divergence import FPDivergence
from flexround_pl.models.adapter import Architecture, find_architecture
from flexround_pl.models.sources import ModelSource
from flexround_pl.quant.config import QuantConfig
from flexround_pl.reconstruct.config import ReconstructionConfig


class PTQModel(L.LightningModule):
    """A pretrained network plus how to quantize it.

    Args:
        source: where the pretrained weights come from
            (e.g. ``flexround_pl.models.HFModel`` or the offline demo classifier).
        quant: method, bits, granularity, grid initialization, FP layers.
        reconstruction: learning rate, batch size, ... of each block.
        evaluate_fp: also evaluate the FP network (for the FP vs quantized report).
        evaluate_rtn: also evaluate round-to-nearest on the run's grid (needs
            ``evaluate_fp``; one more evaluation pass and a copy of the weights),
            so the report shows what the learned rounding gained over RTN.
    """

    def __init__(
        self,
        source: ModelSource,
        quant: QuantConfig = QuantConfig(),
        reconstruction: ReconstructionConfig = ReconstructionConfig(),
        evaluate_fp: bool = True,
        evaluate_rtn: bool = True,
    ) -> None:
        super().__init__()
        self.source = source
        self.quant = quant
        self.reconstruction = reconstruction
        self.evaluate_fp = evaluate_fp
        self.evaluate_rtn = evaluate_rtn
        self.net: Optional[nn.Module] = None
        self.arch: Optional[Architecture] = None
        self.task_metrics: Optional[nn.Module] = None
        self.last_metrics: dict[str, float] = {}
        # quantized vs FP outputs: ``fp_agreement`` (argmax), ``fp_kl`` (classifiers)
        self.fidelity = (FPAgreement(), FPDivergence())

    def load(self, num_labels: Optional[int] = None) -> nn.Module:
        """Load the FP network and run its adapter's one-off preparation."""
        net = self.source.load(num_labels=num_labels)
        self.arch = find_architecture(net)
        if self.arch.prepare is not None:
            net = self.arch.prepare(net)
        self.net = net.eval()
        return self.net

    def train(self, mode: bool = True) -> "PTQModel":
        super().train(mode)
        if self.net is not None:
            self.net.eval()
        return self

    def forward(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        assert self.net is not None and self.arch is not None, "call load() first"
        return self.arch.forward(self.net, inputs)

    # -- evaluation ------------------------------------------------------------

    def _eval_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        logits = self({k: v for k, v in batch.items() if k not in ("labels", "references")})
        if self.task_metrics.generates:  # e.g. BLEU: decodes with the network itself
            self.task_metrics.update_generation(self.net, batch)
        else:
            self.task_metrics.update(logits.float(), batch)
        for measure in self.fidelity:
            measure.update(batch_idx, logits, batch)

    def _eval_start(self) -> None:
        if self.task_metrics is None:
            self.task_metrics = self.trainer.datamodule.metrics()
        self.task_metrics.to(self.device)
        self.task_metrics.reset()

    def _eval_end(self) -> None:
        self.last_metrics = {k: float(v) for k, v in self.task_metrics.compute().items()}
        for measure in self.fidelity:
            value = measure.compute()
            if value is not None:
                self.last_metrics[measure.name] = value
        self.log_dict(self.last_metrics, sync_dist=False)

    def on_validation_epoch_start(self) -> None:
        self._eval_start()

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._eval_step(batch, batch_idx)

    def on_validation_epoch_end(self) -> None:
        self._eval_end()

    def on_test_epoch_start(self) -> None:
        self._eval_start()

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._eval_step(batch, batch_idx)

    def on_test_epoch_end(self) -> None:
        self._eval_end()

    def configure_optimizers(self) -> None:
        # The whole network is never trained; blocks have their own modules.
        return None
