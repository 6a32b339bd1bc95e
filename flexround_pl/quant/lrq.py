"""LRQ: FlexRound with a low-rank weight-scaling matrix.

Lee, Kim, Yang, Kwon, Yang, Yoo, Lee, "LRQ: Optimizing Post-Training
Quantization for Large Language Models by Learning Low-Rank Weight-Scaling
Matrices", NAACL 2025, arXiv 2407.11534 (the FlexRound authors). FlexRound
learns one scale per weight (``S2``, as many parameters as ``W``), which
overfits the few hundred calibration windows of an LLM. LRQ replaces
``log S2`` (and FlexRound's row vector ``s3``) by a low-rank product plus a
row and a column vector:

    W_hat = s1 * (clamp(round_ste(W / (s1 * exp(L2 U2 + r2 + c2))) + zp, qmin, qmax) - zp)

* ``s1``: the grid step (per tensor / channel / group), learned (as the
  authors' code does, ``learn_s1``);
* ``L2`` ``[C_out, r]``, initialized to 0, and ``U2`` ``[r, C_in]``,
  initialized as a Linear weight (Kaiming-uniform, ``a = sqrt(5)``): ``L2 U2 = 0``
  at initialization, and both factors get gradients from the first step
  (``L2``'s is ``dS U2^T``, non-zero; ``U2``'s is ``L2^T dS``, zero until
  ``L2`` moves), the LoRA-style start of the authors' code;
* ``r2`` ``[C_out, 1]`` and ``c2`` ``[1, C_in]``: row and column scales, 0.

``C_in`` is the flattened input size (``weight[0].numel()``; a conv's
``C_in * kh * kw``), so the same operator covers Conv2d. The divisor sits in
the exponent exactly as FlexRound's (``exp(log s1) * exp(rest)``), so at
initialization LRQ *is* round-to-nearest on the same grid, bit for bit, and
the reciprocal rule holds: ``d(W/D)/d S = -W/D`` for the log-scale matrix
``S = L2 U2 + r2 + c2``.

Rank: the paper uses ``r = 1024`` for Llama-2 7B/13B (their code: 2048 for
the largest layers, and full FlexRound for some rectangular shapes). The
default here keeps 7B's ratio on the layer's size, ``ceil(min(C_out, C_in)
/ 4)``; ``lrq.rank`` sets it (capped at ``min(C_out, C_in)``, where ``L2 U2``
is already full rank). The authors' recipe at 5000 iterations is an lr of
6e-4 - 9e-4 (W4/W3, Llama-2 7B) on 512 C4 windows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor, nn

from .base import register
from .flexround import DivisionRounding
from .grid import GridConfig, UniformGrid


@dataclass
class LRQConfig:
    """LRQ (Lee et al., NAACL 2025): learn ``s1`` and ``S2 = exp(L2 U2 + r2 + c2)``.

    ``rank``: the rank of ``L2 U2``; ``None`` is ``ceil(min(C_out, C_in) / 4)``
    per layer (the paper's 1024 on Llama-2-7B's 4096-wide layers).
    ``learn_s1``: the grid step is learned too (the authors do).
    """

    rank: Optional[int] = None
    learn_s1: bool = True

    def __post_init__(self) -> None:
        if self.rank is not None and (isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1):
            raise ValueError(f"lrq.rank must be a positive integer or null (automatic), got {self.rank!r}")


def lrq_rank(c_out: int, c_in: int, rank: Optional[int]) -> int:
    """The rank used on a ``[c_out, c_in]`` weight: ``rank`` or the default, capped at full rank."""
    full = max(1, min(c_out, c_in))
    return min(full, rank if rank is not None else math.ceil(full / 4))


class LRQQuantizer(DivisionRounding):
    """``W_hat = s1 * (clamp(round_ste(W / (s1 * exp(L2 U2 + r2 + c2))) + zp, qmin, qmax) - zp)``."""

    def __init__(
        self, weight: Tensor, grid_cfg: GridConfig, cfg: LRQConfig, is_conv: bool = False,
        hessian: Optional[Tensor] = None,
    ):
        super().__init__(UniformGrid(weight, grid_cfg, hessian))
        self.cfg = cfg
        self._init_log_s1(cfg.learn_s1)
        c_out, c_in = weight.shape[0], weight[0].numel()
        rank = lrq_rank(c_out, c_in, cfg.rank)
        kw = dict(dtype=torch.float32, device=weight.device)
        self.L2 = nn.Parameter(torch.zeros(c_out, rank, **kw))
        self.U2 = nn.Parameter(torch.empty(rank, c_in, **kw))
        nn.init.kaiming_uniform_(self.U2, a=math.sqrt(5))
        self.r2 = nn.Parameter(torch.zeros(c_out, 1, **kw))
        self.c2 = nn.Parameter(torch.zeros(1, c_in, **kw))

    @property
    def rank(self) -> int:
        return self.L2.shape[1]

    def log_divisor_rest(self) -> Tensor:
        """``L2 U2 + r2 + c2`` in the weight's shape."""
        return (self.L2 @ self.U2 + self.r2 + self.c2).reshape(self.grid.weight_shape)

    def extra_repr(self) -> str:
        return f"rank={self.rank}"


register(
    "lrq",
    lambda weight, grid_cfg, cfg, is_conv, hessian: LRQQuantizer(weight, grid_cfg, cfg.lrq, is_conv, hessian),
    starts_anywhere=True,
)

__all__ = ["LRQConfig", "LRQQuantizer", "lrq_rank"]
