"""Per-block resume: SIGKILL mid-run then re-run, refusal of a changed config, NaN guard."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml

from flexround_pl.cli import main
from flexround_pl.export.checkpoint import read_quantized
from flexround_pl.reconstruct.driver import divergence_message
from flexround_pl.reconstruct.resume import describe_changes, fingerprint

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 20

SLOW_STEPS = '''
import time
import lightning as L


class SlowSteps(L.Callback):
    """Sleeps after every step so that a test can kill the run in the middle of a block."""

    def __init__(self, seconds: float = 0.05) -> None:
        self.seconds = seconds

    def on_train_batch_end(self, *args, **kwargs) -> None:
        time.sleep(self.seconds)
'''


def _config(write_config, tmp_path, model_dir: str, **trainer) -> str:
    path = write_config(tmp_path, model_dir)
    config = yaml.safe_load(open(path))
    config["trainer"].update(max_steps=STEPS, **trainer)
    with open(path, "w") as f:
        yaml.safe_dump(config, f)
    return path


def _codes(run) -> dict[str, torch.Tensor]:
    return read_quantized(str(run / "quantized.safetensors"))[1]


def _assert_bitwise_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert set(a) == set(b)
    for key in a:
        assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_bert_dir, write_config):
    """An uninterrupted run (in process): config path and run directory."""
    tmp = tmp_path_factory.mktemp("reference")
    cfg = _config(write_config, tmp, tiny_bert_dir)
    assert main(["fit", "--config", cfg]) == 0
    return cfg, tmp / "run"


def _env(extra_path: str) -> dict[str, str]:
    threads = str(torch.get_num_threads())  # the same intra-op threads as the in-process reference
    env = dict(os.environ, OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads, HF_HUB_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false", PYTHONWARNINGS="ignore")
    env["PYTHONPATH"] = os.pathsep.join([REPO, extra_path] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    return env


def _fit_in_block_1(tmp_path, model_dir: str, write_config):
    """``python -m flexround_pl fit`` in a subprocess (steps slowed down), returned once it is inside block 1:
    ``(process, command, run dir, resume/state.json)``; its stdout / stderr go to ``first.log`` / ``first.err``."""
    (tmp_path / "slow_steps.py").write_text(SLOW_STEPS)
    cfg = _config(write_config, tmp_path, model_dir, callbacks=[{"class_path": "slow_steps.SlowSteps",
                                                    "init_args": {"seconds": 0.05}}])
    run = tmp_path / "run"
    state_file = run / "resume" / "state.json"
    cmd = [sys.executable, "-m", "flexround_pl", "fit", "--config", cfg]
    with open(tmp_path / "first.log", "w") as out, open(tmp_path / "first.err", "w") as err:
        proc = subprocess.Popen(cmd, cwd=REPO, env=_env(str(tmp_path)), stdout=out, stderr=err)
    deadline = time.monotonic() + 300
    while not state_file.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            proc.wait()
            pytest.fail("the first block never finished:\n" + (tmp_path / "first.err").read_text()[-3000:])
        time.sleep(0.02)
    time.sleep(0.3)  # now inside block 1, which sleeps >= 1 s in training alone
    return proc, cmd, run, state_file


def test_sigkill_mid_block_then_rerun_resumes_and_gives_bitwise_identical_codes(
    tmp_path, tiny_bert_dir, reference, monkeypatch, capfd, write_config
):
    """``python -m flexround_pl fit`` killed in block 1, then the same command again (in process, to save
    an interpreter start): block 0 is reloaded, block 1 redone, the codes equal an uninterrupted run's."""
    proc, cmd, run, state_file = _fit_in_block_1(tmp_path, tiny_bert_dir, write_config)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    state = json.loads(state_file.read_text())
    assert list(state["blocks"]) == ["0"], "the kill did not land in the middle of block 1"
    assert not (run / "quantized.safetensors").exists() and not (run / "results.json").exists()

    monkeypatch.syspath_prepend(str(tmp_path))
    capfd.readouterr()
    assert main(cmd[3:]) == 0
    out = capfd.readouterr().out
    assert "resuming" in out and "block 1/2 bert.encoder.layer.0: finished by an earlier run, reloaded" in out
    results = json.loads((run / "results.json").read_text())
    ref_results = json.loads((reference[1] / "results.json").read_text())
    assert results["resumed_blocks"] == 1
    assert results["quantized"] == ref_results["quantized"]
    assert [b["loss_end"] for b in results["blocks"]] == [b["loss_end"] for b in ref_results["blocks"]]
    _assert_bitwise_equal(_codes(run), _codes(reference[1]))


def test_sigterm_mid_block_stops_with_143_and_the_resume_line_then_the_run_resumes(
    tmp_path, tiny_bert_dir, reference, monkeypatch, capfd, write_config
):
    """``kill <pid>`` (a scheduler's preemption) in block 1: Lightning alone would note it and go on."""
    proc, cmd, run, state_file = _fit_in_block_1(tmp_path, tiny_bert_dir, write_config)
    proc.terminate()  # SIGTERM
    proc.wait(timeout=120)
    err = (tmp_path / "first.err").read_text()
    assert proc.returncode == 143, err[-3000:]
    assert "Traceback" not in err and err.strip().splitlines()[-1].startswith(
        "flexround_pl: terminated (SIGTERM): the finished blocks are saved"), err[-3000:]
    assert list(json.loads(state_file.read_text())["blocks"]) == ["0"]
    assert not (run / "results.json").exists()

    monkeypatch.syspath_prepend(str(tmp_path))
    assert main(cmd[3:]) == 0
    assert json.loads((run / "results.json").read_text())["resumed_blocks"] == 1
    _assert_bitwise_equal(_codes(run), _codes(reference[1]))


def test_resume_with_another_config_is_refused_and_fresh_starts_over(tmp_path, reference, capfd):
    cfg, ref_run = reference
    run = tmp_path / "run"
    shutil.copytree(ref_run, run)
    config_before = (run / "config.yaml").read_text()
    results_before = (run / "results.json").read_text()
    capfd.readouterr()

    args = ["fit", "--config", cfg, "--trainer.default_root_dir", str(run)]
    assert main(args + ["--model.quant.weight.bits", "4"]) == 2
    err = capfd.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("flexround_pl: error:") and "another configuration" in err
    assert "model.quant.weight.bits: 3 -> 4" in err and "--fresh true" in err
    assert (run / "config.yaml").read_text() == config_before  # nothing overwritten
    assert (run / "results.json").read_text() == results_before

    assert main(args + ["--trainer.max_steps", "3"]) == 2  # max_steps counts too
    assert f"trainer.max_steps: {STEPS} -> 3" in capfd.readouterr().err

    assert main(args + ["--model.quant.weight.bits", "4", "--trainer.max_steps", "3", "--fresh", "true"]) == 0
    results = json.loads((run / "results.json").read_text())
    assert results["w_bits"] == 4 and results["resumed_blocks"] == 0
    state = json.loads((run / "resume" / "state.json").read_text())
    assert state["config"]["model.quant.weight.bits"] == 4 and sorted(state["blocks"]) == ["0", "1"]
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["model"]["quant"]["weight"]["bits"] == 4 and saved["fresh"] is False  # re-running it resumes


def test_nan_loss_stops_the_block_keeps_finished_blocks_and_resumes(tmp_path, reference, monkeypatch, capfd):
    from flexround_pl.reconstruct.module import BlockReconstruction

    cfg, ref_run = reference
    run = tmp_path / "run"
    args = ["fit", "--config", cfg, "--trainer.default_root_dir", str(run)]
    original = BlockReconstruction.training_step

    def diverging(self, batch, batch_idx):
        loss = original(self, batch, batch_idx)
        return loss * float("nan") if self.tag == "block_01" and self.global_step >= 6 else loss

    monkeypatch.setattr(BlockReconstruction, "training_step", diverging)
    capfd.readouterr()
    assert main(args) == 1
    err = capfd.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("flexround_pl: error: block 2/2 (bert.encoder.layer.1) diverged at iteration 7")
    assert "loss is nan" in err and "Likely cause" in err
    state = json.loads((run / "resume" / "state.json").read_text())
    assert list(state["blocks"]) == ["0"] and (run / "resume" / "block_000.safetensors").exists()
    assert not (run / "quantized.safetensors").exists()

    monkeypatch.setattr(BlockReconstruction, "training_step", original)
    # display settings are not part of the configuration fingerprint
    assert main(args + ["--trainer.log_every_n_steps", "7"]) == 0
    assert json.loads((run / "results.json").read_text())["resumed_blocks"] == 1
    _assert_bitwise_equal(_codes(run), _codes(ref_run))


def test_divergence_message_names_the_likely_cause():
    fp16 = divergence_message(3, 32, "model.layers.3", 120, float("inf"), "16-mixed", 1e-3)
    assert "block 4/32 (model.layers.3) diverged at iteration 120" in fp16 and "bf16-mixed or 32-true" in fp16
    lr = divergence_message(0, 5, "layer1.0", 5, float("nan"), "32-true", 0.5)
    assert "reconstruction.lr=0.5" in lr


def test_fingerprint_ignores_display_settings_only():
    base = {
        "seed_everything": 0,
        "trainer": {"max_steps": 10, "precision": "32-true", "enable_progress_bar": False,
                    "default_root_dir": "a", "log_every_n_steps": 5, "logger": True},
        "model": {"quant": {"weight": {"bits": 4}}, "evaluate_fp": True},
        "data": {"class_path": "x", "init_args": {"num_calibration": 8, "num_workers": 0}},
    }
    fp = fingerprint(base)
    display = json.loads(json.dumps(base))
    display["trainer"].update(enable_progress_bar=True, default_root_dir="b", log_every_n_steps=1, logger=False)
    display["model"]["evaluate_fp"] = False
    display["data"]["init_args"]["num_workers"] = 4
    assert fingerprint(display) == fp
    for path, value in ((("trainer", "precision"), "bf16-mixed"), (("model", "quant", "weight", "bits"), 3),
                        (("data", "init_args", "num_calibration"), 16), (("seed_everything",), 1)):
        changed = json.loads(json.dumps(base))
        node = changed
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value
        assert fingerprint(changed) != fp, path
        assert ".".join(path) in describe_changes(fp, fingerprint(changed))


def _error_lines(stderr: str) -> list[str]:
    """The ``flexround_pl: error:`` lines of ``stderr``: exactly one, the last line, no traceback."""
    errors = [line for line in stderr.splitlines() if line.startswith("flexround_pl: error:")]
    assert len(errors) == 1 and errors[0] == stderr.strip().splitlines()[-1] and "Traceback" not in stderr, stderr
    return errors


def _fit_args(cfg: str, run, *extra: str) -> list[str]:
    return ["fit", "--config", cfg, "--trainer.default_root_dir", str(run), *extra]


def test_a_block_file_of_another_configuration_is_refused_on_resume(tmp_path, reference, capfd):
    """What two runs racing in one directory leave (issue 17): state.json of the bits-3 run, but block 0
    overwritten by a bits-4 run. The resume must refuse it, not load 4-bit codes into a 3-bit run."""
    cfg, ref_run = reference
    other = tmp_path / "bits4"
    assert main(_fit_args(cfg, other, "--model.quant.weight.bits", "4", "--export", "false")) == 0
    run = tmp_path / "run"
    shutil.copytree(ref_run, run)
    shutil.copy(other / "resume" / "block_000.safetensors", run / "resume" / "block_000.safetensors")
    before = {p: (run / p).read_bytes() for p in ("config.yaml", "results.json", "quantized.safetensors")}
    capfd.readouterr()

    assert main(_fit_args(cfg, run)) == 2
    err = _error_lines(capfd.readouterr().err)
    assert "block_000.safetensors was written by a run with another configuration" in err[0]
    assert "model.quant.weight.bits: 4 -> 3" in err[0] and "--fresh true" in err[0]
    assert {p: (run / p).read_bytes() for p in before} == before  # nothing rewritten

    assert main(_fit_args(cfg, run, "--fresh", "true")) == 0
    _assert_bitwise_equal(_codes(run), _codes(ref_run))


HOLD_LOCK = """
import sys, time
from flexround_pl import rundir
with rundir.locked(sys.argv[1]):
    print("locked", flush=True)
    time.sleep(120)
"""


def test_a_run_directory_in_use_is_refused_and_a_killed_holders_lock_is_taken_over(tmp_path, reference, capfd):
    cfg, ref_run = reference
    run = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(run)], cwd=REPO, env=_env(str(tmp_path)),
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        capfd.readouterr()
        assert main(_fit_args(cfg, run)) == 2
        err = _error_lines(capfd.readouterr().err)
        assert f"is in use by another flexround_pl run (PID {holder.pid}" in err[0]
        assert sorted(os.listdir(run)) == [".flexround_pl.lock"]  # nothing else written
    finally:
        holder.kill()  # SIGKILL: the holder cannot clean up its lock file
        holder.wait()

    assert main(_fit_args(cfg, run)) == 0
    out = capfd.readouterr().out
    assert f"took over the stale lock of run PID {holder.pid} (no longer running)" in out
    assert (run / ".flexround_pl.lock").read_text() == ""  # a clean exit leaves no PID behind
    _assert_bitwise_equal(_codes(run), _codes(ref_run))


def test_two_runs_started_at_once_into_one_directory_cannot_mix_their_blocks(tmp_path, tiny_bert_dir, write_config):
    """The issue-17 race: bits 4 and bits 3 started together in one run directory. One runs; the other
    stops with one line (the directory is in use, or holds the other configuration) and writes nothing."""
    cfg = _config(write_config, tmp_path, tiny_bert_dir)
    run = tmp_path / "run"
    env = _env(str(tmp_path))
    procs = {}
    for bits in (4, 3):
        cmd = [sys.executable, "-m", "flexround_pl", *_fit_args(cfg, run, "--model.quant.weight.bits", str(bits))]
        procs[bits] = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                       text=True)
    outcome = {bits: (p.wait(timeout=600), p.stderr.read()) for bits, p in procs.items()}
    winners = [bits for bits, (rc, _) in outcome.items() if rc == 0]
    assert len(winners) == 1, outcome
    (loser,) = set(outcome) - set(winners)
    rc, err = outcome[loser]
    last = err.strip().splitlines()[-1]
    assert rc == 2 and last.startswith("flexround_pl: error:"), err
    assert "is in use by another flexround_pl run (PID" in last or "another configuration" in last, last

    bits = winners[0]
    state = json.loads((run / "resume" / "state.json").read_text())
    assert state["config"]["model.quant.weight.bits"] == bits and sorted(state["blocks"]) == ["0", "1"]
    for name in ("block_000.safetensors", "block_001.safetensors"):
        meta, _ = read_quantized(str(run / "resume" / name))
        assert meta["config"]["model.quant.weight.bits"] == bits
        assert {info["bits"] for info in meta["layers"].values()} == {bits}
    assert json.loads((run / "results.json").read_text())["w_bits"] == bits
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["model"]["quant"]["weight"]["bits"] == bits


def test_results_and_state_are_readable_by_everyone(reference):
    """``results.json`` / ``state.json`` came out 0600 (``mkstemp``); they follow the umask like every output."""
    _, run = reference
    mask = os.umask(0)
    os.umask(mask)
    for path in (run / "results.json", run / "resume" / "state.json", run / "quantized.safetensors"):
        assert os.stat(path).st_mode & 0o777 == 0o666 & ~mask, path


def test_temp_files_of_killed_writes_are_removed_and_fresh_clears_old_tensorboard_events(tmp_path, reference):
    cfg, ref_run = reference
    run = tmp_path / "run"
    shutil.copytree(ref_run, run)
    leftovers = [run / "tmpab12cd.tmp", run / ".tmp-x1y2.safetensors", run / "resume" / "tmpzz.tmp",
                 run / "resume" / ".tmp-q9.safetensors", run / ".tmp-export-k3" / "model.safetensors"]
    for path in leftovers:
        path.parent.mkdir(exist_ok=True)
        path.write_text("half written")
    old_events = run / "tensorboard" / "events.out.tfevents.1.old-run"
    old_events.parent.mkdir(exist_ok=True)
    old_events.write_text("old curves")
    assert main(_fit_args(cfg, run)) == 0  # a resume (every block finished): cleans up, keeps the curves
    assert not any(p.exists() for p in leftovers) and not (run / ".tmp-export-k3").exists()
    assert old_events.exists()
    assert main(_fit_args(cfg, run, "--fresh", "true")) == 0
    assert not old_events.exists()


def test_ctrl_c_outside_a_blocks_fit_prints_one_line_and_the_run_resumes(tmp_path, reference, monkeypatch, capfd):
    from flexround_pl.reconstruct.resume import RunState

    cfg, ref_run = reference
    run = tmp_path / "run"
    save_block = RunState.save_block

    def interrupted_after_block_0(self, index, *args):
        save_block(self, index, *args)
        raise KeyboardInterrupt  # Ctrl-C between block 0's save and block 1

    monkeypatch.setattr(RunState, "save_block", interrupted_after_block_0)
    capfd.readouterr()
    assert main(_fit_args(cfg, run)) == 130
    err = capfd.readouterr().err
    assert "Traceback" not in err and err.strip().splitlines()[-1] == (
        "flexround_pl: interrupted: the finished blocks are saved in the run directory (resume/); "
        "re-run the same command to resume")
    monkeypatch.setattr(RunState, "save_block", save_block)
    assert main(_fit_args(cfg, run)) == 0
    assert json.loads((run / "results.json").read_text())["resumed_blocks"] == 1
    _assert_bitwise_equal(_codes(run), _codes(ref_run))


# What a full disk raises, as measured on a 64 KiB tmpfs: safetensors wraps the OS error in its own type.
def _disk_full_safetensors(*args, **kwargs):
    from safetensors import SafetensorError

    raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")


@pytest.mark.parametrize("where", ["block", "checkpoint", "export"])
def test_a_full_disk_gives_one_line_naming_the_directory_and_the_run_resumes(
    where, tmp_path, reference, monkeypatch, capfd
):
    import safetensors.torch

    cfg, ref_run = reference
    run = tmp_path / "run"
    real_save = safetensors.torch.save_file

    def save_file(tensors, filename, *args, **kwargs):
        target = os.path.dirname(filename)
        in_export = os.path.basename(target).startswith(".tmp-export-")  # an export shard being written
        if (where == "export" and in_export) or (where != "export" and (where == "block") == target.endswith("resume")):
            _disk_full_safetensors()
        return real_save(tensors, filename, *args, **kwargs)

    monkeypatch.setattr(safetensors.torch, "save_file", save_file)
    capfd.readouterr()
    assert main(_fit_args(cfg, run)) == 1
    (error,) = _error_lines(capfd.readouterr().err)
    assert error.startswith("flexround_pl: error: the disk is full: a write under"), error
    assert f"{str(run / 'resume') if where == 'block' else str(run)}" in error and "free space there" in error
    assert not [p for p in os.listdir(run) if p.startswith((".tmp", "tmp"))]  # nothing half-written left

    monkeypatch.undo()  # space freed
    assert main(_fit_args(cfg, run)) == 0
    assert json.loads((run / "results.json").read_text())["resumed_blocks"] == (0 if where == "block" else 2)
    _assert_bitwise_equal(_codes(run), _codes(ref_run))


def test_ctrl_c_inside_a_blocks_training_prints_the_same_line_and_the_run_resumes(
    tmp_path, reference, monkeypatch, capfd
):
    """Lightning turns Ctrl-C inside ``trainer.fit`` into ``sys.exit(1)`` after its own message."""
    import signal

    from flexround_pl.reconstruct.module import BlockReconstruction

    cfg, ref_run = reference
    run = tmp_path / "run"
    original = BlockReconstruction.training_step

    def ctrl_c(self, batch, batch_idx):
        if self.tag == "block_01" and self.global_step == 3:
            raise KeyboardInterrupt
        return original(self, batch, batch_idx)

    monkeypatch.setattr(BlockReconstruction, "training_step", ctrl_c)
    capfd.readouterr()
    assert main(_fit_args(cfg, run)) == 130
    err = capfd.readouterr().err
    assert "Traceback" not in err and err.strip().splitlines()[-1].startswith(
        "flexround_pl: interrupted: the finished blocks are saved")
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # Ctrl-C works again
    monkeypatch.setattr(BlockReconstruction, "training_step", original)
    assert main(_fit_args(cfg, run)) == 0
    assert json.loads((run / "results.json").read_text())["resumed_blocks"] == 1
    _assert_bitwise_equal(_codes(run), _codes(ref_run))
