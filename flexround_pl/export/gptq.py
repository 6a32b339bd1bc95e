"""GPTQ checkpoints (``quant_method: gptq``), written straight from the codes.

Layout per Linear (AutoGPTQ / GPTQModel; the layout vLLM's ``gptq`` and
``gptq_marlin`` kernels read), for ``b`` in 2 / 3 / 4 / 8 bits and ``g`` the
group size (the whole row for per-channel, ``group_size: -1``):

* ``qweight`` int32 ``[in*b/32, out]``: for each output column, the unsigned
  codes ``u`` of its ``in`` inputs as one dense little-endian bit stream
  (4-bit: 8 consecutive input rows per word; 3-bit: 32 rows in 3 words, values
  straddling words);
* ``qzeros`` int32 ``[in/g, out*b/32]``: the zero points, packed the same way
  along the output dimension;
* ``scales`` fp16 ``[in/g, out]``; ``g_idx`` int32 ``[in]`` = ``i // g``
  (``desc_act: false``); ``bias`` fp16.

Dequantization: ``W[o, i] = scales[i//g, o] * (u[i, o] - z[i//g, o])``.
``checkpoint_format: gptq`` (v1) stores ``z - 1`` (an AutoGPTQ legacy that
the loaders undo), so a symmetric grid (``z = 2^(b-1)``) is written as v1.
An asymmetric grid may have ``z = 0``, which v1 cannot store: it is written as
``checkpoint_format: gptq_v2`` (``z`` as is), which GPTQModel reads.

Exact: the loaders compute ``W`` from these integers and the fp16 ``s1``; a
run that exports ``gptq`` rounds ``s1`` to fp16 at hardening, so the file's
``W`` is the run's bit for bit (in fp16 compute: equal up to fp16 rounding of
each weight and of the matmul).
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor

from flexround_pl.export.codes import LayerCodes, QuantizedCodes
from flexround_pl.export.formats import (
    ExportContext, ExportFormat, ExportPlan, gptqmodel_refusal, packing_refusal, register, weight_only_refusal,
)
from flexround_pl.export.hf_files import write_hf_model
from flexround_pl.export.packing import pack_rows_int32

BITS = (2, 3, 4, 8)


def gptq_tensors(layer: LayerCodes, v1: bool) -> dict[str, Tensor]:
    """``qweight`` / ``qzeros`` / ``scales`` / ``g_idx`` of one layer (leaf names)."""
    b = layer.scheme.bits
    zeros = layer.zeros() - (1 if v1 else 0)
    return {
        "qweight": pack_rows_int32(layer.unsigned(), b).t().contiguous(),
        "qzeros": pack_rows_int32(zeros.t().contiguous(), b),
        "scales": layer.scale_fp16().t().contiguous(),
        "g_idx": torch.arange(layer.scheme.n_in, dtype=torch.int32) // layer.group_size,
    }


class GPTQ(ExportFormat):
    name = "gptq"
    fp16_scales = True
    load = "transformers.AutoModelForCausalLM.from_pretrained(<dir>)  (needs optimum + gptqmodel); vllm serve <dir>"

    def refusal(self, plan: ExportPlan) -> Optional[str]:
        return (weight_only_refusal(plan, BITS, every_block_linear=True) or gptqmodel_refusal(plan)
                or packing_refusal(plan, pack_out=True))

    def write(self, codes: QuantizedCodes, directory: str, context: ExportContext) -> dict[str, Any]:
        s = codes.schemes()[0]
        v1 = s.symmetric
        config = {
            "quant_method": "gptq", "bits": s.bits,
            "group_size": s.group_size if s.granularity == "group" else -1,
            "desc_act": False, "sym": s.symmetric, "true_sequential": True, "static_groups": False,
            "checkpoint_format": "gptq" if v1 else "gptq_v2", "damp_percent": 0.01,
        }
        write_hf_model(codes, directory, context, lambda layer: gptq_tensors(layer, v1), config)
        return {"format": "gptq", "checkpoint_format": config["checkpoint_format"], "load": self.load}


register(GPTQ())

__all__ = ["GPTQ", "gptq_tensors"]
