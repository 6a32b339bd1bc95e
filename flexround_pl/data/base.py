"""The contract every data module of the pipeline fulfils.

A PTQ data module is a ``LightningDataModule`` with three splits that never
share an example: a small *calibration* split (inputs only; the reconstruction
targets come from the FP model), an optional *train* split (only used to fit a
demo head) and an *evaluation* split, plus the task's metrics.
"""

from __future__ import annotations

from typing import Any, Optional

import lightning as L
from torch.utils.data import DataLoader

from flexround_pl.evaluate.metrics import TaskMetrics


class PTQDataModule(L.LightningDataModule):
    """Base class: subclasses implement the ``*_dataloader`` methods and ``metrics``.

    Batches are dicts of tensors: the model's keyword inputs (``input_ids``,
    ``attention_mask``, ``pixel_values`` ...) plus ``labels`` where the task has
    them. Calibration batches have a fixed shape (text padded to
    ``max_length``) so that block inputs can be cached sample by sample.
    """

    #: "text-classification" | "language-modeling" | "image-classification"
    task: str = ""

    def __init__(self) -> None:
        super().__init__()
        self.tokenizer: Optional[Any] = None

    def set_tokenizer(self, tokenizer: Any) -> None:
        """Called by the driver with the model's tokenizer before ``setup``."""
        self.tokenizer = tokenizer

    @property
    def num_labels(self) -> Optional[int]:
        return None

    def check_model(self, net: Any) -> None:
        """Refuse (``ValueError``) a network this data's task cannot evaluate; called before any work."""

    def calibration_dataloader(self) -> DataLoader:
        raise NotImplementedError

    def metrics(self) -> TaskMetrics:
        raise NotImplementedError
