"""Lazy loading: a Hugging Face model read from its safetensors shards one block at a time.

Why: block-wise PTQ only ever needs one block's FP weights at a time, so a
model whose FP weights do not fit in RAM can still be quantized
(``HFModel(..., lazy=True)``). Memory stays bounded by the parts outside the
blocks, about one FP block, and the quantized blocks' integer codes.

How:

* the skeleton is built with ``accelerate.init_empty_weights()``: every
  parameter is on the ``meta`` device (no memory), while buffers are computed
  for real by the modules' own ``__init__`` (rotary ``inv_freq`` and other
  non-persistent buffers that no checkpoint holds);
* everything outside the blocks (embeddings, final norm, heads; tied weights
  stay one tensor) and every buffer the checkpoint holds are read once with
  ``safetensors.safe_open``, which reads only the tensors asked for, across
  the shards of ``model.safetensors.index.json``;
* each block (the adapter's ``blocks(model)``) stays on ``meta``: a forward
  pre-hook reads its tensors on the device of its input, a forward hook sends
  them back to ``meta``. Any full-model forward (FP evaluation, calibration
  capture) therefore holds one FP block at a time;
* the block driver :func:`pin` s the block it reconstructs (resident for the
  whole reconstruction) and :func:`release` s it once hardened. A released
  quantized block keeps what the checkpoint cannot give back (codes, scales,
  zero points, biases, norms); only its hardened layers' dequantized weight
  caches (FP size) go to ``meta`` and are recomputed from the codes, bitwise
  the same, at each forward;
* moving the model (Lightning's ``model.to(device)``) moves what is resident
  and only changes the dtype of what is on ``meta``; loading a state dict
  (``validate`` / ``test`` load the quantized checkpoint) materializes one
  block at a time. :func:`materialize` makes everything resident (the
  plain-FP export needs every dequantized weight at once).

For eager models every helper here is a no-op.
"""

from __future__ import annotations

import glob
import json
import os
import types
import weakref
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator

import torch
from torch import Tensor, nn

from flexround_pl.quant.layers import QuantizedLayer

INDEX_FILE = "model.safetensors.index.json"


class Shards:
    """Where each tensor of a directory of ``*.safetensors`` files lives; reads only what is asked."""

    def __init__(self, directory: str) -> None:
        from safetensors import safe_open

        index = os.path.join(directory, INDEX_FILE)
        if os.path.isfile(index):
            with open(index) as f:
                self.files = {k: os.path.join(directory, v) for k, v in json.load(f)["weight_map"].items()}
            return
        single = os.path.join(directory, "model.safetensors")
        paths = [single] if os.path.isfile(single) else sorted(glob.glob(os.path.join(directory, "*.safetensors")))
        if not paths:
            raise ValueError(
                f"lazy: true needs the model as *.safetensors files, but {directory!r} has none; "
                "re-save it with transformers' save_pretrained (safetensors) or set lazy: false"
            )
        self.files = {}
        for path in paths:
            with safe_open(path, framework="pt") as f:
                self.files.update(dict.fromkeys(f.keys(), path))

    def read(self, keys: list[str]) -> dict[str, Tensor]:
        from safetensors import safe_open

        out: dict[str, Tensor] = {}
        for path in sorted({self.files[k] for k in keys}):
            with safe_open(path, framework="pt") as f:
                out.update({k: f.get_tensor(k) for k in keys if self.files[k] == path})
        return out


@dataclass
class _Block:
    """A lazy block: where its tensors are in the shards (``keys``: local name -> key) and whether it is pinned."""

    shards: Shards
    keys: dict[str, str]
    pinned: bool = False
    loading: bool = False  # pinned by a load_state_dict pre-hook, released by its post-hook


#: lazy model -> its shards; lazy block -> its state. Hooks look blocks up here, so a
#: deep copy of a block (the driver's FP teacher) carries hooks that do nothing.
_MODELS: weakref.WeakKeyDictionary[nn.Module, Shards] = weakref.WeakKeyDictionary()
_BLOCKS: weakref.WeakKeyDictionary[nn.Module, _Block] = weakref.WeakKeyDictionary()


# ----------------------------------------------------------------------------- loading


def load(directory: str, task: str) -> nn.Module:
    """The model of ``directory`` with every block on ``meta``, read from the shards when it runs."""
    import transformers
    from accelerate import init_empty_weights

    from flexround_pl.models.adapter import find_architecture

    shards = Shards(directory)
    auto = {
        "causal-lm": transformers.AutoModelForCausalLM,
        "sequence-classification": transformers.AutoModelForSequenceClassification,
    }.get(task)
    if auto is None:
        raise ValueError(f"unknown task {task!r}: use 'sequence-classification' or 'causal-lm'")
    config = transformers.AutoConfig.from_pretrained(directory)
    with init_empty_weights():  # parameters on meta, buffers real
        model = auto.from_config(config, dtype=torch.float32)
    model.tie_weights()
    try:
        blocks = find_architecture(model).blocks(model)
    except (ValueError, AttributeError, TypeError) as e:
        raise ValueError(f"lazy: true loads the model block by block, but its blocks cannot be found: {e}") from None
    if not blocks:
        raise ValueError(f"lazy: true: the adapter finds no blocks in {type(model).__name__}")

    keys = _checkpoint_keys(model, shards, directory)
    prefixes = tuple(name + "." for name, _ in blocks)
    outside = {n: k for n, k in keys.items() if not n.startswith(prefixes)}
    _load_params(model, outside, shards, torch.device("cpu"))
    buffers = {n: keys[n] for n, _ in model.named_buffers() if n in keys}  # persistent buffers in the checkpoint
    if buffers:
        read = shards.read(list(buffers.values()))
        with torch.no_grad():
            for name, key in buffers.items():
                model.get_buffer(name).copy_(read[key])
    for name, block in blocks:
        local = {n[len(name) + 1:]: k for n, k in keys.items() if n.startswith(name + ".")}
        _BLOCKS[block] = _Block(shards, local)
        block.register_forward_pre_hook(_before_forward, with_kwargs=True)
        block.register_forward_hook(_after_forward)
        block.register_load_state_dict_pre_hook(_before_load)
        block.register_load_state_dict_post_hook(_after_load)
        block._apply = types.MethodType(_apply_keeping_meta, block)
    _MODELS[model] = shards
    return model.eval()


def _checkpoint_keys(model: nn.Module, shards: Shards, directory: str) -> dict[str, str]:
    """Checkpoint key of every parameter and buffer name the checkpoint holds; ValueError if a parameter is missing."""
    prefix = getattr(model, "base_model_prefix", "") + "."
    keys, missing = {}, []
    for name, p in [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]:
        key = next((k for k in (name, name.removeprefix(prefix)) if k in shards.files), None)
        if key is not None:
            keys[name] = key
        elif isinstance(p, nn.Parameter):
            missing.append(name)
    # a tied parameter needs only one of its names in the checkpoint
    found = {id(p) for n, p in model.named_parameters(remove_duplicate=False) if n in keys}
    missing = [n for n in missing if id(model.get_parameter(n)) not in found]
    if missing:
        raise ValueError(
            f"lazy: true: the checkpoint in {directory!r} has no tensor for {len(missing)} parameter(s) "
            f"(e.g. {', '.join(missing[:3])}); load it with lazy: false"
        )
    return keys


def _load_params(root: nn.Module, keys: dict[str, str], shards: Shards, device: torch.device) -> None:
    """Replace every ``meta`` parameter of ``root`` named in ``keys`` by the checkpoint's tensor (ties kept)."""
    slots: dict[int, list[tuple[nn.Module, str, nn.Parameter]]] = {}  # one entry per tensor, all its places
    key_of: dict[int, str] = {}
    for mod_name, module in root.named_modules(remove_duplicate=False):
        for name, p in module._parameters.items():
            full = f"{mod_name}.{name}" if mod_name else name
            if p is not None and p.is_meta:
                slots.setdefault(id(p), []).append((module, name, p))
                if full in keys:
                    key_of.setdefault(id(p), keys[full])
    if not key_of:
        return
    read = shards.read(sorted(set(key_of.values())))
    for ident, key in key_of.items():
        p = slots[ident][0][2]
        # copy=True: a private copy, not a view of the file's memory map (which would stay mapped)
        new = nn.Parameter(read[key].to(device=device, dtype=p.dtype, copy=True), requires_grad=p.requires_grad)
        for module, name, _ in slots[ident]:
            module._parameters[name] = new


def _hardened(block: nn.Module) -> list[QuantizedLayer]:
    # a for_loading() wrapper has no codes yet: nothing to dequantize before its load
    return [m for m in block.modules() if isinstance(m, QuantizedLayer) and m.hardened and not m.awaiting_load]


def _materialize_block(block: nn.Module, state: _Block, device: torch.device) -> None:
    _load_params(block, state.keys, state.shards, device)
    for layer in _hardened(block):
        if layer.weight.is_meta:  # recomputed exactly as QuantizedLayer._set_hardened computes it
            layer._buffers["weight"] = layer.decoded_weight()


def _drop_block(block: nn.Module, state: _Block) -> None:
    """Back to meta: a quantized block's dequantized caches, an FP block's checkpoint parameters."""
    if any(isinstance(m, QuantizedLayer) for m in block.modules()):
        for layer in _hardened(block):
            layer._buffers["weight"] = torch.empty_like(layer.weight, device="meta")
        return
    for mod_name, module in block.named_modules(remove_duplicate=False):
        for name, p in module._parameters.items():
            full = f"{mod_name}.{name}" if mod_name else name
            if p is not None and not p.is_meta and full in state.keys:
                module._parameters[name] = nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)


# ----------------------------------------------------------------------------- hooks


def _input_device(args: tuple, kwargs: dict) -> torch.device:
    for value in (*args, *kwargs.values()):
        if isinstance(value, Tensor):
            return value.device
    return torch.device("cpu")


def _before_forward(block: nn.Module, args: tuple, kwargs: dict) -> None:
    state = _BLOCKS.get(block)
    if state is not None and not state.pinned:
        _materialize_block(block, state, _input_device(args, kwargs))


def _after_forward(block: nn.Module, args: tuple, output: Any) -> None:
    state = _BLOCKS.get(block)
    if state is not None and not state.pinned:
        _drop_block(block, state)


def _before_load(block: nn.Module, *args: Any) -> None:
    state = _BLOCKS.get(block)
    if state is not None and not state.pinned:
        _pin(block)
        state.loading = True
    if state is not None:  # what the checkpoint does not hold (e.g. quantizer state) is loaded into empty tensors
        for module in block.modules():
            for table in (module._parameters, module._buffers):
                for name, t in table.items():
                    if t is not None and t.is_meta:
                        empty = torch.empty_like(t, device="cpu")
                        table[name] = nn.Parameter(empty, t.requires_grad) if isinstance(t, nn.Parameter) else empty


def _after_load(block: nn.Module, incompatible_keys: Any) -> None:
    state = _BLOCKS.get(block)
    if state is not None and state.loading:
        state.loading = False
        release(block)


def _apply_keeping_meta(self: nn.Module, fn: Any, recurse: bool = True) -> nn.Module:
    """``nn.Module._apply`` for a lazy block: resident tensors follow ``fn``; ``meta`` ones only its dtype."""
    hidden = []
    for module in self.modules():
        for table in (module._parameters, module._buffers):
            for name, t in table.items():
                if t is not None and t.is_meta:
                    hidden.append((table, name, t))
                    table[name] = None
    try:
        type(self)._apply(self, fn, recurse)
    finally:
        for table, name, t in hidden:
            dtype = fn(torch.empty(0, dtype=t.dtype)).dtype
            if dtype != t.dtype:
                t = nn.Parameter(t.to(dtype), t.requires_grad) if isinstance(t, nn.Parameter) else t.to(dtype)
            table[name] = t
    return self


# ----------------------------------------------------------------------------- the driver's helpers


def is_lazy(model: nn.Module) -> bool:
    return model in _MODELS


def pin(block: nn.Module) -> None:
    """Make ``block`` resident (on CPU, freshly read) until :func:`release`; no-op for eager blocks."""
    _pin(block)


def _pin(block: nn.Module) -> None:  # the hooks' own entry point, apart from the driver's pin()
    state = _BLOCKS.get(block)
    if state is None:
        return
    _drop_block(block, state)  # re-read: whatever a forward left behind may be inference tensors
    _materialize_block(block, state, torch.device("cpu"))
    state.pinned = True


def release(block: nn.Module) -> None:
    """Unpin ``block``: its checkpoint parameters (FP) or dequantized caches (quantized) go back to meta."""
    state = _BLOCKS.get(block)
    if state is None:
        return
    state.pinned = False
    _drop_block(block, state)


@contextmanager
def without_loading(blocks: list[nn.Module]) -> Iterator[None]:
    """Forwards of these lazy blocks read nothing (for forwards replaced by pass-throughs that need no weight)."""
    states = [s for b in blocks if (s := _BLOCKS.get(b)) is not None and not s.pinned]
    for state in states:
        state.pinned = True  # the hooks skip pinned blocks
    try:
        yield
    finally:
        for state in states:
            state.pinned = False


def materialize(model: nn.Module) -> nn.Module:
    """Pin every block of a lazy ``model`` (everything resident); returns ``model``."""
    for module in model.modules():
        if module in _BLOCKS:
            _pin(module)
    return model


def fp_nbytes(model: nn.Module) -> int:
    """Bytes of the FP state dict from shapes and dtypes alone (no weight is read); tied tensors count once."""
    from flexround_pl.utils import state_dict_nbytes

    return state_dict_nbytes(model)


def resident_nbytes(model: nn.Module) -> int:
    """Bytes of the parameters and buffers of ``model`` that are not on ``meta`` (each tensor once)."""
    tensors = {id(t): t for t in (*model.parameters(), *model.buffers()) if not t.is_meta}
    return sum(t.numel() * t.element_size() for t in tensors.values())


__all__ = ["Shards", "fp_nbytes", "is_lazy", "load", "materialize", "pin", "release", "resident_nbytes"]
