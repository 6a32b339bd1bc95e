"""Task metrics against hand-computed values."""

import math

import pytest
import torch

from flexround_pl.evaluate.metrics import (
    GLUE_TASKS,
    ClassificationMetrics,
    PerplexityMetrics,
    TopKMetrics,
)


def one_hot_logits(preds, num_labels):
    return torch.nn.functional.one_hot(torch.tensor(preds), num_labels).float()


def test_binary_accuracy_f1_matthews():
    # preds 1 1 0 0 1 vs labels 1 0 0 1 1: TP=2 FP=1 FN=1 TN=1
    m = ClassificationMetrics(2, ("accuracy", "f1", "matthews"))
    m.update(one_hot_logits([1, 1, 0], 2), {"labels": torch.tensor([1, 0, 0])})
    m.update(one_hot_logits([0, 1], 2), {"labels": torch.tensor([1, 1])})  # accumulates over batches
    out = m.compute()
    assert out["accuracy"] == pytest.approx(3 / 5)
    assert out["f1"] == pytest.approx(2 * 2 / (2 * 2 + 1 + 1))  # binary F1 of class 1
    assert out["matthews"] == pytest.approx((2 * 1 - 1 * 1) / math.sqrt(3 * 3 * 2 * 2))
    m.reset()
    m.update(one_hot_logits([0], 2), {"labels": torch.tensor([0])})
    assert m.compute()["accuracy"] == 1.0


def test_multiclass_macro_f1_and_unlabelled_skipped():
    m = ClassificationMetrics(3, ("accuracy", "f1"))
    # per-class F1: 1, 2/3, 2/3; the -1 (unlabelled) target is ignored
    m.update(one_hot_logits([0, 1, 2, 2, 0], 3), {"labels": torch.tensor([0, 1, 1, 2, -1])})
    out = m.compute()
    assert out["accuracy"] == pytest.approx(3 / 4)
    assert out["f1"] == pytest.approx((1 + 2 / 3 + 2 / 3) / 3)


def test_regression_pearson_spearman():
    m = ClassificationMetrics(1, ("pearson", "spearman"))
    m.update(torch.tensor([[1.0], [2.0], [3.0]]), {"labels": torch.tensor([1.0, 3.0, 2.0])})
    out = m.compute()
    assert out["pearson"] == pytest.approx(0.5, abs=1e-5)  # cov 1 / sqrt(2 * 2)
    assert out["spearman"] == pytest.approx(0.5, abs=1e-5)


@pytest.mark.parametrize(
    "num_labels,names,match",
    [(2, ("pearson",), "not available"), (1, ("accuracy",), "not available"), (3, ("bleu",), "bleu"), (0, ("accuracy",), ">= 1")],
)
def test_bad_metric_names(num_labels, names, match):
    with pytest.raises(ValueError, match=match):
        ClassificationMetrics(num_labels, names)


def test_perplexity_uniform_is_vocab_size_and_padding_ignored():
    vocab = 50
    logits = torch.zeros(2, 6, vocab)
    ids = torch.randint(0, vocab, (2, 6))
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]])
    # padded positions get confident wrong predictions: they must not count
    logits[0, 3:, :] = -100.0
    logits[0, 3:, (ids[0, 4:] + 1) % vocab] = 100.0
    m = PerplexityMetrics()
    m.update(logits, {"input_ids": ids, "attention_mask": mask})
    assert m.compute()["perplexity"] == pytest.approx(vocab, rel=1e-5)


def test_perplexity_known_probability():
    # p(target) = 1/2 at every position -> perplexity 2
    ids = torch.tensor([[0, 1, 0, 1]])
    logits = torch.zeros(1, 4, 4)
    logits[..., :2] = 10.0  # two equally likely tokens, the target among them
    m = PerplexityMetrics()
    m.update(logits, {"input_ids": ids})
    assert m.compute()["perplexity"] == pytest.approx(2.0, rel=1e-3)


def test_topk():
    logits = torch.tensor(
        [
            [6.0, 5, 4, 3, 2, 1],  # label 0: top1 hit
            [6.0, 5, 4, 3, 2, 1],  # label 4: top5 hit only
            [6.0, 5, 4, 3, 2, 1],  # label 5: miss
            [1.0, 6, 5, 4, 3, 2],  # label 2: top5 hit only
        ]
    )
    m = TopKMetrics(6)
    m.update(logits, {"labels": torch.tensor([0, 4, 5, 2])})
    out = m.compute()
    assert out["top1"] == pytest.approx(0.25)
    assert out["top5"] == pytest.approx(0.75)
    assert TopKMetrics(3).names == ["top1"]


def test_glue_tasks():
    assert sorted(GLUE_TASKS) == sorted(["cola", "sst2", "mrpc", "qqp", "stsb", "mnli", "qnli", "rte", "wnli"])
    assert GLUE_TASKS["mnli"].eval_split == "validation_matched"
    assert GLUE_TASKS["mnli"].text_keys == ("premise", "hypothesis")
    assert GLUE_TASKS["cola"].metrics == ("matthews",)
    assert GLUE_TASKS["stsb"].num_labels == 1
    for task in GLUE_TASKS.values():
        assert task.make_metrics().names == list(task.metrics)


# ----------------------------------------------------------------------------- agreement with FP


def test_fp_agreement_counts_equal_argmax_per_batch():
    from flexround_pl.evaluate import FPAgreement

    a = FPAgreement()
    a.start(record=True)
    a.update(0, one_hot_logits([0, 1, 2], 3), {})
    a.update(1, one_hot_logits([2, 2], 3), {})
    assert a.compute() is None  # the reference pass itself reports nothing
    a.start(record=False)
    a.update(0, one_hot_logits([0, 2, 2], 3), {})
    a.update(1, one_hot_logits([2, 1], 3), {})
    assert a.compute() == pytest.approx(3 / 5)


def test_fp_agreement_on_causal_lm_ignores_padding_and_last_position():
    from flexround_pl.evaluate import FPAgreement

    mask = torch.tensor([[1, 1, 1, 0]])  # 2 real next-token positions (t=0, 1)
    fp = one_hot_logits([[1, 2, 3, 0]], 4)
    q = one_hot_logits([[1, 0, 0, 3]], 4)  # t=0 agrees, t=1 not; t=2 predicts padding, t=3 last
    a = FPAgreement()
    a.start(record=True)
    a.update(0, fp, {"attention_mask": mask})
    a.start(record=False)
    a.update(0, q, {"attention_mask": mask})
    assert a.compute() == pytest.approx(1 / 2)


def test_fp_agreement_needs_every_reference_batch_and_skips_regression():
    from flexround_pl.evaluate import FPAgreement

    a = FPAgreement()
    a.start(record=True)
    a.update(0, one_hot_logits([0, 1], 2), {})
    a.update(1, one_hot_logits([0, 1], 2), {})
    a.start(record=False)
    a.update(0, one_hot_logits([0, 1], 2), {})  # batch 1 never compared: not comparable
    assert a.compute() is None
    b = FPAgreement()
    b.start(record=True)
    b.update(0, torch.randn(4, 1), {})  # STS-B style regression: no argmax decision
    b.start(record=False)
    b.update(0, torch.randn(4, 1), {})
    assert b.compute() is None


def test_fp_kl_is_the_mean_kl_from_fp_per_example():
    import torch.nn.functional as F

    from flexround_pl.evaluate import FPDivergence

    fp = [torch.tensor([[2.0, 0.0, -1.0], [0.0, 1.0, 0.0]]), torch.tensor([[0.5, 0.5, 3.0]])]
    q = [torch.tensor([[1.5, 0.2, -1.0], [0.0, 1.0, 0.0]]), torch.tensor([[0.5, 1.5, 2.0]])]
    d = FPDivergence()
    d.start(record=True)
    for i, logits in enumerate(fp):
        d.update(i, logits, {})
    assert d.compute() is None  # the reference pass itself reports nothing
    d.start(record=False)
    for i, logits in enumerate(fp):
        d.update(i, logits, {})
    assert d.compute() == 0.0  # FP against itself
    d.start(record=False)
    for i, logits in enumerate(q):
        d.update(i, logits, {})
    p_fp, p_q = F.softmax(torch.cat(fp), -1), F.softmax(torch.cat(q), -1)
    expected = (p_fp * (p_fp.log() - p_q.log())).sum(-1).mean().item()
    assert expected > 0 and d.compute() == pytest.approx(expected, rel=1e-5)


def test_fp_kl_is_never_negative_for_near_identical_distributions():
    import torch.nn.functional as F

    from flexround_pl.evaluate import FPDivergence

    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        fp = torch.randn(8, 11, generator=g) * 3
        q = fp + 1e-5 * torch.randn(8, 11, generator=g)  # quantization that barely moves the logits
        d = FPDivergence()
        d.start(record=True)
        d.update(0, fp, {})
        d.start(record=False)
        d.update(0, q, {})
        p = F.softmax(fp.double(), -1)
        reference = (p * (F.log_softmax(fp.double(), -1) - F.log_softmax(q.double(), -1))).sum(-1).mean().item()
        assert d.compute() >= 0.0
        assert d.compute() == pytest.approx(max(reference, 0.0), abs=1e-12)


def test_fp_kl_skips_causal_lm_and_regression_and_needs_every_batch():
    from flexround_pl.evaluate import FPDivergence

    for logits in (torch.randn(2, 5, 7), torch.randn(4, 1)):  # causal LM [B, T, V]; STS-B regression
        d = FPDivergence()
        d.start(record=True)
        d.update(0, logits, {})
        d.start(record=False)
        d.update(0, logits, {})
        assert d.compute() is None
    d = FPDivergence()
    d.start(record=True)
    d.update(0, torch.randn(2, 3), {})
    d.update(1, torch.randn(2, 3), {})
    d.start(record=False)
    d.update(0, torch.randn(2, 3), {})  # batch 1 never compared
    assert d.compute() is None
