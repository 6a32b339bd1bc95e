"""Writing a run's export formats from its checkpoint: ``DIR/export/<format>/``, one format at a time.

``fit`` calls :func:`export_formats` right after saving ``quantized.safetensors``;
``python -m flexround_pl export`` calls it on a finished run. Both read the
codes from the checkpoint (:class:`~flexround_pl.export.codes.QuantizedCodes`),
so nothing is quantized again and every format is written one block at a time.
Each directory appears whole (built beside it, then renamed) with a
``flexround_export.json`` saying what it holds, how exact it is and how to load it.

Exactness, per format (the run's weights are ``s1 * (codes - z)``):

* ``fake_quant``, ``compressed_tensors``: the reloaded dequantized weights are
  the run's bit for bit (FP weights / scales in the run's dtype).
* ``gptq``, ``awq``, ``gguf`` store ``s1`` as fp16. A ``fit`` that exports one
  of them keeps ``s1`` in fp16 from hardening on (:func:`round_scales`), so the
  run evaluates, and saves, exactly the weights the file holds. Exporting such a
  format later from a run that kept fp32 steps rounds them here and records the
  largest relative change of ``s1`` (``s1_fp16_max_rel_change``, at most 2^-11).
  GGUF Q4_1 also rounds ``m = -s1 * z`` to fp16.
* Engines then compute in fp16, so their logits equal ours up to fp16 arithmetic.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Optional

import torch
from torch import nn

from flexround_pl.export.codes import QuantizedCodes, make_plan, planned_schemes
from flexround_pl.export.directory import EXPORT_DIR, atomic_directory, directory_nbytes, write_info
from flexround_pl.export.formats import ExportContext, ExportFormat, check_formats
from flexround_pl.quant.layers import QuantizedLayer


def round_scales(net: nn.Module, dtype: torch.dtype = torch.float16) -> int:
    """Round every hardened layer's ``s1`` to ``dtype`` (see the module docstring); returns how many layers."""
    layers = {id(m): m for m in net.modules() if isinstance(m, QuantizedLayer) and m.hardened}
    for layer in layers.values():
        layer.round_scale(dtype)
    return len(layers)


def s1_fp16_change(codes: QuantizedCodes) -> float:
    """Largest relative change of any ``s1`` of the checkpoint when stored as fp16 (0.0: already fp16)."""
    worst = 0.0
    for name in codes.layer_info:
        s = codes.tensor(f"{name}.scale").float()
        if s.numel():
            worst = max(worst, float(((s.half().float() - s).abs() / s.abs().clamp_min(1e-30)).max()))
    return worst


def check_export(net: nn.Module, arch: Any, quant: Any, names: list[str], formats: list[ExportFormat]) -> None:
    """Preflight: ``ValueError`` (one line) if a requested format cannot hold the scheme the run will produce."""
    check_formats(formats, make_plan(net, arch, planned_schemes(net, arch, quant, names)))


def export_formats(
    checkpoint: str,
    root: str,
    formats: list[ExportFormat],
    context: ExportContext,
    verify: bool = True,
    log: Optional[Callable[[str], None]] = None,
) -> dict[str, dict[str, Any]]:
    """Write each of ``formats`` into ``root/export/<name>/`` from ``checkpoint``; returns ``{name: facts}``.

    ``verify``: check the checkpoint's checksum first (``fit`` skips it: it has just written the file).
    """
    log = log or context.log
    codes = QuantizedCodes(checkpoint, verify=verify)
    meta = codes.meta
    change: Optional[float] = None
    written: dict[str, dict[str, Any]] = {}
    for fmt in formats:
        target = os.path.join(root, EXPORT_DIR, fmt.name)
        info = {k: meta.get(k) for k in ("method", "granularity", "group_size", "symmetric", "model", "architecture")}
        info["w_bits"] = meta.get("w_bits", meta.get("bits"))  # "bits" in checkpoints written before the run summary
        if fmt.fp16_scales:
            change = s1_fp16_change(codes) if change is None else change
            info["s1_fp16_max_rel_change"] = change
            info["exact"] = (
                "dequantized weights equal the run's bit for bit (s1 fp16 since hardening)" if change == 0.0
                else f"codes equal the run's; s1 rounded to fp16 here (largest relative change {change:.2e})"
            )
        else:
            info["exact"] = "dequantized weights equal the run's bit for bit"
        with atomic_directory(target) as tmp:
            info.update(fmt.write(codes, tmp, context))
            write_info(tmp, info)
        size = directory_nbytes(target)
        written[fmt.name] = {"dir": target, "size_mb": size / 2**20, "exact": info["exact"]}
        log(f"export {fmt.name}: {target} ({size / 2**20:.2f} MiB)")
    return written


def record_in_results(root: str, written: dict[str, dict[str, Any]]) -> None:
    """Add the formats that ``export`` wrote to the run's ``results.json`` (sizes next to the FP size)."""
    import json

    from flexround_pl.utils import write_json_atomic

    path = os.path.join(root, "results.json")
    if not os.path.isfile(path):
        return
    with open(path) as f:
        results = json.load(f)
    results.setdefault("size_mb", {}).update({f"export/{k}": v["size_mb"] for k, v in written.items()})
    results.setdefault("export", {}).update(written)
    write_json_atomic(path, results)


__all__ = ["EXPORT_DIR", "check_export", "record_in_results", "export_formats", "round_scales", "s1_fp16_change"]
