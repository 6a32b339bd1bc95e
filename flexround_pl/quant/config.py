"""Configuration of weight quantization: one dataclass per concern.

``QuantConfig`` is what a YAML ``model.quant`` section holds. The grid (bits,
symmetry, granularity, initialization) is shared by every method; each
learned-rounding method adds its own small dataclass of hyper-parameters, so a
run switches method with the single key ``method``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

Method = Literal["rtn", "flexround", "adaround"]
Granularity = Literal["tensor", "channel", "group"]
GridInit = Literal["minmax", "lp"]

MIN_BITS, MAX_BITS = 2, 8


@dataclass
class GridConfig:
    """A uniform affine integer grid.

    ``granularity``: ``tensor`` (one step size per weight tensor, the FlexRound
    paper's setting), ``channel`` (one per output channel) or ``group`` (one per
    output channel and per ``group_size`` consecutive input elements).
    ``init``: ``minmax`` uses the full range; ``lp`` searches ``lp_candidates``
    shrunk ranges for the smallest ``||W - Q(W)||_p`` with ``p = lp_norm``
    (BRECQ / QDrop use p = 2.4).
    """

    bits: int = 4
    symmetric: bool = True
    granularity: Granularity = "tensor"
    group_size: int = 128
    init: GridInit = "lp"
    lp_norm: float = 2.4
    lp_candidates: int = 100

    def __post_init__(self) -> None:
        validate_bits(self.bits, "bits")
        if self.granularity not in ("tensor", "channel", "group"):
            raise ValueError(
                f"granularity must be 'tensor', 'channel' or 'group', got {self.granularity!r}"
            )
        if self.init not in ("minmax", "lp"):
            raise ValueError(f"grid init must be 'minmax' or 'lp', got {self.init!r}")
        if self.group_size < 1:
            raise ValueError(f"group_size must be >= 1, got {self.group_size}")
        if self.lp_candidates < 1:
            raise ValueError(f"lp_candidates must be >= 1, got {self.lp_candidates}")

    @property
    def qmin(self) -> int:
        return -(2 ** (self.bits - 1)) if self.symmetric else 0

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1 if self.symmetric else 2**self.bits - 1


@dataclass
class FlexRoundConfig:
    """FlexRound (Lee et al., ICML 2023): learn the divisor s1*S2*s3[*s4].

    ``learn_s1``: the common grid size is learned too (the paper does).
    """

    learn_s1: bool = True


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


@dataclass
class QuantConfig:
    """Everything that decides how a network's weights are quantized.

    ``keep_fp``: regular expressions on module names (``model.named_modules()``)
    of layers that stay in floating point, matched with ``re.search``.
    Adapters add their family's defaults (classifier, ``lm_head``, embeddings).
    """

    method: Method = "flexround"
    weight: GridConfig = field(default_factory=GridConfig)
    flexround: FlexRoundConfig = field(default_factory=FlexRoundConfig)
    adaround: AdaRoundConfig = field(default_factory=AdaRoundConfig)
    keep_fp: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.method not in ("rtn", "flexround", "adaround"):
            raise ValueError(
                f"quantization method must be 'rtn', 'flexround' or 'adaround', got {self.method!r}"
            )


def validate_bits(bits: Optional[int], name: str) -> None:
    if bits is None:
        return
    if isinstance(bits, bool) or not isinstance(bits, int) or not MIN_BITS <= bits <= MAX_BITS:
        raise ValueError(
            f"{name} must be an integer from {MIN_BITS} to {MAX_BITS}, got {bits!r}"
        )
