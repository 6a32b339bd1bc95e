"""Any Hugging Face decoder or encoder whose layers sit in one ``nn.ModuleList``: the generic adapter.

Used for every model class no specific adapter claims (LLaMA, Mistral, Qwen2/3,
Gemma 1/2/3, Phi-3, OLMo-2, Granite, StableLM, GPT-NeoX, Falcon, RoBERTa,
DistilBERT, DeBERTa-v2, ELECTRA, ... and their ``*ForSequenceClassification``
heads). As in AutoRound and llm-compressor, the blocks are the base model's
layer list, found structurally rather than by class name:

* the blocks are the ``nn.ModuleList`` with ``config.num_hidden_layers``
  entries of one class (``model.layers``, ``model.decoder.layers``,
  ``transformer.h``, ``gpt_neox.layers``, ``distilbert.transformer.layer``,
  ...), the shallowest such list;
* everything outside the blocks stays FP: embeddings, final norm, ``lm_head``,
  pooler and classifier (the FlexRound paper's setting and every anchor tool's);
* ``prepare`` turns the KV cache off and lets a block receive a mask identical
  across the batch once (``[1, ...]``), so the calibration cache stores it once.

What each block is called with (one mask per attention type, one rotary table
per rope type) is captured per block by the calibration cache
(:mod:`flexround_pl.reconstruct.cache`), so layers mixing sliding-window and
full attention need nothing here.

Refused with one line, at load time (and in preflight, from the config alone,
see :func:`check_model_class`): encoder-decoder models, models without such a
layer list, DeBERTa-v2 with its convolution between the first two layers, and
mixture-of-experts layers whose fused 3-D expert tensors models/moe.py cannot
split into ``Linear`` layers (Mixtral's and Qwen2/3-MoE's it can).
"""

from __future__ import annotations

import re
from typing import Any, Optional

import torch
from torch import nn

from flexround_pl.models.adapter import Architecture, _REGISTRY, register_fallback
from flexround_pl.models.gpt2 import disable_kv_cache
from flexround_pl.models.gpt_neo import share_batch_invariant_mask
from flexround_pl.models.moe import EXPERT_NAMES, is_fused_experts, unfuse_experts


def _num_layers(config: Any) -> Optional[int]:
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    for key in ("num_hidden_layers", "n_layer", "num_layers", "n_layers"):
        n = getattr(text, key, None)
        if isinstance(n, int) and n > 0:
            return n
    return None


def find_block_path(model: nn.Module) -> str:
    """Dotted path of the model's layer list; ``ValueError`` naming what is missing."""
    cls = type(model).__name__
    config = getattr(model, "config", None)
    if config is None:
        raise ValueError(f"{cls} is not a Hugging Face model (no .config) and no adapter claims it")
    if getattr(config, "is_encoder_decoder", False):
        raise ValueError(
            f"{cls} is an encoder-decoder model; flexround_pl reconstructs one stack of layers "
            "(decoder-only causal LMs and encoders): use a decoder-only or encoder-only model"
        )
    n = _num_layers(config)
    candidates = [
        name for name, m in model.named_modules()
        if isinstance(m, nn.ModuleList) and len(m) == n and len({type(b) for b in m}) == 1
    ]
    # the shallowest list: layers of the base model, not a list inside a layer
    candidates = [c for c in candidates if not any(c.startswith(o + ".") for o in candidates if o != c)]
    if len(candidates) != 1:
        found = "none" if not candidates else ", ".join(candidates)
        raise ValueError(
            f"{cls}: cannot tell which nn.ModuleList holds its {n} layers (found: {found}); "
            "add an adapter in flexround_pl/models/ (see models/bert.py for a short example)"
        )
    return candidates[0]


def _refuse_unsupported_layers(model: nn.Module, block_path: str) -> None:
    cls = type(model).__name__
    for name, m in model.named_modules():
        if name.endswith("encoder.conv") and m is not None and type(m).__name__ == "ConvLayer":
            raise ValueError(
                f"{cls} applies a convolution ({name}) between its first two layers, which block-wise "
                "reconstruction cannot reproduce; use a checkpoint with conv_kernel_size: 0"
            )
    layers = model.get_submodule(block_path)
    for name, m in layers.named_modules():
        if is_fused_experts(m):
            raise ValueError(
                f"{cls}: the experts of {block_path}.{name} ({type(m).__name__}) are fused 3-D tensors that "
                f"flexround_pl cannot split into Linear layers (it splits {', '.join(sorted(EXPERT_NAMES))}); "
                "add the class to models/moe.py EXPERT_NAMES"
            )


def prepare_generic(model: nn.Module, block_path: str) -> nn.Module:
    """KV cache off; MoE experts as Linear layers (models/moe.py); a batch-invariant mask passed as ``mask[:1]``."""
    unfuse_experts(model)
    for block in model.get_submodule(block_path):
        if not getattr(block, "_flexround_shared_mask", False):
            block.register_forward_pre_hook(share_batch_invariant_mask, with_kwargs=True)
            block._flexround_shared_mask = True
    return disable_kv_cache(model)


def generic_architecture(model: nn.Module) -> Architecture:
    """The generic adapter for ``model``'s class (``ValueError`` with one line if it cannot serve it)."""
    block_path = find_block_path(model)
    _refuse_unsupported_layers(model, block_path)
    name = getattr(model.config, "model_type", None) or type(model).__name__
    return Architecture(
        name=str(name),
        class_names=(type(model).__name__,),
        block_path=block_path,
        keep_fp=(rf"^(?!{re.escape(block_path)}\.)",),  # every layer outside the blocks
        prepare=lambda m: prepare_generic(m, block_path),
    )


register_fallback(generic_architecture)


# ---- preflight: the model class from its config, before any long step ------------------------


def _auto_class(task: str) -> Any:
    import transformers

    return {
        "causal-lm": transformers.AutoModelForCausalLM,
        "sequence-classification": transformers.AutoModelForSequenceClassification,
    }[task]


def config_or_error(path: str, gguf_file: Optional[str] = None, **kwargs: Any) -> Any:
    """``AutoConfig`` of a directory / hub id / GGUF file (its header only), or one line saying what to do."""
    import transformers

    if gguf_file:
        kwargs["gguf_file"] = gguf_file
    try:
        return transformers.AutoConfig.from_pretrained(path, **{"trust_remote_code": False, **kwargs})
    except ValueError as e:
        text = str(e)
        if gguf_file and "is not supported yet" in text:
            from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

            raise ValueError(
                f"transformers {transformers.__version__} cannot read this GGUF file ({text.rstrip('.')}; it reads "
                f"{', '.join(a for a in GGUF_SUPPORTED_ARCHITECTURES if a not in ('general', 'tokenizer'))}); "
                "use the model's original safetensors checkpoint instead (model.source.name_or_path, no gguf_file)"
            ) from None
        if "trust_remote_code" in text or "does not recognize this architecture" in text:
            raise ValueError(
                f"{path!r} needs modeling code that transformers {transformers.__version__} does not ship "
                "(trust_remote_code); flexround_pl runs no remote code: use a transformers version that "
                "implements this architecture, or a checkpoint of a supported one"
            ) from None
        raise


def check_model_class(config: Any, task: str, lazy: bool = False) -> str:
    """The model class ``task`` builds from ``config``, after checking an adapter can serve it.

    The model is built on the ``meta`` device (no memory, no weights read) so
    the same structural checks as at load time run in preflight.
    """
    try:
        with torch.device("meta"):
            model = _auto_class(task).from_config(config)
    except ValueError as e:
        raise ValueError(
            f"model type {getattr(config, 'model_type', '?')!r} has no {task} head in transformers: {e}".split("\n")[0]
        ) from None
    cls = type(model).__name__
    if cls not in _REGISTRY:
        generic_architecture(model)  # ValueError with the reason
    if lazy:
        unfuse_experts(model)  # ValueError: a lazy (meta) model's experts cannot be split
    return cls
