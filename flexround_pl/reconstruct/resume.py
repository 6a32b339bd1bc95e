"""Per-block run state: a killed or failed ``fit`` resumes at the block it was in.

After every block the driver saves, under ``<run dir>/resume/``:

* ``block_NNN.safetensors``: the hardened block's state dict (packed codes,
  scales, zero points, activation step sizes, the block's FP tensors), in the
  quantized-checkpoint format of :mod:`flexround_pl.export.checkpoint`;
* ``state.json``: the configuration fingerprint and, per finished block, its
  name, file and :class:`~flexround_pl.reconstruct.driver.BlockResult`.

Each block file carries the fingerprint too, and a resume checks every one
against the run's before any work: ``state.json`` alone cannot tell that
another run with another configuration overwrote a block file (two runs in
one directory; the run-directory lock of :mod:`flexround_pl.rundir` stops that).

Both are written atomically (temporary file + ``os.replace``), block file
first, so a ``SIGKILL`` at any moment leaves either the previous consistent
state or the new one; a block killed midway is simply redone.

Resuming is automatic: ``fit`` with a run directory holding a state of the
*same* configuration skips the finished blocks; ``--fresh true`` discards the
state (and the run's old outputs) and starts over. A state written with a
different configuration is refused (:class:`ResumeError`, naming the changed
entries). The fingerprint covers what changes the codes: ``seed_everything``,
the whole ``model`` section except ``evaluate_fp`` / ``evaluate_rtn``, the whole ``data`` section
except ``num_workers``, and the trainer settings listed in
:data:`RESULT_TRAINER_KEYS` (``max_steps``, ``precision``, the device ...);
display and logging settings (progress bar, loggers, ``default_root_dir``)
do not count.

The calibration cache is not stored: on resume it is captured again and pushed
through the finished blocks exactly as the first run did (the FP teacher fills
the targets, the reloaded hardened block moves the quantized inputs forward),
two forward passes per finished block and bit-identical tensors on the same
device. Each block also re-seeds every RNG with ``reconstruction.seed + i`` at
its start, so a resumed block trains exactly as in an uninterrupted run: on CPU
the final codes are bitwise identical. On GPU, forward passes and training are
reproducible only as far as the kernels are (cuBLAS / cuDNN may pick
non-deterministic algorithms; set ``trainer.deterministic: true`` for
deterministic ones, at some speed cost), so a resumed GPU run may differ from an
uninterrupted one in a few codes.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Any, Optional

from torch import nn

from flexround_pl.export.checkpoint import (
    CheckpointError,
    read_metadata,
    read_quantized,
    save_quantized,
)
from flexround_pl.rundir import CHECKPOINT_NAME, EXPORT_DIR, RESULTS_NAME, STATE_DIR, STATE_FILE, TENSORBOARD_DIR
from flexround_pl.utils import disk_full_errors, is_rank_zero, write_json_atomic

STATE_FORMAT = 1

#: Trainer settings that change the codes a block ends with.
RESULT_TRAINER_KEYS = (
    "max_steps", "precision", "accelerator", "devices", "strategy", "num_nodes",
    "accumulate_grad_batches", "gradient_clip_val", "gradient_clip_algorithm",
    "deterministic", "limit_train_batches",
)
#: Entries of the model / data sections that do not change the codes.
IGNORED_KEYS = (
    "model.evaluate_fp",
    "model.evaluate_rtn",
    "data.init_args.num_workers",
    "data.num_workers",
    # Where the calibration cache lives changes nothing in the results (tests/test_disk_cache.py).
    "model.reconstruction.cache",
    "model.reconstruction.cache_dir",
    # Lazy and eager loading give identical codes and metrics (tests/test_lazy_loading.py).
    "model.source.init_args.lazy",
)


class ResumeError(ValueError):
    """The run directory holds a state that cannot be resumed with this configuration (CLI: exit 2)."""


def _plain(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


def flatten(tree: Any, prefix: str, out: dict[str, Any]) -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"prefix.a.b": 1}`` (lists stay values)."""
    if isinstance(tree, dict) and tree:
        for k, v in tree.items():
            flatten(v, f"{prefix}.{k}" if prefix else str(k), out)
    else:
        out[prefix] = _plain(tree)
    return out


def fingerprint(config: dict[str, Any]) -> dict[str, Any]:
    """The flattened configuration entries that change a run's codes (see the module docstring)."""
    out: dict[str, Any] = {"seed_everything": _plain(config.get("seed_everything"))}
    flatten(config.get("model") or {}, "model", out)
    flatten(config.get("data") or {}, "data", out)
    trainer = config.get("trainer") or {}
    for key in RESULT_TRAINER_KEYS:
        out[f"trainer.{key}"] = _plain(trainer.get(key))
    for key in IGNORED_KEYS:
        out.pop(key, None)
    return out


def describe_changes(old: dict[str, Any], new: dict[str, Any], limit: int = 4) -> str:
    keys = sorted(k for k in set(old) | set(new) if old.get(k, "<unset>") != new.get(k, "<unset>"))
    parts = [f"{k}: {old.get(k, '<unset>')!r} -> {new.get(k, '<unset>')!r}" for k in keys[:limit]]
    if len(keys) > limit:
        parts.append(f"and {len(keys) - limit} more")
    return "; ".join(parts)


class RunState:
    """The resume state of one run directory.

    Build it with :meth:`open` (reads only, refuses an incompatible state), call
    :meth:`begin` once the run really starts (``fresh`` discards old state and
    outputs there), then :meth:`finished` / :meth:`load_block` /
    :meth:`save_block` per block.
    """

    def __init__(self, root: str, config: dict[str, Any], fresh: bool = False) -> None:
        self.root = os.path.abspath(root)
        self.dir = os.path.join(self.root, STATE_DIR)
        self.config = config
        self.fresh = fresh
        self.blocks: dict[int, dict[str, Any]] = {}

    @property
    def state_path(self) -> str:
        return os.path.join(self.dir, STATE_FILE)

    @classmethod
    def open(cls, root: str, config: dict[str, Any], fresh: bool = False) -> "RunState":
        """Read the state under ``root`` (if any) and check it was made with ``config``."""
        state = cls(root, config, fresh)
        if fresh or not os.path.exists(state.state_path):
            return state
        try:
            with open(state.state_path) as f:
                saved = json.load(f)
            saved_config, blocks = saved["config"], saved["blocks"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ResumeError(
                f"cannot read the resume state {state.state_path} ({type(e).__name__}: {e}); "
                "pass --fresh true to discard it and start over"
            ) from None
        if saved_config != config:
            raise ResumeError(
                f"{state.root} holds a run with another configuration ({describe_changes(saved_config, config)}); "
                "re-run with the same configuration to resume it, pass --fresh true to discard it, "
                "or choose another trainer.default_root_dir"
            )
        state.blocks = {int(k): v for k, v in blocks.items()}
        for index in sorted(state.blocks):
            state._check_block_file(index)
        return state

    def _check_block_file(self, index: int) -> None:
        """Refuse a block file that another configuration wrote (e.g. two runs raced in this directory).

        Reads the file's header only; the file's own fingerprint, not only
        ``state.json``'s, must be this run's.
        """
        entry = self.blocks[index]
        path = os.path.join(self.dir, entry["file"])
        try:
            meta = read_metadata(path)
        except CheckpointError as e:
            raise ResumeError(f"cannot resume block {index}: {e}; pass --fresh true to start over") from None
        if meta.get("index") != index or meta.get("block") != entry.get("name"):
            raise ResumeError(
                f"{path} holds block {meta.get('index')} ({meta.get('block')!r}), not block {index} "
                f"({entry.get('name')!r}); pass --fresh true to start over"
            )
        if meta.get("config") != self.config:
            changes = describe_changes(meta["config"], self.config) if isinstance(meta.get("config"), dict) else (
                "the file has no configuration fingerprint")
            raise ResumeError(
                f"{path} was written by a run with another configuration ({changes}): two runs shared this run "
                "directory, or the file was copied in; pass --fresh true to discard the resume state and start over"
            )

    @property
    def resuming(self) -> bool:
        return bool(self.blocks)

    def begin(self) -> None:
        """Start the run: with ``fresh``, discard the old state and outputs of this run directory."""
        if not self.fresh or not is_rank_zero():
            return
        shutil.rmtree(self.dir, ignore_errors=True)
        shutil.rmtree(os.path.join(self.root, EXPORT_DIR), ignore_errors=True)
        shutil.rmtree(os.path.join(self.root, TENSORBOARD_DIR), ignore_errors=True)  # old runs' curves
        for name in (CHECKPOINT_NAME, RESULTS_NAME):
            path = os.path.join(self.root, name)
            if os.path.exists(path):
                os.remove(path)
        self.blocks = {}

    # -- blocks ------------------------------------------------------------------

    def finished(self, index: int, name: str) -> Optional[dict[str, Any]]:
        """The saved result of block ``index`` if it is finished, else ``None``."""
        entry = self.blocks.get(index)
        if entry is None:
            return None
        if entry.get("name") != name:
            raise ResumeError(
                f"the resume state's block {index} is {entry.get('name')!r} but the model's is {name!r}; "
                "pass --fresh true to start over"
            )
        return dict(entry["result"])

    def load_block(self, index: int, block: nn.Module) -> None:
        """Load finished block ``index`` into ``block`` (its layers swapped, not hardened: loading hardens them)."""
        path = os.path.join(self.dir, self.blocks[index]["file"])
        try:
            _, state = read_quantized(path)
            missing, unexpected = block.load_state_dict(state, strict=False)
        except (CheckpointError, RuntimeError) as e:
            raise ResumeError(
                f"cannot resume block {index} from {path}: {' '.join(str(e).split())}; pass --fresh true to start over"
            ) from None
        if missing or unexpected:
            raise ResumeError(
                f"{path} does not fit block {index} (missing {sorted(missing)[:3]}, unexpected "
                f"{sorted(unexpected)[:3]}); pass --fresh true to start over"
            )

    def save_block(self, index: int, name: str, block: nn.Module, result: dict[str, Any]) -> None:
        """Save hardened block ``index`` and record it as finished (atomic; rank 0 only)."""
        self.blocks[index] = {"name": name, "file": f"block_{index:03d}.safetensors", "result": _plain(result)}
        if not is_rank_zero():
            return
        with disk_full_errors(self.dir):
            self._write_block(index, name, block)

    def _write_block(self, index: int, name: str, block: nn.Module) -> None:
        os.makedirs(self.dir, exist_ok=True)
        save_quantized(
            block, os.path.join(self.dir, self.blocks[index]["file"]), {"block": name, "index": index, "config": self.config}
        )
        write_json_atomic(
            self.state_path,
            {
                "format": STATE_FORMAT,
                "config": self.config,
                "blocks": {str(k): v for k, v in sorted(self.blocks.items())},
            },
        )


__all__ = ["RESULT_TRAINER_KEYS", "ResumeError", "RunState", "describe_changes", "fingerprint", "flatten"]
