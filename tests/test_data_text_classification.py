"""TextClassificationData on tiny local files, the offline wiki topics, and bad input."""

import json

import pytest
import torch

from flexround_pl.data.offline import minilm_dir
from flexround_pl.data.text_classification import TextClassificationData

MAX_LEN = 24


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(minilm_dir())


def write_csv(path, rows, sep=","):
    header = list(rows[0])
    lines = [sep.join(header)] + [sep.join(str(r[h]) for h in header) for r in rows]
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def make(tokenizer, **kw):
    data = TextClassificationData(**kw)
    data.set_tokenizer(tokenizer)
    data.setup()
    return data


def text_rows(n, offset=0):
    names = ["positive", "negative", "neutral"]
    return [{"text": f"sentence number {i + offset} is rather {names[i % 3]}", "label": names[i % 3]} for i in range(n)]


def test_csv_calibration_fixed_shape_and_labelled_eval(tmp_path, tokenizer):
    train = write_csv(tmp_path / "train.csv", text_rows(12))
    ev = write_csv(tmp_path / "eval.csv", text_rows(5, offset=100))
    data = make(tokenizer, source="files", train_file=train, eval_file=ev, num_calibration=4, batch_size=3, max_length=MAX_LEN)
    assert data.label_names == ["negative", "neutral", "positive"]  # sorted names -> ids
    assert data.num_labels == 3
    cal = list(data.calibration_dataloader())
    assert [b["input_ids"].shape for b in cal] == [torch.Size([3, MAX_LEN]), torch.Size([1, MAX_LEN])]
    assert set(cal[0]) == {"input_ids", "attention_mask", "token_type_ids", "labels"}
    assert cal[0]["attention_mask"].shape == (3, MAX_LEN) and (cal[0]["attention_mask"][:, -1] == 0).all()
    assert len(data.train_dataloader().dataset) == 8  # calibration drawn from train, removed from it
    ev_batch = next(iter(data.val_dataloader()))
    assert ev_batch["labels"].tolist() == [2, 0, 1, 2, 0]
    assert ev_batch["input_ids"].shape[1] < MAX_LEN  # eval pads per batch
    metrics = data.metrics()
    metrics.update(torch.nn.functional.one_hot(ev_batch["labels"], 3).float(), ev_batch)
    assert metrics.compute() == {"accuracy": 1.0}


def test_tsv_pairs_with_int_labels(tmp_path, tokenizer):
    rows = [{"sentence1": f"a man plays guitar {i}", "sentence2": f"someone plays music {i}", "label": i % 2} for i in range(6)]
    path = write_csv(tmp_path / "pairs.tsv", rows, sep="\t")
    data = make(tokenizer, source="files", calibration_file=path, eval_file=path, max_length=MAX_LEN)
    assert data.num_labels == 2
    batch = next(iter(data.calibration_dataloader()))
    assert batch["input_ids"].shape == (6, MAX_LEN)
    assert batch["token_type_ids"].max() == 1  # second segment present
    assert data.test_dataloader().dataset == data.val_dataloader().dataset


def test_jsonl_unlabelled_calibration_and_regression(tmp_path, tokenizer):
    cal = tmp_path / "cal.jsonl"
    cal.write_text("\n".join(json.dumps({"text": f"calibration text {i}"}) for i in range(3)))
    ev = tmp_path / "eval.jsonl"
    ev.write_text("\n".join(json.dumps({"text": f"scored text {i}", "label": i * 0.5}) for i in range(4)))
    data = make(tokenizer, source="files", calibration_file=str(cal), eval_file=str(ev), max_length=MAX_LEN)
    assert data.num_labels == 1 and data.label_names is None
    assert data.metrics().names == ["pearson", "spearman"]
    batch = next(iter(data.val_dataloader()))
    assert batch["labels"].dtype == torch.float32 and batch["labels"].tolist() == [0.0, 0.5, 1.0, 1.5]
    assert next(iter(data.calibration_dataloader()))["input_ids"].shape == (3, MAX_LEN)


def test_wiki_topics(tokenizer):
    data = make(tokenizer, num_calibration=8, num_eval=16, batch_size=4, eval_batch_size=16, max_length=32)
    assert data.num_labels == 11 and len(data.label_names) == 11
    cal = list(data.calibration_dataloader())
    assert len(cal) == 2 and all(b["input_ids"].shape == (4, 32) for b in cal)
    ev = next(iter(data.val_dataloader()))
    assert ev["labels"].shape == (16,) and 0 <= ev["labels"].min() and ev["labels"].max() < 11
    # calibration order is fixed, train shuffle is seeded
    assert torch.equal(next(iter(data.calibration_dataloader()))["input_ids"], cal[0]["input_ids"])
    first = [next(iter(data.train_dataloader()))["labels"] for _ in range(2)]
    assert torch.equal(*first)


def test_bad_input(tmp_path, tokenizer):
    with pytest.raises(ValueError, match="unknown GLUE task 'sst3'.*sst2"):
        TextClassificationData(source="glue", glue_task="sst3")
    with pytest.raises(ValueError, match="needs glue_task"):
        TextClassificationData(source="glue")
    path = write_csv(tmp_path / "x.csv", text_rows(3))
    with pytest.raises(ValueError, match="eval_file '/nope.csv' does not exist"):
        TextClassificationData(source="files", train_file=path, eval_file="/nope.csv")
    with pytest.raises(ValueError, match="unsupported format"):
        TextClassificationData(source="files", train_file=path, eval_file=__file__)
    with pytest.raises(ValueError, match="needs eval_file"):
        TextClassificationData(source="files", train_file=path)
    with pytest.raises(ValueError, match="only used with source='files'"):
        TextClassificationData(eval_file=path)
    with pytest.raises(ValueError, match="unknown source"):
        TextClassificationData(source="imdb")
    with pytest.raises(ValueError, match="lower num_calibration"):
        TextClassificationData(num_calibration=5000)
    with pytest.raises(ValueError, match="set_tokenizer"):
        TextClassificationData(source="files", train_file=path, eval_file=path).setup()
    bad = tmp_path / "bad.csv"
    bad.write_text("body,label\nhello,a\n")
    with pytest.raises(ValueError, match="no 'text'"):
        make(tokenizer, source="files", train_file=str(bad), eval_file=str(bad))


def test_glue_metrics_known_without_loading():
    data = TextClassificationData(source="glue", glue_task="MRPC")
    assert data.num_labels == 2 and data.metrics().names == ["accuracy", "f1"]
    assert TextClassificationData(source="glue", glue_task="stsb").metrics().names == ["pearson", "spearman"]


def fake_glue(monkeypatch, n_train=10):
    """Stand in for the hub: an in-memory SST-2-like DatasetDict."""
    import datasets

    feats = datasets.Features({"sentence": datasets.Value("string"), "label": datasets.ClassLabel(names=["negative", "positive"])})

    def split(n, prefix, unlabelled=False):
        labels = [-1] * n if unlabelled else [i % 2 for i in range(n)]
        return datasets.Dataset.from_dict({"sentence": [f"{prefix} {i}" for i in range(n)], "label": labels}, features=feats)

    dd = datasets.DatasetDict(train=split(n_train, "train"), validation=split(4, "val"), test=split(3, "test", True))
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: dd)


def test_glue_splits_with_fake_hub(monkeypatch, tokenizer):
    fake_glue(monkeypatch)
    data = make(tokenizer, source="glue", glue_task="sst2", num_calibration=4, max_length=MAX_LEN)
    assert data.label_names == ["negative", "positive"]
    cal = {e.text for e in data.calibration_dataloader().dataset}
    train = {e.text for e in data.train_dataloader().dataset}
    assert len(cal) == 4 and len(train) == 6 and not cal & train
    ev = next(iter(data.val_dataloader()))
    assert ev["labels"].tolist() == [0, 1, 0, 1]  # the validation split, not the unlabelled test split


def test_glue_load_failure_is_one_line(monkeypatch):
    import datasets

    def offline(*a, **k):
        raise ConnectionError("Couldn't reach 'glue' on the Hub (LocalEntryNotFoundError)\nmore details")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(ValueError, match=r"could not load GLUE task 'rte' \(offline\?") as info:
        TextClassificationData(source="glue", glue_task="rte").label_names
    assert "\n" not in str(info.value)
