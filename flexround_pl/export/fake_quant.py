"""Fake-quant export: the quantized model as ordinary floating-point weights.

The ``fake_quant`` export format, ``<run dir>/export/fake_quant/`` (the default of ``--export.formats``):

* Hugging Face models (``transformers.PreTrainedModel``): a sharded
  checkpoint (one ``model-*.safetensors`` shard per block, written from the
  codes one block at a time, + ``model.safetensors.index.json``),
  ``config.json`` and the tokenizer, loadable with
  plain ``transformers`` (``AutoModelForSequenceClassification.from_pretrained``
  / ``AutoModelForCausalLM.from_pretrained``), no flexround_pl needed. Each
  quantized layer's weight is its dequantized weight ``scale * (codes -
  zero_point)`` (NUPES: mapped back through the power function) in the layer's
  FP dtype and layout.
* Other models (torchvision CNNs): ``model_state_dict.pt``, a plain
  torchvision state dict (folded BatchNorms come back as identity BatchNorms
  carrying the folded bias: the adapter's ``export_state_dict`` hook, see
  :func:`flexround_pl.models.cnn.torchvision_state_dict`), for
  ``torchvision.models.get_model(arch, num_classes=...)``.
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

import os
from collections import OrderedDict
from typing import Any, Optional

import torch
from torch import Tensor, nn

from flexround_pl.export.codes import LayerCodes, QuantizedCodes, is_transformers_model
from flexround_pl.export.directory import INFO_FILE, atomic_directory, write_info  # noqa: F401  (INFO_FILE re-exported)
from flexround_pl.export.formats import ExportContext, ExportFormat, ExportPlan, register
from flexround_pl.export.hf_files import save_tokenizer, write_hf_model
from flexround_pl.quant.layers import QuantizedLayer

STATE_DICT_FILE = "model_state_dict.pt"


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
    arch: Optional[Any] = None,
) -> str:
    """Write the plain-FP export of the hardened, in-memory ``net`` to ``directory`` (replaced atomically).

    ``arch``: the model's adapter (found from ``net`` when ``None``); a
    non-``transformers`` model is written through its ``export_state_dict`` hook.
    """
    with atomic_directory(directory) as tmp:
        meta = dict(info or {})
        meta["activation_quantization_dropped"] = has_activation_quantization(net)
        if is_transformers_model(net):
            use_cache = getattr(net.config, "use_cache", None)
            if use_cache is not None:
                net.config.use_cache = True
            try:
                net.save_pretrained(tmp, state_dict=dequantized_state_dict(net))
            finally:
                if use_cache is not None:
                    net.config.use_cache = use_cache
            save_tokenizer(tokenizer, tmp)
            meta.update(format="transformers", load=_hf_load(net))
        else:
            meta.update(_write_state_dict(net, arch, tmp))
        write_info(tmp, meta)
    return directory


def _write_state_dict(net: nn.Module, arch: Optional[Any], directory: str) -> dict[str, Any]:
    """A non-``transformers`` model: its adapter's plain state dict, for ``torch.load`` + ``load_state_dict``."""
    if arch is None:
        from flexround_pl.models.adapter import find_architecture

        arch = find_architecture(net)
    if arch.export_state_dict is None:
        raise ValueError(f"the {arch.name} adapter has no export_state_dict hook: the fake-quant export cannot write it")
    torch.save(arch.export_state_dict(net), os.path.join(directory, STATE_DICT_FILE))
    return {
        "format": "torch_state_dict",
        "model_class": type(net).__name__,
        "load": (
            "m = torchvision.models.get_model(arch, num_classes=...); "
            f"m.load_state_dict(torch.load('{STATE_DICT_FILE}'))"
        ),
    }


def _hf_load(net: nn.Module) -> str:
    return f"transformers.{_auto_class(net)}.from_pretrained(<this directory>)"


class FakeQuant(ExportFormat):
    """``fake_quant``: every quantized weight dequantized to the layer's FP dtype; loads with no extra package.

    Exact: the weights are the run's ``s1 * (codes - z)`` bit for bit. As large
    as the FP model; activation quantization is dropped (noted in the info file).
    """

    name = "fake_quant"
    fp16_scales = False

    def refusal(self, plan: ExportPlan) -> Optional[str]:
        return None

    def write(self, codes: QuantizedCodes, directory: str, context: ExportContext) -> dict[str, Any]:
        act = any(s.act_bits is not None for s in codes.schemes())
        if not is_transformers_model(context.net):  # small torchvision CNNs: from the loaded quantized model
            return {**_write_state_dict(context.net, context.arch, directory), "activation_quantization_dropped": act}

        def dequantized(layer: LayerCodes) -> dict[str, Tensor]:
            w = layer.dequantized()
            w = w.t() if layer.scheme.kind == "QuantConv1D" else w.reshape(layer.fp_shape)
            return {"weight": w.to(layer.fp_dtype)}

        write_hf_model(codes, directory, context, dequantized, dtype=None)
        return {"format": "transformers", "load": _hf_load(context.net), "activation_quantization_dropped": act}


register(FakeQuant())


def _auto_class(net: nn.Module) -> str:
    name = type(net).__name__
    if name.endswith("ForSequenceClassification"):
        return "AutoModelForSequenceClassification"
    if name.endswith("ForCausalLM") or name.endswith("LMHeadModel"):
        return "AutoModelForCausalLM"
    return "AutoModel"


__all__ = ["FakeQuant", "STATE_DICT_FILE", "dequantized_state_dict", "export_fake_quant", "has_activation_quantization"]
