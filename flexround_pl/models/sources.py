"""Where the pretrained network comes from: the ``model.source`` section of a config.

Each source is a small class jsonargparse can build from YAML
(``class_path: flexround_pl.models.HFModel``). ``load`` returns the FP
``nn.Module`` in eval mode; ``load_tokenizer`` returns the matching tokenizer
(or ``None`` for image models).
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any, Literal, Optional

from torch import nn

from flexround_pl.utils import check_writable_dir, default_cache_root


class ModelSource:
    """Base class of model sources."""

    def load(self, num_labels: Optional[int] = None) -> nn.Module:
        raise NotImplementedError

    def load_tokenizer(self) -> Optional[Any]:
        return None

    def describe(self) -> str:
        return type(self).__name__

    def check(self) -> None:
        """Validate cheaply (paths exist, ...) before any work; raise ``ValueError``."""


class TrainedHereSource(ModelSource):
    """A model trained here once, cached under a fingerprint of its training settings.

    Subclasses set ``cache_name`` (folder under the cache root) and
    ``marker_file`` (written last, so its presence means the cache is complete)
    and implement ``settings()``; a change of settings is a new cache entry.
    """

    cache_name = ""
    marker_file = ""
    cache_dir: Optional[str] = None

    def settings(self) -> dict[str, Any]:
        raise NotImplementedError

    def fingerprint(self) -> str:
        blob = json.dumps(self.settings(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def cache_path(self) -> str:
        root = os.path.expanduser(self.cache_dir) if self.cache_dir else default_cache_root()
        return os.path.join(root, self.cache_name, self.fingerprint())

    def is_cached(self) -> bool:
        return os.path.isfile(os.path.join(self.cache_path(), self.marker_file))

    def check_cache(self) -> None:
        """Not cached yet: the cache root must take the trained model (``ValueError`` naming the setting)."""
        if self.is_cached():
            return
        what = "model.source.init_args.cache_dir" if self.cache_dir else (
            "FLEXROUND_PL_CACHE" if os.environ.get("FLEXROUND_PL_CACHE") else "the model cache")
        check_writable_dir(os.path.dirname(self.cache_path()), what)


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0", "false", "False")


class HFModel(ModelSource):
    """A Hugging Face ``transformers`` model, by hub id (online) or local directory.

    Args:
        name_or_path: hub id such as ``bert-base-uncased`` or a local directory.
        task: ``sequence-classification`` (``AutoModelForSequenceClassification``)
            or ``causal-lm`` (``AutoModelForCausalLM``).
        gguf_file: a GGUF file inside ``name_or_path``; transformers dequantizes it
            (see ``flexround_pl.models.gguf`` for the cached conversion).
        revision: hub revision.
        lazy: build the model on the ``meta`` device and read each block from the
            ``*.safetensors`` shards only while it runs (see ``flexround_pl.models.lazy``):
            memory stays about one FP block, for models larger than RAM.
    """

    def __init__(
        self,
        name_or_path: str,
        task: Literal["sequence-classification", "causal-lm"] = "sequence-classification",
        gguf_file: Optional[str] = None,
        revision: Optional[str] = None,
        lazy: bool = False,
    ) -> None:
        self.name_or_path = name_or_path
        self.task = task
        self.gguf_file = gguf_file
        self.revision = revision
        self.lazy = lazy

    def describe(self) -> str:
        return self.name_or_path + (f" ({self.gguf_file})" if self.gguf_file else "")

    def check(self) -> None:
        path = os.path.expanduser(self.name_or_path)
        if self.lazy and self.gguf_file:
            raise ValueError("lazy: true reads *.safetensors shards; it cannot load a GGUF file (set lazy: false)")
        if os.path.isdir(path):
            if self.lazy:
                from flexround_pl.models.lazy import Shards

                Shards(path)  # ValueError if the directory has no safetensors files
            check_model_dir(path, self.gguf_file, weights=False)  # config.json parses
            self.check_model_class(path)  # an adapter serves it (before asking for the weights)
            check_model_dir(path, self.gguf_file)
            return
        if os.path.exists(path):
            raise ValueError(
                f"model path {self.name_or_path!r} is a file, not a model directory; pass the directory that "
                "holds config.json and the weights" + (" (and gguf_file for a GGUF file)" if path.endswith(".gguf") else "")
            )
        # A hub id is "name" or "org/name"; anything else is meant as a path.
        if path.startswith((".", "/")) or path.count("/") > 1:
            raise ValueError(
                f"model path {self.name_or_path!r} does not exist; pass an existing directory "
                "or a Hugging Face hub id"
            )
        if _offline():
            raise ValueError(
                f"model {self.name_or_path!r} is not a local directory and HF_HUB_OFFLINE is set; "
                "download it first or point model.source.name_or_path at a local copy"
            )

    def check_model_class(self, path: str) -> None:
        """From the config alone (before a GGUF conversion or any load): an adapter serves the class."""
        from flexround_pl.models.generic import check_model_class, config_or_error

        gguf_file = self.gguf_file
        if gguf_file:
            from flexround_pl.models.gguf import converted_dir, is_converted

            if is_converted(path, gguf_file):  # (ValueError if the file is missing)
                path, gguf_file = converted_dir(path, gguf_file), None  # its config.json: no GGUF header to parse
        elif not os.path.isfile(os.path.join(path, "config.json")):
            raise ValueError(f"model directory {path!r} has no config.json; save it with save_pretrained")
        check_model_class(config_or_error(path, gguf_file, **self._kwargs()), self.task, self.lazy)

    def _kwargs(self) -> dict[str, Any]:
        kw: dict[str, Any] = {"trust_remote_code": False}  # an error, never an interactive prompt
        if self.revision:
            kw["revision"] = self.revision
        return kw

    def load(self, num_labels: Optional[int] = None) -> nn.Module:
        import transformers

        path = os.path.expanduser(self.name_or_path)
        if self.lazy:
            from flexround_pl.models import lazy

            self.check()
            if not os.path.isdir(path):  # a hub id: download the shards (to disk, not to memory)
                from huggingface_hub import snapshot_download

                path = snapshot_download(path, revision=self.revision, allow_patterns=["*.json", "*.safetensors"])
            model = lazy.load(path, self.task)
            if self.task == "sequence-classification" and num_labels is not None and model.config.num_labels != num_labels:
                raise ValueError(
                    f"model {self.name_or_path!r} has {model.config.num_labels} labels but the data has "
                    f"{num_labels}; use a checkpoint fine-tuned for this task"
                )
        elif self.gguf_file:
            from flexround_pl.models.gguf import load_gguf_causal_lm

            model = load_gguf_causal_lm(path, self.gguf_file)
        elif self.task == "causal-lm":
            model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype="float32", **self._kwargs())
        elif self.task == "sequence-classification":
            kw = self._kwargs()
            if num_labels is not None:
                config = transformers.AutoConfig.from_pretrained(path, **kw)
                if config.num_labels != num_labels:
                    raise ValueError(
                        f"model {self.name_or_path!r} has {config.num_labels} labels but the data has "
                        f"{num_labels}; use a checkpoint fine-tuned for this task"
                    )
            model = transformers.AutoModelForSequenceClassification.from_pretrained(
                path, dtype="float32", **kw
            )
        else:
            raise ValueError(f"unknown task {self.task!r}: use 'sequence-classification' or 'causal-lm'")
        model.config.use_cache = False
        return model.eval()

    def load_tokenizer(self) -> Any:
        import transformers

        path = os.path.expanduser(self.name_or_path)
        kw = self._kwargs()
        if self.gguf_file:
            kw["gguf_file"] = self.gguf_file
        return transformers.AutoTokenizer.from_pretrained(path, **kw)


WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")


def check_model_dir(path: str, gguf_file: Optional[str] = None, weights: bool = True) -> None:
    """A local Hugging Face model directory: ``config.json`` parses and (``weights``) the weight files are
    there and readable.

    Reads headers only (safetensors: the JSON header and its offsets against
    the file size), so a corrupt, empty or truncated download is refused
    before any work instead of failing inside transformers.
    """
    if gguf_file:
        if not os.path.isfile(os.path.join(path, gguf_file)):
            raise ValueError(f"model directory {path!r} has no GGUF file {gguf_file!r}")
        return
    config = os.path.join(path, "config.json")
    try:
        with open(config) as f:
            parsed = json.load(f)
    except FileNotFoundError:
        raise ValueError(f"model directory {path!r} has no config.json; is it a Hugging Face model directory?") from None
    except (OSError, ValueError) as e:
        raise ValueError(
            f"{config} is not valid JSON ({type(e).__name__}: {e}); re-download or re-save the model"
        ) from None
    if not isinstance(parsed, dict):
        raise ValueError(f"{config} is not a model configuration (a JSON object); re-download or re-save the model")
    if not weights:
        return
    names = set(os.listdir(path))
    if not names & set(WEIGHT_FILES) and not any(n.endswith(".safetensors") for n in names):
        raise ValueError(
            f"model directory {path!r} has no weight files ({', '.join(WEIGHT_FILES[::2])} or *.safetensors shards); "
            "the download is incomplete: re-download or re-save the model"
        )
    from safetensors import safe_open

    for name in sorted(n for n in names if n.endswith(".safetensors")):
        try:
            with safe_open(os.path.join(path, name), framework="pt"):
                pass
        except Exception as e:  # SafetensorError, OSError
            raise ValueError(
                f"{os.path.join(path, name)} is not a readable safetensors file, truncated or corrupt "
                f"({' '.join(str(e).split())}); re-download or re-save the model"
            ) from None
