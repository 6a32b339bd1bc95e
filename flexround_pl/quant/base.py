"""The interface every weight quantizer implements, and the factory.

A quantizer owns the :class:`UniformGrid` of one weight tensor plus its own
learnable parameters (FlexRound's scales, AdaRound's ``V``). It never stores
the weight: ``forward(weight)`` returns the fake-quantized fp32 weight,
``codes(weight)`` the hard codes. Two names, two things: ``integers`` are
float tensors holding integer values (soft during training, in the grid view,
differentiable); ``codes`` are integer-dtype tensors (hard, the weight's shape)
and what a hardened layer stores. Dequantization convention, in the grid
view: ``w_hat = s1 * (q - zero_point)`` for either.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Optional

import torch
from torch import Tensor, nn

from .config import QuantConfig
from .grid import UniformGrid


class RoundSTE(torch.autograd.Function):
    """``round`` forward, identity backward (straight-through estimator).

    Exact: the forward is ``torch.round`` itself, not ``x + (round(x) - x)``.
    """

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:  # type: ignore[override]
        return torch.round(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:  # type: ignore[override]
        return grad


def round_ste(x: Tensor) -> Tensor:
    return RoundSTE.apply(x)


def clamp_codes(q: Tensor, qmin: int, qmax: int) -> Tensor:
    """``clamp(q, qmin, qmax)`` whose gradient passes on the *closed* range.

    ``torch.clamp`` blocks the gradient at ``q == qmax`` exactly, which is
    where the min-max grid puts the largest weight; here it still learns.
    """
    return torch.where(q < qmin, qmin, torch.where(q > qmax, qmax, q))


class WeightQuantizer(nn.Module):
    """Base class: a grid plus a rule that maps a weight to integers.

    Subclasses implement :meth:`integers` (float integers in the grid view,
    differentiable w.r.t. their parameters) and :meth:`log_step` (``log s1``).
    ``hard`` only matters to AdaRound (hard rounding ``h >= 0.5``).
    """

    def __init__(self, grid: UniformGrid):
        super().__init__()
        self.grid = grid
        self.hard = False

    @property
    def qmin(self) -> int:
        return self.grid.qmin

    @property
    def qmax(self) -> int:
        return self.grid.qmax

    def log_step(self) -> Tensor:
        return self.grid.log_scale

    def integers(self, weight: Tensor, hard: bool) -> Tensor:
        """Float tensor of integer values in ``[qmin, qmax]``, grid view (not ``codes``: no int dtype)."""
        raise NotImplementedError

    def forward(self, weight: Tensor) -> Tensor:
        """Fake-quantized fp32 weight ``s1 * (q - zp)`` in ``weight``'s shape."""
        q = self.integers(weight, self.hard)
        s1 = torch.exp(self.log_step())
        return self.grid.ungroup(s1 * (q - self.grid.zero_point), weight.shape)

    @torch.no_grad()
    def codes(self, weight: Tensor) -> Tensor:
        """Hard codes: ``integers(weight, hard=True)`` as int16, ``weight``'s shape, inside ``[qmin, qmax]``."""
        q = self.integers(weight, True)
        return self.grid.ungroup(q, weight.shape).to(torch.int16)

    def scale(self) -> Tensor:
        """``s1`` (detached float32) in the grid's broadcast shape."""
        return torch.exp(self.log_step()).detach().float()

    def exponent(self) -> Optional[Tensor]:
        """Power-grid exponent (detached float32 scalar) of non-uniform quantizers; None for uniform grids."""
        return None

    def regularization(self, progress: float) -> Tensor:
        """Extra loss term; 0 except for AdaRound."""
        return torch.zeros((), device=self.grid.log_scale.device)


def build_quantizer(
    weight: Tensor, cfg: QuantConfig, is_conv: bool, bits: Optional[int] = None
) -> WeightQuantizer:
    """The quantizer ``cfg.method`` names, on ``cfg.weight``'s grid.

    ``bits`` overrides ``cfg.weight.bits`` (e.g. 8 for a CNN's first/last layer).
    ``weight`` must be in the grid layout: output channels along dim 0.
    """
    from .adaround import AdaRoundQuantizer
    from .flexround import FlexRoundQuantizer
    from .nupes import NUPESQuantizer
    from .rtn import RoundToNearest

    grid_cfg = cfg.weight if bits is None else replace(cfg.weight, bits=bits)
    if cfg.method == "rtn":
        return RoundToNearest(weight, grid_cfg)
    if cfg.method == "flexround":
        return FlexRoundQuantizer(weight, grid_cfg, cfg.flexround, is_conv)
    if cfg.method == "adaround":
        return AdaRoundQuantizer(weight, grid_cfg, cfg.adaround)
    if cfg.method == "nupes":
        return NUPESQuantizer(weight, grid_cfg, cfg.nupes, cfg.flexround, is_conv)
    raise ValueError(f"unknown quantization method {cfg.method!r}")
