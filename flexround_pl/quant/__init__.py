"""Quantization core in plain PyTorch: grids, quantizers, layer wrappers, surgery."""

from .activation import (
    ActivationQuantizer,
    activation_parameters,
    activation_quantizers,
    calibrate_activations,
    qdrop,
)
from .adaround import AdaRoundQuantizer
from .base import WeightQuantizer, build_quantizer, round_ste
from .config import (
    ActivationConfig,
    AdaRoundConfig,
    FlexRoundConfig,
    GPTQConfig,
    GridConfig,
    LRQConfig,
    NUPESConfig,
    QuantConfig,
    validate_bits,
)
from .flexround import FlexRoundQuantizer
from .grid import UniformGrid, group_view, ungroup
from .gptq import GPTQQuantizer
from .lrq import LRQQuantizer
from .layers import QuantConv1D, QuantConv2d, QuantizedLayer, QuantLinear
from .nupes import NUPESQuantizer
from .rtn import RoundToNearest
from .surgery import (
    harden_modules,
    learnable_parameters,
    quantize_modules,
    quantized_layers,
    set_hard,
    total_regularization,
    wrapper_class,
)

__all__ = [
    "ActivationConfig", "ActivationQuantizer", "NUPESConfig", "NUPESQuantizer",
    "activation_parameters", "activation_quantizers", "calibrate_activations", "qdrop",
    "AdaRoundConfig", "AdaRoundQuantizer", "FlexRoundConfig", "FlexRoundQuantizer",
    "GPTQConfig", "GPTQQuantizer", "GridConfig", "LRQConfig", "LRQQuantizer", "QuantConfig", "QuantConv1D", "QuantConv2d", "QuantLinear",
    "QuantizedLayer", "RoundToNearest", "UniformGrid", "WeightQuantizer",
    "build_quantizer", "group_view", "harden_modules", "learnable_parameters",
    "quantize_modules", "quantized_layers", "round_ste", "set_hard",
    "total_regularization", "ungroup", "validate_bits", "wrapper_class",
]
