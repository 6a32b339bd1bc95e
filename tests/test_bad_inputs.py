"""Every user-facing input is checked up front: one clear line, exit 2, nothing written."""

from __future__ import annotations

import os

import pytest
import torch

from flexround_pl.cli import main


@pytest.fixture()
def config(tmp_path, tiny_bert_dir, write_config):

    return write_config(tmp_path, tiny_bert_dir)


CASES = {
    "unknown config key": (["--model.quant.bitz", "4"], "unrecognized arguments: --model.quant.bitz"),
    "bits out of range": (["--model.quant.weight.bits", "9"], "bits must be an integer from 2 to 8, got 9"),
    "bits not a number": (["--model.quant.weight.bits", "four"], '"model.quant.weight.bits": Expected a'),
    "search stride zero": (["--model.quant.weight.search_stride", "0"], "search_stride must be an integer >= 1"),
    "unknown granularity": (["--model.quant.weight.granularity", "row"], "model.quant.weight.granularity"),
    "unknown output-grid inputs": (["--model.quant.weight.output_inputs", "float"], "model.quant.weight.output_inputs"),
    "unknown method": (["--model.quant.method", "awq"], '"model.quant.method"'),
    "group size vs layer shapes": (
        ["--model.quant.weight.granularity", "group", "--model.quant.weight.group_size", "24"],
        "group_size=24 does not divide the input size of 12 of 12 layers",
    ),
    "keep_fp not a regex": (["--model.quant.keep_fp", '["("]'], "is not a valid regular expression"),
    "nothing left to quantize": (["--model.quant.keep_fp", '["."]'], "no layer would be quantized"),
    "negative learning rate": (["--model.reconstruction.lr", "-1"], "reconstruction.lr must be positive"),
    "missing model directory": (["--model.source.init_args.name_or_path", "/nonexistent/model"], "does not exist"),
    "hub id while offline": (["--model.source.init_args.name_or_path", "bert-base-uncased"], "HF_HUB_OFFLINE"),
    "missing data file": (["--data.init_args.eval_file", "/nonexistent/eval.csv"], "eval_file '/nonexistent"),
    "unknown GLUE task": (
        ["--data.init_args.source", "glue", "--data.init_args.glue_task", "foo",
         "--data.init_args.train_file", "null", "--data.init_args.eval_file", "null"],
        "unknown GLUE task 'foo'",
    ),
    "no calibration samples": (["--data.init_args.num_calibration", "0"], "num_calibration must be >= 1, got 0"),
    "max_steps missing": (["--trainer.max_steps", "-1"], "trainer.max_steps is not set"),
    "bad precision": (["--trainer.precision", "7"], '"trainer.precision"'),
    "gpu without a gpu": (["--trainer.accelerator", "gpu"], "use --trainer.accelerator cpu"),
    "fit with ckpt_path": (["--ckpt_path", "x.ckpt"], "fit does not take --ckpt_path"),
    "lm-eval on a classifier": (["--eval.lm_eval.tasks", "[wiki_topic]"], "BertForSequenceClassification is not one"),
    "missing config file": (["--config", "/nonexistent/config.yaml"], "File does not exist"),
    "model path is a file": (["--model.source.init_args.name_or_path", "/etc/passwd"],
                             "'/etc/passwd' is a file, not a model directory"),
    "run dir in /proc": (["--trainer.default_root_dir", "/proc/flexround_run"],
                         "trainer.default_root_dir '/proc/flexround_run' cannot be written"),
    "no validation batches": (["--trainer.limit_val_batches", "0"], "trainer.limit_val_batches 0 evaluates nothing"),
    "fp16 on CPU": (["--trainer.precision", "16-mixed"], "use --trainer.precision bf16-mixed"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_gives_one_clear_line_exit_2_and_writes_nothing(case, config, tmp_path, monkeypatch, refused):
    args, expected = CASES[case]
    if case == "gpu without a gpu" and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["fit", "--config", config, *args]) == 2
    refused(expected)
    assert not (tmp_path / "run").exists(), os.listdir(tmp_path / "run")


def test_run_dir_that_is_a_file_is_refused(config, tmp_path, capfd):
    target = tmp_path / "occupied"
    target.write_text("not a directory")
    assert main(["fit", "--config", config, "--trainer.default_root_dir", str(target)]) == 2
    assert "is a file, not a directory" in capfd.readouterr().err
    assert target.read_text() == "not a directory"


def test_validate_without_a_checkpoint_is_refused(config, tmp_path, capfd):
    assert main(["validate", "--config", config]) == 2
    err = capfd.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("flexround_pl: error: no quantized checkpoint at") and "run fit" in err
    assert not (tmp_path / "run").exists()
    assert main(["test", "--config", config, "--ckpt_path", str(tmp_path / "missing.safetensors")]) == 2
    assert "missing.safetensors" in capfd.readouterr().err


# -- issue 17: the hostile inputs that used to end in a traceback --------------------------------------


@pytest.fixture()
def read_only_dir(tmp_path):
    """A directory this process cannot create files in: mode 0555, or for root (who ignores modes) /sys/fs."""
    import tempfile

    def writable(path) -> bool:
        try:
            tempfile.TemporaryFile(dir=path).close()
            return True
        except OSError:
            return False

    d = tmp_path / "read_only"
    d.mkdir()
    d.chmod(0o555)
    if not writable(d):
        yield d
        d.chmod(0o755)
        return
    d.chmod(0o755)
    if os.path.isdir("/sys/fs") and not writable("/sys/fs"):
        yield "/sys/fs"
        return
    pytest.skip("no directory on this machine is read-only for this process (root, writable /sys)")


def _broken_copy(src: str, dst, damage) -> str:
    import shutil

    shutil.copytree(src, dst)
    damage(dst)
    return str(dst)


def _truncate(path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


BROKEN_MODEL_DIRS = {
    "corrupt config.json": (lambda d: (d / "config.json").write_text('{"model_type": "bert",'),
                            "config.json is not valid JSON"),
    "no weight files": (lambda d: (d / "model.safetensors").unlink(), "has no weight files"),
    "truncated model.safetensors": (lambda d: _truncate(d / "model.safetensors"),
                                    "model.safetensors is not a readable safetensors file, truncated or corrupt"),
}


def _expect_one_error(args: list[str], capfd) -> str:
    capfd.readouterr()
    assert main(args) == 2
    err = capfd.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("flexround_pl: error:")]
    assert len(errors) == 1 and "Traceback" not in err and errors[0] == err.strip().splitlines()[-1], err
    return errors[0]


@pytest.mark.parametrize("case", sorted(BROKEN_MODEL_DIRS))
def test_a_broken_model_directory_is_refused_up_front(case, config, tmp_path, tiny_bert_dir, capfd):
    damage, expected = BROKEN_MODEL_DIRS[case]
    model_dir = _broken_copy(tiny_bert_dir, tmp_path / "model", damage)
    error = _expect_one_error(["fit", "--config", config, "--model.source.init_args.name_or_path", model_dir], capfd)
    assert expected in error and "re-download or re-save the model" in error, error
    assert not (tmp_path / "run").exists()


def test_an_accelerator_without_its_package_is_refused(config, tmp_path, capfd):
    import importlib.util

    if importlib.util.find_spec("torch_xla") is not None:
        pytest.skip("torch_xla is installed here")
    error = _expect_one_error(["fit", "--config", config, "--trainer.accelerator", "tpu"], capfd)
    assert "trainer.accelerator 'tpu' needs a package that is not installed" in error and "torch_xla" in error
    assert "--trainer.accelerator cpu" in error
    assert not (tmp_path / "run").exists()


def test_a_run_dir_under_a_file_is_refused(config, tmp_path, capfd):
    (tmp_path / "afile").write_text("x")
    error = _expect_one_error(["fit", "--config", config, "--trainer.default_root_dir", str(tmp_path / "afile" / "run")],
                              capfd)
    assert f"is under {str(tmp_path / 'afile')!r}, which is a file, not a directory" in error, error
    assert (tmp_path / "afile").read_text() == "x"


def test_a_read_only_disk_cache_dir_is_refused(config, tmp_path, read_only_dir, capfd):
    cache_dir = os.path.join(str(read_only_dir), "calibration")
    error = _expect_one_error(["fit", "--config", config, "--model.reconstruction.cache", "disk",
                               "--model.reconstruction.cache_dir", cache_dir], capfd)
    assert f"model.reconstruction.cache_dir {cache_dir!r} cannot be written" in error, error
    assert not (tmp_path / "run").exists()


def _demo_config(tmp_path, **source_args) -> str:
    import yaml

    config = {
        "trainer": {"accelerator": "cpu", "max_steps": 1, "default_root_dir": str(tmp_path / "run")},
        "model": {"source": {"class_path": "flexround_pl.models.demo.DemoTopicClassifier", "init_args": source_args}},
        "data": {"class_path": "flexround_pl.data.TextClassificationData", "init_args": {"source": "wiki_topics"}},
    }
    path = tmp_path / "demo.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


def test_a_read_only_model_cache_is_refused_before_training_the_demo_classifier(
    tmp_path, read_only_dir, monkeypatch, capfd
):
    cache = os.path.join(str(read_only_dir), "flexround_cache")
    monkeypatch.setenv("FLEXROUND_PL_CACHE", cache)
    error = _expect_one_error(["fit", "--config", _demo_config(tmp_path)], capfd)
    assert f"FLEXROUND_PL_CACHE {os.path.join(cache, 'demo_topic_classifier')!r} cannot be written" in error, error
    assert not (tmp_path / "run").exists()


def test_a_model_cache_dir_that_is_a_file_is_refused(tmp_path, capfd):
    (tmp_path / "cachefile").write_text("x")
    error = _expect_one_error(["fit", "--config", _demo_config(tmp_path, cache_dir=str(tmp_path / "cachefile"))], capfd)
    assert "model.source.init_args.cache_dir" in error and "which is a file, not a directory" in error, error
    assert not (tmp_path / "run").exists()


BAD_CONFIG_FILES = {
    "empty": (b"", "is empty"),
    "scalar": (b"3\n", "is not a YAML config: it holds a int"),
    "binary": (bytes(range(128, 256)), "is not a text file"),
    "not YAML": (b"trainer: [unclosed\n", "is not valid YAML"),
    "passwd-like text": (b"root:x:0:0:root:/root:/bin/bash\n", "is not a YAML config: it holds a str"),
}


@pytest.mark.parametrize("case", sorted(BAD_CONFIG_FILES))
def test_a_config_file_that_is_not_a_config_is_named(case, tmp_path, capfd):
    content, expected = BAD_CONFIG_FILES[case]
    path = tmp_path / "bad.yaml"
    path.write_bytes(content)
    error = _expect_one_error(["fit", "--config", str(path)], capfd)
    assert f"config file {str(path)!r} {expected}" in error, error


def test_a_scalar_in_place_of_a_section_is_refused(config, tmp_path, capfd):
    """``quant: 3`` used to be replaced by the quantization defaults silently (exit 0)."""
    import yaml

    tree = yaml.safe_load(open(config))
    tree["model"]["quant"] = 3
    bad = tmp_path / "scalar_section.yaml"
    bad.write_text(yaml.safe_dump(tree))
    error = _expect_one_error(["fit", "--config", str(bad)], capfd)
    assert "model.quant must be a section" in error and "got 3" in error and str(bad) in error, error
    assert not (tmp_path / "run").exists()
