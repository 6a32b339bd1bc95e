"""Fake-quant export: the quantized model as ordinary floating-point weights.

``fit`` writes ``<run dir>/export/`` (unless ``--export false``):

* Hugging Face models (``transformers.PreTrainedModel``): ``save_pretrained``
  output (``config.json``, ``model.safetensors``) + the tokenizer, loadable with
  plain ``transformers`` (``AutoModelForSequenceClassification.from_pretrained``
  / ``AutoModelForCausalLM.from_pretrained``), no flexround_pl needed. Each
  quantized layer's weight is its dequantized weight ``scale * (codes -
  zero_point)`` (NUPES: mapped back through the power function) in the layer's
  FP dtype and layout.
* Other models (torchvision CNNs): ``model_state_dict.pt``, a plain
  torchvision state dict (folded BatchNorms come back as identity BatchNorms
  carrying the folded bias, see :func:`flexround_pl.models.cnn.torchvision_state_dict`),
  for ``torchvision.models.get_model(arch, num_classes=...)``.
* ``flexround_export.json``: what was exported and how to load it.

The exported model computes what the quantized model computes, on the same
device and dtype: bitwise the same for ``nn.Linear`` and HF ``Conv1D`` models
(same weights, same kernels; checked on CPU); a CNN's unfolded identity
BatchNorms may differ in the last float bits (``sqrt(1 - eps + eps)``).
``config.json`` is written with ``use_cache: true`` (the run turns the KV
cache off while quantizing; generation wants it back). Activation quantization
(``model.quant.activation.bits``) has no plain-FP equivalent: the export then
holds the dequantized weights only and its outputs are those of a
weight-only-quantized model (noted in ``flexround_export.json``).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections import OrderedDict
from typing import Any, Optional

import torch
from torch import Tensor, nn

from flexround_pl.quant.layers import QuantizedLayer
from flexround_pl.rundir import EXPORT_DIR  # re-exported

INFO_FILE = "flexround_export.json"
STATE_DICT_FILE = "model_state_dict.pt"


def _is_hf(net: nn.Module) -> bool:
    try:
        from transformers import PreTrainedModel
    except ImportError:
        return False
    return isinstance(net, PreTrainedModel)


def has_activation_quantization(net: nn.Module) -> bool:
    return any(getattr(m, "act_quant", None) is not None for m in net.modules() if isinstance(m, QuantizedLayer))


@torch.no_grad()
def dequantized_state_dict(net: nn.Module) -> dict[str, Tensor]:
    """``net``'s state dict with every hardened quantized layer as a plain ``weight`` (+ ``bias``).

    Keys are those of the FP network (a wrapper sits where the FP layer was).
    """
    layers = {name: m for name, m in net.named_modules(remove_duplicate=False) if isinstance(m, QuantizedLayer)}
    for name, layer in layers.items():
        if not layer.hardened:
            raise ValueError(f"export needs hardened quantized layers; {name!r} is not")
    out: dict[str, Tensor] = OrderedDict()
    for key, value in net.state_dict().items():
        owner = next((n for n in _prefixes(key) if n in layers), None)
        if owner is None:
            out[key] = value
    for name, layer in layers.items():
        prefix = f"{name}." if name else ""
        out[prefix + "weight"] = layer.weight.detach().clone()
        if layer.bias is not None:
            out[prefix + "bias"] = layer.bias.detach()
    return out


def _prefixes(key: str) -> list[str]:
    """Module names that could own state-dict ``key``, longest first (``a.b.c`` -> ``a.b``, ``a``, ``''``)."""
    parts = key.split(".")[:-1]
    return [".".join(parts[:i]) for i in range(len(parts), -1, -1)]


def export_fake_quant(
    net: nn.Module,
    directory: str,
    tokenizer: Optional[Any] = None,
    info: Optional[dict[str, Any]] = None,
) -> str:
    """Write the plain-FP export of the hardened ``net`` to ``directory`` (replaced atomically)."""
    directory = os.path.abspath(directory)
    parent = os.path.dirname(directory)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=parent, prefix=".tmp-export-")
    try:
        meta = dict(info or {})
        meta["activation_quantization_dropped"] = has_activation_quantization(net)
        if _is_hf(net):
            use_cache = getattr(net.config, "use_cache", None)
            if use_cache is not None:
                net.config.use_cache = True
            try:
                net.save_pretrained(tmp, state_dict=dequantized_state_dict(net))
            finally:
                if use_cache is not None:
                    net.config.use_cache = use_cache
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)
            meta["format"] = "transformers"
            meta["load"] = f"transformers.{_auto_class(net)}.from_pretrained(<this directory>)"
        else:
            from flexround_pl.models.cnn import torchvision_state_dict

            torch.save(torchvision_state_dict(net), os.path.join(tmp, STATE_DICT_FILE))
            meta["format"] = "torch_state_dict"
            meta["model_class"] = type(net).__name__
            meta["load"] = (
                "m = torchvision.models.get_model(arch, num_classes=...); "
                f"m.load_state_dict(torch.load('{STATE_DICT_FILE}'))"
            )
        with open(os.path.join(tmp, INFO_FILE), "w") as f:
            json.dump(meta, f, indent=2, default=str)
            f.write("\n")
        mask = os.umask(0)
        os.umask(mask)
        os.chmod(tmp, 0o777 & ~mask)
        if os.path.isdir(directory):
            shutil.rmtree(directory)
        os.replace(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


def _auto_class(net: nn.Module) -> str:
    name = type(net).__name__
    if name.endswith("ForSequenceClassification"):
        return "AutoModelForSequenceClassification"
    if name.endswith("ForCausalLM") or name.endswith("LMHeadModel"):
        return "AutoModelForCausalLM"
    return "AutoModel"


__all__ = ["EXPORT_DIR", "INFO_FILE", "STATE_DICT_FILE", "dequantized_state_dict", "export_fake_quant"]
