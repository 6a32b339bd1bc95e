"""The command line: ``python -m flexround_pl fit --config configs/demo.yaml``.

A ``LightningCLI`` whose ``fit`` subcommand runs the block-by-block PTQ
pipeline instead of ``Trainer.fit`` (overriding ``fit`` on the CLI class is
how LightningCLI lets a subcommand be replaced). Everything else — YAML
configs, ``--print_config``, dotted overrides such as
``--trainer.max_steps 500`` or ``--model.quant.weight.bits 3`` — is stock
LightningCLI / jsonargparse.

Subcommands and what they leave in the run directory (``trainer.default_root_dir``):

* ``fit``: checks every input first (config keys and values, paths, hub
  access, data, device, each quantizable layer's shape against the grid) and
  on any problem prints one ``flexround_pl: error: ...`` line, exits 2 and
  writes nothing. Then ``config.yaml``, ``resume/`` (one file per finished
  block), ``quantized.safetensors`` (packed codes + FP remainder + metadata),
  ``export/<format>/`` (``--export.formats``, default ``[fake_quant]``, the plain-FP
  dequantized model; ``--export false`` writes none) and
  ``results.json`` (``size_mb``: checkpoint vs FP state dict). Re-running the
  same command on the same run directory resumes after the last finished
  block (also after ``SIGKILL``); a changed configuration is refused (exit 2)
  unless ``--fresh true``, which discards the old state and outputs.
  Every resumed block file is checked against this configuration too. One
  ``fit`` at a time per run directory: a second one stops with the holder's PID
  (:mod:`flexround_pl.rundir`).
  A diverging block (NaN / inf loss) stops the run with exit 1, naming the
  block, the iteration and the likely cause; finished blocks stay saved.
* ``export``: write the ``--export.formats`` of a finished run from its
  ``quantized.safetensors`` into ``DIR/export/<format>/`` without quantizing
  again (a format that cannot hold the run's scheme: one line, exit 2, nothing written).
* ``compare``: ``fit`` for each ``--methods`` x ``--bits`` (finished runs
  reused), then ``compare.md``, ``compare.json`` and PNG plots
  (:mod:`flexround_pl.compare`).
* ``validate`` / ``test``: load ``quantized.safetensors`` of the run directory
  (or ``--ckpt_path FILE``) into the config's model and print FP vs quantized
  metrics on the data module's validation / test loader; the quantized metric
  is the one ``fit`` reported (same config and device).
  ``--eval.lm_eval.tasks '[...]'`` (any subcommand) also runs lm-eval-harness
  tasks on both models (:mod:`flexround_pl.evaluate.lm_eval`).
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from typing import Any, Optional, Union

import lightning as L
from jsonargparse import ArgumentError
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from flexround_pl import pipeline, progress, rundir
from flexround_pl.config_files import check_config_files
from flexround_pl.data.base import PTQDataModule
from flexround_pl.evaluate.lm_eval import EvalConfig, LmEvalConfig, LmEvalRunner
from flexround_pl.export.checkpoint import (
    check_compatible,
    load_quantized_model,
    read_metadata,
)
from flexround_pl.export.codes import QuantizedCodes, is_transformers_model
from flexround_pl.export.formats import ExportContext, ExportSettings, check_formats, requested_formats
from flexround_pl.export.run import export_formats, record_in_results
from flexround_pl.ptq import PTQModel
from flexround_pl.reconstruct.driver import DivergenceError
from flexround_pl.reconstruct.resume import RunState, fingerprint
from flexround_pl.rundir import CHECKPOINT_NAME, CONFIG_NAME
from flexround_pl.utils import DiskFullError, disk_full_errors, is_rank_zero


SUBCOMMANDS = {
    "fit": "Quantize the model block by block and write the run directory (checkpoint, export, results.json).",
    "validate": "Evaluate a run's quantized checkpoint (and the FP model) on the validation / eval split.",
    "test": "Evaluate a run's quantized checkpoint (and the FP model) on the test loader.",
    "export": "Write serving formats (--export.formats) from a finished run's quantized.safetensors, no re-quantizing.",
}


class _Trainer(L.Trainer):
    """The CLI's trainer class: Lightning's, plus the signature of the ``export`` subcommand.

    LightningCLI builds each subcommand's parser from the trainer method of that
    name; :meth:`FlexRoundCLI.export` is what runs.
    """

    def export(self, model: Any = None, datamodule: Any = None, ckpt_path: Optional[str] = None) -> None:
        """Write serving formats (--export.formats) from a finished run's quantized.safetensors."""
        raise RuntimeError("run it as: python -m flexround_pl export --config <run dir>/config.yaml")


class FlexRoundCLI(LightningCLI):
    def __init__(self, args: Optional[list[str]] = None, run: bool = True) -> None:
        super().__init__(
            model_class=PTQModel,
            datamodule_class=PTQDataModule,
            trainer_class=_Trainer,
            subclass_mode_data=True,
            save_config_callback=None,  # saved once by fit(), not once per block trainer
            auto_configure_optimizers=False,
            seed_everything_default=0,
            parser_kwargs={"exit_on_error": False, **{
                name: {"exit_on_error": False, "description": text} for name, text in SUBCOMMANDS.items()
            }},
            args=args,
            run=run,
        )

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        # no ``predict``: a PTQ run has nothing to predict with beyond its evaluation
        known = {**LightningCLI.subcommands(), "export": {"model", "datamodule"}}
        return {k: v for k, v in known.items() if k in SUBCOMMANDS}

    def _parse_ckpt_path(self) -> None:
        # LightningCLI would torch.load() --ckpt_path to read Lightning hyper-parameters; ours is a
        # quantized safetensors checkpoint, read (and checked) by validate / test themselves.
        return

    def _set_seed(self) -> None:
        with pipeline.quiet_lightning():  # no "Seed set to 0" line before every error message
            super()._set_seed()

    def instantiate_trainer(self, **kwargs: Any) -> Any:
        # The CLI's own trainer only carries settings; block trainers are built per block.
        config = self.config[self.subcommand] if self.subcommand else self.config  # run=False: no subcommand
        accelerator = config["trainer"].get("accelerator")
        with pipeline.quiet_lightning(), pipeline.accelerator_errors(accelerator):
            return super().instantiate_trainer(**kwargs)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        # On every subcommand, not only fit: validate / test read the run's config.yaml, which has them.
        parser.add_argument(
            "--fresh", type=bool, default=False,
            help="fit: discard the resume state and outputs of the run directory and start over "
            "(default: resume automatically when the run directory holds a state of the same configuration)",
        )
        parser.add_argument(
            "--export", type=Union[bool, ExportSettings], default=ExportSettings(),
            help="fit / export: serving formats written into <run dir>/export/<format>/, e.g. "
            "--export.formats '[fake_quant, gptq, awq, compressed_tensors, gguf]' (default: [fake_quant]); "
            "--export false writes none",
        )
        parser.add_argument(
            "--eval", type=EvalConfig, default=EvalConfig(),
            help="evaluations beyond the data's metrics, on the FP and the quantized model "
            "(eval.lm_eval.tasks: lm-eval-harness tasks, results in results.json under lm_eval)",
        )

    def _trainer_settings(self) -> dict[str, Any]:
        return self.config[self.subcommand]["trainer"].as_dict()

    def _lm_eval(self) -> LmEvalRunner:
        section = self.config[self.subcommand].get("eval")
        lm_eval = section.get("lm_eval") if section is not None else None
        return LmEvalRunner(LmEvalConfig(**lm_eval.as_dict()) if lm_eval is not None else LmEvalConfig())

    def fit(self, model: PTQModel, datamodule: PTQDataModule, ckpt_path: Optional[str] = None, **_: Any) -> None:
        config = self.config[self.subcommand]
        if ckpt_path:
            raise ValueError(
                "fit does not take --ckpt_path: re-running the same command on the same run directory resumes "
                "automatically (--ckpt_path is for validate / test)"
            )
        settings = pipeline.TrainerSettings(self._trainer_settings())
        lm_eval = self._lm_eval()
        pipeline.preflight(model, datamodule, settings, lm_eval, export=config.get("export", True))  # writes nothing
        config_fingerprint = fingerprint(config.as_dict())
        # one fit per run directory, from reading its resume state to the last output (rank 0 holds it)
        with rundir.locked(settings.root) if is_rank_zero() else contextlib.nullcontext(), \
                disk_full_errors(settings.root):
            state = RunState.open(settings.root, config_fingerprint, fresh=bool(config.get("fresh")))  # refuses another config
            if is_rank_zero():
                rundir.remove_temp_files(settings.root)  # left by killed writes; the lock says none is live
            saved = config.clone()
            saved.fresh = False  # config.yaml re-runs (resumes) this run; it does not wipe it again
            if is_rank_zero():
                self._parser(self.subcommand).save(saved, os.path.join(settings.root, CONFIG_NAME), overwrite=True)
            state.begin()
            if state.resuming:
                print(f"flexround_pl: resuming {settings.root}: {len(state.blocks)} block(s) already finished")
            self.results = pipeline.run(
                model, datamodule, settings, state=state, export=config.get("export", True),
                config=config_fingerprint, lm_eval=lm_eval,
            )

    def validate(self, model: PTQModel, datamodule: PTQDataModule, ckpt_path: Optional[str] = None, **_: Any) -> None:
        self.results = self._evaluate_checkpoint("validate", model, datamodule, ckpt_path)

    def test(self, model: PTQModel, datamodule: PTQDataModule, ckpt_path: Optional[str] = None, **_: Any) -> None:
        self.results = self._evaluate_checkpoint("test", model, datamodule, ckpt_path)

    def export(self, model: PTQModel, datamodule: PTQDataModule, ckpt_path: Optional[str] = None, **_: Any) -> None:
        """Every requested format from the run's checkpoint (checked first: one line, exit 2, nothing written)."""
        settings = pipeline.TrainerSettings(self._trainer_settings(), require_max_steps=False)
        path = self._checkpoint_path(settings, ckpt_path)
        formats = requested_formats(self.config[self.subcommand].get("export", True))
        if not formats:
            raise ValueError("no export format requested: pass e.g. --export.formats '[gptq, gguf]'")
        compare = {k: v for k, v in fingerprint(self.config[self.subcommand].as_dict()).items()
                   if k.startswith("model.quant")}
        check_compatible(read_metadata(path), compare, path)
        model.source.check()
        pipeline.prepare(model, datamodule)
        codes = QuantizedCodes(path)  # checksum checked
        check_formats(formats, codes.plan(model.net, model.arch))
        if not is_transformers_model(model.net):  # CNNs: fake_quant writes from the loaded quantized model
            load_quantized_model(model, path, compare)
        context = ExportContext(model.net, model.arch, model.source.load_tokenizer(), model.source, print)
        written = export_formats(path, settings.root, formats, context)
        if os.path.dirname(path) == settings.root:  # this run's checkpoint: its results.json lists the sizes
            record_in_results(settings.root, written)
        self.results = {"checkpoint": path, "export": written}

    def _checkpoint_path(self, settings: Any, ckpt_path: Optional[str]) -> str:
        path = os.path.abspath(os.path.expanduser(ckpt_path or os.path.join(settings.root, CHECKPOINT_NAME)))
        if not os.path.isfile(path):
            raise ValueError(
                f"no quantized checkpoint at {path}: run fit with this config first, or pass --ckpt_path FILE"
            )
        return path

    def _evaluate_checkpoint(
        self, stage: str, model: PTQModel, datamodule: PTQDataModule, ckpt_path: Optional[str]
    ) -> dict[str, Any]:
        """FP and quantized metrics of a saved checkpoint, with this config's model source and data."""
        settings = pipeline.TrainerSettings(self._trainer_settings(), require_max_steps=False)
        path = self._checkpoint_path(settings, ckpt_path)
        # every weight comes from the checkpoint; the config's source gives the skeleton and tokenizer
        config_fingerprint = fingerprint(self.config[self.subcommand].as_dict())
        compare = {k: v for k, v in config_fingerprint.items() if k.startswith("model.quant")}
        saved = read_metadata(path)
        check_compatible(saved, compare, path)  # before loading anything
        if saved.get("model") not in (None, model.source.describe()):
            print(f"note: {path} was made from {saved['model']}; the config's model is {model.source.describe()}")
        model.source.check()
        device = settings.eval_trainer().strategy.root_device
        pipeline.prepare(model, datamodule)
        lm_eval = self._lm_eval()
        lm_eval.check(model.net, lazy=bool(getattr(model.source, "lazy", False)))
        fp_metrics: dict[str, float] = {}
        if model.evaluate_fp:
            fp_metrics = pipeline.evaluate(model, datamodule, settings, stage, reference=True)
            if lm_eval.enabled:
                lm_eval.score("fp", model.net, model.source.load_tokenizer(), device)
        meta = load_quantized_model(model, path, compare)
        q_metrics = pipeline.evaluate(model, datamodule, settings, stage)
        if lm_eval.enabled:
            lm_eval.score("quantized", model.net, model.source.load_tokenizer(), device)
        if fp_metrics:
            print(f"FP {stage} metrics: {pipeline._fmt(fp_metrics)}")
        print(f"quantized {stage} metrics: {pipeline._fmt(q_metrics)}  ({path})")
        results = {"checkpoint": path, "fp": fp_metrics, "quantized": q_metrics, "metadata": meta}
        if lm_eval.enabled:
            results["lm_eval"] = lm_eval.report()
        return results


def main(args: Optional[list[str]] = None) -> int:
    argv = sys.argv[1:] if args is None else list(args)
    if argv and argv[0] == "compare":  # several fit runs and one report: flexround_pl/compare.py
        from flexround_pl.compare import main as compare

        return compare(argv[1:])
    # Lightning's own SIGTERM handler only notes the signal; ours stops the run (signals: main thread only)
    on_main = threading.current_thread() is threading.main_thread()
    previous_sigterm = signal.signal(signal.SIGTERM, _raise_terminated) if on_main else None
    try:
        check_config_files(sys.argv[1:] if args is None else args)
        FlexRoundCLI(args=args)
    except ArgumentError as err:
        print(f"flexround_pl: error: {_one_line(err)}", file=sys.stderr)
        return 2
    except (ValueError, FileNotFoundError, MisconfigurationException) as err:
        print(f"flexround_pl: error: {_one_line(err)}", file=sys.stderr)
        return 2
    except (DivergenceError, DiskFullError) as err:
        print(f"flexround_pl: error: {_one_line(err)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as stop:
        return _interrupted(stop)
    except SystemExit as exit_:
        if isinstance(exit_.__context__, KeyboardInterrupt):  # Lightning's Ctrl-C inside a trainer: sys.exit(1)
            signal.signal(signal.SIGINT, signal.default_int_handler)  # Lightning left SIGINT ignored
            return _interrupted(exit_.__context__)
        raise
    finally:
        progress.stop_all()  # a step's heartbeat thread left running by an error
        if on_main:
            signal.signal(signal.SIGTERM, previous_sigterm)
    return 0


class Terminated(KeyboardInterrupt):
    """SIGTERM (``kill``, a scheduler's preemption): stop like Ctrl-C, keep the finished blocks.

    A KeyboardInterrupt subclass so that Lightning's graceful-shutdown path and
    ours treat it as an interruption. Without it Lightning's SIGTERM handler
    only sets a flag, and the run went on, or exited 0 without results.
    """


def _raise_terminated(signum: int, frame: Any) -> None:
    raise Terminated()


def _interrupted(stop: BaseException) -> int:
    what, code = ("terminated (SIGTERM)", 143) if isinstance(stop, Terminated) else ("interrupted", 130)
    print(f"flexround_pl: {what}: the finished blocks are saved in the run directory (resume/); "
          "re-run the same command to resume", file=sys.stderr)
    return code


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    # jsonargparse reports a bad value of a class / Union-typed key as every
    # alternative's failure plus a dump of the whole namespace: keep the real reasons.
    head, sep, rest = text.partition("Does not validate against any of the Union subtypes")
    if not sep or "Errors: - " not in rest:
        return text
    errors, _, given = rest.partition("Errors: - ")[2].partition(" Given value type:")
    reasons = [e.strip() for e in errors.split(" - ") if e.strip() and "NoneType" not in e]
    value = given.partition("Given value: ")[2].strip()
    message = head.strip() + " " + "; ".join(reasons or ["invalid value"])
    if value and len(value) <= 60 and all(r.startswith("Expected") for r in reasons):
        message += f" (got {value})"
    return message.strip()
