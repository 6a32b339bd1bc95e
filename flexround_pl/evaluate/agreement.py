"""Agreement of the quantized model's predictions with the FP model's.

Why: on a small evaluation split, accuracy moves in steps of 1/N and its
sampling noise (≈ ±1.2 points at 0.92 on 500 examples) hides differences
between quantizers that are near FP. The fraction of examples (or, for a
causal LM, next-token positions) where the quantized model predicts the same
argmax as the FP model measures the quantization error directly, label-free,
and is far less noisy. ``1.0`` means "the same decisions as FP".

The FP pass records its argmax per evaluation batch; the quantized pass on the
same (unshuffled) loader compares batch by batch.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor


class FPAgreement:
    """Records FP predictions, then scores a later pass against them."""

    name = "fp_agreement"

    def __init__(self) -> None:
        self.reference: list[Tensor] = []
        self.recording = False
        self.equal = 0
        self.total = 0

    def start(self, record: bool) -> None:
        """``record=True``: this pass is the FP reference; else compare with it."""
        self.recording = record
        if record:
            self.reference = []
        self.equal = self.total = 0

    @staticmethod
    def _predictions(logits: Tensor, batch: dict) -> Optional[Tensor]:
        if logits.shape[-1] < 2:  # regression (STS-B): no argmax decision
            return None
        pred = logits.detach().argmax(dim=-1)
        mask = batch.get("attention_mask")
        if pred.dim() == 2 and mask is not None and mask.shape == pred.shape:
            # causal LM: the positions that predict a real next token (as in perplexity)
            return pred[:, :-1][mask[:, 1:].to(pred.device).bool()].cpu()
        return pred.reshape(-1).cpu()

    @torch.no_grad()
    def update(self, batch_idx: int, logits: Tensor, batch: dict) -> None:
        pred = self._predictions(logits, batch)
        if pred is None:
            return
        if self.recording:
            self.reference.append(pred)
            return
        if batch_idx >= len(self.reference) or self.reference[batch_idx].shape != pred.shape:
            return  # no FP pass over this batch: compute() reports nothing
        self.equal += int((self.reference[batch_idx] == pred).sum())
        self.total += pred.numel()

    def compute(self) -> Optional[float]:
        """Agreement of the last comparing pass; ``None`` if it saw no matching FP batch."""
        if self.recording or self.total == 0:
            return None
        if self.total != sum(r.numel() for r in self.reference):
            return None  # partial coverage would not be comparable
        return self.equal / self.total
