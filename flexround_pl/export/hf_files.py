"""Writing a ``transformers`` model directory one block at a time.

Each :class:`~flexround_pl.export.codes.Unit` (a block, or what lies outside
the blocks) becomes one safetensors shard, written and dropped before the next
is built, with the ``model.safetensors.index.json`` that ``from_pretrained``
reads for sharded checkpoints. Beside it: ``config.json`` (the FP model's,
with ``use_cache: true`` and the format's ``quantization_config``),
``generation_config.json`` and the tokenizer.
"""

from __future__ import annotations

import copy
import json
import os
from typing import Any, Callable, Optional

import torch
from torch import Tensor

from flexround_pl.export.codes import LayerCodes, QuantizedCodes, Unit
from flexround_pl.export.formats import ExportContext

INDEX_NAME = "model.safetensors.index.json"

#: Builds one unit's tensors: ``{key: tensor}`` (quantized layers in the format's own layout).
UnitTensors = Callable[[QuantizedCodes, Unit], dict[str, Tensor]]
#: One quantized layer's tensors in a format's layout, by leaf name (``qweight``, ``weight_packed`` ...).
LayerTensors = Callable[[LayerCodes], dict[str, Tensor]]


def tied_aliases(codes: QuantizedCodes, net: Any) -> set[str]:
    """Alias keys ``from_pretrained`` re-ties itself (tied embeddings), so they are not written twice."""
    if not getattr(getattr(net, "config", None), "tie_word_embeddings", False):
        return set()
    return set(codes.aliases)


def write_shards(
    codes: QuantizedCodes, units: list[Unit], directory: str, unit_tensors: UnitTensors, skip: set[str]
) -> int:
    """One shard per non-empty unit + the index; returns the bytes of tensor data written."""
    from safetensors.torch import save_file

    built = [u for u in units if u.plain or u.layers]
    weight_map: dict[str, str] = {}
    total = 0
    for i, unit in enumerate(built):
        tensors = {k: t.contiguous() for k, t in unit_tensors(codes, unit).items() if k not in skip}
        name = f"model-{i + 1:05d}-of-{len(built):05d}.safetensors"
        save_file(tensors, os.path.join(directory, name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, name))
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        del tensors
    with open(os.path.join(directory, INDEX_NAME), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
        f.write("\n")
    return total


def plain_tensors(codes: QuantizedCodes, unit: Unit) -> dict[str, Tensor]:
    return {key: codes.tensor(key) for key in unit.plain}


def quantized_shards(
    codes: QuantizedCodes, unit: Unit, layer_tensors: LayerTensors, dtype: Optional[torch.dtype]
) -> dict[str, Tensor]:
    """One unit's tensors: FP tensors (cast to ``dtype`` unless ``None``), each quantized layer through ``layer_tensors``."""

    def cast(t: Tensor) -> Tensor:
        return t.to(dtype) if dtype is not None and t.is_floating_point() else t

    out = {k: cast(t) for k, t in plain_tensors(codes, unit).items()}
    for name in unit.layers:
        layer = codes.layer(name)
        out.update({f"{name}.{leaf}": t for leaf, t in layer_tensors(layer).items()})
        if layer.bias is not None:
            out[f"{name}.bias"] = cast(layer.bias)
    return out


def write_hf_model(
    codes: QuantizedCodes, directory: str, context: ExportContext, layer_tensors: LayerTensors,
    quantization_config: Optional[dict[str, Any]] = None, dtype: Optional[torch.dtype] = torch.float16,
) -> None:
    """A sharded ``transformers`` directory (one shard per block) whose quantized layers come from ``layer_tensors``.

    ``dtype``: what the FP tensors and the model are stored in (``None``: as in the run).
    """
    blocks = [n for n, _ in context.arch.blocks(context.net)]
    write_shards(codes, codes.units(blocks), directory,
                 lambda c, u: quantized_shards(c, u, layer_tensors, dtype), tied_aliases(codes, context.net))
    write_config(context.net, directory, quantization_config, dtype=None if dtype is None else dtype_name(dtype))
    save_tokenizer(context.tokenizer, directory)


def write_config(net: Any, directory: str, quantization_config: Optional[dict[str, Any]] = None,
                 dtype: Optional[str] = None) -> None:
    """``config.json`` (+ ``generation_config.json``) of the FP skeleton, ready for serving."""
    config = copy.deepcopy(net.config)
    config.use_cache = True  # the run turns the KV cache off while quantizing; serving wants it
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.save_pretrained(directory)
    path = os.path.join(directory, "config.json")
    with open(path) as f:
        payload = json.load(f)
    if dtype is not None:
        payload["dtype"] = dtype
    if quantization_config is not None:
        payload["quantization_config"] = quantization_config
    with open(path, "w") as f:
        json.dump(payload, f, indent=2, sort_keys=True)
        f.write("\n")
    generation = getattr(net, "generation_config", None)
    if generation is not None:
        generation = copy.deepcopy(generation)
        generation.use_cache = True
        generation.save_pretrained(directory)


def save_tokenizer(tokenizer: Any, directory: str) -> None:
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)


def dtype_name(dtype: Any) -> str:
    return str(dtype).replace("torch.", "")


__all__ = ["INDEX_NAME", "dtype_name", "plain_tensors", "quantized_shards", "write_hf_model", "save_tokenizer", "tied_aliases", "write_config", "write_shards"]
