"""The interface every weight quantizer implements, and the factory.

A quantizer owns the :class:`UniformGrid` of one weight tensor plus its own
learnable parameters (FlexRound's scales, AdaRound's ``V``). It never stores
the weight: ``forward(weight)`` returns the fake-quantized fp32 weight,
``codes(weight)`` the hard codes. Two names, two things: ``integers`` are
float tensors holding integer values (soft during training, in the grid view,
differentiable); ``codes`` are integer-dtype tensors (hard, the weight's shape)
and what a hardened layer stores. Dequantization convention, in the grid
view: ``w_hat = s1 * (q - zero_point)`` for either.

Methods are a registry (torchao's pattern): each quantizer module calls
:func:`register` once with a builder, :func:`build_quantizer` looks the name
up, and ``QuantConfig``'s ``method`` Literal and validation read
:func:`method_names`. A new method is one new module (plus its config field).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Callable, Optional

import torch
from torch import Tensor, nn

from .grid import GridConfig, UniformGrid

if TYPE_CHECKING:
    from .config import QuantConfig


class RoundSTE(torch.autograd.Function):
    """``round`` forward, identity backward (straight-through estimator).

    Exact: the forward is ``torch.round`` itself, not ``x + (round(x) - x)``.
    """

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:  # type: ignore[override]
        return torch.round(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:  # type: ignore[override]
        return grad


def round_ste(x: Tensor) -> Tensor:
    return RoundSTE.apply(x)


def clamp_codes(q: Tensor, qmin: int, qmax: int) -> Tensor:
    """``clamp(q, qmin, qmax)`` whose gradient passes on the *closed* range.

    ``torch.clamp`` blocks the gradient at ``q == qmax`` exactly, which is
    where the min-max grid puts the largest weight; here it still learns.
    """
    return torch.where(q < qmin, qmin, torch.where(q > qmax, qmax, q))


class WeightQuantizer(nn.Module):
    """Base class: a grid plus a rule that maps a weight to integers.

    Subclasses implement :meth:`integers` (float integers in the grid view,
    differentiable w.r.t. their parameters) and :meth:`log_step` (``log s1``).
    ``hard`` only matters to AdaRound (hard rounding ``h >= 0.5``).
    """

    def __init__(self, grid: UniformGrid):
        super().__init__()
        self.grid = grid
        self.hard = False

    @property
    def qmin(self) -> int:
        return self.grid.qmin

    @property
    def qmax(self) -> int:
        return self.grid.qmax

    def log_step(self) -> Tensor:
        return self.grid.log_scale

    def integers(self, weight: Tensor, hard: bool) -> Tensor:
        """Float tensor of integer values in ``[qmin, qmax]``, grid view (not ``codes``: no int dtype)."""
        raise NotImplementedError

    def forward(self, weight: Tensor) -> Tensor:
        """Fake-quantized fp32 weight ``s1 * (q - zp)`` in ``weight``'s shape."""
        q = self.integers(weight, self.hard)
        s1 = torch.exp(self.log_step())
        return self.grid.ungroup(s1 * (q - self.grid.zero_point), weight.shape)

    @torch.no_grad()
    def codes(self, weight: Tensor) -> Tensor:
        """Hard codes: ``integers(weight, hard=True)`` as int16, ``weight``'s shape, inside ``[qmin, qmax]``."""
        q = self.integers(weight, True)
        return self.grid.ungroup(q, weight.shape).to(torch.int16)

    def scale(self) -> Tensor:
        """``s1`` (detached float32) in the grid's broadcast shape."""
        return torch.exp(self.log_step()).detach().float()

    def exponent(self) -> Optional[Tensor]:
        """Power-grid exponent (detached float32 scalar) of non-uniform quantizers; None for uniform grids."""
        return None

    def regularization(self, progress: float) -> Tensor:
        """Extra loss term; 0 except for AdaRound."""
        return torch.zeros((), device=self.grid.log_scale.device)


def decode_values(u: Tensor, exponent: Optional[Tensor | float]) -> Tensor:
    """Grid values ``u = s1 (codes - zp)`` -> weights: ``u`` itself on a uniform grid,
    ``sign(u)|u|^(1/a)`` on a power grid of exponent ``a`` (NUPES).

    Hardened layers have no quantizer left, only codes, scale, zero point and
    (power grids) ``exponent``: they decode with this map, the inverse of what
    the quantizer's :meth:`WeightQuantizer.forward` applies.
    """
    if exponent is None:
        return u
    return torch.sign(u) * u.abs().pow(1.0 / exponent)


#: ``build(weight, grid_cfg, cfg, is_conv, hessian)``: the quantizer of one weight (grid layout, output
#: channels on dim 0); ``hessian`` (``[C_in, C_in]`` or None) goes to its grid (``weight.init: output``).
QuantizerBuilder = Callable[[Tensor, GridConfig, "QuantConfig", bool, Optional[Tensor]], WeightQuantizer]


@dataclass(frozen=True)
class MethodSpec:
    """One registered method.

    ``uses_hessian``: the quantizer needs its layer's input Hessian before it
    is hardened (``compensate(weight, hessian)``, GPTQ); the block driver
    collects it from the calibration cache.
    ``starts_anywhere``: the rounding reads the weight at every call and keeps
    nothing computed from it but the grid, so the driver may hand it another
    starting weight on the same grid (``quant.init_from: gptq``).
    ``output_init``: the method's grid is :class:`UniformGrid`'s, so it can be
    searched on the layer's output error (``weight.init: output``); ``False``
    for a grid of its own (NUPES' power grid).
    """

    name: str
    build: QuantizerBuilder
    uses_hessian: bool = False
    starts_anywhere: bool = False
    output_init: bool = True


METHODS: dict[str, MethodSpec] = {}


def register(
    name: str, build: QuantizerBuilder, uses_hessian: bool = False, starts_anywhere: bool = False,
    output_init: bool = True,
) -> None:
    """Make ``--model.quant.method NAME`` build quantizers with ``build`` (flags: :class:`MethodSpec`)."""
    if name in METHODS and METHODS[name].build is not build:
        raise ValueError(f"quantization method {name!r} is registered twice")
    METHODS[name] = MethodSpec(name, build, uses_hessian, starts_anywhere, output_init)


def method_names() -> tuple[str, ...]:
    """The registered method names, sorted (independent of import order)."""
    return tuple(sorted(METHODS))


def method_spec(name: str) -> MethodSpec:
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(
            f"unknown quantization method {name!r}: registered are {', '.join(METHODS)} "
            "(a new method registers itself in its module under flexround_pl/quant/)"
        ) from None


def build_quantizer(
    weight: Tensor, cfg: "QuantConfig", is_conv: bool, bits: Optional[int] = None,
    hessian: Optional[Tensor] = None,
) -> WeightQuantizer:
    """The quantizer ``cfg.method`` names, on ``cfg.weight``'s grid.

    ``bits`` overrides ``cfg.weight.bits`` (e.g. 8 for a CNN's first/last layer).
    ``weight`` must be in the grid layout: output channels along dim 0.
    ``hessian``: the layer's input Hessian, which ``weight.init: output``
    searches the grid with (:class:`UniformGrid`); ignored by the other inits.
    """
    grid_cfg = cfg.weight if bits is None else replace(cfg.weight, bits=bits)
    return method_spec(cfg.method).build(weight, grid_cfg, cfg, is_conv, hessian)
