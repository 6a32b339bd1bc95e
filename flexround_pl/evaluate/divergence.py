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

import torch.nn.functional as F
from torch import Tensor

from flexround_pl.evaluate.agreement import FPComparison


class FPDivergence(FPComparison):
    """Mean KL(FP || quantized) of the class distributions per example."""

    name = "fp_kl"

    def _summary(self, logits: Tensor, batch: dict) -> Optional[Tensor]:
        if logits.dim() != 2 or logits.shape[-1] < 2:  # causal LM, or regression (STS-B)
            return None
        # float64: near FP the true KL (~1e-10) is far below float32's resolution, and
        # float32 rounding noise of either sign would be reported as the divergence.
        return F.log_softmax(logits.detach().double(), dim=-1).cpu()

    def _score(self, reference: Tensor, current: Tensor) -> float:
        # Per example KL >= 0 exactly; clamp the remaining float64 noise, then sum.
        per_example = (reference.exp() * (reference - current)).sum(-1).clamp_min(0.0)
        return float(per_example.sum())
