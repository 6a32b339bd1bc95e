"""Text classification data (single sentences or pairs) for PTQ of encoders.

Three sources share one pipeline:

* ``wiki_topics`` (default, offline): Wikipedia summaries labelled with 11
  topics, split by :func:`flexround_pl.data.offline.wiki_split`;
* ``glue``: a GLUE task through ``datasets`` (needs the Hugging Face hub);
  calibration = seeded sample of the train split, eval = the official
  validation split (the test splits are unlabelled);
* ``files``: local CSV / TSV / JSONL with a ``text`` (or ``sentence``) column or
  a ``sentence1`` + ``sentence2`` pair, and a ``label`` column.

Examples stay raw text until a batch is collated: tokenizing per batch keeps
``setup`` instant and lets calibration pad to ``max_length`` (fixed shape, so
block inputs can be cached per sample) while eval pads per batch.
"""

from __future__ import annotations

import csv
import json
import os
from typing import Any, Literal, NamedTuple, Optional, Sequence

import torch
from torch.utils.data import DataLoader

from flexround_pl.data.base import PTQDataModule
from flexround_pl.data.offline import (
    WIKI_CALIBRATION_SIZE,
    load_wiki_summaries,
    wiki_split,
    wiki_topics,
)
from flexround_pl.evaluate.metrics import GLUE_TASKS, ClassificationMetrics

Source = Literal["wiki_topics", "glue", "files"]
SOURCES = ("wiki_topics", "glue", "files")
FILE_SUFFIXES = (".csv", ".tsv", ".jsonl", ".json")


class Example(NamedTuple):
    text: str
    text_pair: Optional[str]
    label: Any  # int class id, float (regression), or -1 when unlabelled


class _Collate:
    """Tokenizes a list of examples into a batch dict (a class so workers can pickle it)."""

    def __init__(self, tokenizer: Any, max_length: int, fixed: bool, regression: bool) -> None:
        self.tokenizer, self.max_length, self.fixed, self.regression = tokenizer, max_length, fixed, regression

    def __call__(self, examples: Sequence[Example]) -> dict[str, torch.Tensor]:
        texts = [e.text for e in examples]
        pairs = [e.text_pair for e in examples] if examples[0].text_pair is not None else None
        enc = self.tokenizer(
            texts,
            pairs,
            padding="max_length" if self.fixed else "longest",
            truncation=True,
            max_length=self.max_length,
            return_tensors="pt",
        )
        batch = {k: v for k, v in enc.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
        dtype = torch.float32 if self.regression else torch.long
        batch["labels"] = torch.tensor([e.label for e in examples], dtype=dtype)
        return batch


class TextClassificationData(PTQDataModule):
    """Calibration / train / eval splits of a text classification task.

    Args:
        source: ``wiki_topics`` (offline Wikipedia topics), ``glue`` or ``files``.
        glue_task: GLUE task name (``sst2``, ``mnli`` ...) when ``source="glue"``.
        train_file, calibration_file, eval_file: local CSV / TSV / JSONL files
            when ``source="files"``. ``eval_file`` is required, and calibration
            comes from ``calibration_file`` or else a seeded sample of ``train_file``.
            String labels are mapped to ids by sorted name over all files.
        num_calibration: calibration examples (the wiki split holds 1024).
        num_eval: optional cap on evaluation examples (first ones, fixed order).
        num_train: optional cap on training examples (first ones of the split).
        max_length: token budget; calibration batches are padded to exactly this.
        batch_size: calibration and train batch size.
        eval_batch_size: eval batch size (padded to the longest in the batch).
        seed: seeds the train shuffle and the GLUE / file calibration sample.
        split_seed: seed of the wiki split; keep 0 to stay disjoint from the
            articles the demo classifier was fine-tuned on.
        metric_names: override the task's metrics (e.g. ``[accuracy, f1]``).
        num_workers: ``DataLoader`` workers.
    """

    task = "text-classification"

    def __init__(
        self,
        source: Source = "wiki_topics",
        glue_task: Optional[str] = None,
        train_file: Optional[str] = None,
        calibration_file: Optional[str] = None,
        eval_file: Optional[str] = None,
        num_calibration: int = 256,
        num_eval: Optional[int] = None,
        num_train: Optional[int] = None,
        max_length: int = 128,
        batch_size: int = 32,
        eval_batch_size: int = 64,
        seed: int = 0,
        split_seed: int = 0,
        metric_names: Optional[list[str]] = None,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        self.source = source
        self.glue_task = glue_task.lower() if glue_task else None
        self.files = {"train": train_file, "calibration": calibration_file, "eval": eval_file}
        self.num_calibration, self.num_eval, self.num_train = num_calibration, num_eval, num_train
        self.max_length, self.batch_size, self.eval_batch_size = max_length, batch_size, eval_batch_size
        self.seed, self.split_seed, self.num_workers = seed, split_seed, num_workers
        self.metric_names = list(metric_names) if metric_names else None
        self._validate()
        self._splits: Optional[dict[str, list[Example]]] = None
        self._label_names: Optional[list[str]] = None
        self._num_labels: Optional[int] = GLUE_TASKS[self.glue_task].num_labels if self.glue_task else None

    # ------------------------------------------------------------------ validation

    def _validate(self) -> None:
        """Fail on bad arguments before anything is loaded."""
        if self.source not in SOURCES:
            raise ValueError(f"unknown source {self.source!r}; use one of {list(SOURCES)}")
        for name in ("num_calibration", "max_length", "batch_size", "eval_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("num_eval", "num_train"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1 or None (no cap), got {getattr(self, name)}")
        if self.source != "glue" and self.glue_task:
            raise ValueError(f"glue_task is only used with source='glue' (source is {self.source!r})")
        if self.source == "glue":
            if not self.glue_task:
                raise ValueError(f"source='glue' needs glue_task, one of {sorted(GLUE_TASKS)}")
            if self.glue_task not in GLUE_TASKS:
                raise ValueError(f"unknown GLUE task {self.glue_task!r}; use one of {sorted(GLUE_TASKS)}")
        given = {k: v for k, v in self.files.items() if v}
        if self.source != "files" and given:
            raise ValueError(f"{', '.join(k + '_file' for k in given)} only used with source='files'")
        if self.source == "files":
            for split, path in given.items():
                if not os.path.isfile(os.path.expanduser(path)):
                    raise ValueError(f"{split}_file {path!r} does not exist; check the path")
                if not path.lower().endswith(FILE_SUFFIXES):
                    raise ValueError(f"{split}_file {path!r}: unsupported format; use one of {list(FILE_SUFFIXES)}")
            if not self.files["eval"]:
                raise ValueError("source='files' needs eval_file (a labelled CSV / TSV / JSONL)")
            if not (self.files["calibration"] or self.files["train"]):
                raise ValueError("source='files' needs calibration_file or train_file to draw calibration from")
        if self.source == "wiki_topics" and self.num_calibration > WIKI_CALIBRATION_SIZE:
            raise ValueError(
                f"num_calibration={self.num_calibration} but the wiki calibration split holds "
                f"{WIKI_CALIBRATION_SIZE} articles; lower num_calibration"
            )

    # ------------------------------------------------------------------ loading

    def _load(self) -> dict[str, list[Example]]:
        """Raw examples per split (no tokenizer needed); loaded once."""
        if self._splits is None:
            loader = {"wiki_topics": self._load_wiki, "glue": self._load_glue, "files": self._load_files}
            splits = loader[self.source]()
            if self.num_eval is not None:
                splits["eval"] = splits["eval"][: self.num_eval]
            if self.num_train is not None:
                splits["train"] = splits["train"][: self.num_train]
            self._splits = splits
        return self._splits

    def _load_wiki(self) -> dict[str, list[Example]]:
        articles = load_wiki_summaries()
        self._label_names = wiki_topics(articles)
        self._num_labels = len(self._label_names)
        ids = {name: i for i, name in enumerate(self._label_names)}
        split = wiki_split(articles, seed=self.split_seed)
        split["calibration"] = split["calibration"][: self.num_calibration]
        return {k: [Example(a["text"], None, ids[a["topic"]]) for a in v] for k, v in split.items()}

    def _load_glue(self) -> dict[str, list[Example]]:
        import datasets

        task = GLUE_TASKS[self.glue_task]
        try:
            ds = datasets.load_dataset("glue", task.name)
        except Exception as e:  # network / hub errors come in many types
            msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
            raise ValueError(
                f"could not load GLUE task {task.name!r} (offline? needs the Hugging Face hub): "
                f"{type(e).__name__}: {msg}"
            ) from None
        feature = ds["train"].features["label"]
        self._label_names = list(getattr(feature, "names", None) or []) or None

        def examples(rows: Any) -> list[Example]:
            # column-wise: far faster than row dicts on QQP / MNLI
            first = list(rows[task.text_keys[0]])
            second = list(rows[task.text_keys[1]]) if len(task.text_keys) > 1 else [None] * len(first)
            labels = list(rows["label"])
            return [
                Example(a, b, y) for a, b, y in zip(first, second, labels) if task.num_labels == 1 or y >= 0
            ]

        train = ds["train"]
        order = torch.randperm(len(train), generator=torch.Generator().manual_seed(self.seed)).tolist()
        cal_idx = order[: self.num_calibration]
        rest = sorted(order[self.num_calibration :])  # train = the rest, disjoint from calibration
        return {
            "calibration": examples(train.select(cal_idx)),
            "train": examples(train.select(rest)),
            "eval": examples(ds[task.eval_split]),
        }

    def _load_files(self) -> dict[str, list[Example]]:
        rows = {k: _read_rows(v) if v else [] for k, v in self.files.items()}
        if not rows["calibration"]:  # seeded sample of train, removed from train
            order = torch.randperm(len(rows["train"]), generator=torch.Generator().manual_seed(self.seed)).tolist()
            rows["calibration"] = [rows["train"][i] for i in order[: self.num_calibration]]
            rows["train"] = [rows["train"][i] for i in sorted(order[self.num_calibration :])]
        else:
            rows["calibration"] = rows["calibration"][: self.num_calibration]
        if not any("label" in r for r in rows["eval"]):
            raise ValueError(f"eval_file {self.files['eval']!r} has no 'label' column; evaluation needs labels")
        to_label = self._label_mapping([r.get("label") for split in rows.values() for r in split])
        out = {}
        for split, split_rows in rows.items():
            where = self.files[split] or self.files["train"]
            out[split] = [Example(*_texts(r, where), to_label(r.get("label"))) for r in split_rows]
        return out

    def _label_mapping(self, labels: list[Any]) -> Any:
        """Integer labels stay ids, fractional numbers mean regression, strings map by sorted name."""
        present = [str(x).strip() for x in labels if x is not None and str(x).strip() != ""]
        if not present:
            raise ValueError("no labels found in the files; add a 'label' column")

        def number(s: str) -> Optional[float]:
            try:
                return float(s)
            except ValueError:
                return None

        values = [number(s) for s in present]
        if all(v is not None for v in values):
            if all(float(v).is_integer() and v >= 0 for v in values):
                self._num_labels = int(max(values)) + 1
                self._label_names = [str(i) for i in range(self._num_labels)]
                return lambda x: int(float(x)) if _has(x) else -1
            self._num_labels, self._label_names = 1, None  # regression (STS-B style)
            return lambda x: float(x) if _has(x) else float("nan")
        self._label_names = sorted(set(present))
        self._num_labels = len(self._label_names)
        ids = {name: i for i, name in enumerate(self._label_names)}
        return lambda x: ids[str(x).strip()] if _has(x) else -1

    # ------------------------------------------------------------------ properties

    @property
    def num_labels(self) -> int:
        if self._num_labels is None:
            self._load()
        return self._num_labels

    @property
    def label_names(self) -> Optional[list[str]]:
        """Class names, index = label id (``None`` for regression)."""
        if self._label_names is None and self._num_labels != 1:
            self._load()
        return self._label_names

    def metrics(self) -> ClassificationMetrics:
        if self.metric_names:
            names = self.metric_names
        elif self.source == "glue":
            names = GLUE_TASKS[self.glue_task].metrics
        else:
            names = ("pearson", "spearman") if self.num_labels == 1 else ("accuracy",)
        return ClassificationMetrics(self.num_labels, names)

    # ------------------------------------------------------------------ Lightning hooks

    def setup(self, stage: Optional[str] = None) -> None:
        if self.tokenizer is None:
            raise ValueError("no tokenizer: call set_tokenizer(model_source.load_tokenizer()) before setup()")
        if getattr(self.tokenizer, "pad_token", "") is None:
            eos = getattr(self.tokenizer, "eos_token", None)
            if eos is None:
                raise ValueError("the tokenizer has neither a pad nor an eos token; set tokenizer.pad_token")
            self.tokenizer.pad_token = eos  # decoder-only tokenizers (LLaMA) ship without one
        self._load()

    def _loader(self, split: str, batch_size: int, fixed: bool, shuffle: bool = False) -> DataLoader:
        self.setup()
        data = self._splits[split]
        if not data:
            raise ValueError(f"the {split} split is empty; for source='files' pass {split}_file")
        return DataLoader(
            data,
            batch_size=batch_size,
            shuffle=shuffle,
            generator=torch.Generator().manual_seed(self.seed) if shuffle else None,
            collate_fn=_Collate(self.tokenizer, self.max_length, fixed, self.num_labels == 1),
            num_workers=self.num_workers,
        )

    def calibration_dataloader(self) -> DataLoader:
        """Fixed order and shape: every batch is padded to ``max_length``."""
        return self._loader("calibration", self.batch_size, fixed=True)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", self.batch_size, fixed=False, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("eval", self.eval_batch_size, fixed=False)

    def test_dataloader(self) -> DataLoader:
        return self.val_dataloader()


# ---------------------------------------------------------------------- file reading


def _has(x: Any) -> bool:
    return x is not None and str(x).strip() != ""


def _read_rows(path: str) -> list[dict[str, Any]]:
    """Rows of a CSV / TSV (header line) or JSONL / JSON-list file as dicts."""
    path = os.path.expanduser(path)
    lower = path.lower()
    with open(path, encoding="utf-8", newline="") as f:
        if lower.endswith((".csv", ".tsv")):
            # GLUE TSVs contain unbalanced quotes: no quoting for TSV.
            tsv = lower.endswith(".tsv")
            quoting = csv.QUOTE_NONE if tsv else csv.QUOTE_MINIMAL
            reader = csv.DictReader(f, delimiter="\t" if tsv else ",", quoting=quoting)
            return [dict(r) for r in reader]
        text = f.read()
    if text.lstrip().startswith("["):
        return list(json.loads(text))
    try:
        return [json.loads(line) for line in text.splitlines() if line.strip()]
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not JSON lines ({e}); write one JSON object per line") from None


def _texts(row: dict[str, Any], where: str) -> tuple[str, Optional[str]]:
    if row.get("sentence1") is not None and row.get("sentence2") is not None:
        return str(row["sentence1"]), str(row["sentence2"])
    for key in ("text", "sentence"):
        if row.get(key) is not None:
            return str(row[key]), None
    raise ValueError(f"{where}: a row has no 'text' (or 'sentence', or 'sentence1'+'sentence2') column: {sorted(row)}")
