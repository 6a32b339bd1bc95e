"""The export-format registry: one small module per serving format registers itself here.

A format is an :class:`ExportFormat`: a ``name`` (what ``--export.formats``
lists), whether it stores the step ``s1`` as fp16 (``fp16_scales``), a
:meth:`~ExportFormat.refusal` that says in one line why it cannot hold a
run's scheme (checked in preflight, before any work), and a
:meth:`~ExportFormat.write` that writes ``DIR/export/<name>/`` straight from
the run's integer codes (:class:`~flexround_pl.export.codes.QuantizedCodes`),
one block at a time. Adding a format is one file that calls :func:`register`
and one import line in :mod:`flexround_pl.export`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Optional

if TYPE_CHECKING:
    from flexround_pl.export.codes import QuantizedCodes


@dataclass(frozen=True)
class LayerScheme:
    """How one quantized layer is stored: what a format needs to decide whether it fits.

    ``n_out`` / ``n_in``: rows and (flattened) columns of the codes in grid
    layout (``[out, in]``; HF ``Conv1D`` transposed back). ``kind``: the
    wrapper class (``QuantLinear``, ``QuantConv1D``, ``QuantConv2d``).
    """

    name: str
    kind: str
    bits: int
    symmetric: bool
    granularity: str
    group_size: Optional[int]
    n_out: int
    n_in: int
    nupes: bool = False
    act_bits: Optional[int] = None

    @property
    def groups_per_row(self) -> int:
        return self.n_in // self.group_size if self.granularity == "group" else 1


@dataclass(frozen=True)
class ExportPlan:
    """What a run will export: the model's family, its quantized layers and the FP layers beside them.

    ``in_block_fp``: Linear-like layers inside the blocks that stay FP
    (GPTQ / AWQ loaders expect every block Linear to be quantized).
    """

    model_class: str
    architecture: str
    is_transformers: bool
    layers: tuple[LayerScheme, ...]
    in_block_fp: tuple[str, ...] = ()


class ExportFormat:
    """One serving format. Subclasses set ``name`` / ``fp16_scales`` and implement the two methods."""

    name: str = ""
    #: The format stores ``s1`` in fp16: a run that exports it rounds ``s1`` to fp16 at hardening.
    fp16_scales: bool = True
    #: One line for ``flexround_export.json``: how to load the directory.
    load: str = ""

    def refusal(self, plan: ExportPlan) -> Optional[str]:
        """Why this format cannot hold ``plan`` (one line with a fix), or ``None`` when it can."""
        raise NotImplementedError

    def write(self, codes: "QuantizedCodes", directory: str, context: "ExportContext") -> dict[str, Any]:
        """Write the format into the empty ``directory``; returns extra facts for ``flexround_export.json``."""
        raise NotImplementedError


@dataclass
class ExportContext:
    """What a format may need beside the codes: the FP model skeleton (config), its adapter, the tokenizer."""

    net: Any
    arch: Any
    tokenizer: Any = None
    source: Any = None
    log: Callable[[str], None] = print


_REGISTRY: dict[str, ExportFormat] = {}


def register(fmt: ExportFormat) -> ExportFormat:
    _REGISTRY[fmt.name] = fmt
    return fmt


def get_format(name: str) -> ExportFormat:
    if name not in _REGISTRY:
        raise ValueError(f"unknown export format {name!r}; known: {', '.join(format_names())}")
    return _REGISTRY[name]


def format_names() -> list[str]:
    return sorted(_REGISTRY)


@dataclass
class ExportSettings:
    """``--export``: which serving formats ``fit`` writes, each into ``DIR/export/<format>/``.

    ``formats``: any of ``fake_quant`` (dequantized FP weights, loads anywhere),
    ``gptq``, ``awq``, ``compressed_tensors``, ``gguf``; ``[]`` (or
    ``--export false``) writes none.
    """

    formats: list[str] = field(default_factory=lambda: ["fake_quant"])

    def __post_init__(self) -> None:
        import flexround_pl.export  # noqa: F401  (every format module registers itself)

        for name in self.formats:
            get_format(name)
        if len(set(self.formats)) != len(self.formats):
            raise ValueError(f"export.formats lists a format twice: {self.formats}")


def requested_formats(export: Any) -> list[ExportFormat]:
    """The formats of ``--export`` (``ExportSettings``, ``True`` = the default, ``False`` / ``None`` = none)."""
    if export is True:
        export = ExportSettings()
    if not export:
        return []
    names = export.formats if isinstance(export, ExportSettings) else getattr(export, "formats", [])
    return [get_format(n) for n in names]


def check_formats(formats: list[ExportFormat], plan: ExportPlan) -> None:
    """``ValueError`` naming the first requested format that cannot hold ``plan`` (preflight)."""
    for fmt in formats:
        reason = fmt.refusal(plan)
        if reason:
            raise ValueError(f"export format {fmt.name!r}: {reason}")


def gptqmodel_refusal(plan: ExportPlan) -> Optional[str]:
    """GPTQ / AWQ checkpoints load through gptqmodel, whose transformers integration rejects HF ``Conv1D``."""
    conv1d = [s.name for s in plan.layers if s.kind == "QuantConv1D"]
    if conv1d:
        return (f"transformers 5.24 + gptqmodel 7.7.0 cannot load GPT-2's Conv1D layers ({conv1d[0]}) from this "
                "format; export gguf or fake_quant")
    return None


def weight_only_refusal(plan: ExportPlan, bits: tuple[int, ...], every_block_linear: bool = False) -> Optional[str]:
    """The checks every uniform-grid, weight-only ``transformers`` format shares; ``None`` when they pass.

    Refuses: a non-``transformers`` model, NUPES codes (a power-function grid,
    not uniform), activation quantization (these formats store weights only),
    mixed schemes across layers, Conv2d layers, bit-widths outside ``bits``
    and (``every_block_linear``) FP Linear layers inside the blocks.
    """
    if not plan.is_transformers:
        return f"holds transformers models only, not {plan.model_class}; export fake_quant instead"
    nupes = [s.name for s in plan.layers if s.nupes]
    if nupes:
        return (f"NUPES codes lie on a power-function grid, not the uniform grid this format stores "
                f"(e.g. {nupes[0]}); use method rtn / flexround / adaround, or export fake_quant")
    act = [s.name for s in plan.layers if s.act_bits is not None]
    if act:
        return (f"stores weights only, but the run quantizes activations (A{plan.layers[0].act_bits}); "
                "unset model.quant.activation.bits, or export fake_quant")
    conv = [s.name for s in plan.layers if s.kind == "QuantConv2d"]
    if conv:
        return f"holds Linear layers only, not Conv2d ({conv[0]}); export fake_quant instead"
    schemes = {(s.bits, s.symmetric, s.granularity, s.group_size) for s in plan.layers}
    if len(schemes) > 1:
        return f"needs one scheme for every layer, the run mixes {len(schemes)}: {sorted(schemes, key=str)[:3]}"
    bad = sorted({s.bits for s in plan.layers if s.bits not in bits})
    if bad:
        return f"stores {'/'.join(map(str, bits))}-bit codes, not {bad[0]}-bit; set model.quant.weight.bits"
    if every_block_linear and plan.in_block_fp:
        return (f"its loaders quantize every Linear inside the blocks, but {plan.in_block_fp[0]} stays FP "
                "(model.quant.keep_fp); quantize it, or export compressed_tensors / fake_quant")
    return None


def packing_refusal(plan: ExportPlan, pack_out: bool = False, pack_in: bool = True) -> Optional[str]:
    """A layer whose codes do not fill whole int32 words along a packed dimension (one line), or ``None``."""
    for s in plan.layers:
        if pack_in and (s.n_in * s.bits) % 32:
            return (f"packs {s.bits}-bit codes along the input into int32 words: {s.name} has {s.n_in} inputs, "
                    f"not a multiple of {32 // math.gcd(32, s.bits)}; export compressed_tensors or fake_quant")
        if pack_out and (s.n_out * s.bits) % 32:
            return (f"packs {s.bits}-bit zero points along the output into int32 words: {s.name} has {s.n_out} "
                    f"outputs, not a multiple of {32 // math.gcd(32, s.bits)}; export compressed_tensors or fake_quant")
    return None


def needs_fp16_scales(formats: list[ExportFormat]) -> bool:
    return any(f.fp16_scales for f in formats)


__all__ = [
    "ExportContext", "ExportFormat", "ExportPlan", "ExportSettings", "LayerScheme", "check_formats",
    "format_names", "get_format", "needs_fp16_scales", "register", "requested_formats",
    "gptqmodel_refusal", "packing_refusal", "weight_only_refusal",
]
