"""Model surgery: swap FP layers for quantized wrappers, and act on all of them.

Plain PyTorch; the reconstruction loop (Lightning) only calls these helpers.
"""

from __future__ import annotations

import re
from typing import Optional, Sequence

import torch
from torch import Tensor, nn

from .config import QuantConfig
from .layers import QuantConv1D, QuantConv2d, QuantizedLayer, QuantLinear


def _hf_conv1d() -> Optional[type]:
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # transformers is optional for CNN-only use
        return None
    return Conv1D


def wrapper_class(module: nn.Module) -> Optional[type[QuantizedLayer]]:
    """The wrapper for ``module``, or None if it is not a quantizable layer.

    ``nn.MultiheadAttention.out_proj`` (``NonDynamicallyQuantizableLinear``) is
    skipped: MHA reads its weight directly and would bypass the wrapper.
    """
    conv1d = _hf_conv1d()
    if conv1d is not None and isinstance(module, conv1d):
        return QuantConv1D
    if isinstance(module, nn.Conv2d):
        return QuantConv2d
    if isinstance(module, nn.modules.linear.NonDynamicallyQuantizableLinear):
        return None
    if isinstance(module, nn.Linear):
        return QuantLinear
    return None


def _qualify(prefix: str, *parts: str) -> str:
    return ".".join(p for p in (prefix, *parts) if p)


def quantize_modules(
    root: nn.Module,
    cfg: QuantConfig,
    keep_fp: Sequence[str] = (),
    eight_bit: Sequence[str] = (),
    prefix: str = "",
    load_only: bool = False,
) -> list[str]:
    """Swap every Linear / Conv2d / HF Conv1D under ``root`` in place.

    A layer whose qualified name (``prefix.local_name``, or the local name
    when ``prefix == ''``) matches (``re.search``) a regex of ``keep_fp`` or
    ``cfg.keep_fp`` stays FP; one matching ``eight_bit`` gets 8 bits.
    ``cfg.method`` picks the quantizer. A module shared by several parents
    gets one shared wrapper. ``load_only``: empty hardened wrappers to load
    saved codes into (:meth:`QuantizedLayer.for_loading`). Returns the qualified names swapped.
    """
    keep = [re.compile(p) for p in (*keep_fp, *cfg.keep_fp)]
    eight = [re.compile(p) for p in eight_bit]
    swapped: list[str] = []
    wrappers: dict[int, QuantizedLayer] = {}
    for parent_name, parent in list(root.named_modules()):
        if isinstance(parent, QuantizedLayer):
            continue
        # _modules, not named_children(): the latter yields a module registered
        # twice under one parent only once, which would leave an FP alias behind
        for child_name, child in list(parent._modules.items()):
            if child is None:
                continue
            name = _qualify(prefix, parent_name, child_name)
            if id(child) not in wrappers:
                cls = wrapper_class(child)
                if cls is None or any(p.search(name) for p in keep):
                    continue
                bits = 8 if any(p.search(name) for p in eight) else None
                wrappers[id(child)] = (cls.for_loading if load_only else cls.from_float)(child, cfg, bits=bits)
            setattr(parent, child_name, wrappers[id(child)])
            swapped.append(name)
    return swapped


def quantized_layers(root: nn.Module) -> list[tuple[str, QuantizedLayer]]:
    """``(name, layer)`` of every quantized wrapper under ``root``."""
    return [(n, m) for n, m in root.named_modules() if isinstance(m, QuantizedLayer)]


def harden_modules(root: nn.Module) -> None:
    """Harden every wrapper under ``root`` (codes fixed, quantizers dropped)."""
    for _, layer in quantized_layers(root):
        layer.harden()


def _quantizers(root: nn.Module):
    return [m.quantizer for _, m in quantized_layers(root) if m.quantizer is not None]


def learnable_parameters(root: nn.Module) -> list[nn.Parameter]:
    """Every ``requires_grad`` parameter of the quantizers under ``root`` (deduplicated)."""
    seen: dict[int, nn.Parameter] = {}
    for q in _quantizers(root):
        for p in q.parameters():
            if p.requires_grad:
                seen.setdefault(id(p), p)
    return list(seen.values())


def total_regularization(root: nn.Module, progress: float) -> Tensor:
    """Sum of the quantizers' regularizers (AdaRound's; 0 for RTN / FlexRound)."""
    terms = [q.regularization(progress) for q in _quantizers(root)]
    if not terms:
        return torch.zeros(())
    return torch.stack([t.to(terms[0].device) for t in terms]).sum()


def set_hard(root: nn.Module, hard: bool) -> None:
    """AdaRound hard (``h >= 0.5``) / soft rounding for every quantizer under ``root``."""
    for q in _quantizers(root):
        q.hard = hard
