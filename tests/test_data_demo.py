"""The offline demo classifier: cache location and fingerprint (fast), the trained model (slow)."""

import os

import pytest

from flexround_pl.models.demo import DemoTopicClassifier


def test_cache_path_fingerprint_and_env(monkeypatch, tmp_path):
    monkeypatch.setenv("FLEXROUND_PL_CACHE", str(tmp_path))
    a, b = DemoTopicClassifier(), DemoTopicClassifier(lr=1e-4)
    assert a.cache_path().startswith(os.path.join(str(tmp_path), "demo_topic_classifier"))
    assert a.fingerprint() == DemoTopicClassifier().fingerprint() != b.fingerprint()
    assert DemoTopicClassifier(cache_dir="/x").cache_path().startswith("/x/demo_topic_classifier/")
    assert not a.is_cached()


def test_wrong_num_labels_fails_before_training(tmp_path):
    with pytest.raises(ValueError, match="11 topic labels"):
        DemoTopicClassifier(cache_dir=str(tmp_path)).load(num_labels=3)
    with pytest.raises(ValueError, match="epochs >= 1"):
        DemoTopicClassifier(epochs=0)


@pytest.mark.slow
def test_trained_classifier_loads_and_classifies():
    """Trains once (~5 min on 2 cores) unless cached, then checks the cached model."""
    import torch

    from flexround_pl.data.text_classification import TextClassificationData
    from flexround_pl.models.demo import evaluate_accuracy

    source = DemoTopicClassifier()
    model = source.load(num_labels=11)
    assert source.is_cached() and not model.training
    data = TextClassificationData(num_eval=200)
    data.set_tokenizer(source.load_tokenizer())
    assert model.config.id2label[0] == data.label_names[0]
    with torch.no_grad():
        assert evaluate_accuracy(model, data) > 0.75
