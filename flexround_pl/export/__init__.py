"""Persisting a quantized model: bit packing, the quantized checkpoint, the plain-FP export."""

from flexround_pl.export.checkpoint import (
    CHECKPOINT_NAME,
    CheckpointError,
    load_quantized_model,
    read_metadata,
    read_quantized,
    save_quantized,
    state_dict_nbytes,
)
from flexround_pl.export.fake_quant import (
    EXPORT_DIR,
    dequantized_state_dict,
    export_fake_quant,
)
from flexround_pl.export.packing import pack, pack_codes, unpack, unpack_codes

__all__ = [
    "CHECKPOINT_NAME", "CheckpointError", "EXPORT_DIR", "dequantized_state_dict", "export_fake_quant",
    "load_quantized_model", "pack", "pack_codes", "read_metadata", "read_quantized", "save_quantized",
    "state_dict_nbytes", "unpack", "unpack_codes",
]
