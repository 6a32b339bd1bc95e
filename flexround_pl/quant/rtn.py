"""Round-to-nearest (RTN): the floor every learned rounding must beat.

    W_hat = s1 * (clamp(round(W / s1) + zp, qmin, qmax) - zp)

with ``s1`` and ``zp`` fixed by the grid initialization (min-max or Lp search,
as in BRECQ, Li et al., ICLR 2021, arXiv 2102.05426). No learnable parameters.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .base import WeightQuantizer, clamp_codes, register
from .grid import GridConfig, UniformGrid


class RoundToNearest(WeightQuantizer):
    """``W_hat = s1 * (clamp(round(W/s1) + zp, qmin, qmax) - zp)``; nothing learned."""

    def __init__(self, weight: Tensor, grid_cfg: GridConfig, hessian: Optional[Tensor] = None):
        super().__init__(UniformGrid(weight, grid_cfg, hessian))

    def integers(self, weight: Tensor, hard: bool) -> Tensor:
        v = self.grid.group_view(weight.float())
        s1 = torch.exp(self.log_step())
        return clamp_codes(torch.round(v / s1) + self.grid.zero_point, self.qmin, self.qmax)


register("rtn", lambda weight, grid_cfg, cfg, is_conv, hessian: RoundToNearest(weight, grid_cfg, hessian))
