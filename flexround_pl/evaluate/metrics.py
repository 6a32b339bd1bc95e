"""Task metrics: one small ``nn.Module`` per task family, built on torchmetrics.

The evaluation loop only knows ``update(logits, batch)`` / ``compute()`` /
``reset()``; each subclass decides how logits and the batch map to torchmetrics
inputs. Being ``nn.Module`` s, the metric states follow ``.to(device)`` and
Lightning's device placement; ``update`` moves its inputs to the metric device
so a CPU metric also accepts CUDA logits.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Sequence

import torch
import torchmetrics
from torch import Tensor, nn
from torchmetrics import classification as tmc
from torchmetrics import regression as tmr


class TaskMetrics(nn.Module):
    """Base class: a named set of torchmetrics metrics fed from (logits, batch).

    ``generates = True`` marks metrics fed by decoding with the network instead
    (``update_generation(net, batch)``, see :mod:`flexround_pl.evaluate.generation`).
    """

    generates = False

    def __init__(self) -> None:
        super().__init__()
        self.metrics = nn.ModuleDict()

    @property
    def names(self) -> list[str]:
        return list(self.metrics.keys())

    def _device(self) -> torch.device:
        for m in self.metrics.values():
            return m.device
        return torch.device("cpu")

    def update(self, logits: Tensor, batch: dict) -> None:
        raise NotImplementedError

    @torch.no_grad()
    def compute(self) -> dict[str, float]:
        return {name: float(m.compute()) for name, m in self.metrics.items()}

    def reset(self) -> None:
        for m in self.metrics.values():
            m.reset()

    def forward(self, logits: Tensor, batch: dict) -> None:  # nn.Module call == update
        self.update(logits, batch)


# ----------------------------------------------------------------------------- classification

CLASSIFICATION_NAMES = ("accuracy", "f1", "matthews")
REGRESSION_NAMES = ("pearson", "spearman")


class ClassificationMetrics(TaskMetrics):
    """Sequence / image classification metrics with GLUE conventions.

    ``f1`` is binary F1 of class 1 for two labels (GLUE's MRPC / QQP) and macro
    F1 otherwise. ``num_labels=1`` means regression (STS-B): ``logits[:, 0]``
    against float labels, scored with ``pearson`` / ``spearman``. Targets with a
    negative label (GLUE's unlabelled ``-1``) are skipped.
    """

    def __init__(self, num_labels: int, names: Sequence[str] = ("accuracy",)) -> None:
        super().__init__()
        if num_labels < 1:
            raise ValueError(f"num_labels must be >= 1, got {num_labels}")
        names = [names] if isinstance(names, str) else list(names)
        if not names:
            raise ValueError("no metric names given; pass e.g. names=('accuracy',)")
        self.num_labels = num_labels
        self.regression = num_labels == 1
        valid = REGRESSION_NAMES if self.regression else CLASSIFICATION_NAMES
        for name in names:
            if name not in valid:
                kind = "regression (num_labels=1)" if self.regression else f"{num_labels}-class classification"
                raise ValueError(f"metric {name!r} is not available for {kind}; use one of {list(valid)}")
            self.metrics[name] = self._build(name, num_labels)

    @staticmethod
    def _build(name: str, n: int) -> torchmetrics.Metric:
        if name == "accuracy":
            return tmc.MulticlassAccuracy(num_classes=max(n, 2), average="micro")
        if name == "f1":
            return tmc.BinaryF1Score() if n == 2 else tmc.MulticlassF1Score(num_classes=n, average="macro")
        if name == "matthews":
            return tmc.MatthewsCorrCoef(task="multiclass", num_classes=max(n, 2))
        if name == "pearson":
            return tmr.PearsonCorrCoef()
        with warnings.catch_warnings():  # "saves all predictions": fine at GLUE sizes (STS-B: 1.5 k)
            warnings.simplefilter("ignore", UserWarning)
            return tmr.SpearmanCorrCoef()

    @torch.no_grad()
    def update(self, logits: Tensor, batch: dict) -> None:
        labels = batch["labels"]
        device = self._device()
        logits, labels = logits.detach().to(device), labels.to(device)
        if self.regression:
            preds, target = logits.reshape(len(logits), -1)[:, 0].float(), labels.float()
        else:
            keep = labels >= 0
            preds, target = logits[keep].argmax(dim=-1), labels[keep].long()
        for m in self.metrics.values():
            m.update(preds, target)


# ----------------------------------------------------------------------------- language modelling


class PerplexityMetrics(TaskMetrics):
    """Token-level perplexity of a causal LM: ``exp`` of the mean next-token NLL.

    Logits at position ``t`` predict ``input_ids[t + 1]``; targets whose
    ``attention_mask`` is 0 (padding) are ignored. The NLL comes from
    ``cross_entropy`` (log-softmax) rather than torchmetrics' ``Perplexity``,
    which materialises a softmax copy of the ``[N, V]`` logits and underflows to
    ``inf`` for the very bad models low-bit RTN produces; torchmetrics'
    ``MeanMetric`` does the token-weighted accumulation.
    """

    def __init__(self) -> None:
        super().__init__()
        self.metrics["perplexity"] = torchmetrics.MeanMetric()

    @torch.no_grad()
    def update(self, logits: Tensor, batch: dict) -> None:
        device = self._device()
        ids = batch["input_ids"].to(device)
        target = ids[:, 1:]
        mask = batch.get("attention_mask")
        keep = torch.ones_like(target, dtype=torch.bool) if mask is None else mask.to(device)[:, 1:].bool()
        n = int(keep.sum())
        if n == 0:
            return
        shifted = logits.detach().to(device)[:, :-1].float()
        nll = nn.functional.cross_entropy(shifted[keep], target[keep], reduction="mean")
        self.metrics["perplexity"].update(nll, weight=n)

    @torch.no_grad()
    def compute(self) -> dict[str, float]:
        return {"perplexity": float(torch.exp(self.metrics["perplexity"].compute()))}


# ----------------------------------------------------------------------------- image classification


class TopKMetrics(TaskMetrics):
    """Top-1 / top-5 accuracy (ImageNet convention); ``top5`` only with >= 5 classes."""

    def __init__(self, num_labels: int) -> None:
        super().__init__()
        if num_labels < 2:
            raise ValueError(f"top-k accuracy needs num_labels >= 2, got {num_labels}")
        self.metrics["top1"] = tmc.MulticlassAccuracy(num_classes=num_labels, top_k=1, average="micro")
        if num_labels >= 5:
            self.metrics["top5"] = tmc.MulticlassAccuracy(num_classes=num_labels, top_k=5, average="micro")

    @torch.no_grad()
    def update(self, logits: Tensor, batch: dict) -> None:
        device = self._device()
        logits, labels = logits.detach().to(device).float(), batch["labels"].to(device).long()
        for m in self.metrics.values():
            m.update(logits, labels)


# ----------------------------------------------------------------------------- GLUE


@dataclass(frozen=True)
class GlueTask:
    """What a GLUE task looks like in ``datasets.load_dataset("glue", name)``."""

    name: str
    text_keys: tuple[str, ...]  # one key (single sentence) or two (a pair)
    num_labels: int  # 1 = regression (STS-B)
    metrics: tuple[str, ...]
    eval_split: str = "validation"  # the test splits are unlabelled

    def make_metrics(self) -> ClassificationMetrics:
        return ClassificationMetrics(self.num_labels, self.metrics)


GLUE_TASKS: dict[str, GlueTask] = {
    t.name: t
    for t in (
        GlueTask("cola", ("sentence",), 2, ("matthews",)),
        GlueTask("sst2", ("sentence",), 2, ("accuracy",)),
        GlueTask("mrpc", ("sentence1", "sentence2"), 2, ("accuracy", "f1")),
        GlueTask("qqp", ("question1", "question2"), 2, ("accuracy", "f1")),
        GlueTask("stsb", ("sentence1", "sentence2"), 1, ("pearson", "spearman")),
        GlueTask("mnli", ("premise", "hypothesis"), 3, ("accuracy",), "validation_matched"),
        GlueTask("qnli", ("question", "sentence"), 2, ("accuracy",)),
        GlueTask("rte", ("sentence1", "sentence2"), 2, ("accuracy",)),
        GlueTask("wnli", ("sentence1", "sentence2"), 2, ("accuracy",)),
    )
}
