"""The run directory (``trainer.default_root_dir``): its file names and its lock.

Every module that reads or writes a run directory takes the names from here,
so ``fit``, resume, export, ``validate`` / ``test`` and ``--fresh`` agree on them.

One ``fit`` at a time may use a run directory: :func:`locked` holds an
exclusive ``flock`` on :data:`LOCK_NAME` for the whole run. Two runs started
at once into one directory would otherwise both write ``resume/`` and the
outputs, mixing blocks of two configurations (issue 17). The kernel drops a
``flock`` when its process dies, so the lock of a killed run is never stuck;
the file still holds the dead run's PID, which the next run reports as a stale
lock taken over.
"""

from __future__ import annotations

import contextlib
import errno
import os
from typing import Callable, Iterator, Optional

CONFIG_NAME = "config.yaml"
RESULTS_NAME = "results.json"
CHECKPOINT_NAME = "quantized.safetensors"
EXPORT_DIR = "export"
STATE_DIR = "resume"
STATE_FILE = "state.json"
TENSORBOARD_DIR = "tensorboard"
CACHE_DIR = "cache"
LOCK_NAME = ".flexround_pl.lock"

#: Name patterns of the temporary files an interrupted atomic write leaves behind
#: (``utils.write_json_atomic``, ``export.checkpoint.save_quantized``, ``export_fake_quant``).
TEMP_PATTERNS = ("tmp*.tmp", ".tmp-*.safetensors", ".tmp-export-*")


def remove_temp_files(root: str) -> list[str]:
    """Delete what killed atomic writes left in ``root`` and ``root/resume``; returns the paths removed.

    Call it holding :func:`locked`: then no live writer owns a temporary file there.
    """
    import glob
    import shutil

    removed = []
    for directory in (root, os.path.join(root, STATE_DIR)):
        for pattern in TEMP_PATTERNS:
            for path in glob.glob(os.path.join(glob.escape(directory), pattern)):
                if os.path.isdir(path) and not os.path.islink(path):
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    os.remove(path)
                removed.append(path)
    return removed


class RunDirLocked(ValueError):
    """Another live process holds the run directory (the CLI: one error line, exit 2)."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def _read_pid(fd: int) -> Optional[int]:
    os.lseek(fd, 0, os.SEEK_SET)
    text = os.read(fd, 64).decode("ascii", "replace").strip()
    return int(text) if text.isdigit() else None


@contextlib.contextmanager
def locked(root: str, note: Callable[[str], None] = print) -> Iterator[None]:
    """Hold the run directory ``root`` (created if missing) exclusively while the block runs.

    Raises :class:`RunDirLocked` naming the holder's PID when a live process
    holds it. A lock file left by a killed run is taken over (``note`` says so).
    """
    import fcntl

    os.makedirs(root, exist_ok=True)
    path = os.path.join(root, LOCK_NAME)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            holder = _read_pid(fd)
            raise RunDirLocked(
                f"{root} is in use by another flexround_pl run (PID {holder if holder else 'unknown'}, "
                f"lock file {path}); wait for it to finish or stop it, or choose another trainer.default_root_dir"
            ) from None
        previous = _read_pid(fd)
        if previous is not None and previous != os.getpid() and not _pid_alive(previous):
            note(f"flexround_pl: took over the stale lock of run PID {previous} (no longer running) on {root}")
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, f"{os.getpid()}\n".encode())
        try:
            yield
        finally:
            os.ftruncate(fd, 0)  # a clean exit leaves no PID: only a killed run's lock reads as stale
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


__all__ = [
    "CACHE_DIR", "CHECKPOINT_NAME", "CONFIG_NAME", "EXPORT_DIR", "LOCK_NAME", "RESULTS_NAME", "RunDirLocked",
    "STATE_DIR", "STATE_FILE", "TEMP_PATTERNS", "TENSORBOARD_DIR", "locked", "remove_temp_files",
]
