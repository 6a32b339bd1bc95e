"""The quantized checkpoint: one self-contained ``safetensors`` file.

What ``fit`` writes to ``<run dir>/quantized.safetensors``:

* every hardened quantized layer's state dict, generically (``codes``,
  ``scale``, ``zero_point``, ``bias``, NUPES ``exponent``, activation step
  sizes ``act_quant.*`` ... whatever the layer persists), with ``codes``
  **packed to their bit-width** (:mod:`flexround_pl.export.packing`: 4-bit
  codes two per byte, 3-bit codes 8 per 3 bytes, ...) and stored as a 1-D
  uint8 tensor under the same key;
* every other tensor of the model's state dict (the FP remainder: embeddings,
  LayerNorms, heads kept FP, folded BatchNorm biases ...), as is, so loading
  needs no pretrained weights file; tensors shared by several keys (tied
  embeddings) are stored once and listed under ``aliases``;
* a JSON metadata block (safetensors metadata key ``flexround_pl``): format
  version, library / torch versions, method, bits, granularity, group size,
  the model source and architecture, the run's configuration, one entry per
  quantized layer (class, bits, grid, code shape / dtype, FP weight shape /
  dtype, activation bits) and a SHA-256 over every stored tensor, checked on
  load so a corrupt file is refused instead of silently giving wrong weights.

Loading (:func:`load_quantized_model`) builds the FP network *skeleton* from
the config's model source (architecture, tokenizer; its weights are then
overwritten), swaps the listed layers for hardened wrappers and loads every
tensor with ``strict`` key checking: the result computes exactly what the run's
quantized model computed (same codes, scales, FP tensors, hence bitwise the
same dequantized weights and the same metric on the same device).

The same format holds one block's state in the resume directory
(:mod:`flexround_pl.reconstruct.resume`), with layer names relative to the block.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tempfile
from typing import Any, Optional

import torch
from torch import Tensor, nn

import flexround_pl
from flexround_pl.export.packing import pack_codes, packed_nbytes, unpack_codes
from flexround_pl.quant.layers import QuantizedLayer
from flexround_pl.rundir import CHECKPOINT_NAME  # re-exported

FORMAT = "flexround_pl.quantized"
FORMAT_VERSION = 1
METADATA_KEY = "flexround_pl"


class CheckpointError(ValueError):
    """A checkpoint that is missing, unreadable, corrupt or does not fit the model (CLI: exit 2)."""


# ----------------------------------------------------------------------------- helpers


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise CheckpointError(f"unknown dtype {name!r} in the checkpoint metadata")
    return dtype


def _storage_key(t: Tensor) -> tuple:
    return (t.device.type, t.untyped_storage().data_ptr())


def _view_key(t: Tensor) -> tuple:
    return (*_storage_key(t), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)


def _digest(tensors: dict[str, Tensor]) -> str:
    """SHA-256 over names, dtypes, shapes and bytes of ``tensors`` (sorted by name)."""
    h = hashlib.sha256()
    for key in sorted(tensors):
        t = tensors[key].detach().cpu().contiguous()
        h.update(f"{key}|{_dtype_name(t.dtype)}|{list(t.shape)}|".encode())
        if t.numel():
            h.update(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
    return "sha256:" + h.hexdigest()


def state_dict_nbytes(module: nn.Module) -> int:
    """Bytes of ``module``'s state dict, each shared tensor counted once (an FP checkpoint's size).

    Works from shapes and dtypes alone, so a lazily loaded model (blocks on
    ``meta``) is sized without reading a weight.
    """
    seen: set = set()
    total = 0
    for t in module.state_dict(keep_vars=True).values():
        key = ("meta", id(t)) if t.is_meta else _view_key(t)  # every meta tensor has data_ptr 0
        if key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()
    return total


def quantized_weight_nbytes(module: nn.Module) -> tuple[int, int]:
    """``(packed, fp)`` bytes of the quantized layers' weights: packed codes + scales + zero points vs FP weights."""
    packed = fp = 0
    seen: set = set()
    for _, layer in module.named_modules():
        if not isinstance(layer, QuantizedLayer) or not layer.hardened or id(layer) in seen:
            continue
        seen.add(id(layer))
        numel = layer.codes.numel()
        packed += packed_nbytes(numel, layer.grid_cfg.bits) + 4 * (layer.scale.numel() + layer.zero_point.numel())
        fp += numel * torch.empty((), dtype=layer.fp_dtype).element_size()
    return packed, fp


def quantized_layer_info(module: nn.Module) -> dict[str, dict[str, Any]]:
    """One entry per quantized layer under ``module`` (names relative to it; shared layers under each name)."""
    layers: dict[str, dict[str, Any]] = {}
    for name, layer in module.named_modules(remove_duplicate=False):
        if not isinstance(layer, QuantizedLayer):
            continue
        if not layer.hardened:
            raise ValueError(f"layer {name!r} is not hardened: only hardened (finished) layers can be saved")
        c = layer.grid_cfg
        act = getattr(layer, "act_quant", None)
        layers[name] = {
            "class": type(layer).__name__,
            "bits": c.bits,
            "symmetric": c.symmetric,
            "granularity": c.granularity,
            "group_size": c.group_size,
            "codes_shape": list(layer.codes.shape),
            "codes_dtype": _dtype_name(layer.codes.dtype),
            "fp_shape": list(layer.fp_shape),
            "fp_dtype": _dtype_name(layer.fp_dtype),
            "act_bits": None if act is None else int(act.bits),
            "act_granularity": None if act is None else act.cfg.granularity,
            "exponent": getattr(layer, "exponent", None) is not None,
        }
    return layers


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _key(prefix: str, leaf: str) -> str:
    return f"{prefix}.{leaf}" if prefix else leaf


# ----------------------------------------------------------------------------- save


def save_quantized(module: nn.Module, path: str, metadata: Optional[dict[str, Any]] = None) -> int:
    """Write ``module`` (a hardened network or block) to ``path`` atomically; returns the file size.

    ``metadata`` (JSON-serializable) is merged into the metadata block.
    """
    layers = quantized_layer_info(module)
    tensors: dict[str, Tensor] = {}
    aliases: dict[str, str] = {}
    by_view: dict[tuple, str] = {}
    storages: set = set()
    for key, t in module.state_dict().items():
        t = t.detach()
        view = _view_key(t)
        if view in by_view:
            aliases[key] = by_view[view]
            continue
        by_view[view] = key
        if _storage_key(t) in storages:  # a different view of a storage already stored
            t = t.clone()
        storages.add(_storage_key(t))
        tensors[key] = t.cpu().contiguous()
    for name, info in layers.items():
        key = _key(name, "codes")
        if key in tensors:
            tensors[key] = pack_codes(tensors[key], info["bits"])
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "library_version": flexround_pl.__version__,
        "torch_version": torch.__version__.split("+")[0],
        **(metadata or {}),
        "layers": layers,
        "aliases": aliases,
        "checksum": _digest(tensors),
    }
    from safetensors.torch import save_file

    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=".safetensors")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata={"format": "pt", METADATA_KEY: json.dumps(meta, default=str)})
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return os.path.getsize(path)


# ----------------------------------------------------------------------------- read


def read_metadata(path: str) -> dict[str, Any]:
    """The metadata block of a quantized checkpoint (header only; checks it is one)."""
    from safetensors import safe_open

    if not os.path.isfile(path):
        raise CheckpointError(f"quantized checkpoint {path!r} does not exist")
    try:
        with safe_open(path, framework="pt") as f:
            raw = (f.metadata() or {}).get(METADATA_KEY)
    except Exception as e:  # SafetensorError, OSError ...
        raise CheckpointError(
            f"{path}: not a readable safetensors file (truncated or corrupt?): {type(e).__name__}: {e}"
        ) from None
    if raw is None:
        raise CheckpointError(f"{path}: not a flexround_pl quantized checkpoint (no {METADATA_KEY!r} metadata)")
    try:
        meta = json.loads(raw)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: corrupt metadata block ({e})") from None
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a flexround_pl quantized checkpoint (format {meta.get('format')!r})")
    if int(meta.get("format_version", -1)) > FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: checkpoint format version {meta.get('format_version')} is newer than this "
            f"flexround_pl ({FORMAT_VERSION}); upgrade flexround_pl"
        )
    return meta


def read_quantized(path: str) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """``(metadata, state_dict)`` of a checkpoint, codes unpacked and aliases restored.

    Raises :class:`CheckpointError` on a missing, truncated or corrupt file.
    """
    from safetensors import safe_open

    meta = read_metadata(path)
    try:
        with safe_open(path, framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:
        raise CheckpointError(f"{path}: cannot read the tensors (truncated or corrupt?): {type(e).__name__}: {e}") from None
    if _digest(tensors) != meta.get("checksum"):
        raise CheckpointError(f"{path}: checksum mismatch, the file is corrupt; re-create it (run fit again)")
    for name, info in meta["layers"].items():
        key = _key(name, "codes")
        if key not in tensors:
            continue  # an alias of a shared layer's codes
        packed = tensors[key]
        shape = info["codes_shape"]
        numel = int(torch.tensor(shape).prod()) if shape else 1
        if packed.dtype != torch.uint8 or packed.numel() != packed_nbytes(numel, info["bits"]):
            raise CheckpointError(f"{path}: packed codes of {name!r} have the wrong size")
        tensors[key] = unpack_codes(packed, info["bits"], shape, _dtype(info["codes_dtype"]))
    for alias, target in meta.get("aliases", {}).items():
        if target not in tensors:
            raise CheckpointError(f"{path}: alias {alias!r} points to missing tensor {target!r}")
        tensors[alias] = tensors[target]
    return meta, tensors


# ----------------------------------------------------------------------------- load into a network


def _stored_layer_config(info: dict[str, Any], quant: Optional[Any]) -> Any:
    """The grid and activation settings layer ``info`` was saved with, for
    :meth:`~flexround_pl.quant.layers.QuantizedLayer.for_loading` (the method does not matter)."""
    from flexround_pl.quant.config import GridConfig, QuantConfig

    base = quant if quant is not None else QuantConfig()
    grid = GridConfig(
        bits=info["bits"],
        symmetric=info["symmetric"],
        granularity=info["granularity"],
        group_size=info["group_size"],
    )
    changes: dict[str, Any] = {"weight": grid}
    activation = getattr(base, "activation", None)
    if activation is not None:
        changes["activation"] = dataclasses.replace(
            activation, bits=info.get("act_bits"), granularity=info.get("act_granularity") or "tensor"
        )
    return dataclasses.replace(base, **changes)


def apply_quantized(
    net: nn.Module, meta: dict[str, Any], state: dict[str, Tensor], quant: Optional[Any] = None, where: str = ""
) -> list[str]:
    """Swap the checkpoint's layers of the FP ``net`` for hardened wrappers and load ``state``.

    ``quant``: the run's :class:`~flexround_pl.quant.config.QuantConfig`
    (only its activation settings matter); returns the swapped layer names.
    """
    from flexround_pl.quant.surgery import wrapper_class

    where = where or "the checkpoint"
    modules = dict(net.named_modules(remove_duplicate=False))
    wrappers: dict[int, QuantizedLayer] = {}
    for name, info in meta["layers"].items():
        module = modules.get(name)
        if module is None:
            raise CheckpointError(f"{where} quantizes layer {name!r}, which this model does not have")
        if isinstance(module, QuantizedLayer):
            raise CheckpointError(f"layer {name!r} is already quantized: load into an FP model")
        cls = wrapper_class(module)
        if cls is None or cls.__name__ != info["class"]:
            raise CheckpointError(
                f"{where}: layer {name!r} is a {type(module).__name__} here but {info['class']} in the checkpoint"
            )
        if list(module.weight.shape) != list(info["fp_shape"]):
            raise CheckpointError(
                f"{where}: layer {name!r} has weight shape {list(module.weight.shape)} here but "
                f"{info['fp_shape']} in the checkpoint (another model?)"
            )
        if id(module) not in wrappers:
            wrappers[id(module)] = cls.for_loading(module, _stored_layer_config(info, quant))
    for name in meta["layers"]:
        parent, _, child = name.rpartition(".")
        setattr(modules[parent] if parent else net, child, wrappers[id(modules[name])])
    try:
        missing, unexpected = net.load_state_dict(state, strict=False)
    except RuntimeError as e:
        raise CheckpointError(f"{where} does not fit the model: {' '.join(str(e).split())}") from None
    if missing or unexpected:
        raise CheckpointError(
            f"{where} does not fit the model: missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}"
        )
    return list(meta["layers"])


def load_quantized_model(model: Any, path: str, compare: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    """Load checkpoint ``path`` into ``model`` (a :class:`~flexround_pl.ptq.PTQModel` whose FP net is loaded).

    ``compare``: configuration entries (flattened, as in the metadata's
    ``config``) that must equal the checkpoint's, e.g. the model source and
    the quantization settings; a difference raises :class:`CheckpointError`.
    Returns the metadata.
    """
    if model.net is None:
        raise RuntimeError("load the FP network first (PTQModel.load)")
    meta = read_metadata(path)
    check_compatible(meta, compare or {}, path)
    meta, state = read_quantized(path)
    apply_quantized(model.net, meta, state, getattr(model, "quant", None), where=path)
    model.net.eval()
    return meta


def check_compatible(meta: dict[str, Any], compare: dict[str, Any], path: str) -> None:
    saved = meta.get("config") or {}
    diffs = [
        f"{k}: {saved.get(k, '<unset>')!r} in the checkpoint, {v!r} in the config"
        for k, v in sorted(compare.items())
        if k in saved and saved.get(k) != v
    ]
    if diffs:
        more = f" (and {len(diffs) - 3} more)" if len(diffs) > 3 else ""
        raise CheckpointError(
            f"{path} was made with another configuration: {'; '.join(diffs[:3])}{more}; "
            "use the config of the run that wrote it"
        )


__all__ = [
    "CHECKPOINT_NAME", "CheckpointError", "apply_quantized", "check_compatible", "load_quantized_model",
    "quantized_layer_info", "quantized_weight_nbytes", "read_metadata", "read_quantized", "save_quantized", "state_dict_nbytes",
]
