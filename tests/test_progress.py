"""Progress of long steps: plain lines with rate and ETA off a TTY, a bar on one, a first line at once."""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
import time

import pytest

from flexround_pl import progress

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class _Stream(io.StringIO):
    def __init__(self, tty: bool) -> None:
        super().__init__()
        self.tty = tty

    def isatty(self) -> bool:
        return self.tty


def test_plain_lines_report_count_rate_eta_and_loss(monkeypatch):
    monkeypatch.setenv("FLEXROUND_PL_PROGRESS_INTERVAL", "0")
    stream = _Stream(tty=False)
    bar = progress.Progress("block 1/2 layer.0", total=4, unit="step", stream=stream)
    time.sleep(0.2)
    bar.update(2, loss=0.5)
    bar.close()
    lines = stream.getvalue().splitlines()
    assert lines[0].startswith("[block 1/2 layer.0] 0/4 steps (0%)")  # printed at once, before any step
    m = re.fullmatch(r"\[block 1/2 layer\.0\] 2/4 steps \(50%\), ([\d.]+) steps/s, elapsed (\d+)s, ETA (\d+)s, "
                     r"loss 0\.5", lines[1])
    assert m, lines
    # 2 steps in >= 0.2 s: at most 10 steps/s; the 2 remaining steps take as long again as the first 2
    assert 0 < float(m.group(1)) <= 10.0 and abs(int(m.group(3)) - int(m.group(2))) <= 1
    assert lines[-1].endswith("(done)")
    interrupted = progress.Progress("block 2/2 layer.1", total=4, unit="step", stream=stream)
    interrupted.update(1)
    interrupted.close(done=False)  # an exception ended the step: not "(done)"
    assert stream.getvalue().splitlines()[-1].startswith("[block 2/2 layer.1] 1/4 steps (25%)")
    assert stream.getvalue().splitlines()[-1].endswith("(stopped)")


def test_lines_are_throttled_to_the_interval(monkeypatch):
    monkeypatch.setenv("FLEXROUND_PL_PROGRESS_INTERVAL", "3600")
    stream = _Stream(tty=False)
    with progress.Progress("eval", total=100, unit="batch", stream=stream) as bar:
        for _ in range(100):
            bar.update()
    assert len(stream.getvalue().splitlines()) == 2  # the start line and the final one


def test_a_tty_gets_a_bar_and_off_prints_nothing(monkeypatch):
    tty = _Stream(tty=True)
    with progress.Progress("demo fine-tuning", total=3, unit="step", stream=tty) as bar:
        bar.update(3, loss=0.25)
    out = tty.getvalue()
    assert "\rdemo fine-tuning:" in out and "0/3 [" in out and "[demo fine-tuning]" not in out  # tqdm's bar
    monkeypatch.setenv("FLEXROUND_PL_PROGRESS", "off")
    quiet = _Stream(tty=False)
    with progress.Progress("x", total=3, stream=quiet) as bar:
        bar.update(3)
    assert quiet.getvalue() == ""
    monkeypatch.setenv("FLEXROUND_PL_PROGRESS", "sometimes")
    with pytest.raises(ValueError, match="FLEXROUND_PL_PROGRESS must be one of"):
        progress.mode()


def test_heartbeat_beats_while_a_call_runs(monkeypatch):
    monkeypatch.setenv("FLEXROUND_PL_PROGRESS_INTERVAL", "0.05")
    stream = _Stream(tty=False)
    with progress.heartbeat("gguf: dequantizing", stream=stream):
        time.sleep(0.4)
    lines = stream.getvalue().splitlines()
    assert lines[0] == "[gguf: dequantizing] started" and lines[-1].startswith("[gguf: dequantizing] done in")
    assert sum("still running" in line for line in lines) >= 3


def test_fit_in_a_log_file_speaks_within_5_seconds_and_reports_every_long_step(tmp_path, tiny_bert_dir, write_config):
    """``python -m flexround_pl fit > log``: a first line at once, then progress lines of each step."""
    cfg = write_config(tmp_path, tiny_bert_dir)
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "FLEXROUND_PL_PROGRESS_INTERVAL": "1", "OMP_NUM_THREADS": "1"}
    env.pop("FLEXROUND_PL_PROGRESS", None)
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "flexround_pl", "fit", "--config", cfg, "--trainer.max_steps", "8"],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    first = proc.stdout.readline()
    first_after = time.perf_counter() - start
    rest = proc.stdout.read()
    assert proc.wait(timeout=600) == 0, rest[-3000:]
    assert first.startswith("flexround_pl fit: starting") and first_after < 5.0, (first, first_after)
    for step in ("calibration capture", "FP evaluation", "quantized evaluation"):
        assert re.search(rf"^\[{step}\] \d+/\d+ batches .*\(done\)$", rest, re.M), step
    # each block's steps with rate and loss, and the per-block summary line with its peak RSS
    assert re.search(r"^\[block 1/2 bert\.encoder\.layer\.0\] \d+/8 steps .* (steps/s|s/step), elapsed", rest, re.M)
    assert re.search(r"^block 2/2 bert\.encoder\.layer\.1: 6 layers, loss \S+ -> \S+ \([\d.]+ s, peak RSS \d+ MB\)$",
                     rest, re.M)
    assert "\r" not in rest  # no bar redraws in a log file


def test_a_quiet_heartbeat_speaks_only_when_slow_and_stop_all_ends_a_forgotten_one(monkeypatch):
    monkeypatch.setenv("FLEXROUND_PL_PROGRESS_INTERVAL", "0.05")
    quick = _Stream(tty=False)
    progress.Heartbeat("block 1/2 x: preparing", announce=False, stream=quick).start().stop()
    assert quick.getvalue() == ""
    slow = _Stream(tty=False)
    beat = progress.Heartbeat("block 2/2 y: preparing", announce=False, stream=slow).start()
    time.sleep(0.2)
    progress.stop_all()  # as the CLI does when an error ends the command mid-step
    lines = slow.getvalue().splitlines()
    assert lines[0].startswith("[block 2/2 y: preparing] still running") and lines[-1].startswith(
        "[block 2/2 y: preparing] done in")
    time.sleep(0.15)
    assert slow.getvalue().splitlines() == lines and beat._thread is None
