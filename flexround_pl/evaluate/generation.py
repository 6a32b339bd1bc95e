"""Generation metrics: decode with the model, score the text against references (BLEU, TER).

The FlexRound paper (Lee et al., ICML 2023, arXiv 2306.00317) also quantizes
GPT-2 for natural-language generation and reports BLEU on WebNLG. Unlike the other task metrics this one needs the
model, not one forward's logits: :meth:`GenerationMetrics.update_generation`
generates a continuation of each prompt (greedy, or beam search with
``num_beams > 1``) and feeds the decoded text to torchmetrics'
``SacreBLEUScore`` (SacreBLEU's corpus BLEU, Post, WMT 2018, ``13a``
tokenization, any number of references per example, no smoothing, as
Moses' ``multi-bleu.perl``; equal to
``sacrebleu.corpus_bleu(..., smooth_method="none")``; SacreBLEU's default
``exp`` smoothing differs only when some n-gram order has no match at all) and
``TranslationEditRate``. ``bleu`` is reported on SacreBLEU's 0–100 scale,
``ter`` as a percentage too.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torchmetrics.text import SacreBLEUScore, TranslationEditRate

from flexround_pl.evaluate.metrics import TaskMetrics


def is_causal_lm(net: nn.Module) -> bool:
    """A ``transformers`` causal LM (it can ``generate``; ``HFLM`` scores it): a class of the auto causal-LM mapping."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return type(net).__name__ in set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())


@dataclass(frozen=True)
class GenerationSettings:
    """How continuations are decoded (``transformers`` ``generate`` arguments, sampling off)."""

    max_new_tokens: int = 64
    num_beams: int = 1
    no_repeat_ngram_size: int = 0
    length_penalty: float = 1.0

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.num_beams < 1:
            raise ValueError(f"num_beams must be >= 1 (1 = greedy), got {self.num_beams}")
        if self.no_repeat_ngram_size < 0:
            raise ValueError(f"no_repeat_ngram_size must be >= 0 (0 = off), got {self.no_repeat_ngram_size}")


class GenerationMetrics(TaskMetrics):
    """Corpus BLEU (and TER) of generated continuations against each example's references.

    Batches carry left-padded prompts (``input_ids``, ``attention_mask``) and
    ``references`` (a list of reference lists, one per example).
    ``predictions`` keeps the decoded texts of the last pass, in order.
    """

    generates = True

    def __init__(self, tokenizer: Any, settings: GenerationSettings = GenerationSettings()) -> None:
        super().__init__()
        self.tokenizer, self.settings = tokenizer, settings
        self.metrics["bleu"] = SacreBLEUScore(tokenize="13a")
        self.metrics["ter"] = TranslationEditRate()
        self.predictions: list[str] = []

    def update(self, logits: Tensor, batch: dict) -> None:
        raise TypeError("GenerationMetrics scores generated text: call update_generation(model, batch)")

    @torch.no_grad()
    def update_generation(self, model: nn.Module, batch: dict) -> None:
        texts = self.generate(model, batch["input_ids"], batch["attention_mask"])
        self.predictions.extend(texts)
        references = [list(r) for r in batch["references"]]
        for metric in self.metrics.values():
            metric.update(texts, references)

    def generate(self, model: nn.Module, input_ids: Tensor, attention_mask: Tensor) -> list[str]:
        """Decoded continuations of left-padded prompts (special tokens dropped, whitespace stripped)."""
        tok, s = self.tokenizer, self.settings
        eos = tok.eos_token_id
        pad = tok.pad_token_id if tok.pad_token_id is not None else eos
        out = model.generate(
            input_ids=input_ids, attention_mask=attention_mask, do_sample=False, num_beams=s.num_beams,
            max_new_tokens=s.max_new_tokens, no_repeat_ngram_size=s.no_repeat_ngram_size or None,
            length_penalty=s.length_penalty, eos_token_id=eos, pad_token_id=pad, use_cache=True,
        )
        new = out[:, input_ids.shape[1]:]
        return [t.strip() for t in tok.batch_decode(new, skip_special_tokens=True)]

    @torch.no_grad()
    def compute(self) -> dict[str, float]:
        return {name: 100.0 * float(m.compute()) for name, m in self.metrics.items()}

    def reset(self) -> None:
        super().reset()
        self.predictions = []

