"""Agreement of the quantized model's predictions with the FP model's.

Why: on a small evaluation split, accuracy moves in steps of 1/N and its
sampling noise (≈ ±1.2 points at 0.92 on 500 examples) hides differences
between quantizers that are near FP. The fraction of examples (or, for a
causal LM, next-token positions) where the quantized model predicts the same
argmax as the FP model measures the quantization error directly, label-free,
and is far less noisy. ``1.0`` means "the same decisions as FP".

The FP pass records its argmax per evaluation batch; the quantized pass on the
same (unshuffled) loader compares batch by batch. :class:`FPComparison` is
that record-then-compare loop, shared with ``fp_kl``
(:mod:`flexround_pl.evaluate.divergence`).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor


class FPComparison:
    """Records a per-batch summary of the FP pass, then scores a later pass against it.

    Subclasses say what is recorded (``_summary``: one row per example or
    position, or ``None`` when the measure does not apply) and how a batch
    scores (``_score``: a sum over its rows); ``compute`` is the mean per row.
    """

    name = ""

    def __init__(self) -> None:
        self.reference: list[Tensor] = []
        self.recording = False
        self.score_sum = 0.0
        self.compared = 0

    def start(self, record: bool) -> None:
        """``record=True``: this pass is the FP reference; else compare with it."""
        self.recording = record
        if record:
            self.reference = []
        self.score_sum, self.compared = 0.0, 0

    def _summary(self, logits: Tensor, batch: dict) -> Optional[Tensor]:
        raise NotImplementedError

    def _score(self, reference: Tensor, current: Tensor) -> float:
        raise NotImplementedError

    @torch.no_grad()
    def update(self, batch_idx: int, logits: Tensor, batch: dict) -> None:
        current = self._summary(logits, batch)
        if current is None:
            return
        if self.recording:
            self.reference.append(current)
            return
        if batch_idx >= len(self.reference) or self.reference[batch_idx].shape != current.shape:
            return  # no FP pass over this batch: compute() reports nothing
        self.score_sum += self._score(self.reference[batch_idx], current)
        self.compared += current.shape[0]

    def compute(self) -> Optional[float]:
        """Mean score of the last comparing pass; ``None`` without a complete FP reference."""
        if self.recording or self.compared == 0:
            return None
        if self.compared != sum(r.shape[0] for r in self.reference):
            return None  # partial coverage would not be comparable
        return self.score_sum / self.compared


class FPAgreement(FPComparison):
    """Share of examples (next-token positions) whose argmax equals the FP model's."""

    name = "fp_agreement"

    def _summary(self, logits: Tensor, batch: dict) -> Optional[Tensor]:
        if logits.shape[-1] < 2:  # regression (STS-B): no argmax decision
            return None
        pred = logits.detach().argmax(dim=-1)
        mask = batch.get("attention_mask")
        if pred.dim() == 2 and mask is not None and mask.shape == pred.shape:
            # causal LM: the positions that predict a real next token (as in perplexity)
            return pred[:, :-1][mask[:, 1:].to(pred.device).bool()].cpu()
        return pred.reshape(-1).cpu()

    def _score(self, reference: Tensor, current: Tensor) -> float:
        return float((reference == current).sum())
