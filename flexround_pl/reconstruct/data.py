"""``BlockDataModule``: the calibration cache of the current block as Lightning data.

Training batches are random subsets of the calibration samples (a fresh,
seeded permutation each epoch; Lightning cycles epochs until ``max_steps``).
Validation batches cover every sample once, in order; with a ``holdout``
fraction, training uses only the other samples and validation only the
held-out ones (the same seeded subset for every block).
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader

from flexround_pl.reconstruct.cache import CalibrationCache


def holdout_split(n: int, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """``(training, held_out)`` sample indices: ``round(fraction * n)`` held out (at least 1, at most ``n - 1``)."""
    if fraction <= 0:
        return list(range(n)), []
    if n < 2:
        raise ValueError(f"reconstruction.holdout needs at least 2 calibration samples, got {n}")
    k = min(max(1, round(fraction * n)), n - 1)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    return sorted(order[k:]), sorted(order[:k])


class BlockDataModule(L.LightningDataModule):
    def __init__(
        self, cache: CalibrationCache, batch_size: int, eval_batch_size: int, seed: int,
        holdout: float = 0.0, holdout_seed: int = 0,
    ) -> None:
        super().__init__()
        if cache.targets is None:
            raise RuntimeError("compute the block's targets before building its data module")
        self.cache = cache
        self.train_indices, self.holdout_indices = holdout_split(len(cache), holdout, holdout_seed)
        self.batch_size = min(batch_size, len(self.train_indices))
        self.eval_batch_size = eval_batch_size
        self.seed = seed

    def _loader(self, indices: list[int], batch_size: int, shuffle: bool, drop_last: bool) -> DataLoader:
        generator = torch.Generator().manual_seed(self.seed)
        return DataLoader(
            indices,
            batch_size=batch_size,
            shuffle=shuffle,
            drop_last=drop_last,
            generator=generator,
            collate_fn=self._collate,
        )

    def _collate(self, indices: list[int]) -> dict[str, Any]:
        return self.cache.batch(torch.tensor(indices))

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_indices, self.batch_size, shuffle=True, drop_last=True)

    def val_dataloader(self) -> DataLoader:
        """The samples that pick the best step: the held-out ones, or all without a holdout."""
        return self._loader(self.holdout_indices or list(range(len(self.cache))), self.eval_batch_size,
                            shuffle=False, drop_last=False)

    def calibration_dataloader(self) -> DataLoader:
        """Every calibration sample once, in order (the block's reported loss)."""
        return self._loader(list(range(len(self.cache))), self.eval_batch_size, shuffle=False, drop_last=False)
