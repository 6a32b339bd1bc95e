"""Disk (memory-mapped) and memory calibration caches hold the same values: identical runs."""

from __future__ import annotations

import json
import os

import pytest
import torch

from flexround_pl.cli import main
from flexround_pl.reconstruct.cache import AUTO_DISK_FRACTION, CacheStorage, CalibrationCache, _BatchRecord



def _codes(run_dir) -> dict[str, torch.Tensor]:
    from flexround_pl.export.checkpoint import CHECKPOINT_NAME, read_quantized

    _, tensors = read_quantized(os.path.join(run_dir, CHECKPOINT_NAME))
    return {k: v for k, v in tensors.items() if k.endswith((".codes", ".scale", ".zero_point"))}


def test_disk_and_memory_cache_give_identical_runs(tmp_path, tiny_bert_dir, write_config):
    runs = {}
    for mode in ("memory", "disk"):
        d = tmp_path / mode
        d.mkdir()
        cfg = write_config(d, tiny_bert_dir)
        cache_dir = d / "cache_files"
        args = ["fit", "--config", cfg, "--trainer.max_steps", "10", "--export", "false",
                "--model.reconstruction.cache", mode, "--model.reconstruction.cache_dir", str(cache_dir)]
        assert main(args) == 0
        runs[mode] = d / "run"
        if mode == "disk":
            assert cache_dir.is_dir() and os.listdir(cache_dir) == []  # mapped files are unlinked at once
        else:
            assert not cache_dir.exists()
    res = {m: json.loads((r / "results.json").read_text()) for m, r in runs.items()}
    for a, b in zip(res["memory"]["blocks"], res["disk"]["blocks"]):
        assert (a["loss_start"], a["loss_end"], a["best_step"]) == (b["loss_start"], b["loss_end"], b["best_step"])
    assert res["memory"]["quantized"] == res["disk"]["quantized"]
    mem, disk = _codes(runs["memory"]), _codes(runs["disk"])
    assert mem and mem.keys() == disk.keys()
    assert any(k.endswith(".codes") for k in mem)
    for k in mem:
        assert torch.equal(mem[k], disk[k]), k


def test_cache_storage_round_trip_and_auto_choice(tmp_path):
    torch.manual_seed(0)
    h = [torch.randn(3, 4, 5), torch.randn(2, 4, 5)]
    mask = torch.ones(5, 4, dtype=torch.long)
    records = [_BatchRecord.build([((x,), {"attention_mask": m})]) for x, m in zip(h, (mask[:3], mask[3:]))]
    mem = CalibrationCache._from_records(records, [None, None], "memory")
    disk = CalibrationCache._from_records(records, [None, None], "disk", str(tmp_path))
    assert not mem.storage.on_disk and disk.storage.on_disk
    assert torch.equal(mem.fp_inputs, disk.fp_inputs) and torch.equal(mem.extras[0], disk.extras[0])
    block = torch.nn.Linear(5, 5)
    for c in (mem, disk):
        c.compute_targets(lambda x, attention_mask: block(x), torch.device("cpu"), 2)
    assert torch.equal(mem.targets, disk.targets)
    assert os.listdir(tmp_path) == []
    # auto: disk only above AUTO_DISK_FRACTION of the available memory
    assert not CacheStorage.choose("auto", str(tmp_path), 1).on_disk
    assert CacheStorage.choose("auto", str(tmp_path), 1 << 60).on_disk
    assert 0 < AUTO_DISK_FRACTION < 1
    with pytest.raises(ValueError):
        CacheStorage.choose("ssd", None, 1)
