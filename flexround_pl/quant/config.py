"""Configuration of weight quantization: one dataclass per concern.

``QuantConfig`` is what a YAML ``model.quant`` section holds. The grid (bits,
symmetry, granularity, initialization) is shared by every method; each
learned-rounding method adds its own small dataclass of hyper-parameters, so a
run switches method with the single key ``method``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional, Sequence

Method = Literal["rtn", "flexround", "adaround", "nupes"]
Granularity = Literal["tensor", "channel", "group"]
GridInit = Literal["minmax", "lp"]
ActivationInit = Literal["mse", "minmax"]
ActivationGranularity = Literal["tensor", "token"]
NUPESMode = Literal["data_free", "data_driven"]
NUPESRounding = Literal["additive", "flexround"]

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
class NUPESConfig:
    """NUPES (Yvinec, Dapogny, Bailly, arXiv 2308.05600): a power-function grid.

    The weight is mapped to ``t = sign(W)|W|^a``, ``t`` is quantized on the
    uniform grid of ``model.quant.weight`` and mapped back with
    ``sign(t_hat)|t_hat|^(1/a)``; ``a`` is one exponent per layer.

    ``mode``: ``data_free`` searches ``a`` (and the grid) by weight
    reconstruction error only, nothing is trained; ``data_driven`` starts from
    that search and learns ``a``, the grid step and the quantized values with
    the block reconstruction loss.
    ``rounding`` (data-driven): ``additive`` learns a free offset per weight in
    grid steps (codes may move anywhere in the quantized range, not only up or
    down); ``flexround`` learns FlexRound's divisor ``s1*S2*s3[*s4]`` on ``t``
    (uses ``model.quant.flexround``).
    ``exponent_min`` / ``exponent_max``: the range searched and, in the
    data-driven mode, the range ``a`` is kept in while learning.
    ``exponent_candidates``: exponents of the coarse search (a finer search
    around the best one follows). ``learn_exponent``: data-driven mode trains ``a``.
    See docs/NUPES.md.
    """

    mode: NUPESMode = "data_driven"
    rounding: NUPESRounding = "additive"
    exponent_min: float = 0.2
    exponent_max: float = 1.0
    exponent_candidates: int = 9
    learn_exponent: bool = True

    def __post_init__(self) -> None:
        if self.mode not in ("data_free", "data_driven"):
            raise ValueError(f"nupes.mode must be 'data_free' or 'data_driven', got {self.mode!r}")
        if self.rounding not in ("additive", "flexround"):
            raise ValueError(f"nupes.rounding must be 'additive' or 'flexround', got {self.rounding!r}")
        if not 0 < self.exponent_min <= self.exponent_max:
            raise ValueError(
                "nupes exponents need 0 < exponent_min <= exponent_max, got "
                f"exponent_min={self.exponent_min}, exponent_max={self.exponent_max}"
            )
        if self.exponent_candidates < 1:
            raise ValueError(f"nupes.exponent_candidates must be >= 1, got {self.exponent_candidates}")


@dataclass
class ActivationConfig:
    """Activation quantization at the input of every quantized layer (LSQ step sizes).

    ``bits``: ``None`` keeps activations in floating point (weight-only PTQ);
    4 or 8 quantize the input of every quantized Linear / Conv (8 bits for
    the architecture's first / last layers, as for their weights).
    ``symmetric``: ``False`` (default, as QDrop) is an asymmetric unsigned grid
    whose zero point is fixed at initialization; ``True`` is a grid with zero
    point 0, unsigned ``[0, 2^b - 1]`` when the calibration inputs are all
    ``>= 0`` (post-ReLU) and signed ``[-2^(b-1), 2^(b-1) - 1]`` otherwise.
    ``init``: the per-tensor step size from calibration statistics, ``minmax``
    (the observed range) or ``mse`` (the shrunk range, among
    ``init_candidates``, with the smallest squared error).
    ``init_samples``: calibration samples run through each block to initialize.
    ``lr``: the Adam learning rate of the step sizes (their own parameter
    group, cosine-decayed with the weights'; QDrop uses 4e-5).
    ``granularity``: ``tensor`` (default) is the static, learned LSQ step
    above; ``token`` is dynamic min-max quantization of each token (each row
    of a Linear input, each pixel's channel vector of a Conv input), computed
    from the activation itself at every call, with nothing to calibrate or
    learn (``init*`` and ``lr`` unused). ``token`` is the FlexRound authors'
    W4A8 setting for Llama (their ``quantize_activation_per_token_absmax``),
    and what LLMs need: one static step per tensor cannot cover their
    per-token outliers (README, "Activations quantized with QDrop").
    """

    bits: Optional[int] = None
    granularity: ActivationGranularity = "tensor"
    symmetric: bool = False
    init: ActivationInit = "mse"
    init_candidates: int = 100
    init_samples: int = 256
    lr: float = 4e-5

    def __post_init__(self) -> None:
        validate_bits(self.bits, "activation.bits")
        if self.granularity not in ("tensor", "token"):
            raise ValueError(f"activation.granularity must be 'tensor' or 'token', got {self.granularity!r}")
        if self.init not in ("mse", "minmax"):
            raise ValueError(f"activation.init must be 'mse' or 'minmax', got {self.init!r}")
        if self.init_candidates < 1:
            raise ValueError(f"activation.init_candidates must be >= 1, got {self.init_candidates}")
        if self.init_samples < 1:
            raise ValueError(f"activation.init_samples must be >= 1, got {self.init_samples}")
        if not self.lr > 0:
            raise ValueError(f"activation.lr must be positive, got {self.lr}")


@dataclass
class QuantConfig:
    """Everything that decides how a network's weights are quantized.

    ``keep_fp``: regular expressions on module names (``model.named_modules()``)
    of layers that stay in floating point, matched with ``re.search``.
    Adapters add their family's defaults (classifier, ``lm_head``, embeddings).
    ``eight_bit``: regexes of layers quantized at 8 bits whatever ``weight.bits``;
    ``None`` keeps the architecture's default (the CNN first / last layer, as in
    BRECQ, QDrop and FlexRound), ``[]`` quantizes every layer at ``weight.bits``.
    ``activation``: input quantization of the quantized layers (off by default).
    ``nupes``: settings of ``method: nupes`` (power-function weight grid).
    """

    method: Method = "flexround"
    weight: GridConfig = field(default_factory=GridConfig)
    flexround: FlexRoundConfig = field(default_factory=FlexRoundConfig)
    adaround: AdaRoundConfig = field(default_factory=AdaRoundConfig)
    nupes: NUPESConfig = field(default_factory=NUPESConfig)
    activation: ActivationConfig = field(default_factory=ActivationConfig)
    keep_fp: list[str] = field(default_factory=list)
    eight_bit: Optional[list[str]] = None

    def eight_bit_patterns(self, architecture_default: Sequence[str]) -> tuple[str, ...]:
        return tuple(architecture_default) if self.eight_bit is None else tuple(self.eight_bit)

    def __post_init__(self) -> None:
        if self.method not in ("rtn", "flexround", "adaround", "nupes"):
            raise ValueError(
                "quantization method must be 'rtn', 'flexround', 'adaround' or 'nupes', "
                f"got {self.method!r}"
            )


def validate_bits(bits: Optional[int], name: str) -> None:
    if bits is None:
        return
    if isinstance(bits, bool) or not isinstance(bits, int) or not MIN_BITS <= bits <= MAX_BITS:
        raise ValueError(
            f"{name} must be an integer from {MIN_BITS} to {MAX_BITS}, got {bits!r}"
        )
