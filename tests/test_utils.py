"""Atomic writes that the caches and run directories rely on."""

import os

import pytest

from flexround_pl.utils import atomic_cache_dir, write_json_atomic


def test_cache_entry_appears_whole_or_not_at_all(tmp_path):
    final = str(tmp_path / "cache" / "entry")
    with pytest.raises(RuntimeError):
        with atomic_cache_dir(final, "done.json") as tmp:
            open(os.path.join(tmp, "weights.bin"), "w").write("half")
            raise RuntimeError("killed while writing")
    assert not os.path.exists(final) and os.listdir(tmp_path / "cache") == []

    with atomic_cache_dir(final, "done.json") as tmp:
        open(os.path.join(tmp, "done.json"), "w").write("{}")
    assert os.listdir(final) == ["done.json"]
    assert os.listdir(tmp_path / "cache") == ["entry"]


def test_a_concurrent_complete_entry_wins(tmp_path):
    final = str(tmp_path / "entry")
    os.makedirs(final)
    open(os.path.join(final, "done.json"), "w").write("first")
    with atomic_cache_dir(final, "done.json") as tmp:
        open(os.path.join(tmp, "done.json"), "w").write("second")
    assert open(os.path.join(final, "done.json")).read() == "first"
    assert os.listdir(tmp_path) == ["entry"]


def test_write_json_atomic(tmp_path):
    path = str(tmp_path / "r" / "results.json")
    write_json_atomic(path, {"a": 1})
    assert open(path).read().strip().startswith("{") and os.listdir(tmp_path / "r") == ["results.json"]
