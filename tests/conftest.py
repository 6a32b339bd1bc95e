"""Shared fixtures: tiny random-init models that run end to end in seconds."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(1)  # tiny models: threads cost more than they give


@pytest.fixture(scope="session")
def minilm_tokenizer_dir() -> str:
    from flexround_pl.data.offline import minilm_dir

    return minilm_dir()


def make_tiny_bert(path: str, num_labels: int = 3, layers: int = 2, seed: int = 0) -> str:
    """A 2-layer random-init BERT classifier saved with the MiniLM tokenizer."""
    import transformers

    from flexround_pl.data.offline import minilm_dir

    torch.manual_seed(seed)
    config = transformers.BertConfig(
        vocab_size=30522,
        hidden_size=32,
        num_hidden_layers=layers,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
        num_labels=num_labels,
    )
    model = transformers.BertForSequenceClassification(config).eval()
    model.save_pretrained(path)
    transformers.AutoTokenizer.from_pretrained(minilm_dir()).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory) -> str:
    return make_tiny_bert(str(tmp_path_factory.mktemp("tiny_bert")))


def hf_classifier_metrics(model_dirs: tuple[str, str], csv_path: str, max_length: int) -> dict[str, float]:
    """Accuracy of two saved HF classifiers (FP, quantized export) on a ``text,label`` CSV, and how often
    they agree: an independent reference for a run's ``fp`` / ``quantized`` metrics (plain transformers,
    one example at a time, labels numbered in sorted order as the data module documents)."""
    import csv

    import transformers

    with open(csv_path, newline="") as f:
        rows = list(csv.DictReader(f))
    names = sorted({r["label"] for r in rows})
    labels = torch.tensor([names.index(r["label"]) for r in rows])
    preds = []
    for model_dir in model_dirs:
        tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
        model = transformers.AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
        with torch.no_grad():
            preds.append(torch.tensor([
                int(model(**tokenizer(r["text"], truncation=True, max_length=max_length, return_tensors="pt"))
                    .logits.argmax(-1))
                for r in rows
            ]))
    return {
        "fp_accuracy": (preds[0] == labels).float().mean().item(),
        "accuracy": (preds[1] == labels).float().mean().item(),
        "fp_agreement": (preds[0] == preds[1]).float().mean().item(),
        "n": len(rows),
    }


@pytest.fixture()
def refused(capfd):
    """``refused(expected)``: the command just run printed exactly one ``flexround_pl: error:`` line, the last,
    containing ``expected``, and no traceback; returns that line."""
    def check(expected: str) -> str:
        err = capfd.readouterr().err
        errors = [line for line in err.splitlines() if line.startswith("flexround_pl: error:")]
        assert len(errors) == 1 and "Traceback" not in err, err
        assert expected in errors[0], errors[0]
        assert errors[0] == err.strip().splitlines()[-1]
        return errors[0]

    capfd.readouterr()  # drop what came before the command
    return check
