"""KL divergence of the quantized classifier's outputs from the FP classifier's.

Why: ``fp_agreement`` counts changed decisions, so near FP (W8, or 8-bit
activations) it moves in steps of one example and cannot rank quantizers
that change a handful of decisions. The mean ``KL(p_FP || p_quant)`` over the
evaluation examples is continuous: it sees every shift of the output
distribution, including those that do not (yet) flip the argmax. It is the
output-fidelity measure used to compare PTQ methods at high bit-widths
(e.g. the KL columns of llama.cpp's ``perplexity --kl-divergence``); we report
it in nats per example (``0.0`` means the same distributions as FP).

Classifiers only (logits ``[batch, classes]``, ``classes >= 2``): a causal
LM would need the FP distribution over the whole vocabulary at every token
position kept between the two passes (gigabytes for SmolLM2); its
perplexity is already continuous.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor


class FPDivergence:
    """Records FP log-probabilities, then scores a later pass against them."""

    name = "fp_kl"

    def __init__(self) -> None:
        self.reference: list[Tensor] = []
        self.recording = False
        self.kl_sum = 0.0
        self.compared = 0

    def start(self, record: bool) -> None:
        """``record=True``: this pass is the FP reference; else compare with it."""
        self.recording = record
        if record:
            self.reference = []
        self.kl_sum, self.compared = 0.0, 0

    @staticmethod
    def _log_probs(logits: Tensor) -> Optional[Tensor]:
        if logits.dim() != 2 or logits.shape[-1] < 2:  # causal LM, or regression (STS-B)
            return None
        return F.log_softmax(logits.detach().float(), dim=-1).cpu()

    @torch.no_grad()
    def update(self, batch_idx: int, logits: Tensor, batch: dict) -> None:
        log_q = self._log_probs(logits)
        if log_q is None:
            return
        if self.recording:
            self.reference.append(log_q)
            return
        if batch_idx >= len(self.reference) or self.reference[batch_idx].shape != log_q.shape:
            return  # no FP pass over this batch: compute() reports nothing
        log_p = self.reference[batch_idx]
        self.kl_sum += float(F.kl_div(log_q, log_p, reduction="sum", log_target=True))
        self.compared += log_q.shape[0]

    def compute(self) -> Optional[float]:
        """Mean KL(FP || quantized) per example; ``None`` without a complete FP reference."""
        if self.recording or self.compared == 0:
            return None
        if self.compared != sum(r.shape[0] for r in self.reference):
            return None  # partial coverage would not be comparable
        return self.kl_sum / self.compared
