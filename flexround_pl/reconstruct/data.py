"""``BlockDataModule``: the calibration cache of the current block as Lightning data.

Training batches are random subsets of the calibration samples (a fresh,
seeded permutation each epoch; Lightning cycles epochs until ``max_steps``).
Validation batches cover every sample once, in order.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader

from flexround_pl.reconstruct.cache import CalibrationCache


class BlockDataModule(L.LightningDataModule):
    def __init__(self, cache: CalibrationCache, batch_size: int, eval_batch_size: int, seed: int) -> None:
        super().__init__()
        if cache.targets is None:
            raise RuntimeError("compute the block's targets before building its data module")
        self.cache = cache
        self.batch_size = min(batch_size, len(cache))
        self.eval_batch_size = eval_batch_size
        self.seed = seed

    def _loader(self, batch_size: int, shuffle: bool, drop_last: bool) -> DataLoader:
        generator = torch.Generator().manual_seed(self.seed)
        return DataLoader(
            range(len(self.cache)),
            batch_size=batch_size,
            shuffle=shuffle,
            drop_last=drop_last,
            generator=generator,
            collate_fn=self._collate,
        )

    def _collate(self, indices: list[int]) -> dict[str, Any]:
        return self.cache.batch(torch.tensor(indices))

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.batch_size, shuffle=True, drop_last=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.eval_batch_size, shuffle=False, drop_last=False)
