"""A finished run's integer codes, read from ``quantized.safetensors`` one tensor at a time.

Every export format is written from here, never from a dequantized model:
``fit`` saves the checkpoint and then exports from it, and ``export`` reads
the checkpoint of a finished run, so both take the same path. The file is
memory-mapped and each tensor is read when a format asks for it, so an
export holds about one block at a time (:meth:`QuantizedCodes.units`),
whatever the model's size.

:class:`LayerCodes` gives one hardened layer in its grid layout ``[out, in]``
(HF ``Conv1D`` transposed back): codes, one step ``s1`` and one zero point
per row and group, as unsigned integers the way packed formats store them
(``u = code + 2^(b-1)`` for a symmetric grid, ``u = code`` for an
asymmetric one), so ``W_hat = s1 * (u - z)`` in both cases.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Iterator, Optional

import torch
from torch import Tensor

from flexround_pl.export.checkpoint import CheckpointError, _digest, _dtype, _key, read_metadata
from flexround_pl.export.formats import ExportPlan, LayerScheme
from flexround_pl.export.packing import packed_nbytes, unpack_codes
from flexround_pl.quant.config import GridConfig
from flexround_pl.quant.layers import dequantize_codes


def scheme_of(name: str, info: dict[str, Any]) -> LayerScheme:
    """The :class:`LayerScheme` of a checkpoint layer entry."""
    shape = info["codes_shape"]
    n_in = 1
    for s in shape[1:]:
        n_in *= int(s)
    return LayerScheme(
        name=name, kind=info["class"], bits=int(info["bits"]), symmetric=bool(info["symmetric"]),
        granularity=info["granularity"], group_size=int(info["group_size"]) if info["granularity"] == "group" else None,
        n_out=int(shape[0]), n_in=n_in, nupes=bool(info.get("exponent")), act_bits=info.get("act_bits"),
    )


@dataclass
class LayerCodes:
    """One hardened layer of the checkpoint, in grid layout ``[n_out, n_in]``."""

    scheme: LayerScheme
    codes: Tensor  # int8 (symmetric) / uint8 (asymmetric), [n_out, n_in]
    scale: Tensor  # float32 [n_out, groups]
    zero_point: Tensor  # float32 [n_out, groups], integer-valued
    bias: Optional[Tensor]
    exponent: Optional[Tensor]
    fp_shape: tuple[int, ...]
    fp_dtype: torch.dtype

    @property
    def group_size(self) -> int:
        """Columns per scale: the group size, or the whole row (per channel / per tensor)."""
        return self.scheme.n_in // self.scale.shape[1]

    def unsigned(self) -> Tensor:
        """int32 codes in ``[0, 2^b)``: what packed formats store."""
        offset = 1 << (self.scheme.bits - 1) if self.scheme.symmetric else 0
        return self.codes.to(torch.int32) + offset

    def zeros(self) -> Tensor:
        """int32 zero points in the unsigned domain, ``[n_out, groups]`` (``2^(b-1)`` for a symmetric grid)."""
        offset = 1 << (self.scheme.bits - 1) if self.scheme.symmetric else 0
        return torch.round(self.zero_point).to(torch.int32) + offset

    def scale_fp16(self) -> Tensor:
        return self.scale.to(torch.float16)

    def dequantized(self, fp16_scales: bool = False) -> Tensor:
        """``s1 * (codes - z)`` in grid layout (float32); ``fp16_scales``: with ``s1`` as the fp16 file holds it."""
        s = self.scale_fp16().float() if fp16_scales else self.scale
        cfg = GridConfig(bits=self.scheme.bits, symmetric=self.scheme.symmetric,
                         granularity="group" if s.shape[1] > 1 else "channel", group_size=self.group_size)
        scale = s.unsqueeze(-1) if s.shape[1] > 1 else s
        zero = self.zero_point.unsqueeze(-1) if s.shape[1] > 1 else self.zero_point
        return dequantize_codes(self.codes, scale, zero, cfg, self.exponent)

    def fp16_scale_change(self) -> float:
        """Largest relative change of ``s1`` when stored as fp16 (0.0: the file is exact)."""
        s = self.scale
        if not s.numel():
            return 0.0
        return float(((self.scale_fp16().float() - s).abs() / s.abs().clamp_min(1e-30)).max())


@dataclass
class Unit:
    """What one shard holds: a block's tensors, or the tensors outside every block (``name`` ``''``)."""

    name: str
    plain: list[str]  # state-dict keys of FP tensors (norms, embeddings, FP layers, ...)
    layers: list[str]  # quantized layer names


class _LazyTensors(Mapping):
    """The stored tensors as a read-on-access mapping (the checksum walks it one tensor at a time)."""

    def __init__(self, handle: Any) -> None:
        self.handle = handle
        self._keys = list(handle.keys())

    def __getitem__(self, key: str) -> Tensor:
        return self.handle.get_tensor(key)

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)


class QuantizedCodes:
    """``quantized.safetensors``, memory-mapped; tensors are read when asked for.

    ``verify``: check the file's SHA-256 first (one pass, one tensor at a time).
    """

    def __init__(self, path: str, verify: bool = True) -> None:
        from safetensors import safe_open

        self.path = path
        self.meta = read_metadata(path)
        self._handle = safe_open(path, framework="pt")
        stored = _LazyTensors(self._handle)
        if verify and _digest(stored) != self.meta.get("checksum"):
            raise CheckpointError(f"{path}: checksum mismatch, the file is corrupt; re-create it (run fit again)")
        self.stored = set(stored)
        self.aliases: dict[str, str] = dict(self.meta.get("aliases", {}))
        self.layer_info: dict[str, dict[str, Any]] = dict(self.meta["layers"])
        self.keys = [k for k in stored] + list(self.aliases)

    # ---- plain tensors ------------------------------------------------------
    def tensor(self, key: str) -> Tensor:
        return self._handle.get_tensor(self.aliases.get(key, key))

    def owner(self, key: str) -> Optional[str]:
        """The quantized layer that ``key`` belongs to (``codes``, ``scale``, ``act_quant.*`` ...), if any."""
        parts = key.split(".")
        for i in range(len(parts) - 1, 0, -1):
            name = ".".join(parts[:i])
            if name in self.layer_info:
                return name
        return None

    def scheme(self, name: str) -> LayerScheme:
        return scheme_of(name, self.layer_info[name])

    def schemes(self) -> tuple[LayerScheme, ...]:
        return tuple(self.scheme(n) for n in self.layer_info)

    def layer(self, name: str) -> LayerCodes:
        info = self.layer_info[name]
        scheme = self.scheme(name)
        key = _key(name, "codes")
        packed = self.tensor(key)
        numel = scheme.n_out * scheme.n_in
        if packed.dtype != torch.uint8 or packed.numel() != packed_nbytes(numel, scheme.bits):
            raise CheckpointError(f"{self.path}: packed codes of {name!r} have the wrong size")
        codes = unpack_codes(packed, scheme.bits, [scheme.n_out, scheme.n_in], _dtype(info["codes_dtype"]))
        groups = scheme.groups_per_row
        scale = self.tensor(_key(name, "scale")).float().reshape(-1, groups).expand(scheme.n_out, groups)
        zero = self.tensor(_key(name, "zero_point")).float().reshape(-1, groups).expand(scheme.n_out, groups)
        bias_key, exp_key = _key(name, "bias"), _key(name, "exponent")
        return LayerCodes(
            scheme=scheme, codes=codes, scale=scale.contiguous(), zero_point=zero.contiguous(),
            bias=self.tensor(bias_key) if bias_key in self.keys else None,
            exponent=self.tensor(exp_key) if exp_key in self.keys else None,
            fp_shape=tuple(info["fp_shape"]), fp_dtype=_dtype(info["fp_dtype"]),
        )

    # ---- grouping -------------------------------------------------------------
    def units(self, block_names: list[str]) -> list[Unit]:
        """The blocks in order, then everything outside them: each export shard holds one."""
        units = {name: Unit(name, [], []) for name in block_names}
        rest = Unit("", [], [])
        for key in self.keys:
            owner = self.owner(key)
            target = next((units[b] for b in block_names if (owner or key).startswith(b + ".")), rest)
            if owner is None:
                target.plain.append(key)
            elif owner not in target.layers:
                target.layers.append(owner)
        return [*units.values(), rest]

    def plan(self, net: Any, arch: Any) -> ExportPlan:
        """The :class:`ExportPlan` of this checkpoint for the FP skeleton ``net``."""
        return make_plan(net, arch, self.schemes())


def is_transformers_model(net: Any) -> bool:
    try:
        from transformers import PreTrainedModel
    except ImportError:
        return False
    return isinstance(net, PreTrainedModel)


def make_plan(net: Any, arch: Any, schemes: tuple[LayerScheme, ...]) -> ExportPlan:
    """An :class:`ExportPlan` from the FP skeleton ``net`` and the schemes of its quantized layers."""
    from flexround_pl.quant.surgery import wrapper_class

    quantized = {s.name for s in schemes}
    in_block_fp = []
    for block_name, block in arch.blocks(net):
        for name, module in block.named_modules():
            full = f"{block_name}.{name}" if name else block_name
            if wrapper_class(module) is not None and full not in quantized:
                in_block_fp.append(full)
    return ExportPlan(
        model_class=type(net).__name__, architecture=arch.name, is_transformers=is_transformers_model(net),
        layers=schemes, in_block_fp=tuple(in_block_fp),
    )


def planned_schemes(net: Any, arch: Any, quant: Any, names: list[str]) -> tuple[LayerScheme, ...]:
    """The schemes the run *will* give layers ``names`` (preflight: nothing is quantized yet)."""
    from flexround_pl.quant.surgery import wrapper_class

    eight = [re.compile(p) for p in arch.eight_bit]
    w = quant.weight
    out = []
    for name in names:
        module = net.get_submodule(name)
        cls = wrapper_class(module)
        weight = module.weight
        n_out, n_in = (weight.shape[1], weight.shape[0]) if cls.transposed else (weight.shape[0], weight[0].numel())
        eight_bit = any(p.search(name) for p in eight)  # as quantize_modules: these layers get 8 bits
        a_bits = quant.activation.bits
        out.append(LayerScheme(
            name=name, kind=cls.__name__, bits=8 if eight_bit else w.bits, symmetric=w.symmetric,
            granularity=w.granularity, group_size=w.group_size if w.granularity == "group" else None,
            n_out=int(n_out), n_in=int(n_in), nupes=quant.method == "nupes",
            act_bits=None if a_bits is None else (max(a_bits, 8) if eight_bit else a_bits),
        ))
    return tuple(out)


__all__ = ["LayerCodes", "QuantizedCodes", "Unit", "is_transformers_model", "make_plan", "planned_schemes", "scheme_of"]
