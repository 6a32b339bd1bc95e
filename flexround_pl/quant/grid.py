"""The uniform integer grid of one weight tensor: step size ``s1`` and zero point.

Every quantizer dequantizes as ``w_hat = s1 * (q - zero_point)`` with integer
codes ``q`` in ``[qmin, qmax]``. The computation happens in the grid's *view*
of the weight, where ``s1`` broadcasts:

* ``tensor``:  the weight itself, ``s1`` of shape ``[1, 1, ...]``;
* ``channel``: the weight itself, ``s1`` of shape ``[C_out, 1, ...]``;
* ``group``:   ``[C_out, n_groups, group_size]`` (dims 1.. flattened, then cut
  into groups of consecutive elements), ``s1`` of shape ``[C_out, n_groups, 1]``.

``s1`` is stored as ``log_scale`` (the log parametrization every quantizer
uses) and always evaluated as ``exp(log_scale)`` on the small scale tensor, so
that RTN, FlexRound, AdaRound and the hardened layer use the very same float.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional, Sequence

import torch
from torch import Tensor, nn

Granularity = Literal["tensor", "channel", "group"]
GridInit = Literal["minmax", "lp", "output"]

MIN_BITS, MAX_BITS = 2, 8


def validate_bits(bits: Optional[int], name: str) -> None:
    if bits is None:
        return
    if isinstance(bits, bool) or not isinstance(bits, int) or not MIN_BITS <= bits <= MAX_BITS:
        raise ValueError(
            f"{name} must be an integer from {MIN_BITS} to {MAX_BITS}, got {bits!r}"
        )


@dataclass
class GridConfig:
    """A uniform affine integer grid.

    ``granularity``: ``tensor`` (one step size per weight tensor, the FlexRound
    paper's setting), ``channel`` (one per output channel) or ``group`` (one per
    output channel and per ``group_size`` consecutive input elements).
    ``init``: ``minmax`` uses the full range; ``lp`` searches ``lp_candidates``
    shrunk ranges for the smallest ``||W - Q(W)||_p`` with ``p = lp_norm``
    (BRECQ / QDrop use p = 2.4); ``output`` searches the same ranges for the
    smallest error in the layer's *output* on the calibration inputs,
    ``e^T H e`` with ``e = Q(w) - w`` and ``H`` the layer's input Hessian
    (:class:`UniformGrid`). ``output`` needs calibration data: the block
    driver computes every layer's ``H`` from the FP block before it builds the
    quantizers; a layer with no ``H`` (outside every block, or a Conv2d the
    Hessian hooks do not cover: groups / string padding) gets ``lp``.
    ``search_stride``: ``1`` scores every candidate; ``s > 1`` scores every
    ``s``-th, then each channel / group refines over the ``s - 1`` candidates
    on either side of its best (``n / s + 2(s - 1)`` scores instead of ``n``);
    ``None`` (default): 4 for ``output``, whose ``e^T H e`` scores are the
    cost (measured on SmolLM2 W3 per channel: RTN perplexity 56.76 at 221
    quantize CPU-s, against 58.69 at 337 with every candidate), 1 for ``lp``.
    ``output_inputs``: the inputs whose ``H`` scores the ``output`` search:
    ``quantized`` (default: the quantized network's block inputs through the
    FP block, as GPTQ; one pass over the calibration set per block) or ``fp``
    (the FP network's, summed during the pass that computes the block's
    targets anyway: no pass of its own).
    """

    bits: int = 4
    symmetric: bool = True
    granularity: Granularity = "tensor"
    group_size: int = 128
    init: GridInit = "lp"
    lp_norm: float = 2.4
    lp_candidates: int = 100
    search_stride: Optional[int] = None
    output_inputs: Literal["quantized", "fp"] = "quantized"

    def __post_init__(self) -> None:
        validate_bits(self.bits, "bits")
        if self.granularity not in ("tensor", "channel", "group"):
            raise ValueError(
                f"granularity must be 'tensor', 'channel' or 'group', got {self.granularity!r}"
            )
        if self.init not in ("minmax", "lp", "output"):
            raise ValueError(f"grid init must be 'minmax', 'lp' or 'output', got {self.init!r}")
        if self.group_size < 1:
            raise ValueError(f"group_size must be >= 1, got {self.group_size}")
        if self.lp_candidates < 1:
            raise ValueError(f"lp_candidates must be >= 1, got {self.lp_candidates}")
        if self.output_inputs not in ("quantized", "fp"):
            raise ValueError(f"output_inputs must be 'quantized' or 'fp', got {self.output_inputs!r}")
        stride = self.search_stride
        if stride is not None and (isinstance(stride, bool) or not isinstance(stride, int) or stride < 1):
            raise ValueError(f"search_stride must be an integer >= 1 (1: every candidate) or null, got {stride!r}")

    @property
    def effective_search_stride(self) -> int:
        """``search_stride``, or its default: 4 for the costly ``output`` search, 1 (every candidate) otherwise."""
        if self.search_stride is not None:
            return self.search_stride
        return 4 if self.init == "output" else 1

    @property
    def qmin(self) -> int:
        return -(2 ** (self.bits - 1)) if self.symmetric else 0

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1 if self.symmetric else 2**self.bits - 1


_MIN_STEP = 1e-8  # step of an all-zero channel / group


def group_view(w: Tensor, cfg: GridConfig) -> Tensor:
    """``w`` in the grid's view (unchanged unless ``cfg.granularity == 'group'``)."""
    if cfg.granularity != "group":
        return w
    c_out = w.shape[0]
    n_in = w[0].numel() if c_out else 0
    if n_in % cfg.group_size:
        raise ValueError(
            f"group-wise quantization needs the flattened input size to be divisible by "
            f"group_size: weight of shape {tuple(w.shape)} has {n_in} input elements per "
            f"output channel, group_size={cfg.group_size}. Choose a group_size that divides "
            f"{n_in}, or use granularity 'channel', or keep this layer in FP (keep_fp)."
        )
    return w.reshape(c_out, n_in // cfg.group_size, cfg.group_size)


def ungroup(v: Tensor, shape: Sequence[int]) -> Tensor:
    """Inverse of :func:`group_view`: back to the weight's ``shape``."""
    return v.reshape(tuple(shape))


def reduce_dims(v: Tensor, cfg: GridConfig) -> tuple[int, ...]:
    """Dims of the grid view that share one step size."""
    if cfg.granularity == "tensor":
        return tuple(range(v.dim()))
    if cfg.granularity == "channel":
        return tuple(range(1, v.dim()))
    return (2,)


def fake_quant(v: Tensor, step: Tensor, zero_point: Tensor, qmin: int, qmax: int) -> Tensor:
    """Round-to-nearest on the grid: ``step * (clamp(round(v/step) + zp) - zp)``."""
    q = torch.clamp(torch.round(v / step) + zero_point, qmin, qmax)
    return step * (q - zero_point)


def fake_quant_into(
    out: Tensor, v: Tensor, step: Tensor, zero_point: Tensor, qmin: int, qmax: int, symmetric: bool
) -> Tensor:
    """:func:`fake_quant` computed in place in ``out`` (same operations, same bits).

    Searches over many candidate grids are bound by memory traffic: with a
    fresh tensor per operation the Lp range search cost about twice as much
    on CPU, the NUPES search 3.6x (demo). A symmetric grid's zero point is exactly 0: adding /
    subtracting it only turns ``-0.0`` into ``+0.0``, so it is skipped.
    """
    buf = torch.div(v, step, out=out)
    buf.round_()
    if not symmetric:
        buf.add_(zero_point)
    buf.clamp_(qmin, qmax)
    if not symmetric:
        buf.sub_(zero_point)
    return buf.mul_(step)


class UniformGrid(nn.Module):
    """Step size s1 (+ zero point) of one weight tensor for a GridConfig.

    Initialization (``cfg.init``):

    * ``minmax``: the smallest step whose grid covers ``[min(W, 0), max(W, 0)]``.
      Symmetric: ``s1 = max(max(W)/qmax, min(W)/qmin)`` (zero point 0);
      asymmetric: ``s1 = (max - min) / (qmax - qmin)``,
      ``zero_point = clamp(round(-min / s1), qmin, qmax)``.
    * ``lp``: BRECQ / QDrop search. The range is shrunk by ``alpha`` in
      ``linspace(1/n, 1, n)`` (``n = cfg.lp_candidates``; 0.01..1 for n = 100)
      and the ``alpha`` with the smallest ``sum |W - Q(W)|^p`` (``p =
      cfg.lp_norm``) is kept, independently for every channel / group.
      ``alpha = 1`` (min-max) is a candidate, so the Lp error never exceeds
      min-max's.
    * ``output``: the same candidates, scored by the error they cause in the
      layer's output over the calibration inputs ``X`` (rows: tokens). With
      ``hessian`` ``H = 2 X^T X / n`` (``[C_in, C_in]``, flattened inputs, as
      GPTQ's) and a weight row's error ``e = Q(w) - w``, that error is
      ``e^T H e``, computed exactly for ``channel`` (per row) and ``tensor``
      (summed over rows). It does not separate over the groups of a row, so
      ``group`` scores each group ``g`` with its own diagonal block of ``H``,
      ``e_g^T H_gg e_g``: the exact output error of quantizing that group
      alone, which keeps the correlations inside a group (that ``diag(H)``
      would drop) and leaves out only the cross terms between groups, which
      a choice made per group cannot see. ``alpha = 1`` is a candidate here
      too. Without ``hessian`` (layers outside the blocks) this is ``lp``.
      The search runs on ``hessian``'s device, in float32.

    The zero point is fixed here and never learned (as in the FlexRound code).
    """

    def __init__(self, weight: Tensor, cfg: GridConfig, hessian: Optional[Tensor] = None):
        super().__init__()
        self.cfg = cfg
        self.qmin, self.qmax = cfg.qmin, cfg.qmax
        self.weight_shape = tuple(weight.shape)
        if cfg.init != "output":
            hessian = None  # minmax / lp never read it
        with torch.no_grad():
            w = weight.detach().float()
            if hessian is not None:
                w = w.to(hessian.device)
            log_scale, zero_point = self._init(self.group_view(w), hessian)
        self.register_buffer("log_scale", log_scale.to(weight.device))
        self.register_buffer("zero_point", zero_point.to(weight.device))

    # ---- views --------------------------------------------------------------
    def group_view(self, w: Tensor) -> Tensor:
        return group_view(w, self.cfg)

    def ungroup(self, v: Tensor, shape: Sequence[int] | None = None) -> Tensor:
        return ungroup(v, self.weight_shape if shape is None else shape)

    def scale_shape(self) -> tuple[int, ...]:
        """Shape of ``s1`` / ``zero_point`` (broadcasts against the grid view)."""
        return tuple(self.log_scale.shape)

    def step(self) -> Tensor:
        """``s1 = exp(log_scale)``, the one float every user of this grid shares."""
        return torch.exp(self.log_scale)

    # ---- initialization ----------------------------------------------------
    def _step_and_zero(self, lo: Tensor, hi: Tensor) -> tuple[Tensor, Tensor]:
        """log step and zero point of the grid covering ``[lo, hi]`` (lo <= 0 <= hi)."""
        if self.cfg.symmetric:
            step = torch.maximum(hi / self.qmax, lo / self.qmin)
        else:
            step = (hi - lo) / (self.qmax - self.qmin)
        log_step = torch.log(step.clamp_min(_MIN_STEP))
        step = torch.exp(log_step)  # the float the quantizers will use
        if self.cfg.symmetric:
            zero_point = torch.zeros_like(step)
        else:
            zero_point = torch.clamp(torch.round(-lo / step), self.qmin, self.qmax)
        return log_step, zero_point

    def _init(self, v: Tensor, hessian: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
        dims = reduce_dims(v, self.cfg)
        lo = v.amin(dim=dims, keepdim=True).clamp_max(0)
        hi = v.amax(dim=dims, keepdim=True).clamp_min(0)
        best_log, best_zp = self._step_and_zero(lo, hi)
        if self.cfg.init == "minmax" or self.cfg.lp_candidates == 1:
            return best_log, best_zp
        p, n = self.cfg.lp_norm, self.cfg.lp_candidates
        scratch = torch.empty_like(v)  # one buffer for every candidate: no per-op allocation
        if hessian is None:

            def error(log_step: Tensor, zp: Tensor) -> Tensor:
                return self._lp_error(v, log_step, zp, p, dims, scratch)
        else:
            h = self._check_hessian(v, hessian)

            def error(log_step: Tensor, zp: Tensor) -> Tensor:
                return self._output_error(v, log_step, zp, h, scratch)

        alphas = torch.linspace(1.0 / n, 1.0, n)  # candidate k (1..n) shrinks the range to alphas[k - 1] = k / n
        stride = self.cfg.effective_search_stride
        best_err = error(best_log, best_zp)
        best_k = torch.full(best_err.shape, n, dtype=torch.long, device=best_err.device)

        def consider(k: Tensor | int, ties_take: bool) -> None:
            nonlocal best_err, best_log, best_zp, best_k
            alpha = alphas[k - 1].item() if isinstance(k, int) else alphas.to(k.device)[k - 1]
            log_step, zp = self._step_and_zero(lo * alpha, hi * alpha)
            err = error(log_step, zp)
            better = err <= best_err if ties_take else err < best_err
            best_err = torch.where(better, err, best_err)
            best_log = torch.where(better, log_step, best_log)
            best_zp = torch.where(better, zp, best_zp)
            best_k = torch.where(better, k, best_k)

        # from the widest range down; a tie keeps the wider range (the one scored first)
        for k in range(n - stride, 0, -stride):
            consider(k, ties_take=False)
        if stride > 1:  # each unit's neighbours, in the same order: wider ones win ties
            centre = best_k.clone()
            for d in range(1, stride):
                consider((centre + d).clamp(max=n), ties_take=True)
            for d in range(1, stride):
                consider((centre - d).clamp(min=1), ties_take=False)
        return best_log, best_zp

    def _lp_error(self, v: Tensor, log_step: Tensor, zp: Tensor, p: float, dims, out: Tensor) -> Tensor:
        """``sum |fake_quant(v) - v|^p`` over ``dims``, in ``out`` (a scratch buffer shaped like ``v``)."""
        buf = fake_quant_into(out, v, torch.exp(log_step), zp, self.qmin, self.qmax, self.cfg.symmetric)
        buf.sub_(v).abs_().pow_(p)
        return buf.sum(dim=dims, keepdim=True)

    def _check_hessian(self, v: Tensor, hessian: Tensor) -> Tensor:
        """``hessian`` as float32 ``[C_in, C_in]`` (``group``: its diagonal blocks, ``[n_groups, gs, gs]``)."""
        c_in = v[0].numel() if v.shape[0] else 0
        if tuple(hessian.shape) != (c_in, c_in):
            raise ValueError(
                f"grid init 'output': the Hessian of a weight of shape {self.weight_shape} must be "
                f"[{c_in}, {c_in}] (flattened inputs), got {list(hessian.shape)}"
            )
        h = hessian.detach().float()
        if self.cfg.granularity != "group":
            return h
        n_groups, size = v.shape[1], v.shape[2]
        # [g, i, g', j] = H[g*size + i, g'*size + j]; the diagonal g = g' is [i, j, g]
        return h.reshape(n_groups, size, n_groups, size).diagonal(dim1=0, dim2=2).permute(2, 0, 1).contiguous()

    def _output_error(self, v: Tensor, log_step: Tensor, zp: Tensor, h: Tensor, out: Tensor) -> Tensor:
        """``e^T H e`` of every row (``group``: ``e_g^T H_gg e_g`` of every group), in the scale's shape.

        ``e = fake_quant(v) - v`` is computed in ``out``; the products are
        taken over chunks of rows (about 2^24 elements each).
        """
        e = fake_quant_into(out, v, torch.exp(log_step), zp, self.qmin, self.qmax, self.cfg.symmetric).sub_(v)
        rows = e.shape[0]
        chunk = max(1, (1 << 24) // max(e[0].numel(), 1))
        if self.cfg.granularity == "group":
            err = torch.empty(rows, e.shape[1], dtype=e.dtype, device=e.device)
            for r0 in range(0, rows, chunk):
                eg = e[r0:r0 + chunk].transpose(0, 1)  # [n_groups, rows, size]
                err[r0:r0 + chunk] = torch.bmm(eg, h).mul_(eg).sum(-1).t()
            return err.unsqueeze(-1)  # [C_out, n_groups, 1]
        flat = e.reshape(rows, -1)
        err = torch.empty(rows, dtype=e.dtype, device=e.device)
        for r0 in range(0, rows, chunk):
            er = flat[r0:r0 + chunk]
            err[r0:r0 + chunk] = (er @ h).mul_(er).sum(1)
        if self.cfg.granularity == "tensor":
            return err.sum().reshape((1,) * v.dim())
        return err.reshape((rows,) + (1,) * (v.dim() - 1))

    def extra_repr(self) -> str:
        c = self.cfg
        kind = "sym" if c.symmetric else "asym"
        return f"bits={c.bits}, {kind}, granularity={c.granularity}, scale_shape={self.scale_shape()}"
