"""GPT-2 causal LMs (``GPT2LMHeadModel``).

Blocks are ``transformer.h``; the token / position embeddings (``wte``,
``wpe``) and ``lm_head`` (tied to ``wte``) stay FP. The attention and MLP
projections are Hugging Face ``Conv1D`` layers (weight ``[in, out]``), which
the quantization core wraps as ``QuantConv1D``.

In transformers 5 ``GPT2Model`` calls each block as
``block(hidden_states, past_key_values, causal_mask, encoder_hidden_states,
encoder_attention_mask=..., use_cache=..., position_ids=...)``: the capture
replays those positional extras as they were. ``prepare`` turns the KV cache
off so no ``Cache`` object (which every call would append to) is captured.
"""

from torch import nn

from flexround_pl.models.adapter import Architecture, register


def disable_kv_cache(model: nn.Module) -> nn.Module:
    """``config.use_cache = False``: block calls get ``past_key_values=None``, never a growing ``Cache``."""
    model.config.use_cache = False
    generation = getattr(model, "generation_config", None)
    if generation is not None:
        generation.use_cache = False
    return model


GPT2 = register(
    Architecture(
        name="gpt2",
        class_names=("GPT2LMHeadModel",),
        block_path="transformer.h",
        keep_fp=(r"\bwte\b", r"\bwpe\b", r"lm_head"),
        prepare=disable_kv_cache,
    )
)
