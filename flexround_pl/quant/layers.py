"""Drop-in wrappers of ``nn.Linear``, ``nn.Conv2d`` and Hugging Face ``Conv1D``.

Life of a wrapper:

1. ``from_float(module, cfg)``: keeps the FP weight as a frozen parameter
   (``weight``, in the FP layer's layout) and builds a quantizer; forward uses
   the soft fake-quantized weight, so gradients reach the quantizer's scales.
2. ``harden()``: computes the integer codes once and keeps only ``codes``
   (int8 symmetric / uint8 asymmetric), ``scale`` and ``zero_point`` (float32,
   grid broadcast shape) + the frozen bias. The quantizer and the FP weight
   parameter are deleted; the dequantized weight is cached as a
   *non-persistent buffer named* ``weight`` (FP layout, FP dtype), so code that
   reads ``layer.weight`` (dtype / device checks) keeps working, while the
   state dict holds only ``codes``, ``scale``, ``zero_point`` and ``bias``.

Codes live in the *grid layout*: output channels on dim 0, i.e. the FP layout
for Linear / Conv2d and ``[out, in]`` (transposed) for ``Conv1D``. Dequantize in
the grid view: ``scale * (codes - zero_point)``; :meth:`dequantize` does it.

Loading a hardened state dict into a freshly wrapped (not hardened) layer
hardens it on the fly from the stored codes; :meth:`QuantizedLayer.for_loading`
builds the wrapper to load into without building a quantizer at all.

Non-uniform grids (NUPES) also keep ``exponent`` (a float32 scalar buffer):
:meth:`dequantize` then returns ``sign(u) * |u|^(1 / exponent)`` with
``u = scale * (codes - zero_point)``.

With ``QuantConfig.activation.bits`` set, the layer's input goes through an
:class:`~flexround_pl.quant.activation.ActivationQuantizer` (``act_quant``,
8 bits for the architecture's ``eight_bit`` layers); its calibrated step size,
zero point and range are in the state dict (``act_quant.*``) before and after
hardening.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.utils import _pair

from .activation import ActivationQuantizer
from .base import WeightQuantizer, build_quantizer, decode_values
from .config import QuantConfig
from .grid import GridConfig, group_view, ungroup


def dequantize_codes(
    codes: Tensor, scale: Tensor, zero_point: Tensor, cfg: GridConfig, exponent: Optional[Tensor] = None
) -> Tensor:
    """``scale * (codes - zero_point)`` (NUPES: through the inverse power) in the codes' grid layout, float32.

    The one dequantization every hardened layer and every export uses, so they agree bit for bit.
    """
    u = scale * (group_view(codes.float(), cfg) - zero_point)
    return ungroup(decode_values(u, exponent), codes.shape)


class QuantizedLayer(nn.Module):
    """Base of the wrappers: FP weight + quantizer, then codes after :meth:`harden`."""

    is_conv = False
    transposed = False  # HF Conv1D: FP weight is [in, out]
    quantizer: Optional[WeightQuantizer]
    grid_cfg: GridConfig

    def __init__(
        self, module: nn.Module, cfg: QuantConfig, bits: Optional[int] = None, load_only: bool = False,
        hessian: Optional[Tensor] = None,
    ):
        super().__init__()
        bias = getattr(module, "bias", None)
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)
        self.fp_dtype = module.weight.dtype
        self.fp_shape = tuple(module.weight.shape)
        self.grid_shape = self.fp_shape[::-1] if self.transposed else self.fp_shape
        if load_only:  # see for_loading(): no quantizer, empty hardened buffers
            self.quantizer = None
            self.grid_cfg = cfg.weight if bits is None else dataclasses.replace(cfg.weight, bits=bits)
            code_dtype = torch.int8 if self.grid_cfg.symmetric else torch.uint8
            device = module.weight.device
            self.register_buffer("codes", torch.empty(0, dtype=code_dtype, device=device))
            self.register_buffer("scale", torch.empty(0, device=device))
            self.register_buffer("zero_point", torch.empty(0, device=device))
            self.register_buffer("weight", torch.empty(0, dtype=self.fp_dtype, device=device), persistent=False)
            self.hardened, self.awaiting_load = True, True
        else:
            self.weight = nn.Parameter(module.weight.detach(), requires_grad=False)
            self.quantizer = build_quantizer(self._grid_weight(), cfg, self.is_conv, bits, hessian)
            self.grid_cfg = self.quantizer.grid.cfg
            self.hardened, self.awaiting_load = False, False
        a_bits = cfg.activation.bits
        if a_bits is not None and bits is not None:
            a_bits = max(a_bits, bits)  # first / last layer: input at 8 bits too
        self.act_quant = (
            None if a_bits is None
            else ActivationQuantizer(a_bits, cfg.activation, feature_dim=1 if self.is_conv else -1)
        )

    @classmethod
    def from_float(
        cls, module: nn.Module, cfg: QuantConfig, bits: Optional[int] = None, hessian: Optional[Tensor] = None
    ):
        """The wrapper of FP ``module``; ``hessian`` (its input Hessian) is for ``weight.init: output``."""
        return cls(module, cfg, bits, hessian=hessian)

    @classmethod
    def for_loading(cls, module: nn.Module, cfg: QuantConfig, bits: Optional[int] = None):
        """A hardened wrapper of ``module`` whose ``codes`` / ``scale`` / ``zero_point`` are empty until
        ``load_state_dict`` fills them (a saved block, a quantized checkpoint).

        Builds no quantizer (no grid search, no learnable parameters): only
        ``cfg.weight``'s grid layout (bits, symmetric, granularity, group size;
        ``bits`` overrides) and ``cfg.activation`` matter, whatever method made the codes.
        """
        return cls(module, cfg, bits, load_only=True)

    # ---- weights ------------------------------------------------------------
    def _grid_weight(self) -> Tensor:
        return self.weight.t() if self.transposed else self.weight

    def _to_fp_layout(self, w: Tensor) -> Tensor:
        return w.t() if self.transposed else w

    def quantized_weight(self) -> Tensor:
        """Soft fake-quantized weight (fp32, training), the hardened layer's weight (hard rounding
        without gradients: validation) or the cached dequantized one (hardened)."""
        if self.hardened:
            return self.weight
        if self.quantizer.hard and not torch.is_grad_enabled():
            return self.hard_weight()
        return self._to_fp_layout(self.quantizer(self._grid_weight()))

    @torch.no_grad()
    def hard_weight(self) -> Tensor:
        """The weight :meth:`harden` will cache, bit for bit, while the quantizer is still there.

        Hard-rounding validation computes with it, so a block validated in hard
        mode gives the hardened block's outputs exactly: the driver keeps those
        outputs as the next block's inputs instead of running the block again,
        and a resumed run (which reloads the codes) sees the same inputs.
        """
        q = self.quantizer
        assert q is not None
        exponent = q.exponent()
        return self._decoded(q.codes(self._grid_weight()), q.scale(), q.grid.zero_point.detach().float(),
                             None if exponent is None else exponent.reshape(()))

    def _decoded(self, codes: Tensor, scale: Tensor, zero_point: Tensor, exponent: Optional[Tensor]) -> Tensor:
        """Codes -> the layer's weight: FP layout and dtype, contiguous (kernels must not depend on how the
        codes were made: :meth:`harden`, a loaded checkpoint or :meth:`hard_weight`)."""
        u = dequantize_codes(codes, scale, zero_point, self.grid_cfg, exponent)
        return self._to_fp_layout(u).to(self.fp_dtype).contiguous()

    def decoded_weight(self) -> Tensor:
        """The hardened layer's weight from its codes (what its cached ``weight`` holds)."""
        return self._decoded(self.codes, self.scale, self.zero_point, getattr(self, "exponent", None))

    def dequantize(self) -> Tensor:
        """``scale * (codes - zero_point)`` in the FP weight's shape (float32)."""
        if not self.hardened:
            raise RuntimeError("dequantize() needs codes: call harden() first")
        u = dequantize_codes(self.codes, self.scale, self.zero_point, self.grid_cfg, getattr(self, "exponent", None))
        return self._to_fp_layout(u)

    # ---- hardening ----------------------------------------------------------
    @torch.no_grad()
    def harden(self) -> None:
        """Fix the codes (hard rounding), drop the quantizer and the FP weight."""
        if self.hardened:
            return
        q = self.quantizer
        codes = q.codes(self._grid_weight())
        scale = q.scale().clone()
        zero_point = q.grid.zero_point.detach().float().clone()
        exponent = q.exponent()
        self._set_hardened(codes, scale, zero_point, None if exponent is None else exponent.clone())

    def _set_hardened(
        self, codes: Tensor, scale: Tensor, zero_point: Tensor, exponent: Optional[Tensor] = None
    ) -> None:
        device = self.weight.device
        self.quantizer = None
        del self.weight  # the FP parameter (or the empty buffer of for_loading())
        self.awaiting_load = False
        code_dtype = torch.int8 if self.grid_cfg.symmetric else torch.uint8
        self.register_buffer("codes", codes.to(device=device, dtype=code_dtype))
        self.register_buffer("scale", scale.to(device=device, dtype=torch.float32))
        self.register_buffer("zero_point", zero_point.to(device=device, dtype=torch.float32))
        if exponent is not None:
            self.register_buffer("exponent", exponent.reshape(()).to(device=device, dtype=torch.float32))
        if self.act_quant is not None:
            self.act_quant.scale.requires_grad_(False)
        self.hardened = True
        self.register_buffer("weight", self.decoded_weight(), persistent=False)

    @torch.no_grad()
    def round_scale(self, dtype: torch.dtype) -> None:
        """Keep ``s1`` as ``dtype`` stores it (fp16: what GPTQ / AWQ / GGUF files hold); the cached weight follows.

        The codes do not change; the layer then computes exactly what the exported file computes.
        """
        self.scale.copy_(self.scale.to(dtype).float())
        if not self.weight.is_meta:  # a released lazy block recomputes it at its next forward
            self._buffers["weight"] = self.decoded_weight()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # a hardened checkpoint loaded into a fresh wrapper: become hardened first
        key = prefix + "codes"
        if (not self.hardened or self.awaiting_load) and key in state_dict:
            self._set_hardened(
                state_dict[key].clone(),
                state_dict[prefix + "scale"].clone(),
                state_dict[prefix + "zero_point"].clone(),
                state_dict[prefix + "exponent"].clone() if prefix + "exponent" in state_dict else None,
            )
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    # ---- forward helpers ----------------------------------------------------
    def _quantize_input(self, x: Tensor) -> Tensor:
        """The layer input through the activation quantizer (identity without one)."""
        return x if self.act_quant is None else self.act_quant(x)

    def _weight_bias_for(self, x: Tensor) -> tuple[Tensor, Optional[Tensor]]:
        """Quantized weight and bias in ``x``'s dtype (fp32 scales stay fp32)."""
        w, b = self.quantized_weight(), self.bias
        if w.dtype != x.dtype and x.is_floating_point():
            w = w.to(x.dtype)
        if b is not None and b.dtype != x.dtype and x.is_floating_point():
            b = b.to(x.dtype)
        return w, b

    def extra_repr(self) -> str:
        c = self.grid_cfg
        state = "hardened" if self.hardened else type(self.quantizer).__name__
        return (
            f"weight={self.fp_shape}, "
            f"bias={self.bias is not None}, bits={c.bits}, "
            f"{'sym' if c.symmetric else 'asym'}, {c.granularity}, {state}"
            + ("" if self.act_quant is None else f", a_bits={self.act_quant.bits}")
        )


class QuantLinear(QuantizedLayer):
    """Quantized ``nn.Linear``: ``y = x W_hat^T + b``."""

    def __init__(
        self, module: nn.Linear, cfg: QuantConfig, bits: Optional[int] = None, load_only: bool = False,
        hessian: Optional[Tensor] = None,
    ):
        super().__init__(module, cfg, bits, load_only, hessian)
        self.in_features, self.out_features = module.in_features, module.out_features

    def forward(self, x: Tensor) -> Tensor:
        x = self._quantize_input(x)
        w, b = self._weight_bias_for(x)
        return F.linear(x, w, b)


class QuantConv2d(QuantizedLayer):
    """Quantized ``nn.Conv2d`` (groups / depthwise, stride, padding, dilation, padding_mode)."""

    is_conv = True

    def __init__(
        self, module: nn.Conv2d, cfg: QuantConfig, bits: Optional[int] = None, load_only: bool = False,
        hessian: Optional[Tensor] = None,
    ):
        super().__init__(module, cfg, bits, load_only, hessian)
        for name in ("in_channels", "out_channels", "kernel_size", "stride", "padding",
                     "dilation", "groups", "padding_mode", "_reversed_padding_repeated_twice"):
            setattr(self, name, getattr(module, name))

    def forward(self, x: Tensor) -> Tensor:
        x = self._quantize_input(x)
        w, b = self._weight_bias_for(x)
        if self.padding_mode != "zeros":  # as nn.Conv2d._conv_forward
            x = F.pad(x, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            return F.conv2d(x, w, b, self.stride, _pair(0), self.dilation, self.groups)
        return F.conv2d(x, w, b, self.stride, self.padding, self.dilation, self.groups)


class QuantConv1D(QuantizedLayer):
    """Quantized HF ``Conv1D`` (GPT-2): FP weight ``[in, out]``, ``y = x W + b``.

    The grid (and the codes) use the transposed weight ``[out, in]``, so the
    quantizer's output channel (dim 0) is the layer's output feature; forward
    is ``F.linear(x, W^T, b)``.
    """

    transposed = True

    def __init__(
        self, module: nn.Module, cfg: QuantConfig, bits: Optional[int] = None, load_only: bool = False,
        hessian: Optional[Tensor] = None,
    ):
        super().__init__(module, cfg, bits, load_only, hessian)
        self.nf, self.nx = module.nf, module.nx

    def forward(self, x: Tensor) -> Tensor:
        x = self._quantize_input(x)
        w, b = self._weight_bias_for(x)
        return F.linear(x, w.t(), b)
