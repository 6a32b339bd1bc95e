"""GGUF files for llama.cpp / ollama / LM Studio: Q4_0, Q4_1 and Q8_0 blocks written from the codes.

ggml's block formats (``ggml-common.h``), 32 consecutive weights of a row per block:

* ``Q4_0``: fp16 ``d`` + 16 bytes; byte ``j`` holds weight ``j`` in its low
  nibble and weight ``j + 16`` in its high nibble, ``w = d * (u - 8)``. Our
  symmetric codes of 2-4 bits are ``u - 8`` exactly (``u = c + 8``).
* ``Q4_1``: fp16 ``d``, fp16 ``m`` + the same 16 bytes, ``w = d * u + m``.
  Our asymmetric codes of 2-4 bits: ``u = c``, ``d = s1``, ``m = -s1 * z``.
* ``Q8_0``: fp16 ``d`` + 32 int8, ``w = d * c``: symmetric codes of 5-8 bits.

A block needs one step for its 32 weights, so a group size must be a multiple
of 32 (the step is repeated over the group's blocks) or per-channel (repeated
over the row). Exactness: ``d`` is ``s1`` in fp16, which a run exporting
``gguf`` uses from hardening on, so Q4_0 / Q8_0 weights are the run's bit for
bit. Q4_1's ``m = -s1 * z`` is rounded to fp16 once more (ggml has no other
place for the zero point), so Q4_1 weights differ from the run's by at most
half an fp16 ulp of ``m`` (about ``s1 * z * 2^-11``).

LLaMA-family ``q_proj`` / ``k_proj`` rows are permuted as llama.cpp's
``convert_hf_to_gguf.py`` does (its rotary kernel pairs dims ``2i, 2i+1``);
transformers' GGUF loader undoes it. Tensor names come from ``gguf-py``'s
tensor map; the hyper-parameters from the model's config; the tokenizer is
copied from the source GGUF file when the model came from one (SmolLM2), or
built from a byte-level BPE ``tokenizer.json`` otherwise.
"""

from __future__ import annotations

import os
from typing import Any, Optional

import numpy as np
import torch

from flexround_pl.export.codes import LayerCodes, QuantizedCodes
from flexround_pl.export.formats import ExportContext, ExportFormat, ExportPlan, register, weight_only_refusal

GGUF_FILE = "model.gguf"
BLOCK = 32
#: transformers model class -> llama.cpp architecture
ARCHITECTURES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "llama", "GPT2LMHeadModel": "gpt2"}


def block_type(bits: int, symmetric: bool) -> str:
    if bits <= 4:
        return "Q4_0" if symmetric else "Q4_1"
    return "Q8_0"


def per_block(values: torch.Tensor, layer: LayerCodes) -> torch.Tensor:
    """A per-row-and-group tensor ``[out, groups]`` repeated for every 32-weight block, ``[out, in/32]``."""
    return values.repeat_interleave(layer.group_size // BLOCK, dim=1)


def quantized_blocks(layer: LayerCodes) -> tuple[np.ndarray, str]:
    """The layer's ggml blocks as bytes ``[out, in/32 * block_bytes]`` and the block type's name."""
    s = layer.scheme
    kind = block_type(s.bits, s.symmetric)
    n_out, nb = s.n_out, s.n_in // BLOCK
    step = per_block(layer.scale_fp16(), layer)
    d = step.numpy().view(np.uint8).reshape(n_out, nb, 2)
    if kind == "Q8_0":
        qs = layer.codes.reshape(n_out, nb, BLOCK).numpy().view(np.uint8)
        return np.concatenate([d, qs], axis=2).reshape(n_out, -1), kind
    u = (layer.codes.to(torch.int32) + (8 if s.symmetric else 0)).reshape(n_out, nb, BLOCK).numpy().astype(np.uint8)
    qs = u[:, :, :16] | (u[:, :, 16:] << 4)
    parts = [d]
    if kind == "Q4_1":
        m = (-(step.float() * per_block(layer.zero_point, layer))).to(torch.float16)
        parts.append(m.numpy().view(np.uint8).reshape(n_out, nb, 2))
    parts.append(qs)
    return np.concatenate(parts, axis=2).reshape(n_out, -1), kind


def llama_permute(rows: np.ndarray, n_head: int, n_head_kv: Optional[int] = None) -> np.ndarray:
    """llama.cpp's q/k row order (``convert_hf_to_gguf.py`` ``LlamaModel.permute``), on any per-row data."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    shape = rows.shape
    return rows.reshape(n_head, 2, shape[0] // n_head // 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


class GGUF(ExportFormat):
    name = "gguf"
    fp16_scales = True
    load = "llama-cli -m <dir>/model.gguf; transformers: from_pretrained(<dir>, gguf_file='model.gguf')"

    def refusal(self, plan: ExportPlan) -> Optional[str]:
        reason = weight_only_refusal(plan, tuple(range(2, 9)))
        if reason:
            return reason
        if plan.model_class not in ARCHITECTURES:
            return (f"writes llama.cpp architectures {sorted(set(ARCHITECTURES.values()))} "
                    f"({', '.join(sorted(ARCHITECTURES))}), not {plan.model_class}; export gptq or fake_quant")
        s = plan.layers[0]
        if not s.symmetric and s.bits > 4:
            return (f"asymmetric {s.bits}-bit codes have no exact GGUF block (Q8_0 has no zero point); "
                    "use model.quant.weight.symmetric true or bits <= 4")
        if s.granularity == "group" and s.group_size % BLOCK:
            return (f"GGUF blocks hold 32 weights with one step, so group_size must be a multiple of 32, "
                    f"not {s.group_size}; use 32, 64, 128 or granularity channel")
        odd = [x for x in plan.layers if x.n_in % BLOCK]
        if odd:
            return f"GGUF blocks hold 32 weights of a row: {odd[0].name} has {odd[0].n_in} inputs; export gptq instead"
        return None

    def write(self, codes: QuantizedCodes, directory: str, context: ExportContext) -> dict[str, Any]:
        import gguf

        net, config = context.net, context.net.config
        arch = ARCHITECTURES[type(net).__name__]
        blocks = [n for n, _ in context.arch.blocks(net)]
        name_map = gguf.get_tensor_name_map(_arch_enum(gguf, arch), len(blocks))
        writer = gguf.GGUFWriter(os.path.join(directory, GGUF_FILE), arch)
        _hyper_parameters(writer, arch, config, len(blocks))
        tokenizer_source = _tokenizer(writer, context)
        kind = block_type(codes.schemes()[0].bits, codes.schemes()[0].symmetric)
        writer.add_file_type({"Q4_0": gguf.LlamaFileType.MOSTLY_Q4_0, "Q4_1": gguf.LlamaFileType.MOSTLY_Q4_1,
                              "Q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[kind])
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)

        skip = set(codes.aliases) if getattr(config, "tie_word_embeddings", False) else set()
        order = []  # (gguf name, producer) in file order: infos first, then data one tensor at a time
        for unit in codes.units(blocks):
            for key in unit.plain:
                if key not in skip:
                    order.append((_gguf_name(name_map, key), ("plain", key)))
            for layer in unit.layers:
                order.append((_gguf_name(name_map, f"{layer}.weight"), ("layer", layer)))
                if f"{layer}.bias" in codes.keys:
                    order.append((_gguf_name(name_map, f"{layer}.bias"), ("plain", f"{layer}.bias")))
        qtype = getattr(gguf.GGMLQuantizationType, kind)
        block_bytes = gguf.GGML_QUANT_SIZES[qtype][1]
        for gname, (what, key) in order:
            if what == "layer":
                s = codes.scheme(key)
                writer.add_tensor_info(gname, [s.n_out, s.n_in // BLOCK * block_bytes], np.dtype(np.uint8),
                                       s.n_out * (s.n_in // BLOCK) * block_bytes, raw_dtype=qtype)
            else:
                t = codes.tensor(key)
                writer.add_tensor_info(gname, list(t.shape), np.dtype(np.float32), t.numel() * 4)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for gname, (what, key) in order:
            if what == "layer":
                data, _ = quantized_blocks(codes.layer(key))
                data = self._permute(gname, data, config, arch)
            else:
                data = codes.tensor(key).float().numpy()
            writer.write_tensor_data(np.ascontiguousarray(data))
        writer.close()
        return {"format": "gguf", "block_type": kind, "file": GGUF_FILE, "tokenizer": tokenizer_source,
                "load": self.load}

    @staticmethod
    def _permute(gname: str, data: np.ndarray, config: Any, arch: str) -> np.ndarray:
        if arch != "llama":
            return data
        heads = config.num_attention_heads
        if gname.endswith("attn_q.weight"):
            return llama_permute(data, heads, heads)
        if gname.endswith("attn_k.weight"):
            return llama_permute(data, heads, getattr(config, "num_key_value_heads", heads))
        return data


def _arch_enum(gguf: Any, arch: str) -> Any:
    return next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch)


def _gguf_name(name_map: Any, key: str) -> str:
    name = name_map.get_name(key, try_suffixes=(".weight", ".bias"))
    if name is None:
        raise ValueError(f"gguf: no llama.cpp tensor name for {key!r}")
    return name


def _hyper_parameters(writer: Any, arch: str, config: Any, n_blocks: int) -> None:
    writer.add_name(getattr(config, "_name_or_path", "") or "flexround_pl export")
    writer.add_block_count(n_blocks)
    writer.add_vocab_size(config.vocab_size)
    if arch == "gpt2":
        writer.add_context_length(config.n_positions)
        writer.add_embedding_length(config.n_embd)
        writer.add_feed_forward_length(config.n_inner or 4 * config.n_embd)
        writer.add_head_count(config.n_head)
        writer.add_layer_norm_eps(config.layer_norm_epsilon)
        return
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    rope = getattr(config, "rope_parameters", None) or {}
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(getattr(config, "num_key_value_heads", heads))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))))
    writer.add_rope_dimension_count(head_dim)


def _tokenizer(writer: Any, context: ExportContext) -> str:
    """Tokenizer metadata: copied from the source GGUF, or built from a byte-level BPE; what was done."""
    path = source_gguf_path(context.source)
    if path is not None:
        import gguf

        reader = gguf.GGUFReader(path)
        for name, field in reader.fields.items():
            if not name.startswith("tokenizer."):
                continue
            vtype = gguf.GGUFValueType(field.types[0])
            sub = gguf.GGUFValueType(field.types[1]) if vtype == gguf.GGUFValueType.ARRAY else None
            writer.add_key_value(name, field.contents(), vtype, sub_type=sub)
        return f"copied from {os.path.basename(path)}"
    return _bpe_tokenizer(writer, context.tokenizer)


def _bpe_tokenizer(writer: Any, tokenizer: Any) -> str:
    import json

    import gguf

    backend = getattr(tokenizer, "backend_tokenizer", None) or getattr(tokenizer, "_tokenizer", None)
    if backend is None:
        return "none (not a fast tokenizer): llama.cpp needs tokenizer metadata; transformers loads the weights"
    model = json.loads(backend.to_str()).get("model", {})
    if model.get("type") != "BPE":
        return f"none ({model.get('type')} tokenizer): llama.cpp needs tokenizer metadata; transformers loads the weights"
    vocab = model["vocab"]
    tokens = [""] * (max(vocab.values()) + 1)
    for tok, i in vocab.items():
        tokens[i] = tok
    special = {t.content: t for t in getattr(tokenizer, "added_tokens_decoder", {}).values()}
    for i, tok in getattr(tokenizer, "added_tokens_decoder", {}).items():
        if i >= len(tokens):
            tokens.extend([""] * (i + 1 - len(tokens)))
        tokens[i] = tok.content
    types = [gguf.TokenType.CONTROL if t in special else gguf.TokenType.NORMAL for t in tokens]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    for attr, add in (("bos_token_id", writer.add_bos_token_id), ("eos_token_id", writer.add_eos_token_id),
                      ("pad_token_id", writer.add_pad_token_id), ("unk_token_id", writer.add_unk_token_id)):
        value = getattr(tokenizer, attr, None)
        if value is not None:
            add(int(value))
    return "byte-level BPE from tokenizer.json"


def source_gguf_path(source: Any) -> Optional[str]:
    """The GGUF file a model source was read from (SmolLM2's), or ``None``."""
    from flexround_pl.models.gguf import SmolLM2, smollm2_dir

    if isinstance(source, SmolLM2):
        directory, name = smollm2_dir()
        return os.path.join(directory, name)
    path, name = getattr(source, "name_or_path", None), getattr(source, "gguf_file", None)
    if path and name:
        full = name if os.path.isabs(name) else os.path.join(os.path.expanduser(path), name)
        return full if os.path.isfile(full) else None
    return None


register(GGUF())

__all__ = ["ARCHITECTURES", "GGUF", "GGUF_FILE", "block_type", "llama_permute", "quantized_blocks", "source_gguf_path"]
