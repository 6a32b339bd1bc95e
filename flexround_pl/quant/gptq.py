"""GPTQ: round column by column, pushing each column's error onto the columns not yet rounded.

Frantar, Ashkboos, Hoefler, Alistarh, "GPTQ: Accurate Post-Training
Quantization for Generative Pre-trained Transformers", ICLR 2023,
arXiv 2210.17323, Algorithm 1. For one layer ``y = W x`` with calibration
inputs ``X`` (columns: tokens), the layer-wise objective
``||W X - W_hat X||^2`` has Hessian ``H = 2 X X^T`` (per input feature).
Optimal Brain Quantization rounds one input column ``j`` at a time and
updates the remaining ones to compensate:

    q_j   = quant(w_j)                               (our grid: s1, zp, [qmin, qmax])
    err   = (w_j - q_j) / [H^-1]_jj
    w_k  -= err * [H^-1]_jk        for every k > j   (then j leaves H^-1)

GPTQ makes it practical:

* a fixed column order for every row (``act_order``: by decreasing
  ``diag(H)``, the paper's "act-order" heuristic, else left to right);
* the inverse Hessian updates precomputed once as the upper Cholesky factor
  of ``H^-1`` (row ``j`` of it holds ``[H^-1]_j,j: / sqrt([H^-1]_jj)``, so the
  update above becomes ``err_j = (w_j - q_j) / U_jj``,
  ``w_k -= err_j U_jk``);
* lazy batch updates: columns are processed in blocks of ``block_size``;
  inside a block the updates touch only the block, and the rest of ``W``
  gets one matrix product per block;
* damping: ``H += percdamp * mean(diag(H)) * I`` (``percdamp`` 0.01 as the
  paper's code); inputs that are always 0 (``H_jj = 0``) get ``H_jj = 1`` and
  their weights do not matter.

The grid is ours and fixed *before* compensation (``UniformGrid``: min-max or
the Lp search, per tensor / channel / group, symmetric or asymmetric), as
GPTQ's ``static_groups``: one step per group known up front also makes
act-order compatible with groups. The output is hardened integer codes on
that grid, so every export format works unchanged. ``compensated`` (the
weight each column had when it was rounded, its RTN is exactly GPTQ's codes)
is the starting point ``quant.init_from: gptq`` hands to FlexRound / LRQ.

A layer's quantizer is built before its Hessian is known: until
:meth:`GPTQQuantizer.compensate` runs it is round-to-nearest; the block
driver collects the Hessians from the calibration cache
(:mod:`flexround_pl.reconstruct.gptq_hessian`) and calls it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch
from torch import Tensor

from .base import WeightQuantizer, clamp_codes, register
from .grid import GridConfig, UniformGrid


@dataclass
class GPTQConfig:
    """GPTQ (Frantar et al., ICLR 2023) settings, also used by ``init_from: gptq``.

    ``percdamp``: damping, a fraction of the mean Hessian diagonal added to it.
    ``act_order``: round columns by decreasing Hessian diagonal (act-order).
    ``block_size``: columns per lazy batch update (speed only; same result up to float rounding).
    """

    percdamp: float = 0.01
    act_order: bool = False
    block_size: int = 128

    def __post_init__(self) -> None:
        if not self.percdamp > 0:
            raise ValueError(f"gptq.percdamp must be positive, got {self.percdamp}")
        if self.block_size < 1:
            raise ValueError(f"gptq.block_size must be >= 1, got {self.block_size}")


class GPTQResult(NamedTuple):
    codes: Tensor  # float-valued integer codes, [C_out, C_in]
    compensated: Tensor  # the weight each column had when it was rounded, [C_out, C_in]


def _inverse_hessian_factor(h: Tensor, percdamp: float) -> Tensor:
    """Upper Cholesky factor of ``(H + damp I)^-1`` (float64 for the factorizations)."""
    h = h.double().clone()
    damp = percdamp * torch.mean(torch.diag(h))
    h.diagonal().add_(damp)
    chol = torch.linalg.cholesky(h)
    h_inv = torch.cholesky_inverse(chol)
    return torch.linalg.cholesky(h_inv, upper=True)


@torch.no_grad()
def gptq_quantize(
    weight: Tensor, hessian: Tensor, step: Tensor, zero_point: Tensor, qmin: int, qmax: int, cfg: GPTQConfig
) -> GPTQResult:
    """GPTQ of a ``[C_out, C_in]`` weight on a fixed grid.

    ``step`` / ``zero_point``: the grid's ``s1`` / ``zp`` of every weight,
    ``[C_out, C_in]``. Codes are ``clamp(round(w / s1) + zp, qmin, qmax)``,
    the same arithmetic as round-to-nearest.
    """
    w = weight.detach().float().clone()
    h = hessian.detach().float().clone()
    s, zp = step.float(), zero_point.float()
    n = w.shape[1]
    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    perm: Optional[Tensor] = None
    if cfg.act_order:
        perm = torch.argsort(torch.diag(h), descending=True)
        w, h, s, zp = w[:, perm], h[perm][:, perm], s[:, perm], zp[:, perm]
    u = _inverse_hessian_factor(h, cfg.percdamp).float()
    codes = torch.zeros_like(w)
    compensated = torch.zeros_like(w)
    for i1 in range(0, n, cfg.block_size):
        i2 = min(i1 + cfg.block_size, n)
        w1 = w[:, i1:i2].clone()
        err1 = torch.zeros_like(w1)
        u1 = u[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = w1[:, i]
            j = i1 + i
            q = clamp_codes(torch.round(col / s[:, j]) + zp[:, j], qmin, qmax)
            codes[:, j], compensated[:, j] = q, col
            err = (col - s[:, j] * (q - zp[:, j])) / u1[i, i]
            w1[:, i:] -= err.unsqueeze(1) * u1[i, i:].unsqueeze(0)
            err1[:, i] = err
        w[:, i2:] -= err1 @ u[i1:i2, i2:]
    if perm is not None:
        inverse = torch.argsort(perm)
        codes, compensated = codes[:, inverse], compensated[:, inverse]
    return GPTQResult(codes, compensated)


def grid_per_weight(grid: UniformGrid, weight_shape: tuple[int, ...]) -> tuple[Tensor, Tensor]:
    """``s1`` and ``zp`` broadcast to every weight, as ``[C_out, C_in]`` (flattened inputs)."""
    shape = grid.group_view(torch.empty(weight_shape, device=grid.log_scale.device)).shape
    step = grid.step().expand(shape).reshape(weight_shape[0], -1)
    zero_point = grid.zero_point.expand(shape).reshape(weight_shape[0], -1)
    return step, zero_point


def gptq_on_grid(weight: Tensor, hessian: Tensor, grid: UniformGrid, cfg: GPTQConfig) -> GPTQResult:
    """:func:`gptq_quantize` of a weight in the grid layout (any shape, output channels first), results in its shape."""
    step, zero_point = grid_per_weight(grid, tuple(weight.shape))
    result = gptq_quantize(weight.reshape(weight.shape[0], -1), hessian, step, zero_point, grid.qmin, grid.qmax, cfg)
    return GPTQResult(result.codes.reshape(weight.shape), result.compensated.reshape(weight.shape))


class GPTQQuantizer(WeightQuantizer):
    """Codes fixed by GPTQ from the layer's input Hessian; nothing is learned.

    Round-to-nearest until :meth:`compensate` has run (the driver calls it
    once per layer, before hardening).
    """

    def __init__(self, weight: Tensor, grid_cfg: GridConfig, cfg: GPTQConfig, hessian: Optional[Tensor] = None):
        super().__init__(UniformGrid(weight, grid_cfg, hessian))
        self.cfg = cfg
        self.register_buffer("fixed_codes", None)

    @property
    def compensated(self) -> bool:
        return self.fixed_codes is not None

    @torch.no_grad()
    def compensate(self, weight: Tensor, hessian: Tensor) -> GPTQResult:
        """Run GPTQ with ``hessian`` (``[C_in, C_in]``, flattened inputs) and fix the codes."""
        result = gptq_on_grid(weight, hessian, self.grid, self.cfg)
        self.fixed_codes = self.grid.group_view(result.codes)
        return result

    def integers(self, weight: Tensor, hard: bool) -> Tensor:
        if self.fixed_codes is not None:
            return self.fixed_codes
        v = self.grid.group_view(weight.float())
        return clamp_codes(torch.round(v / self.grid.step()) + self.grid.zero_point, self.qmin, self.qmax)

    def extra_repr(self) -> str:
        return f"compensated={self.compensated}, act_order={self.cfg.act_order}"


register(
    "gptq",
    lambda weight, grid_cfg, cfg, is_conv, hessian: GPTQQuantizer(weight, grid_cfg, cfg.gptq, hessian),
    uses_hessian=True,
)

__all__ = ["GPTQConfig", "GPTQQuantizer", "GPTQResult", "gptq_on_grid", "gptq_quantize", "grid_per_weight"]
