"""Export directories appear whole or not at all: built in a temporary sibling, then renamed into place."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from typing import Any, Iterator

from flexround_pl.rundir import EXPORT_DIR  # noqa: F401  (<run dir>/export/<format>/)

INFO_FILE = "flexround_export.json"


@contextlib.contextmanager
def atomic_directory(directory: str) -> Iterator[str]:
    """Yield an empty temporary directory beside ``directory``; on success it replaces ``directory``."""
    directory = os.path.abspath(directory)
    parent = os.path.dirname(directory)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=parent, prefix=".tmp-export-")
    try:
        yield tmp
        mask = os.umask(0)
        os.umask(mask)
        os.chmod(tmp, 0o777 & ~mask)
        if os.path.isdir(directory):
            shutil.rmtree(directory)
        os.replace(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_info(directory: str, info: dict[str, Any]) -> None:
    """``flexround_export.json``: what was exported, how exact it is, how to load it."""
    with open(os.path.join(directory, INFO_FILE), "w") as f:
        json.dump(info, f, indent=2, default=str)
        f.write("\n")


def directory_nbytes(directory: str) -> int:
    """Bytes of every file under ``directory``."""
    return sum(os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(directory) for f in files)


__all__ = ["EXPORT_DIR", "INFO_FILE", "atomic_directory", "directory_nbytes", "write_info"]
