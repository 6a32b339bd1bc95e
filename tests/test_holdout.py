"""``reconstruction.holdout``: held-out calibration samples pick the best step and stop early."""

from __future__ import annotations

import json
import os

import pytest
import torch

from flexround_pl.reconstruct.config import ReconstructionConfig
from flexround_pl.reconstruct.data import BlockDataModule, holdout_split


def test_split_is_disjoint_seeded_and_the_same_for_every_block():
    train, held = holdout_split(40, 0.25, seed=3)
    assert len(held) == 10 and sorted(train + held) == list(range(40))
    assert holdout_split(40, 0.25, seed=3) == (train, held)
    assert holdout_split(40, 0.25, seed=4)[1] != held
    assert holdout_split(40, 0.0, seed=3) == (list(range(40)), [])
    assert len(holdout_split(3, 0.01, seed=0)[1]) == 1 and len(holdout_split(3, 0.99, seed=0)[0]) == 1


class _Cache:
    def __init__(self, n):
        self.n, self.targets = n, torch.zeros(n)

    def __len__(self):
        return self.n

    def batch(self, index):
        return {"index": index}


def test_training_never_sees_the_held_out_samples():
    dm = BlockDataModule(_Cache(20), batch_size=4, eval_batch_size=8, seed=1, holdout=0.2, holdout_seed=0)
    seen = {int(i) for _ in range(3) for b in dm.train_dataloader() for i in b["index"]}
    val = [int(i) for b in dm.val_dataloader() for i in b["index"]]
    assert seen == set(dm.train_indices) and sorted(val) == dm.holdout_indices and not seen & set(val)
    assert [int(i) for b in dm.calibration_dataloader() for i in b["index"]] == list(range(20))


def test_bad_holdout_settings_name_the_key():
    for kwargs, key in (({"holdout": 1.0}, "reconstruction.holdout"), ({"holdout": -0.1}, "reconstruction.holdout"),
                        ({"patience": 2}, "reconstruction.patience needs held-out samples")):
        with pytest.raises(ValueError, match=key):
            ReconstructionConfig(**kwargs)
    assert ReconstructionConfig().selection_metric("block_01") == "block_01/calibration_loss"
    assert ReconstructionConfig(holdout=0.1).selection_metric("block_01") == "block_01/holdout_loss"


def _scalars(run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags = set()
    for root, _, files in os.walk(run / "tensorboard"):
        for f in files:
            if f.startswith("events.out.tfevents"):
                acc = EventAccumulator(os.path.join(root, f))
                acc.Reload()
                tags |= set(acc.Tags()["scalars"])
    return tags


def test_cli_holdout_logs_the_holdout_loss_and_stops_early(tmp_path, tiny_bert_dir, write_config):
    from flexround_pl.cli import main

    cfg = write_config(tmp_path, tiny_bert_dir)
    # a learning rate far too large: the held-out loss rises after the first evaluation
    args = ["fit", "--config", cfg, "--export", "false", "--model.reconstruction.holdout", "0.25",
            "--model.reconstruction.patience", "1", "--model.reconstruction.evaluations", "10",
            "--model.reconstruction.lr", "0.5"]
    assert main(args) == 0
    run = tmp_path / "run"
    tags = _scalars(run)
    assert "block_00/holdout_loss" in tags and not any(t.endswith("calibration_loss") for t in tags)
    blocks = json.loads((run / "results.json").read_text())["blocks"]
    assert any(b["steps"] < 30 for b in blocks), blocks  # early stopping ended at least one block
    for b in blocks:
        assert b["best_step"] <= b["steps"]
