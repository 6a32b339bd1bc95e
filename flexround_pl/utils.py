"""Two small helpers every stage that writes files needs."""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any


def is_rank_zero() -> bool:
    """True outside DDP and on global rank 0: the only process that writes files."""
    from lightning.pytorch.utilities import rank_zero_only

    return getattr(rank_zero_only, "rank", 0) == 0


def write_json_atomic(path: str, payload: dict[str, Any]) -> None:
    """Write JSON to a temporary file in the same directory, fsync, then rename over ``path``."""
    directory = os.path.dirname(path) or "."
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(payload, f, indent=2)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
