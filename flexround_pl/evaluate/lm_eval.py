"""Standard LLM evaluation through lm-eval-harness, on the FP and the quantized model in memory.

How users of AutoRound and llm-compressor evaluate a quantized LLM:
``lm_eval.simple_evaluate(model=HFLM(pretrained=model), tasks=[...])``
(EleutherAI lm-evaluation-harness, https://github.com/EleutherAI/lm-evaluation-harness,
PyPI ``lm-eval``). ``fit`` runs the tasks of ``--eval.lm_eval.tasks '[...]'``
once on the FP model (before it is quantized in place) and once on the
quantized model, and stores both tables in ``results.json`` under ``lm_eval``;
``validate`` / ``test`` do the same for a saved checkpoint.

Task names are lm-eval's own (``piqa``, ``arc_easy``, ``hellaswag`` ... need
the Hugging Face hub), custom YAML tasks under ``eval.lm_eval.include_path``
(``dataset_path: json`` over local files runs offline), or the offline tasks
shipped here (:mod:`flexround_pl.evaluate.wiki_tasks`: ``wiki_topic``,
``wiki_ppl``, group ``wiki_summaries``).

Perplexity conventions differ: lm-eval's rolling-loglikelihood tasks
(``wikitext``, ``wiki_ppl``) report *word* perplexity (total NLL over whole
documents divided by the number of words) and byte perplexity. The papers'
WikiText-2 number is *token* perplexity over consecutive 2048-token windows,
what :class:`~flexround_pl.data.language_modeling.LanguageModelingData` reports
as ``perplexity``. The two are not comparable.
"""

from __future__ import annotations

import difflib
import importlib.util
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
from torch import nn

from flexround_pl.evaluate.generation import is_causal_lm

INSTALL_HINT = "pip install 'flexround_pl[eval]' (or pip install lm-eval)"


@dataclass
class LmEvalConfig:
    """The ``eval.lm_eval`` section: which lm-eval tasks to run and how.

    ``tasks``: task or group names (empty: no lm-eval run).
    ``include_path``: a directory of custom task YAMLs (lm-eval's ``--include_path``).
    ``num_fewshot``: few-shot examples (``None``: each task's default, usually 0).
    ``limit``: at most this many documents per task (a fraction < 1: that share), for quick runs.
    ``batch_size``: requests per forward pass.
    ``max_length``: context length of the model's windows (``None``: the model's maximum).
    ``bootstrap_iters``: lm-eval's bootstrap resamples for stderr of metrics without a closed form.
    ``data_dir``: where the shipped offline tasks' YAML and JSON are generated
    (default ``<cache root>/lm_eval_tasks``, see ``FLEXROUND_PL_CACHE``).
    """

    tasks: list[str] = field(default_factory=list)
    include_path: Optional[str] = None
    num_fewshot: Optional[int] = None
    limit: Optional[float] = None
    batch_size: int = 8
    max_length: Optional[int] = None
    bootstrap_iters: int = 100000
    data_dir: Optional[str] = None

    def __post_init__(self) -> None:
        if isinstance(self.tasks, str):
            self.tasks = [self.tasks]
        self.tasks = list(self.tasks)
        if any(not isinstance(t, str) or not t.strip() for t in self.tasks):
            raise ValueError(f"eval.lm_eval.tasks must be task names, got {self.tasks!r}")
        if len(set(self.tasks)) != len(self.tasks):
            raise ValueError(f"eval.lm_eval.tasks lists a task twice: {self.tasks!r}")
        if self.batch_size < 1:
            raise ValueError(f"eval.lm_eval.batch_size must be >= 1, got {self.batch_size}")
        if self.num_fewshot is not None and self.num_fewshot < 0:
            raise ValueError(f"eval.lm_eval.num_fewshot must be >= 0, got {self.num_fewshot}")
        if self.limit is not None and not self.limit > 0:
            raise ValueError(f"eval.lm_eval.limit must be positive (documents, or a fraction < 1), got {self.limit}")
        if self.limit is not None and self.limit >= 1:
            if self.limit != int(self.limit):
                raise ValueError(f"eval.lm_eval.limit >= 1 is a number of documents, got {self.limit}")
            self.limit = int(self.limit)
        if self.max_length is not None and self.max_length < 2:
            raise ValueError(f"eval.lm_eval.max_length must be >= 2, got {self.max_length}")
        if self.bootstrap_iters < 0:
            raise ValueError(f"eval.lm_eval.bootstrap_iters must be >= 0, got {self.bootstrap_iters}")
        if self.include_path is not None and not os.path.isdir(os.path.expanduser(self.include_path)):
            raise ValueError(
                f"eval.lm_eval.include_path {self.include_path!r} is not a directory; point it at a folder of "
                "lm-eval task YAML files"
            )


@dataclass
class EvalConfig:
    """The top-level ``eval`` section: evaluations beyond the data module's metrics."""

    lm_eval: LmEvalConfig = field(default_factory=LmEvalConfig)


def _require_lm_eval() -> None:
    if importlib.util.find_spec("lm_eval") is None:
        raise ValueError(f"eval.lm_eval.tasks needs the package 'lm-eval', which is not installed; {INSTALL_HINT}")


class LmEvalRunner:
    """Resolves the tasks once (:meth:`check`, before any work), then scores models (:meth:`run`)."""

    def __init__(self, config: LmEvalConfig) -> None:
        self.config = config
        self.task_manager: Any = None
        self.scores: dict[str, dict[str, dict[str, float]]] = {}  # "fp" | "quantized" -> task -> metric -> value

    @property
    def enabled(self) -> bool:
        return bool(self.config.tasks)

    def check(self, net: nn.Module, lazy: bool = False) -> None:
        """``ValueError`` naming the problem: lm-eval missing, not a causal LM, unknown tasks, unloadable data."""
        if not self.enabled:
            return
        _require_lm_eval()
        if not is_causal_lm(net):
            raise ValueError(
                f"eval.lm_eval.tasks scores causal language models; {type(net).__name__} is not one "
                "(remove eval.lm_eval.tasks for this model)"
            )
        if lazy:
            raise ValueError(
                "eval.lm_eval.tasks needs the whole model in memory; it does not run with "
                "model.source.init_args.lazy true (set lazy: false or drop eval.lm_eval.tasks)"
            )
        self.task_manager = self._task_manager()
        from lm_eval.tasks import get_task_dict

        try:
            with _quiet_lm_eval():
                get_task_dict(list(self.config.tasks), self.task_manager)  # builds each task: loads its data
        except Exception as e:  # dataset / YAML errors come in many types
            first = (str(e).strip().splitlines() or [""])[0]
            raise ValueError(
                f"eval.lm_eval.tasks {self.config.tasks}: could not build the tasks ({type(e).__name__}: {first}); "
                "hub tasks need the Hugging Face hub, offline use the shipped tasks or local YAML tasks"
            ) from None

    def _task_manager(self) -> Any:
        from lm_eval.tasks import TaskManager

        from flexround_pl.evaluate import wiki_tasks

        tasks = list(self.config.tasks)
        include = []
        if any(t in wiki_tasks.TASK_NAMES for t in tasks):
            include.append(wiki_tasks.write_tasks(self.config.data_dir))
        if self.config.include_path:
            include.append(os.path.abspath(os.path.expanduser(self.config.include_path)))
        with _quiet_lm_eval():
            # Indexing lm-eval's own ~15k task YAMLs takes seconds: only when a task needs them.
            manager = TaskManager(include_path=include, include_defaults=False) if include else None
            if manager is None or any(t not in manager.all_tasks for t in tasks):
                manager = TaskManager(include_path=include or None)
        unknown = [t for t in tasks if t not in manager.all_tasks]
        if unknown:
            hints = []
            for t in unknown:
                close = difflib.get_close_matches(t, manager.all_tasks, n=3)
                hints.append(f"{t!r}" + (f" (did you mean {', '.join(close)}?)" if close else ""))
            raise ValueError(
                f"eval.lm_eval.tasks: unknown lm-eval task(s) {', '.join(hints)}; shipped offline tasks: "
                f"{', '.join(wiki_tasks.TASK_NAMES)}; custom YAML tasks: set eval.lm_eval.include_path"
            )
        return manager

    @torch.no_grad()
    def run(self, net: nn.Module, tokenizer: Any, device: torch.device) -> dict:
        """``{task: {metric: value}}`` of lm-eval's tasks on ``net`` (moved to ``device`` for the run)."""
        from lm_eval import simple_evaluate
        from lm_eval.models.huggingface import HFLM

        if self.task_manager is None:
            self.check(net)
        cfg = self.config
        home = next(net.parameters()).device
        was_training = net.training
        net.to(device).eval()
        try:
            kw: dict[str, Any] = {"max_length": cfg.max_length} if cfg.max_length else {}
            with _quiet_lm_eval():
                lm = HFLM(pretrained=net, tokenizer=tokenizer, batch_size=cfg.batch_size, **kw)
            out = simple_evaluate(
                model=lm, tasks=list(cfg.tasks), num_fewshot=cfg.num_fewshot, limit=cfg.limit,
                task_manager=self.task_manager, log_samples=False, bootstrap_iters=cfg.bootstrap_iters,
            )
        finally:
            net.to(home).train(was_training)
        return _metrics(out["results"])

    def score(self, which: str, net: nn.Module, tokenizer: Any, device: torch.device,
              log: Callable[[str], None] = print) -> None:
        """Run the tasks on ``net`` and keep the scores as ``which`` (``"fp"`` or ``"quantized"``)."""
        log(f"lm-eval on the {'FP' if which == 'fp' else 'quantized'} model: {', '.join(self.config.tasks)}")
        self.scores[which] = self.run(net, tokenizer, device)
        for task, row in self.scores[which].items():
            shown = ", ".join(f"{k}={v:.4f}" for k, v in row.items() if "_stderr" not in k)
            log(f"  {task}: {shown}")
        if which == "quantized":
            log("lm-eval (FP vs quantized):\n" + self.report()["table"])

    def report(self) -> dict[str, Any]:
        """The ``lm_eval`` entry of ``results.json``: settings, both score sets and their table."""
        from lm_eval import __version__

        cfg = self.config
        return {
            "tasks": list(cfg.tasks), "num_fewshot": cfg.num_fewshot, "limit": cfg.limit,
            "lm_eval_version": __version__,
            "fp": self.scores.get("fp", {}), "quantized": self.scores.get("quantized", {}),
            "table": side_by_side(self.scores.get("fp", {}), self.scores.get("quantized", {})),
        }


def _metrics(results: dict[str, dict[str, Any]]) -> dict[str, dict[str, float]]:
    """lm-eval's ``results`` reduced to numbers: ``"acc,none"`` -> ``acc``, other filters keep ``acc,filter``."""
    table: dict[str, dict[str, float]] = {}
    for task, values in results.items():
        row = {}
        for key, value in values.items():
            if "," not in key or isinstance(value, str) or value is None:
                continue  # name, alias, sample_len, "N/A" stderr
            metric, _, filt = key.partition(",")
            row[metric if filt == "none" else key] = float(value)
        table[task] = row
    return table


def side_by_side(fp: dict[str, dict[str, float]], quantized: dict[str, dict[str, float]]) -> str:
    """A Markdown table ``task | metric | FP | quantized`` (stderr columns folded into ``±``)."""
    lines = ["| task | metric | FP | quantized |", "|---|---|---|---|"]

    def cell(row: dict[str, float], metric: str) -> str:
        if metric not in row:
            return "—"
        err = row.get(metric.replace(",", "_stderr,", 1) if "," in metric else f"{metric}_stderr")
        return f"{row[metric]:.4f}" + (f" ± {err:.4f}" if err is not None else "")

    for task in sorted(set(fp) | set(quantized)):
        metrics = [m for m in {**fp.get(task, {}), **quantized.get(task, {})} if "_stderr" not in m]
        for metric in sorted(metrics):
            lines.append(f"| {task} | {metric} | {cell(fp.get(task, {}), metric)} | "
                         f"{cell(quantized.get(task, {}), metric)} |")
    return "\n".join(lines)


class _quiet_lm_eval:
    """lm-eval logs every task's default metric settings at INFO/WARNING: keep warnings, drop the chatter."""

    def __enter__(self) -> None:
        import logging

        self._logger = logging.getLogger("lm_eval")
        self._level = self._logger.level
        self._logger.setLevel(logging.ERROR)

    def __exit__(self, *exc: Any) -> None:
        self._logger.setLevel(self._level)
