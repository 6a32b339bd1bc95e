"""The layer Hessians GPTQ and the output-aware grid need, from the calibration cache, and their use in a block.

GPTQ (Frantar et al., ICLR 2023, arXiv 2210.17323) quantizes a block's layers
with ``H = 2 X X^T / n``, ``X`` the inputs of each layer when the *quantized*
network's block input (``cache.q_inputs``) runs through the *FP* block: the
teacher copy, so every layer of the block sees the FP layers before it, as
the paper's code does. Forward hooks on the teacher's layers accumulate
``X X^T`` while the cache runs through it once; padding tokens (the cache's
``loss_mask``) are left out.

Used for ``quant.method: gptq`` (the codes), ``quant.init_from: gptq``
(FlexRound / LRQ start from the GPTQ-compensated weight, so at step 0 they
are GPTQ and the reconstruction loss can only improve on it) and
``quant.weight.init: output`` (every method's grid is searched on
``e^T H e``; :func:`grid_init_hessians`, computed before the block's layers
are swapped, and the same Hessians GPTQ then uses).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from flexround_pl.quant.base import method_spec
from flexround_pl.quant.config import QuantConfig
from flexround_pl.quant.gptq import GPTQQuantizer, gptq_on_grid
from flexround_pl.quant.layers import QuantizedLayer
from flexround_pl.quant.surgery import quantizable_layers, quantized_layers
from flexround_pl.reconstruct.cache import CalibrationCache, to_device
from flexround_pl.reconstruct.config import ReconstructionConfig
from flexround_pl.reconstruct.data import holdout_split


def uses_layer_hessians(quant: QuantConfig) -> bool:
    return method_spec(quant.method).uses_hessian or quant.init_from == "gptq"


def unsupported_by_gptq(module: nn.Module) -> Optional[str]:
    """Why GPTQ cannot take ``module``'s input Hessian (``None`` if it can); checked in preflight."""
    if isinstance(module, nn.Conv2d) and (
        module.groups != 1 or module.padding_mode != "zeros" or isinstance(module.padding, str)
    ):
        return (f"Conv2d with groups={module.groups}, padding={module.padding!r}, padding_mode={module.padding_mode!r} "
                "(GPTQ here needs groups=1 and integer zero padding)")
    return None


def _layer_rows(module: nn.Module, x: Tensor, mask: Optional[Tensor]) -> Tensor:
    """The rows of ``X^T`` one forward contributes: ``[rows, C_in]`` in the grid's input layout."""
    if isinstance(module, nn.Conv2d):
        why = unsupported_by_gptq(module)
        if why is not None:
            raise ValueError(f"GPTQ: {why}: keep this layer FP (model.quant.keep_fp) or use another method")
        cols = F.unfold(x, module.kernel_size, module.dilation, module.padding, module.stride)  # [B, C*k*k, L]
        return cols.transpose(1, 2).reshape(-1, cols.shape[1])
    if mask is not None and x.dim() == 3 and x.shape[:2] == mask.shape:
        x = x[mask.to(x.device).bool()]
    return x.reshape(-1, x.shape[-1])


class _HessianSums:
    """Forward hooks on named teacher layers summing ``X^T X`` over the rows of each batch.

    Before each batch, :meth:`next_batch` gives the batch's sample indices
    (for the cache's padding mask) and which of its samples count (``None``: all).
    """

    def __init__(self, teacher: nn.Module, names: list[str]) -> None:
        modules = dict(teacher.named_modules(remove_duplicate=False))  # a shared layer under any of its names
        self.names = names
        self.sums: dict[str, Tensor] = {}
        self.counts: dict[str, int] = {n: 0 for n in names}
        self.mask: Optional[Tensor] = None
        self.samples: Optional[Tensor] = None
        self.handles = [modules[n].register_forward_hook(self._hook(n)) for n in names]

    def next_batch(self, cache: CalibrationCache, index: Tensor, samples: Optional[Tensor] = None) -> None:
        self.mask = cache.loss_mask[index] if cache.loss_mask is not None else None
        self.samples = samples

    def _hook(self, name: str):
        def accumulate(module: nn.Module, args: tuple, output: object) -> None:
            x, mask = args[0], self.mask
            if self.samples is not None:
                if not bool(self.samples.any()):
                    return
                x = x[self.samples.to(x.device)]
                mask = None if mask is None else mask[self.samples]
            rows = _layer_rows(module, x, mask).float()
            if name not in self.sums:
                self.sums[name] = torch.zeros(rows.shape[1], rows.shape[1], device=rows.device)
            self.sums[name].addmm_(rows.t(), rows)
            self.counts[name] += rows.shape[0]

        return accumulate

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []

    def hessians(self) -> dict[str, Tensor]:
        """``H = 2 X X^T / n`` of every layer (after :meth:`remove`)."""
        missing = [n for n in self.names if self.counts[n] == 0]
        if missing:
            raise RuntimeError(f"GPTQ: no calibration input reached layer(s) {', '.join(missing)} of this block")
        return {n: self.sums[n] * (2.0 / self.counts[n]) for n in self.names}


@torch.no_grad()
def layer_hessians(
    teacher: nn.Module,
    names: list[str],
    cache: CalibrationCache,
    device: torch.device,
    batch_size: int,
    indices: Optional[Tensor] = None,
) -> dict[str, Tensor]:
    """``H = 2 X X^T / n`` (float32, ``[C_in, C_in]``) of each named teacher layer, on ``cache.q_inputs[indices]``."""
    sums = _HessianSums(teacher, names)
    order = torch.arange(len(cache)) if indices is None else indices
    try:
        for start in range(0, len(order), batch_size):
            index = order[start:start + batch_size]
            sums.next_batch(cache, index)
            args, kwargs = to_device(cache.call_args(index), device)
            teacher(cache.q_inputs[index].to(device), *args, **kwargs)
    finally:
        sums.remove()
    return sums.hessians()


@torch.no_grad()
def targets_and_fp_hessians(
    teacher: nn.Module, names: list[str], cache: CalibrationCache, device: torch.device, recon: ReconstructionConfig,
) -> dict[str, Tensor]:
    """``cache.compute_targets`` that also sums the named layers' Hessians on the *FP* inputs it runs on
    (the training samples only): ``weight.output_inputs: fp``, no pass of its own."""
    train, _ = holdout_split(len(cache), recon.holdout, recon.seed)
    counted = torch.zeros(len(cache), dtype=torch.bool)
    counted[torch.tensor(train, dtype=torch.long)] = True
    sums = _HessianSums(teacher, names)

    def before(index: Tensor) -> None:
        keep = counted[index]
        sums.next_batch(cache, index, None if bool(keep.all()) else keep)

    try:
        cache.compute_targets(teacher, device, recon.eval_batch_size, before=before)
    finally:
        sums.remove()
    return sums.hessians()


def training_hessians(
    teacher: nn.Module, names: list[str], cache: CalibrationCache, device: torch.device, recon: ReconstructionConfig
) -> dict[str, Tensor]:
    """:func:`layer_hessians` on the training samples only (``reconstruction.holdout`` keeps the
    held-out ones unseen by every method)."""
    train, _ = holdout_split(len(cache), recon.holdout, recon.seed)
    return layer_hessians(teacher, names, cache, device, recon.eval_batch_size, torch.tensor(train))


def grid_init_hessians(
    teacher: nn.Module, cache: CalibrationCache, device: torch.device, quant: QuantConfig,
    recon: ReconstructionConfig, keep_fp: Sequence[str] = (), prefix: str = "",
) -> dict[str, Tensor]:
    """The input Hessian of every layer of the FP block ``teacher`` that will be quantized, by local name,
    for ``weight.init: output`` (``quantize_modules(..., hessians=...)``); empty for the other inits.

    Conv2d layers the hooks cannot unfold (groups, string padding) get none: their grid is ``lp``.
    """
    if quant.weight.init != "output":
        return {}
    names = output_grid_layers(teacher, quant, keep_fp, prefix)
    return training_hessians(teacher, names, cache, device, recon) if names else {}


def output_grid_layers(teacher: nn.Module, quant: QuantConfig, keep_fp: Sequence[str] = (), prefix: str = "") -> list[str]:
    """The layers of ``teacher`` whose ``weight.init: output`` grid gets a Hessian (not those Conv2d hooks cannot unfold)."""
    return [n for n, m in quantizable_layers(teacher, quant, keep_fp, prefix) if unsupported_by_gptq(m) is None]


def hessians_from_fp_inputs(quant: QuantConfig) -> bool:
    """``weight.init: output`` with ``weight.output_inputs: fp``: the targets pass sums the grid's Hessians.
    GPTQ (``method: gptq``, ``init_from: gptq``) compensates on the quantized inputs: its own pass."""
    return quant.weight.init == "output" and quant.weight.output_inputs == "fp" and not uses_layer_hessians(quant)


def _grid_weight(layer: QuantizedLayer) -> Tensor:
    return layer._grid_weight().detach()


@torch.no_grad()
def compensate_block(
    student: nn.Module,
    teacher: nn.Module,
    cache: CalibrationCache,
    device: torch.device,
    quant: QuantConfig,
    recon: ReconstructionConfig,
    hessians: Optional[dict[str, Tensor]] = None,
) -> int:
    """GPTQ on every quantized layer of ``student`` (its teacher twin gives the Hessian).

    The Hessians use the training samples only (``reconstruction.holdout``
    keeps the held-out ones unseen by every method). ``hessians``: those
    already computed for the block (:func:`grid_init_hessians`, the same
    teacher, inputs and samples), reused; the missing ones are computed.

    ``method: gptq``: the layer's codes are fixed. ``init_from: gptq``: the
    layer's frozen starting weight becomes the GPTQ-compensated one (its
    round-to-nearest on the layer's grid is GPTQ's codes). Returns the number
    of layers compensated.
    """
    layers = [(n, m) for n, m in quantized_layers(student) if m.quantizer is not None]
    hessians = dict(hessians or {})
    missing = [n for n, _ in layers if n not in hessians]
    if missing:
        hessians.update(training_hessians(teacher, missing, cache, device, recon))
    for name, layer in layers:
        q = layer.quantizer
        if isinstance(q, GPTQQuantizer):
            q.compensate(_grid_weight(layer), hessians[name])
        else:
            result = gptq_on_grid(_grid_weight(layer), hessians[name], q.grid, quant.gptq)
            compensated = layer._to_fp_layout(result.compensated).to(layer.weight.dtype)
            layer.weight.data.copy_(compensated)
        del hessians[name]
    return len(layers)
