"""FlexRound: learnable rounding by element-wise division.

Lee, Kim, Kwon, Lee, "FlexRound: Learnable Rounding based on Element-wise
Division for Post-Training Quantization", ICML 2023, arXiv 2306.00317, Eq. (1)-(2):

    W_hat = s1 * clamp( round( W / (s1 * S2 * s3 [* s4]) ), qmin, qmax )

here with a fixed zero point for asymmetric grids:

    W_hat = s1 * (clamp(round_ste(W / D) + zp, qmin, qmax) - zp),
    D     = s1 * exp(log S2 + log s3 [+ log s4])

* ``s1``: the grid step (one per tensor / channel / group), learned if
  ``cfg.learn_s1``; the only scale that multiplies back.
* ``S2``: one scale per weight element (shape of W).
* ``s3``: one per output channel, ``[C_out, 1]`` / ``[C_out, 1, 1, 1]``.
* ``s4``: one per input channel, ``[1, C_in, 1, 1]``, conv only (``C_in`` is
  ``weight.shape[1]``, i.e. per group for grouped / depthwise convs).

All scales are stored as logs, initialized to ``log s1`` from the grid and 0,
so at initialization FlexRound *is* round-to-nearest on the same grid, bit
for bit. ``exp(log s1)`` is evaluated on the small ``s1`` tensor (exactly as
RTN does) and multiplied by ``exp(log S2 + log s3 [+ log s4])``; this equals
the authors' ``exp(log s1 + log S2 + ...)`` mathematically and keeps the
bit-exact match with RTN (a vectorized ``exp`` on a large tensor may differ
by one ulp from the scalar one).

Reciprocal rule: ``d(W/D)/d log S2 = -W/D``, so the update of ``S2`` is
proportional to its own weight.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor, nn

from .base import WeightQuantizer, clamp_codes, register, round_ste
from .grid import GridConfig, UniformGrid


@dataclass
class FlexRoundConfig:
    """FlexRound (Lee et al., ICML 2023): learn the divisor s1*S2*s3[*s4].

    ``learn_s1``: the common grid size is learned too (the paper does).
    """

    learn_s1: bool = True


class _RoundClampSTE(torch.autograd.Function):
    """``clamp(round(x) + zp, qmin, qmax)`` in one node: the same values and gradients as
    ``clamp_codes(round_ste(x) + zp, qmin, qmax)`` (bit for bit: ``torch.clamp`` equals the
    nested ``where`` of :func:`clamp_codes`, and the gradient is ``grad`` on the closed range,
    ``+0`` outside), with one saved boolean mask instead of two ``where`` nodes and their
    comparisons, forward and backward. ``zp`` is a buffer (no gradient).
    """

    @staticmethod
    def forward(ctx, x: Tensor, zp: Tensor, qmin: int, qmax: int) -> Tensor:  # type: ignore[override]
        r = torch.round(x).add_(zp)  # the caller checks that zp broadcasts to x's shape
        ctx.save_for_backward((r >= qmin) & (r <= qmax))
        return r.clamp_(qmin, qmax)

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        (inside,) = ctx.saved_tensors
        return torch.where(inside, grad, 0.0), None, None, None


class DivisionRounding(WeightQuantizer):
    """The rounding FlexRound and LRQ share:
    ``codes = clamp(round_ste(W / (s1 * exp(rest))) + zp, qmin, qmax)``.

    Subclasses own ``log_s1`` (parameter or buffer) and say how the log of the
    rest of the divisor is parametrized (:meth:`log_divisor_rest`, in the
    weight's shape): one scale per weight (FlexRound) or a low-rank product
    plus row and column vectors (LRQ).
    """

    log_s1: Tensor

    def _init_log_s1(self, learn: bool) -> None:
        log_s1 = self.grid.log_scale.detach().clone()
        if learn:
            self.log_s1 = nn.Parameter(log_s1)
        else:
            self.register_buffer("log_s1", log_s1)

    def log_step(self) -> Tensor:
        return self.log_s1

    def log_divisor_rest(self) -> Tensor:
        raise NotImplementedError

    def integers(self, weight: Tensor, hard: bool) -> Tensor:
        v = self.grid.group_view(weight.float())
        divisor = torch.exp(self.log_step()) * self.grid.group_view(torch.exp(self.log_divisor_rest()))
        x = v / divisor
        zp = self.grid.zero_point
        if zp.dim() <= x.dim() and torch.broadcast_shapes(x.shape, zp.shape) == x.shape:
            return _RoundClampSTE.apply(x, zp, self.qmin, self.qmax)
        return clamp_codes(round_ste(x) + zp, self.qmin, self.qmax)


class FlexRoundQuantizer(DivisionRounding):
    """``W_hat = s1 * (clamp(round_ste(W / (s1*S2*s3[*s4])) + zp, qmin, qmax) - zp)``."""

    log_s4: Optional[nn.Parameter]

    def __init__(
        self, weight: Tensor, grid_cfg: GridConfig, cfg: FlexRoundConfig, is_conv: bool,
        hessian: Optional[Tensor] = None,
    ):
        super().__init__(UniformGrid(weight, grid_cfg, hessian))
        self.cfg = cfg
        self._init_log_s1(cfg.learn_s1)
        kw = dict(dtype=torch.float32, device=weight.device)
        self.log_S2 = nn.Parameter(torch.zeros(weight.shape, **kw))
        self.log_s3 = nn.Parameter(torch.zeros((weight.shape[0],) + (1,) * (weight.dim() - 1), **kw))
        if is_conv and weight.dim() == 4:
            self.log_s4 = nn.Parameter(torch.zeros(1, weight.shape[1], 1, 1, **kw))
        else:
            self.log_s4 = None

    def log_divisor_rest(self) -> Tensor:
        """``log S2 + log s3 [+ log s4]`` in the weight's shape."""
        rest = self.log_S2 + self.log_s3
        return rest if self.log_s4 is None else rest + self.log_s4


register(
    "flexround",
    lambda weight, grid_cfg, cfg, is_conv, hessian: FlexRoundQuantizer(
        weight, grid_cfg, cfg.flexround, is_conv, hessian
    ),
    starts_anywhere=True,
)
