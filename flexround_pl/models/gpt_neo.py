"""GPT-Neo causal LMs (``GPTNeoForCausalLM``, EleutherAI/gpt-neo-125M ... 2.7B), the paper's LM family.

Blocks are ``transformer.h``; ``wte``, ``wpe`` and ``lm_head`` stay FP. The
calibration cache captures each block's own arguments (the "local" layers
apply their sliding window, ``config.window_size``, inside the attention
module). Blocks return a tuple whose first element is the hidden states.

GPT-Neo only has eager attention, whose additive mask is materialized as
``[batch, 1, T, T]`` floats even without padding: cached per sample that is
``N * T * T * 4`` bytes (17 GB for 1024 windows of 2048 tokens). ``prepare``
adds a forward pre-hook to each block that passes a mask identical across the
batch as its first row ``[1, 1, T, T]`` (it broadcasts the same), so the
calibration cache stores it once.
"""

import torch
from torch import nn

from flexround_pl.models.adapter import Architecture, get_submodule, register
from flexround_pl.models.gpt2 import disable_kv_cache

BLOCK_PATH = "transformer.h"


def share_batch_invariant_mask(module: nn.Module, args: tuple, kwargs: dict):
    """Forward pre-hook: an ``attention_mask`` equal for every sample becomes ``mask[:1]``."""
    mask = kwargs.get("attention_mask")
    if isinstance(mask, torch.Tensor) and mask.dim() == 4 and mask.shape[0] > 1 and bool((mask == mask[:1]).all()):
        return args, {**kwargs, "attention_mask": mask[:1]}
    return None


def prepare_gpt_neo(model: nn.Module) -> nn.Module:
    for block in get_submodule(model, BLOCK_PATH):
        if not getattr(block, "_flexround_shared_mask", False):
            block.register_forward_pre_hook(share_batch_invariant_mask, with_kwargs=True)
            block._flexround_shared_mask = True
    return disable_kv_cache(model)


GPT_NEO = register(
    Architecture(
        name="gpt_neo",
        class_names=("GPTNeoForCausalLM",),
        block_path=BLOCK_PATH,
        keep_fp=(r"\bwte\b", r"\bwpe\b", r"lm_head"),
        prepare=prepare_gpt_neo,
    )
)
