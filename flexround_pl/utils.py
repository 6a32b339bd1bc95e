"""Small helpers shared across the pipeline stages."""

from __future__ import annotations

import contextlib
import errno
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
        os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp makes 0600; results are for everyone to read
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


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _share(directory: str) -> None:
    """Give the directory (``mkdtemp`` makes it 0700) and its files the usual umask permissions."""
    umask = current_umask()
    os.chmod(directory, 0o777 & ~umask)
    for name in os.listdir(directory):
        os.chmod(os.path.join(directory, name), 0o666 & ~umask)


def check_writable_dir(path: str, what: str) -> None:
    """``ValueError`` unless ``path`` is, or can be created as, a directory this process can write.

    Checks the nearest existing ancestor: a file there is refused, and write
    access is probed by creating an unnamed temporary file (``os.access`` says
    yes to root on read-only filesystems, ``/proc`` and ``/sys``). Leaves
    nothing behind. ``what`` names the setting in the message.
    """
    path = os.path.abspath(os.path.expanduser(path))
    existing = path
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        where = "is a file" if existing == path else f"is under {existing!r}, which is a file"
        raise ValueError(f"{what} {path!r} {where}, not a directory; choose a directory")
    try:
        tempfile.TemporaryFile(dir=existing).close()
    except OSError as e:
        reason = e.strerror or type(e).__name__
        raise ValueError(
            f"{what} {path!r} cannot be written ({reason} in {existing!r}); choose a writable directory"
        ) from None


class DiskFullError(RuntimeError):
    """A write failed because the disk (or quota) is full (the CLI: one line, exit 1; the run resumes)."""


#: How a full disk shows: OSError errno, safetensors' message, torch.save's failed-write check.
_DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
_DISK_FULL_TEXT = ("No space left on device", "os error 28", "Disk quota exceeded", "os error 122", "unexpected pos")


@contextlib.contextmanager
def disk_full_errors(directory: str) -> Iterator[None]:
    """Turn a full-disk failure of any write inside the block into :class:`DiskFullError` naming the directory.

    ``directory`` is named when the error does not carry a file name. The
    writers are atomic (temporary file + rename), so nothing half-written
    stays; a re-run resumes after the last finished block.
    """
    try:
        yield
    except DiskFullError:
        raise
    except Exception as e:  # OSError, safetensors' SafetensorError, torch.save's RuntimeError
        full = (isinstance(e, OSError) and e.errno in _DISK_FULL_ERRNOS) or any(t in str(e) for t in _DISK_FULL_TEXT)
        if not full:
            raise
        filename = getattr(e, "filename", None)
        where = os.path.dirname(os.path.abspath(filename)) if filename else directory
        raise DiskFullError(
            f"the disk is full: a write under {where!r} failed ({' '.join(str(e).split())}); free space there "
            "(or choose another directory), then re-run the same command: the finished blocks resume"
        ) from None
