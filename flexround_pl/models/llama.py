"""LLaMA-family causal LMs: every ``*ForCausalLM`` with ``model.layers`` and rotary embeddings.

Blocks are ``model.layers``; ``embed_tokens``, the final ``norm`` and
``lm_head`` stay FP. The decoder computes the rotary ``position_embeddings``
(cos, sin; shape ``[1, T, d]``) and the causal mask once and passes the same
keyword arguments to every layer, so the calibration cache captures them at
the first layer and replays them for all.

Models whose layers get *different* masks (``config.layer_types`` mixing full
and sliding-window attention, e.g. Qwen2 with ``use_sliding_window``) would be
replayed with the first layer's mask: ``prepare`` rejects them.
"""

from torch import nn

from flexround_pl.models.adapter import Architecture, register
from flexround_pl.models.gpt2 import disable_kv_cache

#: Same decoder loop as LLaMA in transformers 5 (checked in their modeling files).
LLAMA_LIKE = (
    "LlamaForCausalLM",
    "MistralForCausalLM",
    "Qwen2ForCausalLM",
    "Qwen3ForCausalLM",
    "Phi3ForCausalLM",
    "GemmaForCausalLM",
    "Olmo2ForCausalLM",
    "GraniteForCausalLM",
    "SmolLM3ForCausalLM",
)


def prepare_llama(model: nn.Module) -> nn.Module:
    layer_types = getattr(model.config, "layer_types", None)
    if layer_types and len(set(layer_types)) > 1:
        raise ValueError(
            f"{type(model).__name__} mixes attention types across layers ({sorted(set(layer_types))}); "
            "the calibration cache replays the first layer's mask for every layer, which would be wrong "
            "here. Disable sliding-window attention (e.g. config.use_sliding_window=False) or add an adapter "
            "that captures each layer's mask."
        )
    return disable_kv_cache(model)


LLAMA = register(
    Architecture(
        name="llama",
        class_names=LLAMA_LIKE,
        block_path="model.layers",
        keep_fp=(r"embed_tokens", r"lm_head"),
        prepare=prepare_llama,
    )
)
