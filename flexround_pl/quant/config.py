"""Configuration of weight quantization: one dataclass per concern.

``QuantConfig`` is what a YAML ``model.quant`` section holds. The grid (bits,
symmetry, granularity, initialization) is shared by every method; each
learned-rounding method adds its own small dataclass of hyper-parameters, so a
run switches method with the single key ``method``.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Literal, Optional, Sequence

ActivationInit = Literal["mse", "minmax"]
ActivationGranularity = Literal["tensor", "token"]

# every method module registers itself on import (quant.base.register); the Literal is what they registered
from .adaround import AdaRoundConfig
from .base import method_names, method_spec
from .flexround import FlexRoundConfig
from .gptq import GPTQConfig
from .lrq import LRQConfig
from .grid import MAX_BITS, MIN_BITS, GridConfig, validate_bits
from .nupes import NUPESConfig
from . import rtn as _rtn  # noqa: F401  (registers 'rtn')

Method = Literal[method_names()]  # type: ignore[valid-type]
InitFrom = Literal["rtn", "gptq"]


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
    ``lrq``: settings of ``method: lrq`` (FlexRound with a low-rank scale matrix).
    ``gptq``: settings of ``method: gptq`` and of ``init_from: gptq``.
    ``init_from``: the weight a learned rounding starts from: ``rtn``, the FP
    weight (at initialization the method is round-to-nearest); ``gptq``, the
    GPTQ-compensated weight of every layer on the same grid (at
    initialization the method *is* GPTQ), for ``flexround`` and ``lrq``.
    """

    method: Method = "flexround"
    weight: GridConfig = field(default_factory=GridConfig)
    flexround: FlexRoundConfig = field(default_factory=FlexRoundConfig)
    adaround: AdaRoundConfig = field(default_factory=AdaRoundConfig)
    nupes: NUPESConfig = field(default_factory=NUPESConfig)
    lrq: LRQConfig = field(default_factory=LRQConfig)
    gptq: GPTQConfig = field(default_factory=GPTQConfig)
    init_from: InitFrom = "rtn"
    activation: ActivationConfig = field(default_factory=ActivationConfig)
    keep_fp: list[str] = field(default_factory=list)
    eight_bit: Optional[list[str]] = None

    def as_rtn(self, **changes: Any) -> "QuantConfig":
        """This config with round-to-nearest (and nothing to start from), plus ``changes``."""
        return replace(self, method="rtn", init_from="rtn", **changes)

    def eight_bit_patterns(self, architecture_default: Sequence[str]) -> tuple[str, ...]:
        return tuple(architecture_default) if self.eight_bit is None else tuple(self.eight_bit)

    def __post_init__(self) -> None:
        if self.method not in method_names():
            raise ValueError(
                f"quantization method must be one of {', '.join(method_names())}, got {self.method!r}"
            )
        if self.init_from not in ("rtn", "gptq"):
            raise ValueError(f"quant.init_from must be 'rtn' or 'gptq', got {self.init_from!r}")
        if self.init_from == "gptq" and not method_spec(self.method).starts_anywhere:
            starts = ", ".join(n for n in method_names() if method_spec(n).starts_anywhere)
            raise ValueError(
                f"quant.init_from gptq needs a method that can start from another weight ({starts}), "
                f"got method {self.method!r}: use init_from rtn, or method gptq itself"
            )
        if self.weight.init == "output" and not method_spec(self.method).output_init:
            takes = ", ".join(n for n in method_names() if method_spec(n).output_init)
            raise ValueError(
                f"quant.weight.init output searches the uniform grid of {takes} on the layer's output error; "
                f"method {self.method!r} searches a grid of its own on the weight error: use weight.init lp or minmax"
            )
        if self.weight.effective_search_stride > 1 and not method_spec(self.method).output_init:
            raise ValueError(
                f"quant.weight.search_stride thins the range search of the uniform grid; method {self.method!r} "
                "searches a grid of its own (nupes.exponent_candidates, weight.lp_candidates): use search_stride 1"
            )


__all__ = [
    "ActivationConfig", "AdaRoundConfig", "FlexRoundConfig", "GPTQConfig", "GridConfig", "LRQConfig", "MAX_BITS", "MIN_BITS",
    "Method", "NUPESConfig", "QuantConfig", "validate_bits",
]
