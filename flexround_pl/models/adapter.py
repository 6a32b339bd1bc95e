"""Declarative architecture adapters: which modules are blocks, which layers stay FP.

A new model family is one short file that builds an :class:`Architecture` and
calls :func:`register`. The pipeline only ever asks an adapter four things:

* ``blocks(model)``: the reconstruction units, in execution order, such that the
  output of block ``i`` is exactly the (first positional) input of block ``i+1``
  (BRECQ's block granularity: a transformer layer, a ResNet BasicBlock, ...);
* ``keep_fp``: module-name patterns that are never quantized (classifier,
  ``lm_head``, embeddings, ...);
* ``prepare(model)``: one-off surgery before quantization (e.g. BatchNorm folding);
* ``forward(model, inputs)``: the logits of the whole model for a batch dict.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import nn


def get_submodule(model: nn.Module, path: str) -> nn.Module:
    return model.get_submodule(path) if path else model


@dataclass(frozen=True)
class Architecture:
    """One model family.

    ``class_names``: model classes (``type(model).__name__``) this adapter serves.
    ``block_path``: dotted path to the ``nn.ModuleList`` of blocks.
    ``keep_fp``: regexes (``re.search`` on module names) of layers kept in FP.
    ``eight_bit``: regexes of layers quantized at 8 bits whatever the requested
    bits (the CNN first/last-layer convention of BRECQ / QDrop / FlexRound).
    ``prepare``: optional in-place surgery run once before anything else.
    ``output_key``: attribute of a Hugging Face output holding the logits;
    ``None`` means the model returns the logits tensor itself (torchvision).
    """

    name: str
    class_names: tuple[str, ...]
    block_path: str
    keep_fp: tuple[str, ...] = ()
    eight_bit: tuple[str, ...] = ()
    prepare: Optional[Callable[[nn.Module], nn.Module]] = None
    output_key: Optional[str] = "logits"

    def blocks(self, model: nn.Module) -> list[tuple[str, nn.Module]]:
        """Blocks in execution order with their qualified names."""
        container = get_submodule(model, self.block_path)
        named = [(f"{self.block_path}.{i}", m) for i, m in enumerate(container)]
        return named

    def forward(self, model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """Logits of the whole model for one batch (labels are not passed)."""
        if self.output_key is None:
            return model(inputs["pixel_values"])
        return getattr(model(**inputs), self.output_key)


_REGISTRY: dict[str, Architecture] = {}
#: called in order for a class no adapter claims (models/generic.py: any HF layer list)
_FALLBACKS: list[Callable[[nn.Module], Architecture]] = []


def register(arch: Architecture) -> Architecture:
    for cls in arch.class_names:
        _REGISTRY[cls] = arch
    return arch


def register_fallback(build: Callable[[nn.Module], Architecture]) -> None:
    """``build(model)`` serves classes no adapter claims; it raises ``ValueError`` naming what it cannot handle."""
    _FALLBACKS.append(build)


def find_architecture(model: nn.Module) -> Architecture:
    """The adapter serving ``model``'s class (a specific one, else the fallback), or a clear error."""
    cls = type(model).__name__
    if cls in _REGISTRY:
        return _REGISTRY[cls]
    if _FALLBACKS:
        return _FALLBACKS[0](model)
    known = ", ".join(sorted(_REGISTRY))
    raise ValueError(
        f"no architecture adapter for model class {cls!r}; supported: {known}. "
        "Add one in flexround_pl/models/ (see models/bert.py for a short example)."
    )
