"""Small helpers shared across the pipeline stages."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from typing import Any, Iterator, Optional


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


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """Silence transformers' expected warnings (new classifier heads, long texts tokenized whole)."""
    from transformers.utils import logging as hf_logging

    old = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(old)


def default_cache_root() -> str:
    """Where models built here are cached: ``$FLEXROUND_PL_CACHE`` or ``~/.cache/flexround_pl``."""
    return os.path.expanduser(os.environ.get("FLEXROUND_PL_CACHE") or "~/.cache/flexround_pl")


@contextlib.contextmanager
def torch_threads(n: Optional[int]) -> Iterator[None]:
    """Run with ``n`` intra-op threads (unchanged when ``n`` is falsy)."""
    import torch

    old = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


@contextlib.contextmanager
def atomic_cache_dir(final: str, marker: str) -> Iterator[str]:
    """Yield a temporary directory beside ``final``; when the block ends, rename it to ``final``.

    Readers never see half a cache entry. ``marker`` is the file written last:
    if another process renamed its complete entry into place first, that one
    wins and this one is dropped silently.
    """
    parent = os.path.dirname(final)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(final)}.tmp-", dir=parent)
    try:
        yield tmp
        _share(tmp)
        os.replace(tmp, final)
    except OSError:
        if not os.path.isfile(os.path.join(final, marker)):
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _share(directory: str) -> None:
    """Give the directory (``mkdtemp`` makes it 0700) and its files the usual umask permissions."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(directory, 0o777 & ~umask)
    for name in os.listdir(directory):
        os.chmod(os.path.join(directory, name), 0o666 & ~umask)


def tensor_view_key(t: "Any") -> tuple:
    """What identifies one view of a tensor's memory: storage, offset, shape, strides, dtype."""
    return (t.device.type, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)


def state_dict_nbytes(module: "Any") -> int:
    """Bytes of ``module``'s state dict, each shared tensor counted once (an FP checkpoint's size).

    Works from shapes and dtypes alone, so a lazily loaded model (blocks on
    ``meta``) is sized without reading a weight.
    """
    seen: set = set()
    total = 0
    for t in module.state_dict(keep_vars=True).values():
        # every meta tensor has data_ptr 0: tell them apart by identity
        key = ("meta", id(t)) if t.is_meta else tensor_view_key(t)
        if key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()
    return total
