"""One PTQ run, start to finish: load → evaluate FP → capture → blocks → evaluate → results.

The CLI's ``fit`` subcommand calls :func:`run`. Everything a run writes goes
under the trainer's ``default_root_dir``: ``config.yaml`` (saved by the CLI),
``results.json`` and ``tensorboard/``, plus (see :mod:`flexround_pl.export` and
:mod:`flexround_pl.reconstruct.resume`) ``quantized.safetensors`` (the packed
quantized checkpoint), ``export/`` (the plain-FP fake-quant export) and
``resume/`` (per-block state: a re-run of the same command resumes there).

:func:`preflight` checks every input that can be checked before any work and
writes nothing; the CLI calls it before it creates the run directory.
"""

from __future__ import annotations

import copy
import logging
import math
import os
import time
import warnings
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any, Callable, Iterator, Optional

import lightning as L
import torch
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.cli import instantiate_class
from lightning.pytorch.loggers import Logger, TensorBoardLogger

from flexround_pl import progress, report
from flexround_pl.data.base import PTQDataModule
from flexround_pl.evaluate.lm_eval import LmEvalRunner
from flexround_pl.export.checkpoint import (
    quantized_weight_nbytes,
    save_quantized,
)
from flexround_pl.export.formats import ExportContext, ExportFormat, needs_fp16_scales, requested_formats
from flexround_pl.export.run import check_export, export_formats, round_scales
from flexround_pl.models import lazy
from flexround_pl.models.moe import expert_tokens
from flexround_pl.ptq import PTQModel
from flexround_pl.reconstruct.cache import CalibrationCache
from flexround_pl.reconstruct.driver import BlockResult, quantize_blocks, quantize_outside_blocks, round_to_nearest
from flexround_pl.reconstruct.gptq_hessian import unsupported_by_gptq, uses_layer_hessians
from flexround_pl.reconstruct.module import calibrate_model_activations
from flexround_pl.progress import peak_rss_mb
from flexround_pl.rundir import CACHE_DIR, CHECKPOINT_NAME, RESULTS_NAME, TENSORBOARD_DIR
from flexround_pl.utils import check_writable_dir, is_rank_zero, state_dict_nbytes, write_json_atomic

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
# lightning 2.6 on torch >= 2.10 warns at every trainer about its own pytree use: nothing a user can act on
warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")


class _DropBlockStopLine(logging.Filter):
    """Every block's trainer ends at ``max_steps`` by design: Lightning's line saying so is noise."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "`Trainer.fit` stopped: `max_steps=" not in record.getMessage()


for _handler in logging.getLogger("lightning.pytorch").handlers:
    _handler.addFilter(_DropBlockStopLine())
# torchao (pulled in by the [export] extra's gptqmodel) registers enums the deprecated way at import
logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)


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

    def __init__(self, settings: dict[str, Any], require_max_steps: bool = True) -> None:
        self.settings = dict(settings)
        self.root = os.path.abspath(os.path.expanduser(self.settings.get("default_root_dir") or os.getcwd()))
        self.max_steps = int(self.settings.get("max_steps") if self.settings.get("max_steps") is not None else -1)
        if self.max_steps < 0 and require_max_steps:
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
                self._logger = TensorBoardLogger(self.root, name=TENSORBOARD_DIR, version="")
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

    def eval_trainer(self, callbacks: tuple = ()) -> L.Trainer:
        keep = ("accelerator", "devices", "num_nodes", "precision", "strategy", "enable_progress_bar",
                "limit_val_batches", "limit_test_batches", "default_root_dir", "plugins")
        kw = {k: v for k, v in self.settings.items() if k in keep and v is not None}
        kw.update(logger=False, enable_checkpointing=False, enable_model_summary=False, callbacks=list(callbacks))
        with quiet_lightning():
            trainer = L.Trainer(**kw)
            if trainer.world_size > 1:
                # Data-parallel runs evaluate on one device per rank, every sample once: the
                # DistributedSampler of a DDP evaluation would pad the eval set with duplicates.
                # Every rank computes the same metrics (the driver is deterministic on every rank).
                local = int(os.environ.get("LOCAL_RANK", trainer.local_rank))
                kw.update(strategy="auto", num_nodes=1, devices=1 if trainer.accelerator.__class__.__name__ ==
                          "CPUAccelerator" else [local])
                trainer = L.Trainer(**kw)
            return trainer


class _PhaseClock:
    """Wall and process-CPU seconds between successive ``lap(name)`` calls."""

    def __init__(self) -> None:
        self.laps: dict[str, dict[str, float]] = {}
        self._wall, self._cpu = time.perf_counter(), time.process_time()

    def lap(self, name: str) -> None:
        wall, cpu = time.perf_counter(), time.process_time()
        self.laps[name] = {"seconds": wall - self._wall, "cpu_seconds": cpu - self._cpu}
        self._wall, self._cpu = wall, cpu


def evaluate(
    model: PTQModel, datamodule: PTQDataModule, settings: TrainerSettings, stage: str = "validate",
    reference: bool = False, label: Optional[str] = None,
) -> dict[str, float]:
    """Metrics of ``model`` on the data module's ``validate`` (eval split) or ``test`` loader.

    ``reference=True`` marks the FP pass: its predictions are recorded, and a
    later pass on the same loader adds ``fp_agreement`` (and ``fp_kl`` for a
    classifier) to its metrics.
    """
    label = label or ("FP" if reference else "quantized")
    trainer = settings.eval_trainer([progress.EvalProgress(f"{label} evaluation")])
    for measure in model.fidelity:
        measure.start(record=reference)
    with quiet_lightning():
        getattr(trainer, stage)(model, datamodule=datamodule, verbose=False)
    return dict(model.last_metrics)


def prepare(model: PTQModel, datamodule: PTQDataModule) -> None:
    """Give the data its tokenizer, set it up, and load the FP network."""
    datamodule.set_tokenizer(model.source.load_tokenizer())
    datamodule.setup("fit")
    model.load(num_labels=datamodule.num_labels)


def check_quantizable(net: torch.nn.Module, arch: Any, quant: Any) -> list[str]:
    """Names of the layers the run will quantize; ``ValueError`` if the settings cannot fit them all.

    Checks, before any training, every layer's shape against the grid
    (``group_size`` must divide each layer's input size) and the ``keep_fp``
    patterns; no quantizer is built.
    """
    import re

    from flexround_pl.quant.surgery import wrapper_class

    patterns = list(arch.keep_fp) + list(quant.keep_fp)
    for p in patterns:
        try:
            re.compile(p)
        except re.error as e:
            raise ValueError(f"model.quant.keep_fp pattern {p!r} is not a valid regular expression: {e}") from None
    keep = [re.compile(p) for p in patterns]
    names, bad = [], []
    for name, module in net.named_modules():
        cls = wrapper_class(module)
        if cls is None or any(p.search(name) for p in keep):
            continue
        names.append(name)
        weight = module.weight
        n_in = weight.shape[0] if cls.transposed else weight[0].numel()
        if quant.weight.granularity == "group" and n_in % quant.weight.group_size:
            bad.append((name, n_in))
        why = unsupported_by_gptq(module) if uses_layer_hessians(quant) else None
        if why is not None:
            raise ValueError(f"{name}: {why}: keep it FP (model.quant.keep_fp) or use a method other than gptq")
    if not names:
        raise ValueError("no layer would be quantized: every Linear / Conv layer matches keep_fp")
    if bad:
        sizes = sorted({n for _, n in bad})
        divisor = 0
        for name in names:
            m = net.get_submodule(name)
            divisor = math.gcd(divisor, m.weight.shape[0] if wrapper_class(m).transposed else m.weight[0].numel())
        raise ValueError(
            f"model.quant.weight.group_size={quant.weight.group_size} does not divide the input size of "
            f"{len(bad)} of {len(names)} layers (e.g. {bad[0][0]}: {bad[0][1]}; sizes {sizes[:5]}); "
            f"use a divisor of {divisor}, granularity 'channel', or keep those layers FP (model.quant.keep_fp)"
        )
    return names


def check_trainer(settings: TrainerSettings) -> None:
    """Build the eval trainer once (device / precision errors up front); refuse settings that measure nothing."""
    with accelerator_errors(settings.settings.get("accelerator")):
        trainer = settings.eval_trainer()
    limit = settings.settings.get("limit_val_batches")
    if limit is not None and float(limit) == 0:
        raise ValueError(
            "trainer.limit_val_batches 0 evaluates nothing: the FP and quantized metrics would be empty; "
            "use a positive number of batches, a fraction such as 0.25, or remove it (all batches)"
        )
    precision = str(settings.settings.get("precision") or "")
    if precision.startswith("16") and trainer.strategy.root_device.type == "cpu":
        # CPU float16 autocast: slow, few kernels, and fp16 overflows are what DivergenceError reports
        raise ValueError(
            f"trainer.precision {precision} on CPU: float16 is a GPU format; use --trainer.precision bf16-mixed "
            "(or 32-true) on CPU"
        )


@contextmanager
def accelerator_errors(accelerator: Any) -> Iterator[None]:
    """A missing accelerator, or its package, while building a trainer: one ``ValueError`` with the fix."""
    try:
        yield
    except ModuleNotFoundError as e:  # Lightning's accelerators import their backend (tpu: torch_xla)
        raise ValueError(
            f"trainer.accelerator {accelerator!r} needs a package that is not installed ({e}); "
            "install it, or use --trainer.accelerator cpu (or auto)"
        ) from None
    except MisconfigurationException as e:
        if "backend found" not in str(e) and "not available" not in str(e):
            raise
        raise ValueError(
            f"trainer.accelerator {accelerator!r} is not available on this machine ({' '.join(str(e).split())}); "
            "use --trainer.accelerator cpu, or auto to take whatever is there"
        ) from None


def preflight(
    model: PTQModel, datamodule: PTQDataModule, settings: TrainerSettings, lm_eval: Optional[LmEvalRunner] = None,
    export: Any = None,
) -> None:
    """Check the inputs of a run up front (``ValueError`` with one clear message); writes nothing.

    Loads the FP model and the data (kept for :func:`run`), builds the eval
    trainer (device / precision errors), checks every quantizable layer's
    shape, that every ``export`` format can hold the scheme, and fetches one calibration
    batch; resolves the lm-eval tasks.
    """
    check_writable_dir(settings.root, "trainer.default_root_dir")
    recon = model.reconstruction
    if recon.cache != "memory" and recon.cache_dir:
        check_writable_dir(recon.cache_dir, "model.reconstruction.cache_dir")
    model.source.check()
    check_trainer(settings)
    prepare(model, datamodule)
    assert model.net is not None and model.arch is not None
    datamodule.check_model(model.net)
    names = check_quantizable(model.net, model.arch, model.quant)
    check_export(model.net, model.arch, model.quant, names, requested_formats(export))
    if next(iter(datamodule.calibration_dataloader()), None) is None:
        raise ValueError("the calibration data is empty: set a positive number of calibration samples")
    datamodule.val_dataloader()
    if lm_eval is not None:
        lm_eval.check(model.net, lazy=bool(getattr(model.source, "lazy", False)))


def run(
    model: PTQModel,
    datamodule: PTQDataModule,
    settings: TrainerSettings,
    log: Callable[[str], None] = print,
    state: Optional[Any] = None,
    export: Any = True,
    config: Optional[dict[str, Any]] = None,
    lm_eval: Optional[LmEvalRunner] = None,
) -> dict[str, Any]:
    """Quantize ``model`` on ``datamodule``'s calibration data; write and return the results.

    ``state``: a :class:`~flexround_pl.reconstruct.resume.RunState` (resume /
    save finished blocks); ``export``: the ``--export`` settings (formats
    written into ``DIR/export/<format>/``; ``True``: the default, ``False``: none);
    ``config``: the run's configuration fingerprint, stored in the checkpoint;
    ``lm_eval``: lm-eval tasks run on the FP and the quantized model.
    """
    t0, cpu0 = time.perf_counter(), time.process_time()
    if not is_rank_zero():  # DDP: every rank runs the same driver; only rank 0 reports (and writes)
        log = _silent
    if model.net is None:  # the CLI has already loaded everything in preflight()
        model.source.check()
        prepare(model, datamodule)
    assert model.net is not None and model.arch is not None
    fp_nbytes = state_dict_nbytes(model.net)  # from shapes and dtypes: reads nothing of a lazy model
    summary = _run_summary(model, settings)
    log(
        f"flexround_pl: {summary['model']} ({summary['architecture']}), method={summary['method']}, "
        f"W{summary['w_bits']} {summary['granularity']}, {settings.max_steps} steps/block"
    )

    phases = _PhaseClock()  # wall / CPU seconds per phase, for results.json
    fp_metrics: dict[str, float] = {}
    if model.evaluate_fp:
        fp_metrics = evaluate(model, datamodule, settings, reference=True)
        log(f"FP metrics: {_fmt(fp_metrics)}")
    if model.evaluate_fp:
        _score_lm_eval(lm_eval, "fp", model, settings, log)
    fp_texts = _generations(model, datamodule, log)  # causal LMs: greedy text before quantizing, for the report
    phases.lap("fp_eval")
    rtn_metrics = _rtn_baseline(model, datamodule, settings, log) if model.evaluate_rtn and fp_metrics else None
    if rtn_metrics is not None:
        phases.lap("rtn_eval")

    quantized = _quantize(model, datamodule, settings, log, state)
    formats = requested_formats(export)
    if needs_fp16_scales(formats):  # the run computes exactly what the fp16-scale files hold
        round_scales(model.net)
    phases.lap("quantize")  # calibration capture + every block + outside-block RTN

    q_metrics = evaluate(model, datamodule, settings)
    log(f"quantized metrics: {_fmt(q_metrics)}" + (f"  (FP {_fmt(fp_metrics)})" if fp_metrics else ""))
    _score_lm_eval(lm_eval, "quantized", model, settings, log)
    q_texts = _generations(model, datamodule, log) if fp_texts else None
    phases.lap("quantized_eval")

    ckpt_nbytes = _write_checkpoint(model, settings, summary, q_metrics, config, log, fp_nbytes)
    exports = _write_export(model, settings, formats, log)

    results = {
        **summary,
        "calibration_samples": quantized.calibration_samples,
        "fp": fp_metrics,
        **({"rtn": rtn_metrics} if rtn_metrics is not None else {}),
        "quantized": q_metrics,
        "blocks": [asdict(b) for b in quantized.blocks],
        "outside_blocks_rtn": quantized.outside_blocks_rtn,
        **({"expert_tokens": quantized.expert_tokens} if quantized.expert_tokens else {}),
        "size_mb": {"quantized": ckpt_nbytes / 2**20, "fp": fp_nbytes / 2**20,
                    **{f"export/{k}": v["size_mb"] for k, v in exports.items()}},
        "export": exports,
        "quantized_weights_mb": dict(zip(("packed", "fp"), (n / 2**20 for n in quantized_weight_nbytes(model.net)))),
        "resumed_blocks": quantized.resumed_blocks,
        "seconds_total": time.perf_counter() - t0,
        "cpu_seconds_total": time.process_time() - cpu0,  # all threads; wall time on a busy machine misleads
        "phases": phases.laps,  # {"fp_eval" | "quantize" | "quantized_eval": {"seconds", "cpu_seconds"}}
        "peak_rss_mb": peak_rss_mb(),
    }
    if lm_eval is not None and lm_eval.enabled:
        results["lm_eval"] = lm_eval.report()
    if fp_texts and q_texts:
        results["generations"] = report.pair_samples(fp_texts, q_texts)
    log(report.summary(results))
    path = os.path.join(settings.root, RESULTS_NAME)
    if is_rank_zero():
        write_json_atomic(path, results)
    log(f"results written to {path}")
    return results


def _rtn_baseline(
    model: PTQModel, datamodule: PTQDataModule, settings: TrainerSettings, log: Callable[[str], None]
) -> Optional[dict[str, float]]:
    """Metrics of the round-to-nearest model on the run's grid: the baseline a learned method must beat.

    A copy of the FP network gets RTN (``quant.as_rtn()``: same bits,
    granularity, grid ``init``, FP and 8-bit layers) everywhere the run
    quantizes, is evaluated on the same loader (so it also gets
    ``fp_agreement``), and is dropped. Costs one evaluation pass and one extra
    copy of the weights; skipped (with a line saying why) where that copy or
    the comparison would not hold.
    """
    assert model.net is not None and model.arch is not None
    quant = model.quant
    if quant.method == "rtn":
        return None  # the run is the baseline
    why = None
    if quant.activation.bits is not None:
        why = "activations are quantized (their ranges are calibrated per block)"
    elif quant.weight.init == "output":
        why = "the grid init is output-aware (weight.init output needs each block's calibration inputs)"
    elif lazy.is_lazy(model.net):
        why = "the model is loaded lazily (a second copy would not fit in memory)"
    if why is not None:
        log(f"RTN baseline not evaluated: {why}; python -m flexround_pl compare --methods rtn {quant.method} runs it")
        return None
    fp_net = model.net
    with progress.heartbeat("RTN baseline: rounding a copy of the model to nearest"):
        rtn_net = copy.deepcopy(fp_net)
        round_to_nearest(rtn_net, model.arch, quant)
    model.net = rtn_net
    try:
        metrics = evaluate(model, datamodule, settings, label="RTN baseline")
    finally:
        model.net = fp_net
        del rtn_net
    log(f"RTN baseline metrics (same grid): {_fmt(metrics)}")
    return metrics


def _score_lm_eval(
    lm_eval: Optional[LmEvalRunner], which: str, model: PTQModel, settings: TrainerSettings, log: Callable[[str], None]
) -> None:
    """The lm-eval tasks on the network as it is now: ``"fp"`` before quantization, ``"quantized"`` after."""
    if lm_eval is not None and lm_eval.enabled:
        lm_eval.score(which, model.net, model.source.load_tokenizer(), settings.eval_trainer().strategy.root_device, log)


def _run_summary(model: PTQModel, settings: TrainerSettings) -> dict[str, Any]:
    """What was run: the head of ``results.json`` and of the quantized checkpoint's metadata."""
    assert model.net is not None and model.arch is not None
    quant, recon = model.quant, model.reconstruction
    return {
        "method": quant.method,
        "w_bits": quant.weight.bits,
        "a_bits": quant.activation.bits,
        "a_granularity": quant.activation.granularity if quant.activation.bits is not None else None,
        "qdrop_p": recon.effective_qdrop_p(quant.activation.bits is not None),
        "granularity": quant.weight.granularity,
        "group_size": quant.weight.group_size if quant.weight.granularity == "group" else None,
        "symmetric": quant.weight.symmetric,
        "grid_init": quant.weight.init,
        "model": model.source.describe(),
        "architecture": model.arch.name,
        "model_class": type(model.net).__name__,
        "max_steps": settings.max_steps,
        "lr": recon.lr,
        "batch_size": recon.batch_size,
    }


@dataclass
class _Quantized:
    """What :func:`_quantize` did, for ``results.json``."""

    blocks: list[BlockResult]
    outside_blocks_rtn: list[str]
    calibration_samples: int
    resumed_blocks: int
    expert_tokens: dict[str, list[int]]  # MoE: calibration tokens each expert saw (empty for dense models)


def _quantize(
    model: PTQModel, datamodule: PTQDataModule, settings: TrainerSettings, log: Callable[[str], None],
    state: Optional[Any],
) -> _Quantized:
    """Capture every block's calibration call, reconstruct every block, RTN the rest, calibrate activations."""
    assert model.net is not None and model.arch is not None
    quant, recon = model.quant, model.reconstruction
    device = settings.eval_trainer().strategy.root_device
    blocks = model.arch.blocks(model.net)
    cache = CalibrationCache.capture(
        lambda inputs: model(inputs), [b for _, b in blocks],
        progress.track(datamodule.calibration_dataloader(), "calibration capture"),
        cache=recon.cache, cache_dir=_cache_dir(recon.cache_dir, settings.root),
    )
    where = f"on disk ({cache.storage.directory})" if cache.storage.on_disk else "in memory"
    log(f"calibration cache: {len(cache)} samples, {cache.nbytes() / 2**20:.1f} MiB {where}, {len(blocks)} blocks")

    torch.manual_seed(recon.seed)
    resumed = len(state.blocks) if state is not None else 0
    block_results = quantize_blocks(
        model.net, model.arch, cache, quant, recon, settings.block_trainer, settings.max_steps, device, log,
        state=state,
    )
    outside = quantize_outside_blocks(model.net, model.arch, quant)
    if outside:
        log(f"round-to-nearest outside blocks: {', '.join(outside)}")
    routed = expert_tokens(model.net)  # MoE: calibration tokens each expert saw (empty for dense models)
    for name, counts in routed.items():
        log(f"{name}: calibration tokens per expert {counts}")
    calibrate_model_activations(
        model.net, model, datamodule.calibration_dataloader, quant.activation.init_samples
    )  # activation quantizers outside blocks (e.g. a CNN's last layer input)
    n_calibration = len(cache)
    del cache
    return _Quantized(block_results, outside, n_calibration, resumed, routed)


def _write_checkpoint(
    model: PTQModel, settings: TrainerSettings, summary: dict[str, Any], q_metrics: dict[str, float],
    config: Optional[dict[str, Any]], log: Callable[[str], None], fp_nbytes: int,
) -> int:
    """Save ``quantized.safetensors`` (rank 0); its metadata is the run summary + metrics + fingerprint."""
    assert model.net is not None
    ckpt = os.path.join(settings.root, CHECKPOINT_NAME)
    meta = {**summary, "quantized_metrics": q_metrics, "config": config or {}}
    ckpt_nbytes = save_quantized(model.net, ckpt, meta) if is_rank_zero() else 0
    log(f"quantized checkpoint: {ckpt} ({ckpt_nbytes / 2**20:.2f} MiB, FP {fp_nbytes / 2**20:.2f} MiB)")
    return ckpt_nbytes


def _write_export(
    model: PTQModel, settings: TrainerSettings, formats: list[ExportFormat], log: Callable[[str], None]
) -> dict[str, Any]:
    """Every requested export format, from the checkpoint just saved (rank 0); ``{format: dir, size, exactness}``."""
    if not formats or not is_rank_zero():
        return {}
    context = ExportContext(model.net, model.arch, model.source.load_tokenizer(), model.source, log)
    return export_formats(os.path.join(settings.root, CHECKPOINT_NAME), settings.root, formats, context, verify=False)


def _cache_dir(configured: Optional[str], root: str) -> str:
    """The disk cache directory: ``reconstruction.cache_dir`` or ``<run dir>/cache`` (file names are unique per process)."""
    return os.path.abspath(os.path.expanduser(configured)) if configured else os.path.join(root, CACHE_DIR)


def _generations(model: PTQModel, datamodule: PTQDataModule, log: Callable[[str], None]) -> Optional[list[str]]:
    """Greedy continuations of :data:`report.PROMPTS` by a causal LM; ``None`` for other models."""
    if not report.can_generate(model.net) or datamodule.tokenizer is None:
        return None
    if lazy.is_lazy(model.net):
        log("generations skipped: a lazy model would re-read every block per generated token")
        return None
    device = next(model.net.parameters()).device
    with progress.heartbeat(f"greedy generation ({len(report.PROMPTS)} prompts)"):
        try:
            return report.greedy_samples(model.net, datamodule.tokenizer, device)
        except Exception as e:  # a sample for the eye: never lose a finished quantization over it
            log(f"generations skipped: {type(e).__name__}: {' '.join(str(e).split())[:200]}")
            return None


def _silent(message: str) -> None:
    return None


def _fmt(metrics: dict[str, float]) -> str:
    return ", ".join(f"{k}={v:.4f}" for k, v in metrics.items())
