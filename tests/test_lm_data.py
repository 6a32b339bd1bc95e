"""LanguageModelingData: calibration windows, perplexity windows, sources and errors (no model needed)."""

from __future__ import annotations

import pytest
import torch

from flexround_pl.data.language_modeling import LanguageModelingData, _even_batches
from flexround_pl.evaluate.metrics import PerplexityMetrics

@pytest.fixture()
def write_texts(tmp_path, make_text):
    """``write_texts()``: train / eval text files in ``tmp_path``; returns their paths."""

    def write(n_train: int = 200, n_eval: int = 100) -> tuple[str, str]:
        train, evaluation = tmp_path / "train.txt", tmp_path / "eval.txt"
        train.write_text(make_text(n_train, 1))
        evaluation.write_text(make_text(n_eval, 2))
        return str(train), str(evaluation)

    return write


@pytest.fixture()
def files_data(write_texts, tiny_tokenizer):
    """``files_data(**kw)``: a set-up ``text_files`` LanguageModelingData over ``write_texts()``."""

    def build(**kw) -> LanguageModelingData:
        train, evaluation = write_texts()
        args = dict(source="text_files", train_file=train, eval_file=evaluation, seq_length=16, num_calibration=10)
        args.update(kw)
        data = LanguageModelingData(**args)
        data.set_tokenizer(tiny_tokenizer())
        data.setup("fit")
        return data

    return build


def test_calibration_windows_are_seeded_random_slices_of_the_training_text(tmp_path, files_data, tiny_tokenizer):
    data = files_data(batch_size=4)
    ids = torch.tensor(tiny_tokenizer()(open(data.train_file).read(), add_special_tokens=False)["input_ids"])
    cal = data.windows()["calibration"]
    assert cal.shape == (10, 16) and cal.dtype == torch.long
    text = ids.tolist()
    for row in cal.tolist():  # each window is a contiguous slice of the tokenized training text
        assert any(text[s : s + 16] == row for s in range(len(text) - 15))
    assert len({tuple(r) for r in cal.tolist()}) > 1

    again = files_data(batch_size=4).windows()["calibration"]
    other = files_data(batch_size=4, seed=1).windows()["calibration"]
    assert torch.equal(cal, again) and not torch.equal(cal, other)

    batches = list(data.calibration_dataloader())
    assert [tuple(b["input_ids"].shape) for b in batches] == [(4, 16), (4, 16), (2, 16)]
    for b in batches:
        assert set(b) == {"input_ids", "attention_mask"} and bool((b["attention_mask"] == 1).all())
    assert torch.equal(torch.cat([b["input_ids"] for b in batches]), cal)


def test_eval_windows_are_consecutive_non_overlapping_and_capped(tmp_path, files_data, tiny_tokenizer):
    data = files_data(eval_batch_size=3)
    ids = torch.tensor(tiny_tokenizer()(open(data.eval_file).read(), add_special_tokens=False)["input_ids"])
    ev = data.windows()["eval"]
    n = len(ids) // 16
    assert ev.shape == (n, 16) and n > 3
    assert torch.equal(ev.flatten(), ids[: n * 16])
    batches = list(data.val_dataloader())
    assert [len(b["input_ids"]) for b in batches][0] == 3
    assert torch.equal(torch.cat([b["input_ids"] for b in batches]), ev)
    assert list(data.test_dataloader())[0]["input_ids"].shape == (3, 16)

    capped = files_data(num_eval_windows=2)
    assert torch.equal(capped.windows()["eval"], ev[:2])


def test_metrics_is_perplexity_and_uniform_logits_give_the_vocabulary_size(tmp_path, files_data):
    data = files_data(eval_batch_size=4)
    metrics = data.metrics()
    assert isinstance(metrics, PerplexityMetrics) and data.task == "language-modeling" and data.num_labels is None
    for batch in data.val_dataloader():
        metrics.update(torch.zeros(*batch["input_ids"].shape, 45), batch)
    assert metrics.compute()["perplexity"] == pytest.approx(45.0, rel=1e-5)


def test_even_batches_never_leave_a_single_sample_batch():
    assert _even_batches(9, 4) == [[0, 1, 2, 3], [4, 5, 6, 7, 8]]
    assert _even_batches(8, 4) == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert _even_batches(3, 1) == [[0], [1], [2]]
    assert _even_batches(1, 4) == [[0]]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(source="c4"), "unknown language-modeling source"),
        (dict(seq_length=1), "seq_length"),
        (dict(num_calibration=0), "num_calibration"),
        (dict(num_eval_windows=0), "num_eval_windows"),
        (dict(source="text_files", eval_file="x.txt"), "needs train_file"),
        (dict(source="wikitext2", train_file="x.txt"), "only used with source='text_files'"),
        (dict(source="text_files", train_file="/nonexistent/train.txt", eval_file="/nonexistent/eval.txt"),
         "does not exist"),
    ],
)
def test_bad_arguments_raise_clear_value_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LanguageModelingData(**kwargs)


def test_text_shorter_than_one_window_is_a_clear_error(tmp_path, files_data):
    with pytest.raises(ValueError, match=r"training text .* fewer than one window of seq_length=100000"):
        files_data(seq_length=100_000)


def test_setup_without_tokenizer_is_a_clear_error(tmp_path, write_texts):
    train, evaluation = write_texts()
    data = LanguageModelingData(source="text_files", train_file=train, eval_file=evaluation, seq_length=16)
    with pytest.raises(ValueError, match="no tokenizer"):
        data.setup("fit")


@pytest.mark.parametrize("source", ["wikitext2", "ptb"])
def test_hub_sources_fail_offline_with_one_clear_line(source, monkeypatch, tiny_tokenizer):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    data = LanguageModelingData(source=source, seq_length=16)
    data.set_tokenizer(tiny_tokenizer())
    with pytest.raises(ValueError, match=f"could not load {source}") as info:
        data.setup("fit")
    assert "\n" not in str(info.value)


def test_wiki_summaries_calibrate_on_articles_disjoint_from_the_eval_articles(tiny_tokenizer):
    from flexround_pl.data.offline import load_wiki_summaries, wiki_split

    data = LanguageModelingData(source="wiki_summaries", seq_length=64, num_calibration=4, num_eval_windows=3)
    texts = data.texts()
    split = wiki_split(load_wiki_summaries(), labelled_only=False)
    assert texts["eval"] == "\n\n".join(a["text"] for a in split["eval"]) and len(split["eval"]) == 500
    assert texts["calibration"] == "\n\n".join(a["text"] for a in split["calibration"])
    assert not {a["title"] for a in split["eval"]} & {a["title"] for a in split["calibration"]}
    assert not any(a["text"] in texts["calibration"] for a in split["eval"][:50])
    assert LanguageModelingData(source="wiki_summaries").texts() == texts  # deterministic
    data.set_tokenizer(tiny_tokenizer())
    data.setup()
    assert data.windows()["calibration"].shape == (4, 64) and data.windows()["eval"].shape == (3, 64)
