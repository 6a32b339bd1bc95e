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


# ---------------------------------------------------------------------- text, tokenizer, configs

WORDS = (
    "the a of and to in is was for on with as by at from river mountain city music science war king "
    "queen north south east west alpha beta gamma delta red blue green small large old new first last"
).split()


def new_tiny_tokenizer():
    """A word-level tokenizer over ``WORDS`` (vocabulary 45, unknown words -> [UNK])."""
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"[UNK]": 0, "[EOS]": 1, ".": 2, ",": 3}
    for w in WORDS:
        vocab[w] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", eos_token="[EOS]")


def random_text(n_sentences: int, seed: int) -> str:
    """``n_sentences`` seeded random sentences over ``WORDS``."""
    import random

    r = random.Random(seed)
    return " ".join(
        " ".join(r.choice(WORDS) for _ in range(r.randint(4, 12))) + r.choice([".", ","]) for _ in range(n_sentences)
    )


@pytest.fixture(scope="session")
def tiny_tokenizer():
    """``tiny_tokenizer()``: a fresh word-level tokenizer (vocabulary 45)."""
    return new_tiny_tokenizer


@pytest.fixture(scope="session")
def make_text():
    """``make_text(n_sentences, seed)``: seeded random text over the tiny tokenizer's words."""
    return random_text


def write_run_config_file(tmp_path, source: dict, quant: dict, reconstruction: dict, data: dict,
                      max_steps: int, **trainer) -> str:
    """``tmp_path/config.yaml`` for a CPU ``fit`` into ``tmp_path/run``: the one YAML writer of the tests."""
    import yaml

    config = {
        "seed_everything": 0,
        "trainer": {"accelerator": "cpu", "devices": 1, "max_steps": max_steps, "enable_progress_bar": False,
                    "default_root_dir": str(tmp_path / "run"), **trainer},
        "model": {"source": source, "quant": quant, "reconstruction": reconstruction},
        "data": data,
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


def write_classification_csvs(tmp_path) -> dict[str, str]:
    """``train.csv`` / ``eval.csv`` (48 rows each, ``text,label``, 3 labels) in ``tmp_path``; their paths."""
    words = ["alpha", "beta", "gamma", "delta", "river", "mountain", "music", "science", "war", "city"]
    rows = []
    for i in range(96):
        label = ("north", "south", "east")[i % 3]
        text = " ".join(words[(i * 7 + k * (i % 3 + 1)) % len(words)] for k in range(6 + i % 5))
        rows.append(f"{text},{label}")
    files = {}
    for split, chunk in (("train", rows[:48]), ("eval", rows[48:])):
        p = tmp_path / f"{split}.csv"
        p.write_text("text,label\n" + "\n".join(chunk) + "\n")
        files[split] = str(p)
    return files


def write_classifier_config(tmp_path, model_dir: str, **quant) -> str:
    """A tiny-BERT classification run (FlexRound W3 per tensor, 30 steps) on ``write_classification_csvs``."""
    files = write_classification_csvs(tmp_path)
    return write_run_config_file(
        tmp_path,
        source={"class_path": "flexround_pl.models.HFModel", "init_args": {"name_or_path": model_dir}},
        quant={"method": "flexround", "weight": {"bits": 3, "granularity": "tensor"}, **quant},
        reconstruction={"lr": 0.003, "batch_size": 8, "eval_batch_size": 16},
        data={"class_path": "flexround_pl.data.TextClassificationData",
              "init_args": {"source": "files", "train_file": files["train"], "eval_file": files["eval"],
                            "num_calibration": 32, "max_length": 16, "batch_size": 8}},
        max_steps=30, log_every_n_steps=5,
    )


def write_lm_run_config(tmp_path, model_dir: str, max_steps: int = 20) -> str:
    """A tiny causal-LM run (FlexRound W3 per channel) on seeded random text files."""
    (tmp_path / "train.txt").write_text(random_text(200, 1))
    (tmp_path / "eval.txt").write_text(random_text(100, 2))
    return write_run_config_file(
        tmp_path,
        source={"class_path": "flexround_pl.models.HFModel",
                "init_args": {"name_or_path": model_dir, "task": "causal-lm"}},
        quant={"method": "flexround", "weight": {"bits": 3, "granularity": "channel"}},
        reconstruction={"lr": 0.003, "batch_size": 4, "eval_batch_size": 8, "evaluations": 2},
        data={"class_path": "flexround_pl.data.language_modeling.LanguageModelingData",
              "init_args": {"source": "text_files", "train_file": str(tmp_path / "train.txt"),
                            "eval_file": str(tmp_path / "eval.txt"), "seq_length": 16, "num_calibration": 8,
                            "batch_size": 4, "eval_batch_size": 4, "num_eval_windows": 4}},
        max_steps=max_steps, logger=False,
    )


@pytest.fixture(scope="session")
def write_config():
    """``write_config(tmp_path, model_dir, **quant)``: the tiny-BERT classification config; returns its path."""
    return write_classifier_config


@pytest.fixture(scope="session")
def write_lm_config():
    """``write_lm_config(tmp_path, model_dir, max_steps=20)``: the tiny causal-LM config; returns its path."""
    return write_lm_run_config


@pytest.fixture(scope="session")
def write_run_config():
    """``write_run_config(tmp_path, source, quant, reconstruction, data, max_steps, **trainer)``."""
    return write_run_config_file
