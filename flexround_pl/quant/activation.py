"""Activation quantization with learned step sizes (LSQ) and QDrop's random drop.

LSQ (Esser et al., "Learned Step Size Quantization", ICLR 2020, arXiv 1902.08153),
per tensor; asymmetric grids keep the zero point fixed at initialization (only
the step is learned):

    x_hat = s * (clamp(round_ste(x / s) + zp, qmin, qmax) - zp)

* ``s`` is learned; its gradient is scaled by ``g = 1 / sqrt(numel(x) * qmax)``
  (LSQ's gradient scale, with ``numel`` of the whole activation tensor as in
  QDrop's code). With STE rounding the gradient is
  ``d x_hat / d s = round(x/s) - x/s`` inside the range and
  ``qmin - zp`` / ``qmax - zp`` below / above it; ``d x_hat / d x`` is 1 inside
  the range (closed: a code landing exactly on ``qmin`` / ``qmax`` is inside;
  ``torch.clamp`` with tensor bounds would split that gradient) and 0 outside.
* Computed in fp32 whatever the input dtype (autocast included); the output
  is cast back to the input's dtype.
* Initialized from calibration statistics (:func:`calibrate_activations`):
  the observed ``[min(x, 0), max(x, 0)]`` (``minmax``), or the shrunk range
  ``alpha * [lo, hi]``, ``alpha`` in ``linspace(1/n, 1, n)``, with the smallest
  squared error over the calibration data (``mse``).

QDrop (Wei et al., "QDrop: Randomly Dropping Quantization for Extremely
Low-bit Post-Training Quantization", ICLR 2022, arXiv 2203.05740): during
reconstruction each element of the quantizer's output is the quantized value
with probability ``p`` and the unquantized input otherwise,
``where(rand < p, x_hat, x)`` (``p = 0.5``; the authors' code calls it
``drop_prob`` and uses it as the probability of *keeping* quantization). Set
with :func:`qdrop`; never active outside it (validation, hardening, evaluation).

Per-token dynamic quantization (``ActivationConfig.granularity: token``): the
grid of each token (each row of a Linear input; each pixel's channel vector of
a Conv2d input) is recomputed from that token at every call,
``[min(x, 0), max(x, 0)]`` over its features (asymmetric), or its absolute
maximum (symmetric, signed codes). Nothing is calibrated or learned; the grid
is detached (as in the FlexRound authors' Llama W4A8 evaluation code,
``quantize_activation_per_token_absmax`` in ``onliwad101/FlexRound_LRQ``), so
``d x_hat / d x`` is 1 (straight-through; every element is inside its range).
QDrop's drop applies to it in the same way.

Everything is a tensor in the state dict (``scale``, ``zero_point``, ``qmin``,
``qmax``, ``initialized``), so a saved layer needs nothing else.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator, Optional

import torch
from torch import Tensor, nn

from .base import clamp_codes, round_ste
from .config import ActivationConfig

_MIN_STEP = 1e-8
#: At most this many elements per batch enter the MSE search (a fixed-seed random
#: subset: a strided one would keep only some channels of a [..., C] activation).
_MSE_MAX_ELEMENTS = 1 << 16


def grad_scale(x: Tensor, g: Tensor | float) -> Tensor:
    """``x`` forward, gradient multiplied by ``g`` (LSQ's gradient scaling)."""
    scaled = x * g
    return (x - scaled).detach() + scaled


class ActivationQuantizer(nn.Module):
    """Fake quantizer of one layer input: per-tensor LSQ, or per-token dynamic (see the module docstring).

    ``feature_dim``: the dimension a token's features lie along (``-1`` for a
    Linear input, ``1`` for a Conv2d input); used by ``granularity: token`` only.
    """

    def __init__(self, bits: int, cfg: ActivationConfig, feature_dim: int = -1) -> None:
        super().__init__()
        self.bits = bits
        self.cfg = cfg
        self.dynamic = cfg.granularity == "token"
        self.feature_dim = feature_dim
        # a dynamic quantizer keeps the (unused) scale so every state dict has the same keys
        self.scale = nn.Parameter(torch.ones(()), requires_grad=not self.dynamic)
        self.register_buffer("zero_point", torch.zeros(()))
        self.register_buffer("qmin", torch.zeros(()))
        self.register_buffer("qmax", torch.full((), float(2**bits - 1)))
        self.register_buffer("initialized", torch.full((), self.dynamic, dtype=torch.bool))
        #: QDrop probability of keeping the quantized value; None = always quantize.
        self.drop_p: Optional[float] = None
        #: Calibration: None, "minmax" or "mse" (observe, return the input unchanged).
        self.observing: Optional[str] = None
        self._lo: Optional[Tensor] = None
        self._hi: Optional[Tensor] = None
        self._errors: Optional[Tensor] = None
        self._alphas: Optional[Tensor] = None

    # ---- quantization ------------------------------------------------------
    def fake_quant(self, x: Tensor) -> Tensor:
        """LSQ fake quantization of ``x`` in fp32 (differentiable w.r.t. ``scale`` and ``x``)."""
        xf = x.float()
        g = torch.rsqrt(self.qmax.clamp_min(1.0) * xf.numel())
        s = grad_scale(self.scale.float(), g).clamp_min(_MIN_STEP)
        q = clamp_codes(round_ste(xf / s) + self.zero_point, self.qmin, self.qmax)
        return s * (q - self.zero_point)

    def dynamic_fake_quant(self, x: Tensor) -> Tensor:
        """Per-token min-max (or absmax) fake quantization of ``x`` in fp32, grid detached."""
        xf = x.float()
        with torch.no_grad():
            lo = xf.amin(dim=self.feature_dim, keepdim=True).clamp_max(0)
            hi = xf.amax(dim=self.feature_dim, keepdim=True).clamp_min(0)
            step, zp, qmin, qmax = self._grid_for(lo, hi, unsigned=False)
            x_hat = step * (torch.clamp(torch.round(xf / step) + zp, qmin, qmax) - zp)
        return xf + (x_hat - xf).detach()  # straight-through: the token's range holds all of it

    def forward(self, x: Tensor) -> Tensor:
        if self.observing is not None:
            self._observe(x.detach())
            return x
        if not bool(self.initialized):
            raise RuntimeError(
                "activation quantizer used before calibration: run calibrate_activations() "
                "(the block driver does it before reconstruction) or load a calibrated state dict"
            )
        p = self.drop_p
        if p is not None and p <= 0:
            return x  # QDrop with p = 0: activations stay FP during training
        out = self.dynamic_fake_quant(x) if self.dynamic else self.fake_quant(x)
        if p is not None and p < 1:
            keep = torch.rand(x.shape, device=x.device) < p
            out = torch.where(keep, out, x.float())
        return out.to(x.dtype) if x.is_floating_point() else out

    # ---- calibration -------------------------------------------------------
    def _observe(self, x: Tensor) -> None:
        xf = x.float()
        if self.observing == "minmax":
            lo, hi = xf.min().clamp_max(0), xf.max().clamp_min(0)
            self._lo = lo if self._lo is None else torch.minimum(self._lo, lo)
            self._hi = hi if self._hi is None else torch.maximum(self._hi, hi)
            return
        # "mse": squared error of every shrunk range of the observed [lo, hi]
        assert self._lo is not None and self._hi is not None, "observe min-max first"
        flat = xf.flatten()
        if flat.numel() > _MSE_MAX_ELEMENTS:
            g = torch.Generator().manual_seed(0)
            flat = flat[torch.randint(0, flat.numel(), (_MSE_MAX_ELEMENTS,), generator=g).to(flat.device)]
        if self._alphas is None:
            n = self.cfg.init_candidates
            self._alphas = torch.linspace(1.0 / n, 1.0, n, device=flat.device).flip(0)
            self._errors = torch.zeros(n, dtype=torch.float64, device=flat.device)
        for i, alpha in enumerate(self._alphas.tolist()):
            step, zp, qmin, qmax = self._grid_for(self._lo * alpha, self._hi * alpha, bool(self._lo >= 0))
            q = torch.clamp(torch.round(flat / step) + zp, qmin, qmax)
            self._errors[i] += (step * (q - zp) - flat).pow(2).sum().double()

    def _grid_for(self, lo: Tensor, hi: Tensor, unsigned: bool) -> tuple[Tensor, Tensor, float, float]:
        """Step, zero point and code range of the grid covering ``[lo, hi]`` (lo <= 0 <= hi, broadcast).

        ``unsigned``: a symmetric grid for inputs that are all ``>= 0`` (asymmetric grids ignore it).
        """
        levels = 2**self.bits - 1
        if not self.cfg.symmetric:  # asymmetric, unsigned codes, fixed zero point
            step = ((hi - lo) / levels).clamp_min(_MIN_STEP)
            zp = torch.clamp(torch.round(-lo / step), 0, levels)
            return step, zp, 0.0, float(levels)
        zero = torch.zeros_like(lo)
        if unsigned:  # e.g. after ReLU
            return (hi / levels).clamp_min(_MIN_STEP), zero, 0.0, float(levels)
        qmin, qmax = -(2 ** (self.bits - 1)), 2 ** (self.bits - 1) - 1
        step = torch.maximum(hi / qmax, lo / qmin).clamp_min(_MIN_STEP)
        return step, zero, float(qmin), float(qmax)

    @torch.no_grad()
    def finish_calibration(self) -> None:
        """Set step size, zero point and code range from what was observed."""
        if self._lo is None or self._hi is None:
            raise RuntimeError("activation quantizer saw no calibration data")
        alpha = 1.0
        if self._errors is not None and self._alphas is not None:
            # the first minimum; candidates run from the full range down, so ties keep the wider range
            alpha = float(self._alphas[int(torch.argmin(self._errors))])
        step, zp, qmin, qmax = self._grid_for(self._lo * alpha, self._hi * alpha, bool(self._lo >= 0))
        self.scale.copy_(step.reshape(()))
        self.zero_point.copy_(zp.reshape(()))
        self.qmin.fill_(qmin)
        self.qmax.fill_(qmax)
        self.initialized.fill_(True)
        self.observing = None
        self._lo = self._hi = self._errors = self._alphas = None

    def extra_repr(self) -> str:
        kind = "sym" if self.cfg.symmetric else "asym"
        if self.dynamic:
            return f"bits={self.bits}, {kind}, per-token dynamic"
        state = "calibrated" if bool(self.initialized) else "not calibrated"
        return f"bits={self.bits}, {kind}, per-tensor LSQ, {state}"


# ---- acting on every activation quantizer under a module ---------------------


def activation_quantizers(root: nn.Module) -> list[ActivationQuantizer]:
    """Every :class:`ActivationQuantizer` under ``root`` (deduplicated, in module order)."""
    seen: dict[int, ActivationQuantizer] = {}
    for m in root.modules():
        if isinstance(m, ActivationQuantizer):
            seen.setdefault(id(m), m)
    return list(seen.values())


def activation_parameters(root: nn.Module) -> list[nn.Parameter]:
    """The trainable LSQ step sizes under ``root``."""
    return [q.scale for q in activation_quantizers(root) if q.scale.requires_grad]


@torch.no_grad()
def calibrate_activations(root: nn.Module, run: Callable[[], None], only_uncalibrated: bool = True) -> int:
    """Initialize the activation quantizers under ``root`` from the data ``run()`` feeds it.

    ``run()`` must push the calibration data through ``root`` (it is called once
    for ``minmax``, twice for ``mse``). While observing, every quantizer returns
    its input unchanged, so all statistics are those of FP activations (with the
    weights as they are). Returns the number of quantizers initialized.
    """
    quantizers = [
        q for q in activation_quantizers(root)
        if not q.dynamic and not (only_uncalibrated and bool(q.initialized))
    ]
    if not quantizers:
        return 0
    try:
        for q in quantizers:
            q.observing = "minmax"
        run()
        mse = [q for q in quantizers if q.cfg.init == "mse" and q._lo is not None]
        if mse:
            for q in quantizers:
                q.observing = None
            for q in mse:
                q.observing = "mse"
            run()
        done = 0
        for q in quantizers:
            if q._lo is not None:
                q.finish_calibration()
                done += 1
        return done
    finally:
        for q in quantizers:
            q.observing = None


@contextmanager
def qdrop(root: nn.Module, p: Optional[float]) -> Iterator[None]:
    """Within the block, every activation quantizer keeps its quantized value with probability ``p``."""
    quantizers = activation_quantizers(root)
    previous = [q.drop_p for q in quantizers]
    for q in quantizers:
        q.drop_p = p
    try:
        yield
    finally:
        for q, prev in zip(quantizers, previous):
            q.drop_p = prev


__all__ = [
    "ActivationQuantizer", "activation_parameters", "activation_quantizers",
    "calibrate_activations", "grad_scale", "qdrop",
]
