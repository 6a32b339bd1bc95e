"""One PTQ run, start to finish: load → evaluate FP → capture → blocks → evaluate → results.

The CLI's ``fit`` subcommand calls :func:`run`. Everything a run writes goes
under the trainer's ``default_root_dir``: ``config.yaml`` (saved by the CLI),
``results.json`` and ``tensorboard/``.
"""

from __future__ import annotations

import json
import logging
import os
import resource
import tempfile
import time
import warnings
from contextlib import contextmanager
from dataclasses import asdict
from typing import Any, Callable, Iterator, Optional

import lightning as L
import torch
from lightning.pytorch.cli import instantiate_class
from lightning.pytorch.loggers import Logger, TensorBoardLogger

from flexround_pl.data.base import PTQDataModule
from flexround_pl.ptq import PTQModel
from flexround_pl.reconstruct.cache import CalibrationCache
from flexround_pl.reconstruct.driver import quantize_blocks, quantize_outside_blocks

# Trainer arguments the driver owns for every per-block trainer.
_BLOCK_TRAINER_FIXED = dict(
    max_epochs=-1,
    check_val_every_n_epoch=None,
    num_sanity_val_steps=0,
    enable_checkpointing=False,
    enable_model_summary=False,
)


# Blocks are trained in eval mode on purpose (no dropout, frozen BatchNorm).
warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode", category=UserWarning)
warnings.filterwarnings("ignore", message=r"The number of training batches .* is smaller than the logging interval")


@contextmanager
def quiet_lightning() -> Iterator[None]:
    """Silence Lightning's per-trainer banners (one per block would drown the progress lines)."""
    loggers = [logging.getLogger(n) for n in ("lightning.pytorch", "lightning.fabric", "pytorch_lightning")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


class TrainerSettings:
    """The user's ``trainer:`` section, turned into fresh trainers on demand."""

    def __init__(self, settings: dict[str, Any]) -> None:
        self.settings = dict(settings)
        self.root = os.path.abspath(self.settings.get("default_root_dir") or os.getcwd())
        self.max_steps = int(self.settings.get("max_steps", -1))
        if self.max_steps < 0:
            raise ValueError(
                "trainer.max_steps is not set: it is the number of reconstruction iterations per block "
                "(e.g. --trainer.max_steps 500)"
            )
        self._logger: Optional[Logger] = None

    def shared_logger(self) -> Optional[Logger]:
        logger = self.settings.get("logger")
        if logger is False:
            return None
        if self._logger is None:
            if isinstance(logger, dict):
                self._logger = instantiate_class((), logger)
            else:
                self._logger = TensorBoardLogger(self.root, name="tensorboard", version="")
        return self._logger

    def _callbacks(self) -> list[L.Callback]:
        configured = self.settings.get("callbacks") or []
        if isinstance(configured, dict):
            configured = [configured]
        return [instantiate_class((), c) if isinstance(c, dict) else c for c in configured]

    def block_trainer(self, tag: str, callbacks: list, val_check_interval: Optional[int]) -> L.Trainer:
        kw = dict(self.settings)
        kw.update(_BLOCK_TRAINER_FIXED)
        kw["callbacks"] = self._callbacks() + list(callbacks)
        kw["logger"] = self.shared_logger() or False
        if val_check_interval is None:
            kw["limit_val_batches"] = 0
        else:
            kw["val_check_interval"] = val_check_interval
        with quiet_lightning():
            return L.Trainer(**kw)

    def eval_trainer(self) -> L.Trainer:
        keep = ("accelerator", "devices", "num_nodes", "precision", "strategy", "enable_progress_bar",
                "limit_val_batches", "limit_test_batches", "default_root_dir", "plugins")
        kw = {k: v for k, v in self.settings.items() if k in keep and v is not None}
        kw.update(logger=False, enable_checkpointing=False, enable_model_summary=False)
        with quiet_lightning():
            return L.Trainer(**kw)


def evaluate(model: PTQModel, datamodule: PTQDataModule, settings: TrainerSettings) -> dict[str, float]:
    trainer = settings.eval_trainer()
    with quiet_lightning():
        trainer.validate(model, datamodule=datamodule, verbose=False)
    return dict(model.last_metrics)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def write_json_atomic(path: str, payload: dict[str, Any]) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path) or ".", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(payload, f, indent=2)
        f.write("\n")
    os.replace(tmp, path)


def prepare(model: PTQModel, datamodule: PTQDataModule) -> None:
    """Give the data its tokenizer, set it up, and load the FP network."""
    datamodule.set_tokenizer(model.source.load_tokenizer())
    datamodule.setup("fit")
    model.load(num_labels=datamodule.num_labels)


def run(
    model: PTQModel,
    datamodule: PTQDataModule,
    settings: TrainerSettings,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Quantize ``model`` on ``datamodule``'s calibration data; write and return the results."""
    t0 = time.perf_counter()
    model.source.check()
    prepare(model, datamodule)
    assert model.net is not None and model.arch is not None
    quant, recon = model.quant, model.reconstruction
    log(
        f"flexround_pl: {model.source.describe()} ({model.arch.name}), method={quant.method}, "
        f"W{quant.weight.bits} {quant.weight.granularity}, {settings.max_steps} steps/block"
    )

    fp_metrics: dict[str, float] = {}
    if model.evaluate_fp:
        fp_metrics = evaluate(model, datamodule, settings)
        log(f"FP metrics: {_fmt(fp_metrics)}")

    device = settings.eval_trainer().strategy.root_device
    blocks = model.arch.blocks(model.net)
    cache = CalibrationCache.capture(lambda inputs: model(inputs), blocks[0][1], datamodule.calibration_dataloader())
    log(f"calibration cache: {len(cache)} samples, {cache.nbytes() / 2**20:.1f} MiB, {len(blocks)} blocks")

    torch.manual_seed(recon.seed)
    block_results = quantize_blocks(
        model.net, model.arch, cache, quant, recon, settings.block_trainer, settings.max_steps, device, log
    )
    outside = quantize_outside_blocks(model.net, model.arch, quant)
    if outside:
        log(f"round-to-nearest outside blocks: {', '.join(outside)}")
    n_calibration = len(cache)
    del cache

    q_metrics = evaluate(model, datamodule, settings)
    log(f"quantized metrics: {_fmt(q_metrics)}" + (f"  (FP {_fmt(fp_metrics)})" if fp_metrics else ""))

    results = {
        "method": quant.method,
        "w_bits": quant.weight.bits,
        "a_bits": None,
        "granularity": quant.weight.granularity,
        "group_size": quant.weight.group_size if quant.weight.granularity == "group" else None,
        "symmetric": quant.weight.symmetric,
        "grid_init": quant.weight.init,
        "model": model.source.describe(),
        "architecture": model.arch.name,
        "max_steps": settings.max_steps,
        "lr": recon.lr,
        "batch_size": recon.batch_size,
        "calibration_samples": n_calibration,
        "fp": fp_metrics,
        "quantized": q_metrics,
        "blocks": [asdict(b) for b in block_results],
        "outside_blocks_rtn": outside,
        "seconds_total": time.perf_counter() - t0,
        "peak_rss_mb": peak_rss_mb(),
    }
    write_json_atomic(os.path.join(settings.root, "results.json"), results)
    log(f"results written to {os.path.join(settings.root, 'results.json')}")
    return results


def _fmt(metrics: dict[str, float]) -> str:
    return ", ".join(f"{k}={v:.4f}" for k, v in metrics.items())
