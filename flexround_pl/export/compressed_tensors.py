"""compressed-tensors ``pack-quantized`` checkpoints (vLLM W4A16 / W8A16, llm-compressor), from the codes.

Layout per Linear (compressed-tensors' ``PackedQuantizationCompressor``):

* ``weight_packed`` int32 ``[out, ceil(in*b/32)]``: each row's signed codes
  ``c`` as ``c + 2^(b-1)``, one dense little-endian bit stream per row;
* ``weight_scale`` ``[out, groups]`` (``[out, 1]`` per channel), stored in the
  layer's FP dtype: compressed-tensors multiplies in that dtype, so the
  reloaded weight is the run's ``s1 * (c - z)`` bit for bit for any run
  (no fp16 rounding needed; vLLM casts the scales to its compute dtype);
* ``weight_shape`` int64 ``[out, in]``;
* asymmetric grids: ``weight_zero_point``, the signed zero points ``z - 2^(b-1)``
  packed along the output dimension, int32 ``[ceil(out*b/32), groups]``. This
  is what compressed-tensors 0.20.1 writes, but transformers 5.24 then fails
  to reload it (it allocates ``weight_zero_point`` unpacked, ``[out, groups]``),
  whatever the bits and groups: asymmetric runs are refused until it does.

``config_groups`` holds one scheme (``targets: [Linear]``); ``ignore`` lists
every Linear kept FP (``lm_head`` ...). compressed-tensors targets
``nn.Linear`` only, so GPT-2's ``Conv1D`` layers are refused.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor

from flexround_pl.export.codes import LayerCodes, QuantizedCodes
from flexround_pl.export.formats import ExportContext, ExportFormat, ExportPlan, register, weight_only_refusal
from flexround_pl.export.hf_files import write_hf_model
from flexround_pl.export.packing import pack_rows_int32


def ct_tensors(layer: LayerCodes) -> dict[str, Tensor]:
    s = layer.scheme
    out = {
        "weight_packed": pack_rows_int32(layer.unsigned(), s.bits),
        "weight_scale": layer.scale.to(layer.fp_dtype),
        "weight_shape": torch.tensor([s.n_out, s.n_in], dtype=torch.int64),
    }
    if not s.symmetric:  # signed zero point + offset = the unsigned zero point, packed along the output
        out["weight_zero_point"] = pack_rows_int32(layer.zeros().t().contiguous(), s.bits).t().contiguous()
    return out


def fp_linear_names(net: Any, quantized: set[str]) -> list[str]:
    from torch import nn

    return [n for n, m in net.named_modules() if isinstance(m, nn.Linear) and n not in quantized]


class CompressedTensors(ExportFormat):
    name = "compressed_tensors"
    fp16_scales = False
    load = ("transformers.AutoModelForCausalLM.from_pretrained(<dir>)  (needs compressed-tensors; "
            "decompresses to dense); vllm serve <dir>")

    def refusal(self, plan: ExportPlan) -> Optional[str]:
        reason = weight_only_refusal(plan, tuple(range(2, 9)))
        if reason:
            return reason
        if not plan.layers[0].symmetric:
            return ("asymmetric pack-quantized checkpoints do not reload with transformers 5.24 + "
                    "compressed-tensors 0.20.1 (weight_zero_point size mismatch, also for files compressed-tensors "
                    "writes itself); use model.quant.weight.symmetric true, or export gptq / gguf")
        conv1d = [s.name for s in plan.layers if s.kind == "QuantConv1D"]
        if conv1d:
            return (f"compressed-tensors quantizes nn.Linear only, not transformers' Conv1D ({conv1d[0]}, GPT-2); "
                    "export gptq, gguf or fake_quant")
        return None

    def write(self, codes: QuantizedCodes, directory: str, context: ExportContext) -> dict[str, Any]:
        s = codes.schemes()[0]
        weights = {
            "num_bits": s.bits, "type": "int", "symmetric": s.symmetric, "dynamic": False,
            "strategy": "group" if s.granularity == "group" else "channel",
            "group_size": s.group_size if s.granularity == "group" else None,
            "observer": "minmax", "actorder": None,
        }
        import flexround_pl

        config = {
            "quant_method": "compressed-tensors", "format": "pack-quantized", "quantization_status": "compressed",
            "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights, "input_activations": None,
                                          "output_activations": None, "format": "pack-quantized"}},
            "ignore": fp_linear_names(context.net, set(codes.layer_info)),
            "kv_cache_scheme": None, "global_compression_ratio": None,
            "producer": {"name": "flexround_pl", "version": flexround_pl.__version__},
        }
        write_hf_model(codes, directory, context, ct_tensors, config, dtype=None)
        return {"format": "compressed-tensors pack-quantized", "load": self.load}


register(CompressedTensors())

__all__ = ["CompressedTensors", "ct_tensors"]
