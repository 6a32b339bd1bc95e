"""Progress of every long step: a ``tqdm`` bar on a terminal, periodic plain lines in a log file.

A run is never silent for more than a few seconds. Each long step (GGUF
conversion, the one-off fine-tuning of a demo model, calibration capture,
each block's reconstruction, evaluation) reports through one of three tools:

* :class:`Progress`: a counted step (``update(n, loss=...)``). On a TTY it is
  a ``tqdm`` bar with rate and ETA; otherwise it prints a line when it starts,
  then one every :func:`interval` seconds, then one when it ends:
  ``[desc] 40/120 steps (33%), 2.1 steps/s, elapsed 19s, ETA 38s, loss 0.412``;
* :func:`track`: the same around an iterable;
* :func:`heartbeat` / :class:`Heartbeat`: a step with no count (one library
  call that takes a minute, a grid search): ``[desc] still running, 25s
  elapsed`` every interval, from a thread.

``FLEXROUND_PL_PROGRESS`` = ``auto`` (default: bar on a TTY, lines otherwise),
``bar``, ``lines`` or ``off``; ``FLEXROUND_PL_PROGRESS_INTERVAL`` = seconds
between plain lines (default 5). Lightning hooks: :class:`BlockProgress`
(one block's reconstruction, with the current loss) and :class:`EvalProgress`.
Output goes to stderr (tqdm's default), so stdout keeps only results.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
import weakref
from typing import Any, Iterable, Iterator, Optional, TextIO

import lightning as L

MODES = ("auto", "bar", "lines", "off")


def mode(stream: Optional[TextIO] = None) -> str:
    """``bar``, ``lines`` or ``off`` for ``stream`` (stderr by default)."""
    chosen = os.environ.get("FLEXROUND_PL_PROGRESS", "auto").strip().lower() or "auto"
    if chosen not in MODES:
        raise ValueError(f"FLEXROUND_PL_PROGRESS must be one of {', '.join(MODES)}, got {chosen!r}")
    if chosen != "auto":
        return chosen
    stream = stream or sys.stderr
    return "bar" if getattr(stream, "isatty", lambda: False)() else "lines"


def interval() -> float:
    """Seconds between two plain progress lines (``FLEXROUND_PL_PROGRESS_INTERVAL``, default 5)."""
    return float(os.environ.get("FLEXROUND_PL_PROGRESS_INTERVAL", "5"))


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MB (Linux reports KiB)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m{seconds:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


def _plural(unit: str) -> str:
    return unit + ("es" if unit.endswith(("ch", "sh", "s", "x")) else "s")


def _number(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


class Progress:
    """A counted long step; see the module docstring for what it prints.

    Args:
        desc: what runs (``demo fine-tuning``, ``block 3/6 bert.encoder.layer.2``).
        total: number of units, ``None`` if unknown (no ETA then).
        unit: name of one unit (``step``, ``batch``).
    """

    def __init__(self, desc: str, total: Optional[int] = None, unit: str = "it",
                 stream: Optional[TextIO] = None) -> None:
        self.desc, self.total, self.unit = desc, total, unit
        self.stream = stream or sys.stderr
        self.mode = mode(self.stream)
        self.n = 0
        self.postfix: dict[str, Any] = {}
        self.start = self._last_line = time.perf_counter()
        self._bar = None
        if self.mode == "bar":
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total, desc=desc, unit=unit, file=self.stream, dynamic_ncols=True, leave=False)
        elif self.mode == "lines":
            self._line()

    def update(self, n: int = 1, **postfix: Any) -> None:
        self.n += n
        if postfix:
            self.postfix.update(postfix)
        if self._bar is not None:
            if postfix:
                self._bar.set_postfix({k: _number(v) for k, v in self.postfix.items()}, refresh=False)
            self._bar.update(n)
        elif self.mode == "lines" and time.perf_counter() - self._last_line >= interval():
            self._line()

    def close(self, done: bool = True) -> None:
        """End the bar; a plain last line says ``(done)``, or ``(stopped)`` when ``done`` is false."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        elif self.mode == "lines" and self.n:
            print(self.line() + (" (done)" if done else " (stopped)"), file=self.stream, flush=True)
        self.mode = "closed"

    def line(self) -> str:
        """The plain progress line for the current state."""
        elapsed = time.perf_counter() - self.start
        count = f"{self.n}/{self.total}" if self.total else f"{self.n}"
        parts = [f"[{self.desc}] {count} {_plural(self.unit)}"]
        if self.total:
            parts[0] += f" ({100 * self.n / self.total:.0f}%)"
        rate = self.n / elapsed if elapsed > 0 else 0.0
        parts.append(f"{rate:.3g} {_plural(self.unit)}/s" if rate >= 1 or not self.n else f"{1 / rate:.3g} s/{self.unit}")
        parts.append(f"elapsed {_duration(elapsed)}")
        if self.total and self.n and self.n < self.total:
            parts.append(f"ETA {_duration((self.total - self.n) / rate)}")
        parts += [f"{k} {_number(v)}" for k, v in self.postfix.items()]
        return ", ".join(parts)

    def _line(self) -> None:
        print(self.line(), file=self.stream, flush=True)
        self._last_line = time.perf_counter()

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def track(items: Iterable, desc: str, total: Optional[int] = None, unit: str = "batch") -> Iterator:
    """Yield from ``items`` while reporting progress (``total`` defaults to ``len(items)``)."""
    if total is None:
        try:
            total = len(items)  # type: ignore[arg-type]
        except TypeError:
            total = None
    with Progress(desc, total, unit) as bar:
        for item in items:
            yield item
            bar.update()


class Heartbeat:
    """A line every interval while a step with no count runs (from a thread), until :meth:`stop`.

    ``announce``: also print when it starts and stops; otherwise it speaks only
    once the step has run for an interval (a step that is usually quick).
    """

    def __init__(self, desc: str, announce: bool = True, stream: Optional[TextIO] = None) -> None:
        self.desc, self.announce = desc, announce
        self.stream = stream or sys.stderr
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._spoke = False

    def _print(self, text: str) -> None:
        print(f"[{self.desc}] {text}", file=self.stream, flush=True)
        self._spoke = True

    def start(self) -> "Heartbeat":
        if mode(self.stream) == "off":
            return self
        _RUNNING.add(self)
        self.start_time = time.perf_counter()
        if self.announce:
            self._print("started")

        def beat() -> None:
            while not self._stop.wait(interval()):
                self._print(f"still running, {_duration(time.perf_counter() - self.start_time)} elapsed")

        self._thread = threading.Thread(target=beat, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        _RUNNING.discard(self)
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join()
        self._thread = None
        if self._spoke:
            self._print(f"done in {_duration(time.perf_counter() - self.start_time)}")


_RUNNING: "weakref.WeakSet[Heartbeat]" = weakref.WeakSet()


def stop_all() -> None:
    """Stop every running :class:`Heartbeat` (the CLI calls it when a command ends, also by an error)."""
    for beat in list(_RUNNING):
        beat.stop()


@contextlib.contextmanager
def heartbeat(desc: str, announce: bool = True, stream: Optional[TextIO] = None) -> Iterator[None]:
    """:class:`Heartbeat` around a block of code."""
    beat = Heartbeat(desc, announce, stream).start()
    try:
        yield
    finally:
        beat.stop()


class BlockProgress(L.Callback):
    """One block's reconstruction: steps with rate, ETA and the current training loss.

    ``stops``: a :class:`Heartbeat` to stop when training starts.
    """

    def __init__(self, desc: str, total_steps: int, stops: Optional[Heartbeat] = None) -> None:
        self.desc, self.total_steps, self.stops = desc, total_steps, stops
        self.bar: Optional[Progress] = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.stops is not None:  # the heartbeat of what ran before training (the block's preparation)
            self.stops.stop()
        if trainer.is_global_zero:
            self.bar = Progress(self.desc, self.total_steps, unit="step")

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self.bar is None:
            return
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        self.bar.update(1, **({"loss": float(loss.detach().float())} if loss is not None else {}))

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if self.bar is not None:
            self.bar.close(done=False)
            self.bar = None


class EvalProgress(L.Callback):
    """Batches of one evaluation pass (validate or test) with rate and ETA."""

    def __init__(self, desc: str) -> None:
        self.desc = desc
        self.bar: Optional[Progress] = None

    def _start(self, trainer: L.Trainer, totals: Any) -> None:
        if trainer.is_global_zero:
            total = int(sum(totals)) if totals else None
            self.bar = Progress(self.desc, total if total and total < float("inf") else None, unit="batch")

    def _step(self) -> None:
        if self.bar is not None:
            self.bar.update()

    def _end(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start(trainer, trainer.num_val_batches)

    def on_test_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start(trainer, trainer.num_test_batches)

    def on_validation_batch_end(self, *args: Any, **kwargs: Any) -> None:
        self._step()

    def on_test_batch_end(self, *args: Any, **kwargs: Any) -> None:
        self._step()

    def on_validation_end(self, *args: Any) -> None:
        self._end()

    def on_test_end(self, *args: Any) -> None:
        self._end()
