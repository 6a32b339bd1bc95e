"""AWQ GEMM checkpoints (``quant_method: awq``, ``version: gemm``), written straight from the codes.

Layout per Linear (AutoAWQ's GEMM packing; what GPTQModel's AWQ kernels and
vLLM's ``awq`` / ``awq_marlin`` read), 4-bit codes, group size ``g``:

* ``qweight`` int32 ``[in, out/8]``: each word holds 8 consecutive output
  columns of one input row, nibble ``k`` holding column ``AWQ_ORDER[k]``
  (``[0, 2, 4, 6, 1, 3, 5, 7]``, the interleaving AutoAWQ's kernels unpack);
* ``qzeros`` int32 ``[in/g, out/8]``: the zero points, packed the same way,
  stored as they are (no ``-1``; a symmetric grid has ``z = 8``);
* ``scales`` fp16 ``[in/g, out]``.

``W[o, i] = scales[i//g, o] * (q[i, o] - z[i//g, o])``. Exact in the sense
of :mod:`flexround_pl.export.gptq` (fp16 ``s1``, rounded at hardening).
Group-wise 4-bit only: that is all AWQ GEMM stores.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor

from flexround_pl.export.codes import LayerCodes, QuantizedCodes
from flexround_pl.export.formats import (
    ExportContext, ExportFormat, ExportPlan, gptqmodel_refusal, register, weight_only_refusal,
)
from flexround_pl.export.hf_files import write_hf_model

#: Nibble k of a packed word holds column AWQ_ORDER[k] of its 8.
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)


def pack_awq(values: Tensor) -> Tensor:
    """Unsigned 4-bit ``values`` ``[rows, cols]`` (cols a multiple of 8) -> int32 ``[rows, cols/8]``, AWQ order."""
    rows, cols = values.shape
    v = values.to(torch.int64).reshape(rows, cols // 8, 8)[:, :, list(AWQ_ORDER)]
    shifts = torch.arange(0, 32, 4, dtype=torch.int64)
    words = (v << shifts).sum(-1)  # < 2^32: no carries between nibbles
    return (words - ((words >= 2**31).long() << 32)).to(torch.int32)  # as signed int32, same bits


def awq_tensors(layer: LayerCodes) -> dict[str, Tensor]:
    return {
        "qweight": pack_awq(layer.unsigned().t()),
        "qzeros": pack_awq(layer.zeros().t()),
        "scales": layer.scale_fp16().t().contiguous(),
    }


class AWQ(ExportFormat):
    name = "awq"
    fp16_scales = True
    load = "transformers.AutoModelForCausalLM.from_pretrained(<dir>)  (needs gptqmodel); vllm serve <dir>"

    def refusal(self, plan: ExportPlan) -> Optional[str]:
        reason = weight_only_refusal(plan, (4,), every_block_linear=True) or gptqmodel_refusal(plan)
        if reason:
            return reason
        s = plan.layers[0]
        if s.granularity != "group":
            return (f"AWQ GEMM stores group-wise scales only, not {s.granularity}; "
                    "set model.quant.weight.granularity group (e.g. group_size 128)")
        odd = [x for x in plan.layers if x.n_out % 8]
        if odd:
            return f"packs 8 output columns per int32: {odd[0].name} has {odd[0].n_out} outputs; export gptq instead"
        return None

    def write(self, codes: QuantizedCodes, directory: str, context: ExportContext) -> dict[str, Any]:
        s = codes.schemes()[0]
        config = {"quant_method": "awq", "bits": 4, "group_size": s.group_size, "zero_point": True,
                  "version": "gemm", "modules_to_not_convert": None}
        write_hf_model(codes, directory, context, awq_tensors, config)
        return {"format": "awq", "load": self.load}


register(AWQ())

__all__ = ["AWQ", "AWQ_ORDER", "awq_tensors", "pack_awq"]
