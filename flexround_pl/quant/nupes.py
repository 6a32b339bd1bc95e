"""NUPES: non-uniform quantization on a power-function grid.

Yvinec, Dapogny, Bailly, "NUPES: Non-Uniform Post-Training Quantization via
Power Exponent Search", arXiv 2308.05600 (the power operator comes from the
same authors' PowerQuant, ICLR 2023). See docs/NUPES.md.

Operator, in the grid view of one weight tensor, with one exponent ``a > 0``
per layer and the uniform grid (``s1``, ``zp``, ``[qmin, qmax]``) of
``model.quant.weight`` laid on the *transformed* weight:

    t     = sign(W) |W|^a                                   (power transform)
    codes = clamp(round(t / s1) + zp, qmin, qmax)           (uniform grid on t)
    W_hat = sign(u) |u|^(1/a),   u = s1 (codes - zp)        (inverse power)

``a = 1`` is exactly the uniform quantizer (bit for bit); ``a < 1`` puts more
levels near 0, where bell-shaped weights are dense. Hardened layers keep the
codes, ``s1``, ``zp`` and ``exponent``; dequantization is the inverse power
(a lookup table of ``2^bits`` values per step size).

Modes (``NUPESConfig.mode``):

* ``data_free``: search ``a`` by weight reconstruction error: for each
  candidate ``a`` the grid is initialized on ``t`` (min-max, or the Lp search
  over shrunk ranges) with the error measured on ``W`` itself,
  ``sum |W - W_hat|^p``; a coarse grid of exponents then a finer one around
  the best. Round-to-nearest on that grid; nothing is trained.
* ``data_driven``: the same search as initialization, then ``a``, ``s1`` and the
  quantized values are learned with the block reconstruction loss. The
  quantized values move over the whole quantized range, not only up or down:
  ``rounding: additive`` learns an unbounded offset ``V`` (in grid steps) per
  weight, ``codes = clamp(round_ste(t / s1 + V) + zp)``; ``rounding:
  flexround`` applies FlexRound's learned division to ``t``,
  ``codes = clamp(round_ste(t / (s1 S2 s3 [s4])) + zp)``.

Numerical stability of learning ``a`` (the gradients involve ``log|W|`` and
``log|u|``, unbounded near 0, and ``|u|^(1/a - 1)``, unbounded at 0 for
``a > 1``): both power maps are custom autograd functions whose backward is
finite everywhere:

* ``d t / d a = t log|W|``: bounded by ``1 / (e a)`` for ``|W| < 1`` and exactly
  0 at ``W = 0`` (``log`` is taken of ``max(|W|, tiny)``);
* ``d W_hat / d a = -W_hat log|u| / a^2``: 0 at ``u = 0``; ``u`` is otherwise at
  least one grid step away from 0 (codes are integers);
* ``d W_hat / d u = |u|^(1/a - 1) / a`` is evaluated at ``max(|u|, s1/2)``: the
  STE gradient of a weight on the zero code is the slope at the first rounding
  boundary instead of 0 (``a < 1``, the weight could never leave 0) or infinity
  (``a > 1``);
* ``a`` is kept in ``[exponent_min, exponent_max]`` by projection after each
  update (clamped in place before use), so it never approaches 0.

Both power maps run in fp32 on the fp32 weight, under autocast too.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal, Optional

import torch
from torch import Tensor, nn

from .base import WeightQuantizer, clamp_codes, decode_values, register, round_ste
from .flexround import FlexRoundConfig, FlexRoundQuantizer
from .grid import GridConfig, UniformGrid, fake_quant_into, group_view, reduce_dims
from .rtn import RoundToNearest

_TINY = torch.finfo(torch.float32).tiny

NUPESMode = Literal["data_free", "data_driven"]
NUPESRounding = Literal["additive", "flexround"]


@dataclass
class NUPESConfig:
    """NUPES (Yvinec, Dapogny, Bailly, arXiv 2308.05600): a power-function grid.

    The weight is mapped to ``t = sign(W)|W|^a``, ``t`` is quantized on the
    uniform grid of ``model.quant.weight`` and mapped back with
    ``sign(t_hat)|t_hat|^(1/a)``; ``a`` is one exponent per layer.

    ``mode``: ``data_free`` searches ``a`` (and the grid) by weight
    reconstruction error only, nothing is trained; ``data_driven`` starts from
    that search and learns ``a``, the grid step and the quantized values with
    the block reconstruction loss.
    ``rounding`` (data-driven): ``additive`` learns a free offset per weight in
    grid steps (codes may move anywhere in the quantized range, not only up or
    down); ``flexround`` learns FlexRound's divisor ``s1*S2*s3[*s4]`` on ``t``
    (uses ``model.quant.flexround``).
    ``exponent_min`` / ``exponent_max``: the range searched and, in the
    data-driven mode, the range ``a`` is kept in while learning.
    ``exponent_candidates``: exponents of the coarse search (a finer search
    around the best one follows). ``learn_exponent``: data-driven mode trains ``a``.
    See docs/NUPES.md.
    """

    mode: NUPESMode = "data_driven"
    rounding: NUPESRounding = "additive"
    exponent_min: float = 0.2
    exponent_max: float = 1.0
    exponent_candidates: int = 9
    learn_exponent: bool = True

    def __post_init__(self) -> None:
        if self.mode not in ("data_free", "data_driven"):
            raise ValueError(f"nupes.mode must be 'data_free' or 'data_driven', got {self.mode!r}")
        if self.rounding not in ("additive", "flexround"):
            raise ValueError(f"nupes.rounding must be 'additive' or 'flexround', got {self.rounding!r}")
        if not 0 < self.exponent_min <= self.exponent_max:
            raise ValueError(
                "nupes exponents need 0 < exponent_min <= exponent_max, got "
                f"exponent_min={self.exponent_min}, exponent_max={self.exponent_max}"
            )
        if self.exponent_candidates < 1:
            raise ValueError(f"nupes.exponent_candidates must be >= 1, got {self.exponent_candidates}")


# ---- the two power maps ----------------------------------------------------------


def power(x: Tensor, a: Tensor | float) -> Tensor:
    """``sign(x) |x|^a`` (values only; exact for ``a = 1``)."""
    return torch.sign(x) * x.abs().pow(a)


def inverse_power(u: Tensor, a: Tensor | float) -> Tensor:
    """``sign(u) |u|^(1/a)``: NUPES dequantization (values only; exact for ``a = 1``).

    The same map hardened layers decode with (:func:`~flexround_pl.quant.base.decode_values`).
    """
    return decode_values(u, a)


class _Power(torch.autograd.Function):
    """``t = sign(x)|x|^a`` with a finite gradient w.r.t. ``a`` (0 at ``x = 0``)."""

    @staticmethod
    def forward(ctx, x: Tensor, a: Tensor) -> Tensor:  # type: ignore[override]
        t = power(x, a)
        ctx.save_for_backward(x, a, t)
        return t

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        x, a, t = ctx.saved_tensors
        grad_x = grad_a = None
        log_abs = torch.log(x.abs().clamp_min(_TINY))
        if ctx.needs_input_grad[0]:
            grad_x = grad * a * torch.exp((a - 1) * log_abs)
        if ctx.needs_input_grad[1]:
            grad_a = (grad * t * log_abs).sum().reshape(a.shape)
        return grad_x, grad_a


class _InversePower(torch.autograd.Function):
    """``w = sign(u)|u|^(1/a)``; the slope w.r.t. ``u`` is taken at ``max(|u|, floor)``."""

    @staticmethod
    def forward(ctx, u: Tensor, a: Tensor, floor: Tensor) -> Tensor:  # type: ignore[override]
        w = inverse_power(u, a)
        ctx.save_for_backward(u, a, floor, w)
        return w

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        u, a, floor, w = ctx.saved_tensors
        grad_u = grad_a = None
        if ctx.needs_input_grad[0]:
            mag = torch.maximum(u.abs(), floor).clamp_min(_TINY)
            grad_u = grad * torch.exp((1.0 / a - 1.0) * torch.log(mag)) / a
        if ctx.needs_input_grad[1]:
            log_abs = torch.log(u.abs().clamp_min(_TINY))
            grad_a = (-(grad * w * log_abs).sum() / (a * a)).reshape(a.shape)
        return grad_u, grad_a, None


# ---- data-free search --------------------------------------------------------------


def _candidates(lo: float, hi: float, n: int) -> list[float]:
    if n == 1 or lo == hi:
        return [hi]
    return [round(lo + (hi - lo) * i / (n - 1), 6) for i in range(n - 1)] + [hi]


@torch.no_grad()
def search_grid(w: Tensor, grid_cfg: GridConfig, cfg: NUPESConfig) -> tuple[float, Tensor, Tensor, dict]:
    """Exponent, ``log s1`` and zero point minimizing ``sum |W - W_hat|^p`` (``p = lp_norm``).

    For each exponent the step is chosen as :class:`UniformGrid` does (min-max,
    or the best of ``lp_candidates`` shrunk ranges, independently per channel /
    group; the first minimum in the order full range, then narrower), but with
    the error measured on the weight, after the inverse power. If ``a = 1``
    wins, the grid is ``UniformGrid``'s own, bit for bit. Candidate ranges
    are evaluated in batches (one op over ``[k, *weight]``, in place in two
    scratch buffers). Returns ``(a, log_scale, zero_point, errors)`` with
    ``errors[a]`` the total error of exponent ``a``.
    """
    w = w.detach().float()
    v = group_view(w, grid_cfg)
    dims = reduce_dims(v, grid_cfg)
    batched_dims = tuple(d + 1 for d in dims)
    helper = UniformGrid(w, replace(grid_cfg, init="minmax"))
    p, n = grid_cfg.lp_norm, grid_cfg.lp_candidates
    alphas = [1.0]
    if grid_cfg.init == "lp" and n > 1:
        alphas += torch.linspace(1.0 / n, 1.0, n).flip(0)[1:].tolist()
    chunk = max(1, (1 << 24) // max(v.numel(), 1))
    scratch, scratch2 = (
        torch.empty((min(chunk, len(alphas)), *v.shape), dtype=v.dtype, device=v.device) for _ in range(2)
    )

    def errors(t: Tensor, a: float, log_step: Tensor, zp: Tensor) -> Tensor:
        """``sum |inverse_power(fake_quant(t)) - W|^p``, in place in the scratch buffers.

        The same values as ``inverse_power(fake_quant(...))``: ``copysign``
        differs from ``sign(u) *`` only in the sign of a zero, which ``abs``
        erases. Fresh tensors per operation made the search 3.6x slower on CPU.
        """
        k = log_step.shape[0]
        u = fake_quant_into(scratch[:k], t.unsqueeze(0), torch.exp(log_step), zp,
                            helper.qmin, helper.qmax, grid_cfg.symmetric)
        mag = torch.abs(u, out=scratch2[:k]).pow_(1.0 / a)
        w_hat = torch.copysign(mag, u, out=mag)  # sign(u)|u|^(1/a), as inverse_power
        return w_hat.sub_(v).abs_().pow_(p).sum(dim=batched_dims, keepdim=True)

    def evaluate(a: float) -> tuple[float, Tensor, Tensor]:
        t = power(v, a)
        lo = t.amin(dim=dims, keepdim=True).clamp_max(0)
        hi = t.amax(dim=dims, keepdim=True).clamp_min(0)
        best_err = best_log = best_zp = None
        for c0 in range(0, len(alphas), chunk):
            al = torch.tensor(alphas[c0 : c0 + chunk], device=v.device).reshape(-1, *([1] * v.dim()))
            log_step, zp = helper._step_and_zero(lo * al, hi * al)  # [k, *scale_shape]
            err = errors(t, a, log_step, zp)
            i = torch.argmin(err, dim=0, keepdim=True)  # the first minimum: ties keep the wider range
            err, log_step, zp = (x.gather(0, i)[0] for x in (err, log_step, zp))
            if best_err is None:
                best_err, best_log, best_zp = err, log_step, zp
            else:
                better = err < best_err
                best_err = torch.where(better, err, best_err)
                best_log = torch.where(better, log_step, best_log)
                best_zp = torch.where(better, zp, best_zp)
        return float(best_err.double().sum()), best_log, best_zp

    lo_a, hi_a, n_a = cfg.exponent_min, cfg.exponent_max, cfg.exponent_candidates
    results: dict[float, tuple[float, Tensor, Tensor]] = {}
    coarse = _candidates(lo_a, hi_a, n_a)
    for a in coarse:
        results[a] = evaluate(a)
    if len(coarse) > 1:  # refine around the best coarse exponent
        best = min(results, key=lambda k: results[k][0])
        step = (hi_a - lo_a) / (len(coarse) - 1)
        for a in _candidates(max(lo_a, best - step), min(hi_a, best + step), 9):
            if a not in results:
                results[a] = evaluate(a)
    best = min(results, key=lambda k: (results[k][0], -k))  # ties: the exponent closest to uniform
    err, log_scale, zero_point = results[best]
    if best == 1.0:  # the uniform grid, bit for bit (the batched search may differ in the last ulp)
        uniform = UniformGrid(w, grid_cfg)
        log_scale, zero_point = uniform.log_scale, uniform.zero_point
    return best, log_scale, zero_point, {k: r[0] for k, r in sorted(results.items())}


# ---- quantizers --------------------------------------------------------------------


class AdditiveRounding(WeightQuantizer):
    """``codes = clamp(round_ste(t / s1 + V) + zp, qmin, qmax)``: ``s1`` and ``V`` learned.

    ``V`` (one per weight, in grid steps, initialized to 0) is unbounded, so a
    code can move anywhere in ``[qmin, qmax]`` (NUPES' "learning new quantized
    weights over the entire quantized space"); at initialization this is
    round-to-nearest on the grid.
    """

    def __init__(self, grid: UniformGrid, weight_shape: tuple[int, ...]):
        super().__init__(grid)
        self.log_s1 = nn.Parameter(grid.log_scale.detach().clone())
        self.V = nn.Parameter(torch.zeros(weight_shape, dtype=torch.float32, device=grid.log_scale.device))

    def log_step(self) -> Tensor:
        return self.log_s1

    def integers(self, weight: Tensor, hard: bool) -> Tensor:
        v = self.grid.group_view(weight.float())
        s1 = torch.exp(self.log_step())
        x = v / s1 + self.grid.group_view(self.V)
        return clamp_codes(round_ste(x) + self.grid.zero_point, self.qmin, self.qmax)


class NUPESQuantizer(WeightQuantizer):
    """Power-function grid: ``W_hat = sign(u)|u|^(1/a)``, ``u = s1 (codes(sign(W)|W|^a) - zp)``.

    ``rounding`` is the rule that maps the transformed weight to codes
    (round-to-nearest, :class:`AdditiveRounding`, or FlexRound), sharing this
    quantizer's grid.
    """

    def __init__(
        self,
        weight: Tensor,
        grid_cfg: GridConfig,
        cfg: NUPESConfig,
        flex_cfg: Optional[FlexRoundConfig] = None,
        is_conv: bool = False,
    ):
        w = weight.detach().float()
        a0, log_scale, zero_point, errors = search_grid(w, grid_cfg, cfg)
        t = power(w, a0)
        fast = replace(grid_cfg, init="minmax")  # the searched grid replaces it below
        grid = UniformGrid(t, fast)
        grid.cfg = grid_cfg
        grid.log_scale.copy_(log_scale)
        grid.zero_point.copy_(zero_point)
        super().__init__(grid)
        self.cfg = cfg
        self.search_errors = errors  # {exponent: weight error} of the search
        a = torch.tensor(a0, dtype=torch.float32, device=weight.device)
        if cfg.mode == "data_driven" and cfg.learn_exponent:
            self.a = nn.Parameter(a)
        else:
            self.register_buffer("a", a)

        rounding: WeightQuantizer
        if cfg.mode == "data_free":
            rounding = RoundToNearest(t, fast)
        elif cfg.rounding == "flexround":
            rounding = FlexRoundQuantizer(t, fast, flex_cfg or FlexRoundConfig(), is_conv)
            with torch.no_grad():
                rounding.log_s1.copy_(grid.log_scale)
        else:
            rounding = AdditiveRounding(grid, tuple(weight.shape))
        rounding.grid = grid  # one grid (step, zero point) for the whole quantizer
        self.rounding = rounding

    def log_step(self) -> Tensor:
        return self.rounding.log_step()

    def current_a(self) -> Tensor:
        """The exponent, projected into ``[exponent_min, exponent_max]`` first when learned."""
        if isinstance(self.a, nn.Parameter):
            with torch.no_grad():
                self.a.clamp_(self.cfg.exponent_min, self.cfg.exponent_max)
        return self.a

    def exponent(self) -> Tensor:
        return self.current_a().detach().float().reshape(())

    def _integers(self, weight: Tensor, a: Tensor, hard: bool) -> Tensor:
        return self.rounding.integers(_Power.apply(weight.float(), a), hard)

    def integers(self, weight: Tensor, hard: bool) -> Tensor:
        return self._integers(weight, self.current_a(), hard)

    def forward(self, weight: Tensor) -> Tensor:
        a = self.current_a()  # projected once, before anything uses it
        q = self._integers(weight, a, self.hard)
        s1 = torch.exp(self.log_step())
        u = s1 * (q - self.grid.zero_point)
        w_hat = _InversePower.apply(u, a, (s1 / 2).detach())
        return self.grid.ungroup(w_hat, weight.shape)

    def extra_repr(self) -> str:
        learned = "learned" if isinstance(self.a, nn.Parameter) else "fixed"
        return f"mode={self.cfg.mode}, a={float(self.a.detach()):.4f} ({learned})"


register(
    "nupes",
    lambda weight, grid_cfg, cfg, is_conv, hessian: NUPESQuantizer(weight, grid_cfg, cfg.nupes, cfg.flexround, is_conv),
    output_init=False,  # its power grid is searched on the weight error (QuantConfig refuses weight.init output)
)

__all__ = [
    "AdditiveRounding", "NUPESConfig", "NUPESQuantizer", "inverse_power", "power", "search_grid",
]
