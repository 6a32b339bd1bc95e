"""Model surgery: swap FP layers for quantized wrappers, and act on all of them.

Plain PyTorch; the reconstruction loop (Lightning) only calls these helpers.
"""

from __future__ import annotations

import re
from typing import Iterator, Mapping, Optional, Sequence

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


def _children(root: nn.Module) -> Iterator[tuple[nn.Module, str, nn.Module, str]]:
    """``(parent, child_name, child, local_name)`` of every child of every module under ``root``
    (not inside a quantized wrapper), ``local_name`` relative to ``root``."""
    for parent_name, parent in list(root.named_modules()):
        if isinstance(parent, QuantizedLayer):
            continue
        # _modules, not named_children(): the latter yields a module registered
        # twice under one parent only once, which would leave an FP alias behind
        for child_name, child in list(parent._modules.items()):
            if child is not None:
                yield parent, child_name, child, _qualify("", parent_name, child_name)


def quantizable_layers(
    root: nn.Module, cfg: QuantConfig, keep_fp: Sequence[str] = (), prefix: str = ""
) -> list[tuple[str, nn.Module]]:
    """``(local_name, module)`` of every layer :func:`quantize_modules` would swap (with the same
    ``cfg``, ``keep_fp`` and ``prefix``), a shared module once under the name it is wrapped at."""
    keep = [re.compile(p) for p in (*keep_fp, *cfg.keep_fp)]
    seen: set[int] = set()
    layers = []
    for _, _, child, local in _children(root):
        if id(child) in seen or wrapper_class(child) is None or any(p.search(_qualify(prefix, local)) for p in keep):
            continue
        seen.add(id(child))
        layers.append((local, child))
    return layers


def quantize_modules(
    root: nn.Module,
    cfg: QuantConfig,
    keep_fp: Sequence[str] = (),
    eight_bit: Sequence[str] = (),
    prefix: str = "",
    load_only: bool = False,
    hessians: Optional[Mapping[str, Tensor]] = None,
) -> list[str]:
    """Swap every Linear / Conv2d / HF Conv1D under ``root`` in place.

    A layer whose qualified name (``prefix.local_name``, or the local name
    when ``prefix == ''``) matches (``re.search``) a regex of ``keep_fp`` or
    ``cfg.keep_fp`` stays FP; one matching ``eight_bit`` gets 8 bits.
    ``cfg.method`` picks the quantizer. A module shared by several parents
    gets one shared wrapper. ``load_only``: empty hardened wrappers to load
    saved codes into (:meth:`QuantizedLayer.for_loading`). ``hessians``:
    input Hessians by local name (as :func:`quantizable_layers` names them),
    handed to each layer's grid for ``weight.init: output``; a layer without
    one gets ``lp``. Returns the qualified names swapped.
    """
    keep = [re.compile(p) for p in (*keep_fp, *cfg.keep_fp)]
    eight = [re.compile(p) for p in eight_bit]
    swapped: list[str] = []
    wrappers: dict[int, QuantizedLayer] = {}
    for parent, child_name, child, local in _children(root):
        name = _qualify(prefix, local)
        if id(child) not in wrappers:
            cls = wrapper_class(child)
            if cls is None or any(p.search(name) for p in keep):
                continue
            bits = 8 if any(p.search(name) for p in eight) else None
            if load_only:
                wrappers[id(child)] = cls.for_loading(child, cfg, bits=bits)
            else:
                hessian = hessians.get(local) if hessians is not None else None
                wrappers[id(child)] = cls.from_float(child, cfg, bits=bits, hessian=hessian)
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
