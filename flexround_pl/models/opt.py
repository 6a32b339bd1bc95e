"""OPT causal LMs (``OPTForCausalLM``, facebook/opt-125m ... 66b).

Blocks are ``model.decoder.layers``; the token / learned position embeddings,
the optional ``project_in`` / ``project_out`` linears (OPT-350m), the final
layer norm and ``lm_head`` stay FP. Layers are called as
``layer(hidden_states, attention_mask=causal_mask, position_ids=..., ...)``
with per-sample ``position_ids`` (a cumulative sum of the attention mask).
"""

from flexround_pl.models.adapter import Architecture, register
from flexround_pl.models.gpt2 import disable_kv_cache

OPT = register(
    Architecture(
        name="opt",
        class_names=("OPTForCausalLM",),
        block_path="model.decoder.layers",
        keep_fp=(r"embed_tokens", r"embed_positions", r"project_in", r"project_out",
                 r"^model\.decoder\.final_layer_norm$", r"lm_head"),
        prepare=disable_kv_cache,
    )
)
