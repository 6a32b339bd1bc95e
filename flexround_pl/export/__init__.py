"""Persisting a quantized model: bit packing, the quantized checkpoint, and the serving formats.

Each serving format is one module that registers itself in
:mod:`flexround_pl.export.formats`; importing this package registers them all.
"""

from flexround_pl.export.checkpoint import (
    CHECKPOINT_NAME,
    CheckpointError,
    load_quantized_model,
    read_metadata,
    read_quantized,
    save_quantized,
)
from flexround_pl.export.packing import pack, pack_codes, unpack, unpack_codes
from flexround_pl.export import fake_quant, gptq, awq, compressed_tensors, gguf  # noqa: F401,E402  (register)
from flexround_pl.export.fake_quant import dequantized_state_dict, export_fake_quant  # noqa: E402
from flexround_pl.export.formats import ExportSettings, format_names, get_format  # noqa: E402
from flexround_pl.export.run import EXPORT_DIR, export_formats  # noqa: E402

__all__ = [
    "CHECKPOINT_NAME", "CheckpointError", "EXPORT_DIR", "ExportSettings", "dequantized_state_dict",
    "export_fake_quant", "export_formats", "format_names", "get_format", "load_quantized_model", "pack",
    "pack_codes", "read_metadata", "read_quantized", "save_quantized", "unpack", "unpack_codes",
]
