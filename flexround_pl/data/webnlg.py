"""Data-to-text (WebNLG) for PTQ of a causal LM: calibration on training pairs, BLEU on generations.

The FlexRound paper (Lee et al., ICML 2023, arXiv 2306.00317) also quantizes
GPT-2 for natural-language generation and scores WebNLG with BLEU.
A WebNLG entry is a set of DBpedia triples ``subject | property | object`` and
one or more human verbalisations (references). Here:

* the prompt is the linearised triple set, ``"s : p : o | s : p : o ="``
  (subjects / objects with ``_`` read as spaces), and the model continues it;
* calibration: ``num_calibration`` seeded (triples, text) pairs of the
  *training* entries, each ``prompt + " " + text + EOS``, right-padded to
  ``max_length`` (fixed shape for the block cache);
* evaluation: each eval entry's prompt, left-padded, generated greedily (or with
  ``num_beams``), scored by corpus BLEU / TER against all of its references
  (:class:`~flexround_pl.evaluate.generation.GenerationMetrics`).

Sources (``source``):

* ``hub``: ``datasets.load_dataset(hub_name, hub_config)``, default the WebNLG
  challenge 2017 (``webnlg-challenge/web_nlg``, ``webnlg_challenge_2017``),
  splits ``train`` and ``test``. It needs the Hugging Face hub; that repository
  is a loading script, which ``datasets >= 4`` no longer runs: then set
  ``hub_revision: refs/convert/parquet`` or use local files. Not verified here
  (no hub access).
* ``files``: ``train_file`` / ``eval_file``, each a WebNLG XML file
  (``<entry><modifiedtripleset><mtriple>s | p | o</mtriple>...<lex>text</lex>``),
  a WebNLG JSON file (``{"entries": [{"1": {"modifiedtripleset": [{"subject",
  "property", "object"}], "lexicalisations": [{"lex": ...}]}}]}``), JSON Lines
  of the hub's rows (``modified_triple_sets``, ``lex``), or a directory of
  such files (read recursively in sorted order, as the corpus ships per size
  and category).
"""

from __future__ import annotations

import json
import os
import random
import xml.etree.ElementTree as ET
from typing import Any, Iterable, Literal, NamedTuple, Optional, Sequence

import torch
from torch.utils.data import DataLoader

from flexround_pl.data.base import PTQDataModule
from flexround_pl.data.language_modeling import _even_batches
from flexround_pl.evaluate.generation import GenerationMetrics, GenerationSettings, is_causal_lm

Source = Literal["hub", "files"]
SUFFIXES = (".xml", ".json", ".jsonl")


class Entry(NamedTuple):
    """One WebNLG entry: its triples and its reference texts."""

    triples: tuple[tuple[str, str, str], ...]
    texts: tuple[str, ...]


def _triple(text: str, where: str) -> tuple[str, str, str]:
    parts = [p.strip() for p in text.split("|")]
    if len(parts) != 3:
        raise ValueError(f"{where}: triple {text.strip()!r} is not 'subject | property | object'")
    return parts[0], parts[1], parts[2]


def _entry(triples: Iterable[tuple[str, str, str]], texts: Iterable[str]) -> Optional[Entry]:
    triples, texts = tuple(triples), tuple(t.strip() for t in texts if t and t.strip())
    return Entry(triples, texts) if triples and texts else None


def _english(lang: Optional[str]) -> bool:
    return lang in (None, "", "en")


def _read_xml(path: str) -> list[Entry]:
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as e:
        raise ValueError(f"{path} is not valid XML ({e}); expected the WebNLG XML layout") from None
    out = []
    for node in root.iter("entry"):
        mtriples = node.find("modifiedtripleset")
        triples = [_triple(t.text or "", path) for t in (mtriples if mtriples is not None else [])]
        texts = [
            (lex.text or "").strip() or (lex.findtext("text") or "")  # 2017: plain text; enriched: <text>
            for lex in node.findall("lex") if _english(lex.get("lang"))
        ]
        out.append(_entry(triples, texts))
    return [e for e in out if e is not None]


def _from_webnlg_json(record: dict[str, Any], path: str) -> Optional[Entry]:
    triples = [(t["subject"], t["property"], t["object"]) for t in record.get("modifiedtripleset", [])]
    texts = [x.get("lex", "") for x in record.get("lexicalisations", []) if _english(x.get("lang"))]
    return _entry(triples, texts)


def from_hub_row(row: dict[str, Any], where: str = "hub row") -> Optional[Entry]:
    """An entry from a row of the hub dataset ``web_nlg`` (first modified triple set, English texts)."""
    sets = (row.get("modified_triple_sets") or {}).get("mtriple_set") or [[]]
    lex = row.get("lex") or {}
    langs = lex.get("lang") or [None] * len(lex.get("text", []))
    texts = [t for t, lang in zip(lex.get("text", []), langs) if _english(lang)]
    return _entry((_triple(t, where) for t in sets[0]), texts)


def _read_json(path: str) -> list[Entry]:
    with open(path, encoding="utf-8") as f:
        try:
            if path.endswith(".jsonl"):
                rows = [json.loads(line) for line in f if line.strip()]
                return [e for e in (from_hub_row(r, path) for r in rows) if e is not None]
            data = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON ({e})") from None
    if not isinstance(data, dict) or not isinstance(data.get("entries"), list):
        raise ValueError(f'{path}: expected the WebNLG JSON layout {{"entries": [{{"1": {{...}}}}, ...]}}')
    records = [r for item in data["entries"] for r in (item.values() if isinstance(item, dict) else [])]
    return [e for e in (_from_webnlg_json(r, path) for r in records) if e is not None]


def read_webnlg(path: str) -> list[Entry]:
    """Entries with at least one triple and one English text from a WebNLG file or directory."""
    path = os.path.expanduser(path)
    if os.path.isdir(path):
        files = sorted(
            os.path.join(d, f) for d, _, names in os.walk(path) for f in names if f.endswith(SUFFIXES)
        )
        if not files:
            raise ValueError(f"{path} holds no WebNLG file ({', '.join(SUFFIXES)})")
        return [e for f in files for e in read_webnlg(f)]
    if not path.endswith(SUFFIXES):
        raise ValueError(f"{path}: unknown WebNLG file type; use {', '.join(SUFFIXES)} or a directory of them")
    entries = _read_xml(path) if path.endswith(".xml") else _read_json(path)
    if not entries:
        raise ValueError(f"{path} has no entry with both triples and texts; is it in the WebNLG layout?")
    return entries


def linearize(triples: Sequence[tuple[str, str, str]]) -> str:
    """``"s : p : o | s : p : o"`` with DBpedia underscores read as spaces and quotes dropped."""
    def clean(x: str) -> str:
        return x.replace("_", " ").strip().strip('"').strip()

    return " | ".join(f"{clean(s)} : {p.strip()} : {clean(o)}" for s, p, o in triples)


class _Collate:
    """Calibration: right-padded ``prompt text EOS`` to ``max_length``; eval: left-padded prompts + references."""

    def __init__(self, tokenizer: Any, max_length: int, calibration: bool) -> None:
        self.tokenizer, self.max_length, self.calibration = tokenizer, max_length, calibration
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def _ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def __call__(self, items: Sequence[tuple[str, Any]]) -> dict[str, Any]:
        if self.calibration:
            rows = [(self._ids(f"{p} {t}") + [self.tokenizer.eos_token_id])[: self.max_length] for p, t in items]
            width, left = self.max_length, False
        else:
            rows = [self._ids(p)[-self.max_length:] for p, _ in items]  # keep the prompt's end
            width, left = max(len(r) for r in rows), True
        ids = torch.full((len(rows), width), self.pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            span = slice(width - len(row), width) if left else slice(0, len(row))
            ids[i, span], mask[i, span] = torch.tensor(row, dtype=torch.long), 1
        batch: dict[str, Any] = {"input_ids": ids, "attention_mask": mask}
        if not self.calibration:
            batch["references"] = [list(refs) for _, refs in items]
        return batch


class DataToTextData(PTQDataModule):
    """WebNLG-style data-to-text: calibration pairs from the training entries, BLEU on the eval entries.

    Args:
        source: ``hub`` (``datasets``) or ``files`` (local WebNLG XML / JSON).
        train_file: training entries (``source="files"``): calibration pairs.
        eval_file: evaluation entries with their references (``source="files"``).
        hub_name, hub_config, hub_revision: the hub dataset (``source="hub"``).
        train_split, eval_split: hub split names (``dev`` for quick runs).
        max_length: calibration tokens per pair (padded / truncated) and the
            longest prompt kept at evaluation.
        num_calibration: (triples, text) pairs drawn for calibration.
        num_eval: keep only the first eval entries (``None``: all).
        max_new_tokens, num_beams, no_repeat_ngram_size, length_penalty:
            decoding (``num_beams=1``: greedy; LoRA's GPT-2 scripts, Hu et al.
            2021, decode with beam 10 and ``no_repeat_ngram_size=4``).
        batch_size: calibration batch size; eval_batch_size: prompts per generate call.
        seed: seeds the calibration draw.
    """

    task = "data-to-text"

    def __init__(
        self,
        source: Source = "hub",
        train_file: Optional[str] = None,
        eval_file: Optional[str] = None,
        hub_name: str = "webnlg-challenge/web_nlg",
        hub_config: Optional[str] = "webnlg_challenge_2017",
        hub_revision: Optional[str] = None,
        train_split: str = "train",
        eval_split: str = "test",
        max_length: int = 128,
        num_calibration: int = 128,
        num_eval: Optional[int] = None,
        max_new_tokens: int = 64,
        num_beams: int = 1,
        no_repeat_ngram_size: int = 0,
        length_penalty: float = 1.0,
        batch_size: int = 8,
        eval_batch_size: int = 8,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.source, self.train_file, self.eval_file = source, train_file, eval_file
        self.hub_name, self.hub_config, self.hub_revision = hub_name, hub_config, hub_revision
        self.train_split, self.eval_split = train_split, eval_split
        self.max_length, self.num_calibration, self.num_eval = max_length, num_calibration, num_eval
        self.batch_size, self.eval_batch_size, self.seed = batch_size, eval_batch_size, seed
        self.generation = GenerationSettings(max_new_tokens, num_beams, no_repeat_ngram_size, length_penalty)
        self._validate()
        self._entries: Optional[dict[str, list[Entry]]] = None

    def _validate(self) -> None:
        if self.source not in ("hub", "files"):
            raise ValueError(f"unknown data-to-text source {self.source!r}; use 'hub' or 'files'")
        for name in ("max_length", "num_calibration", "batch_size", "eval_batch_size"):
            if getattr(self, name) < (2 if name == "max_length" else 1):
                raise ValueError(f"{name} must be >= {2 if name == 'max_length' else 1}, got {getattr(self, name)}")
        if self.num_eval is not None and self.num_eval < 1:
            raise ValueError(f"num_eval must be >= 1 or None (all entries), got {self.num_eval}")
        files = {"train_file": self.train_file, "eval_file": self.eval_file}
        if self.source == "hub":
            given = [k for k, v in files.items() if v]
            if given:
                raise ValueError(f"{', '.join(given)} only used with source='files' (source is 'hub')")
            return
        for name, path in files.items():
            if not path:
                raise ValueError(f"source='files' needs {name} (a WebNLG XML / JSON file or a directory of them)")
            if not os.path.exists(os.path.expanduser(path)):
                raise ValueError(f"{name} {path!r} does not exist; check the path")

    # ------------------------------------------------------------------ entries

    def entries(self) -> dict[str, list[Entry]]:
        """``{"train": [...], "eval": [...]}``, read once."""
        if self._entries is None:
            if self.source == "files":
                train, evaluation = read_webnlg(self.train_file), read_webnlg(self.eval_file)
            else:
                train, evaluation = self._load_hub()
            if self.num_eval is not None:
                evaluation = evaluation[: self.num_eval]
            self._entries = {"train": train, "eval": evaluation}
        return self._entries

    def _load_hub(self) -> tuple[list[Entry], list[Entry]]:
        import datasets

        args = (self.hub_name,) + ((self.hub_config,) if self.hub_config else ())
        kw = {"revision": self.hub_revision} if self.hub_revision else {}
        try:
            ds = datasets.load_dataset(*args, **kw)
            splits = [ds[self.train_split], ds[self.eval_split]]
        except Exception as e:  # network / hub / script errors come in many types
            first = (str(e).strip().splitlines() or [""])[0]
            raise ValueError(
                f"could not load {self.hub_name} ({self.hub_config}) splits {self.train_split}/{self.eval_split} "
                f"via datasets.load_dataset (offline, or a script dataset: try hub_revision: refs/convert/parquet; "
                f"or download the WebNLG XML files and use source: files): {type(e).__name__}: {first}"
            ) from None
        return tuple(
            [e for e in (from_hub_row(r, self.hub_name) for r in split) if e is not None] for split in splits
        )

    def calibration_pairs(self) -> list[tuple[str, str]]:
        """Seeded draw of ``num_calibration`` (prompt, text) pairs of the training entries."""
        pairs = [(self.prompt(e), t) for e in self.entries()["train"] for t in e.texts]
        if not pairs:
            raise ValueError("the training data has no (triples, text) pair for calibration")
        rng = random.Random(self.seed)
        return rng.sample(pairs, self.num_calibration) if len(pairs) > self.num_calibration else pairs

    @staticmethod
    def prompt(entry: Entry) -> str:
        return linearize(entry.triples) + " ="

    # ------------------------------------------------------------------ contract

    def setup(self, stage: Optional[str] = None) -> None:
        entries = self.entries()
        if not entries["eval"]:
            raise ValueError("the evaluation data has no entry with triples and references")

    def check_model(self, net: Any) -> None:
        if not is_causal_lm(net):
            raise ValueError(
                f"data-to-text generates text with a causal language model; {type(net).__name__} is not one "
                "(use e.g. model.source.init_args.task: causal-lm with a GPT-2 checkpoint)"
            )

    def _require_tokenizer(self) -> Any:
        if self.tokenizer is None:
            raise ValueError("no tokenizer: call set_tokenizer(model_source.load_tokenizer()) before the loaders")
        if self.tokenizer.eos_token_id is None:
            raise ValueError("the model's tokenizer has no EOS token; data-to-text needs one to end a text")
        return self.tokenizer

    def metrics(self) -> GenerationMetrics:
        return GenerationMetrics(self._require_tokenizer(), self.generation)

    def calibration_dataloader(self) -> DataLoader:
        collate = _Collate(self._require_tokenizer(), self.max_length, calibration=True)
        pairs = self.calibration_pairs()  # batches of >= 2 (see _even_batches)
        return DataLoader(pairs, batch_sampler=_even_batches(len(pairs), self.batch_size), collate_fn=collate)

    def val_dataloader(self) -> DataLoader:
        items = [(self.prompt(e), e.texts) for e in self.entries()["eval"]]
        collate = _Collate(self._require_tokenizer(), self.max_length, calibration=False)
        return DataLoader(items, batch_size=self.eval_batch_size, shuffle=False, collate_fn=collate)

    def test_dataloader(self) -> DataLoader:
        return self.val_dataloader()
