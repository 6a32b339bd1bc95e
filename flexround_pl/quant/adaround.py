"""AdaRound: learn whether each weight rounds up or down.

Nagel, Amjad, van Baalen, Louizos, Blankevoort, "Up or Down? Adaptive Rounding
for Post-Training Quantization", ICML 2020, arXiv 2004.10568, Eq. (21)-(24):

    W_hat = s1 * (clamp(floor(W / s1) + h(V) + zp, qmin, qmax) - zp)
    h(V)  = clamp(sigmoid(V) * (zeta - gamma) + gamma, 0, 1),  gamma = -0.1, zeta = 1.1
    f_reg = reg_weight * sum(1 - |2 h(V) - 1|^beta)

``s1`` (and ``zp``) stay fixed at the grid initialization, as in the paper.
``V`` starts where ``h(V) = frac(W / s1)``, so the soft weight equals ``W``
up to clamping. With ``hard = True`` the rounding is ``h(V) >= 0.5``.

Regularizer schedule (BRECQ's ``LinearTempDecay``, the public AdaRound code):
0 for the first ``warmup`` fraction of the steps, then ``beta`` decays
*linearly* from ``beta_start`` to ``beta_end``:
``beta = beta_end + (beta_start - beta_end) * (1 - (p - warmup) / (1 - warmup))``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor, nn

from .base import WeightQuantizer, clamp_codes, register
from .grid import GridConfig, UniformGrid

GAMMA, ZETA = -0.1, 1.1


@dataclass
class AdaRoundConfig:
    """AdaRound (Nagel et al., ICML 2020) rectified-sigmoid rounding.

    Regularizer ``reg_weight * sum(1 - |2h - 1|^beta)``; beta is annealed from
    ``beta_start`` to ``beta_end`` after a ``warmup`` fraction of the steps with
    no regularization.
    """

    reg_weight: float = 0.01
    beta_start: float = 20.0
    beta_end: float = 2.0
    warmup: float = 0.2


class AdaRoundQuantizer(WeightQuantizer):
    """``W_hat = s1 * (clamp(floor(W/s1) + h(V) + zp, qmin, qmax) - zp)``, ``s1`` fixed."""

    def __init__(self, weight: Tensor, grid_cfg: GridConfig, cfg: AdaRoundConfig, hessian: Optional[Tensor] = None):
        super().__init__(UniformGrid(weight, grid_cfg, hessian))
        self.cfg = cfg
        with torch.no_grad():
            x = self.grid.group_view(weight.detach().float()) / torch.exp(self.log_step())
            frac = self.grid.ungroup(x - torch.floor(x), weight.shape)
            # invert h: sigmoid(V) = (frac - gamma) / (zeta - gamma)
            v = -torch.log((ZETA - GAMMA) / (frac - GAMMA) - 1)
        self.V = nn.Parameter(v)

    def h(self) -> Tensor:
        """Rectified sigmoid, in the weight's shape."""
        return torch.clamp(torch.sigmoid(self.V) * (ZETA - GAMMA) + GAMMA, 0, 1)

    def integers(self, weight: Tensor, hard: bool) -> Tensor:
        v = self.grid.group_view(weight.float())
        h = self.h()
        if hard:
            h = (h >= 0.5).float()
        base = torch.floor(v / torch.exp(self.log_step()))
        return clamp_codes(base + self.grid.group_view(h) + self.grid.zero_point, self.qmin, self.qmax)

    def beta(self, progress: float) -> float:
        """Annealed exponent (linear decay after warm-up)."""
        c = self.cfg
        rel = (progress - c.warmup) / max(1.0 - c.warmup, 1e-12)
        return c.beta_end + (c.beta_start - c.beta_end) * max(0.0, 1.0 - rel)

    def regularization(self, progress: float) -> Tensor:
        """``reg_weight * sum(1 - |2h - 1|^beta)``; 0 during the warm-up."""
        if progress < self.cfg.warmup or self.cfg.reg_weight == 0:
            return torch.zeros((), device=self.V.device)
        beta = self.beta(progress)
        return self.cfg.reg_weight * (1 - (2 * self.h() - 1).abs().pow(beta)).sum()


register(
    "adaround",
    lambda weight, grid_cfg, cfg, is_conv, hessian: AdaRoundQuantizer(weight, grid_cfg, cfg.adaround, hessian),
)

__all__ = ["AdaRoundConfig", "AdaRoundQuantizer", "GAMMA", "ZETA"]
