"""Image model sources: torchvision CNNs (``model.source`` of a config).

* :class:`TorchvisionModel`: ResNet-18 / ResNet-50 / MobileNetV2 with
  torchvision's pretrained ImageNet weights (online users: ``weights:
  DEFAULT`` or ``IMAGENET1K_V1``; torchvision downloads them into its cache),
  a local ``state_dict`` file (plain torchvision keys), or random init
  (``weights: random``, for tests).
* :class:`FashionMNISTResNet18`: the offline CNN of this project. No pretrained
  weights can be downloaded here, so a torchvision ResNet-18 is trained once,
  seeded, on Debian's Fashion-MNIST and cached under
  ``$FLEXROUND_PL_CACHE`` (default ``~/.cache/flexround_pl``) in
  ``fashion_mnist_resnet18/<fingerprint>/``; later runs load it.

  The network is ``torchvision.models.resnet18(num_classes=10)`` whose
  ``conv1`` takes **one** input channel (``Conv2d(1, 64, 7, stride 2, pad 3)``);
  everything else is stock ResNet-18, so the ImageNet stem (7x7/2 conv +
  3x3/2 max-pool) turns the 32x32 inputs (28x28 resized, see
  :class:`~flexround_pl.data.images.FashionMNISTData`) into 8x8 maps and
  layer4 works at 1x1. That keeps training at a couple of minutes on 2 CPU
  cores. The checkpoint is a plain torchvision state dict: it also loads with
  ``TorchvisionModel(arch="resnet18", weights=<cache>/model.pt)``.

Importing this module registers the CNN adapters (:mod:`flexround_pl.models.cnn`).
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from typing import Any, Literal, Optional

import torch
from torch import nn

from flexround_pl import progress
from flexround_pl.models import cnn  # noqa: F401  (registers the ResNet / MobileNetV2 adapters)
from flexround_pl.models.sources import ModelSource, TrainedHereSource
from flexround_pl.utils import torch_threads

Arch = Literal["resnet18", "resnet50", "mobilenet_v2"]
ARCHS = ("resnet18", "resnet50", "mobilenet_v2")
STATE_DICT_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".safetensors")
RANDOM = "random"


# ----------------------------------------------------------------------------- building


def _first_conv_name(arch: str) -> str:
    return "conv1" if arch.startswith("resnet") else "features.0.0"


def _classifier_name(arch: str) -> str:
    return "fc" if arch.startswith("resnet") else "classifier.1"


def build_model(arch: str, num_classes: int = 1000, in_channels: int = 3, **kwargs: Any) -> nn.Module:
    """A random-init torchvision ``arch`` with ``num_classes`` outputs and ``in_channels`` inputs."""
    import torchvision

    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; use one of {list(ARCHS)}")
    model = torchvision.models.get_model(arch, weights=None, num_classes=num_classes, **kwargs)
    if in_channels != 3:
        name = _first_conv_name(arch)
        old = model.get_submodule(name)
        new = nn.Conv2d(in_channels, old.out_channels, old.kernel_size, old.stride, old.padding, bias=False)
        cnn._set_submodule(model, name, new)
    return model


def load_state_dict_file(path: str) -> dict[str, torch.Tensor]:
    """A state dict from ``.pt`` / ``.pth`` / ``.bin`` / ``.ckpt`` (torch) or ``.safetensors``.

    Unwraps ``{"state_dict": ...}`` / ``{"model": ...}`` checkpoints and the
    ``module.`` prefix of ``DataParallel``.
    """
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        sd: Any = load_file(path)
    else:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model"):
        if isinstance(sd, dict) and isinstance(sd.get(key), dict):
            sd = sd[key]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ValueError(f"{path}: not a state dict (a mapping of parameter names to tensors)")
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module.") :]: v for k, v in sd.items()}
    return sd


def _looks_like_path(weights: str) -> bool:
    return os.sep in weights or weights.startswith(("~", ".")) or weights.lower().endswith(STATE_DICT_SUFFIXES)


class TorchvisionModel(ModelSource):
    """A torchvision CNN: ``resnet18``, ``resnet50`` or ``mobilenet_v2``.

    Args:
        arch: the torchvision model name.
        weights: a torchvision weights name (``DEFAULT``, ``IMAGENET1K_V1``,
            ``IMAGENET1K_V2`` ...; downloaded by torchvision, so it needs the
            internet or a filled torch hub cache), a path to a local state dict
            with plain torchvision keys (``.pt`` / ``.pth`` / ``.safetensors``),
            or ``random`` for random init (seeded by ``seed``; tests only). ``None``
            means ``random`` too, but a saved config drops ``null`` values (and
            would reload with the default), so configs spell ``random``.
        num_classes: output classes; ``None`` = the data's ``num_labels`` (or
            the checkpoint's / 1000 for ImageNet weights). Must match both.
        in_channels: input channels for random init (a local state dict's own
            first conv decides otherwise).
        model_kwargs: extra torchvision builder arguments (e.g.
            ``{width_mult: 0.25}`` for a small MobileNetV2).
        seed: seed of the random init (``weights: random``).
    """

    def __init__(
        self,
        arch: Arch = "resnet18",
        weights: Optional[str] = "DEFAULT",
        num_classes: Optional[int] = None,
        in_channels: int = 3,
        model_kwargs: Optional[dict[str, Any]] = None,
        seed: int = 0,
    ) -> None:
        if arch not in ARCHS:
            raise ValueError(f"unknown arch {arch!r}; use one of {list(ARCHS)}")
        if num_classes is not None and num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if in_channels < 1:
            raise ValueError(f"in_channels must be >= 1, got {in_channels}")
        if weights is None or str(weights).strip().lower() in ("random", "none", ""):
            weights = RANDOM
        self.arch, self.weights, self.num_classes = arch, weights, num_classes
        self.in_channels, self.model_kwargs, self.seed = in_channels, dict(model_kwargs or {}), seed

    def describe(self) -> str:
        return f"torchvision {self.arch} (weights={self.weights})"

    def _is_path(self) -> bool:
        return self.weights != RANDOM and _looks_like_path(self.weights)

    def _weights_enum(self) -> Any:
        import torchvision

        enum = torchvision.models.get_model_weights(self.arch)
        try:
            return enum[self.weights]
        except KeyError:
            names = ["DEFAULT", *(w.name for w in enum)]
            raise ValueError(
                f"unknown weights {self.weights!r} for {self.arch}; use one of {names}, a local state-dict "
                "path, or 'random' (random init)"
            ) from None

    def check(self) -> None:
        if self.weights == RANDOM:
            return
        if self._is_path():
            if not os.path.isfile(os.path.expanduser(self.weights)):
                raise ValueError(f"weights file {self.weights!r} does not exist; pass a local state-dict path")
            return
        self._weights_enum()

    def load(self, num_labels: Optional[int] = None) -> nn.Module:
        self.check()
        wanted = self.num_classes
        if wanted is not None and num_labels is not None and wanted != num_labels:
            raise ValueError(f"num_classes={wanted} but the data has {num_labels} labels")
        wanted = wanted if wanted is not None else num_labels
        if self.weights == RANDOM:
            torch.manual_seed(self.seed)
            model = build_model(self.arch, wanted or 1000, self.in_channels, **self.model_kwargs)
        elif self._is_path():
            model = self._load_file(os.path.expanduser(self.weights), wanted)
        else:
            model = self._load_pretrained(wanted)
        return model.eval()

    def _load_file(self, path: str, wanted: Optional[int]) -> nn.Module:
        sd = load_state_dict_file(path)
        head, first = f"{_classifier_name(self.arch)}.weight", f"{_first_conv_name(self.arch)}.weight"
        if head not in sd or first not in sd:
            raise ValueError(
                f"{path}: missing {head!r} / {first!r}; expected a plain torchvision {self.arch} state dict"
            )
        n_classes, in_channels = sd[head].shape[0], sd[first].shape[1]
        if wanted is not None and n_classes != wanted:
            raise ValueError(f"{path} has {n_classes} classes but {wanted} are expected")
        model = build_model(self.arch, n_classes, in_channels, **self.model_kwargs)
        try:
            model.load_state_dict(sd, strict=True)
        except RuntimeError as e:
            raise ValueError(f"{path} does not fit torchvision {self.arch}: {e}") from None
        return model

    def _load_pretrained(self, wanted: Optional[int]) -> nn.Module:
        import torchvision

        weights = self._weights_enum()
        n_classes = len(weights.meta.get("categories") or []) or 1000
        if wanted is not None and wanted != n_classes:
            raise ValueError(
                f"{self.arch} {weights.name} predicts {n_classes} classes but {wanted} are expected; "
                "use data with the same classes or a local state dict"
            )
        try:
            return torchvision.models.get_model(self.arch, weights=weights, **self.model_kwargs)
        except Exception as e:  # URLError, HTTPError, SSL errors ...
            raise ValueError(
                f"could not get torchvision weights {self.arch} {weights.name} ({type(e).__name__}: {e}); "
                "offline? put the file in the torch hub cache or pass a local state-dict path as weights"
            ) from None


# ----------------------------------------------------------------------------- the offline CNN

#: Bump when the training recipe changes in a way the settings do not capture.
FMNIST_RECIPE_VERSION = 1
MODEL_FILE, INFO_FILE = "model.pt", "info.json"


class FashionMNISTResNet18(TrainedHereSource):
    """Torchvision ResNet-18 (1-channel ``conv1``, 10 classes) trained once on Fashion-MNIST, cached.

    Training: SGD (momentum 0.9, nesterov, weight decay 5e-4), linear warm-up
    over 5 % of the steps then cosine decay to 0, ``epochs`` passes over the
    first ``num_train`` images of a seeded permutation of the 60k train
    images, batch ``batch_size``, inputs preprocessed exactly as
    :class:`~flexround_pl.data.images.FashionMNISTData` does (28x28 resized to
    ``image_size``, normalized). The test split is never seen. Everything is
    seeded; the fingerprint of these settings (plus the data files' sizes)
    names the cache directory.

    Args:
        data_dir: Debian's Fashion-MNIST folder.
        cache_dir: cache root (default ``$FLEXROUND_PL_CACHE`` or ``~/.cache/flexround_pl``).
        num_train: training images (capped at the 60k available; 60000 = all); the
            default keeps training near 3 CPU-minutes on 2 cores.
        epochs, batch_size, lr, weight_decay, seed: the recipe.
        image_size: training (and evaluation) resolution.
        num_threads: torch CPU threads while training (0: leave as is).

    Integer-valued settings have no ``None`` form on purpose: a saved
    ``config.yaml`` drops ``null`` values, which would reload as the defaults.
    """

    cache_name = "fashion_mnist_resnet18"
    marker_file = MODEL_FILE

    def __init__(
        self,
        data_dir: Optional[str] = None,
        cache_dir: Optional[str] = None,
        num_train: int = 24576,
        epochs: int = 1,
        batch_size: int = 128,
        lr: float = 0.05,
        weight_decay: float = 5e-4,
        image_size: int = 32,
        seed: int = 0,
        num_threads: int = 2,
    ) -> None:
        from flexround_pl.data.images import FASHION_MNIST_DIR

        if epochs < 1 or batch_size < 1 or image_size < 8 or lr <= 0 or weight_decay < 0:
            raise ValueError(
                "FashionMNISTResNet18 needs epochs >= 1, batch_size >= 1, image_size >= 8, lr > 0, weight_decay >= 0"
            )
        if num_train < batch_size:
            raise ValueError(f"num_train ({num_train}) must be at least batch_size ({batch_size})")
        if num_threads < 0:
            raise ValueError(f"num_threads must be >= 0 (0: leave torch's setting), got {num_threads}")
        self.data_dir = data_dir or FASHION_MNIST_DIR
        self.cache_dir = cache_dir
        self.num_train, self.epochs, self.batch_size = num_train, epochs, batch_size
        self.lr, self.weight_decay, self.image_size = lr, weight_decay, image_size
        self.seed, self.num_threads = seed, num_threads

    # ------------------------------------------------------------------ cache

    def settings(self) -> dict[str, Any]:
        """Everything that determines the weights (hashed into the fingerprint)."""
        from flexround_pl.data.images import fashion_mnist_paths

        try:
            files = {
                os.path.basename(p): os.path.getsize(p)
                for pair in fashion_mnist_paths(self.data_dir).values()
                for p in pair
            }
        except ValueError:
            files = {}
        return {
            "recipe": FMNIST_RECIPE_VERSION,
            "arch": "resnet18",
            "in_channels": 1,
            "data_files": files,
            "image_size": self.image_size,
            "num_train": min(self.num_train, 60000),
            "epochs": self.epochs,
            "batch_size": self.batch_size,
            "lr": self.lr,
            "weight_decay": self.weight_decay,
            "seed": self.seed,
        }




    def info(self) -> Optional[dict[str, Any]]:
        """The training report (test accuracy, seconds) of the cached model, if any."""
        path = os.path.join(self.cache_path(), INFO_FILE)
        if not os.path.isfile(path):
            return None
        with open(path) as f:
            return json.load(f)

    def describe(self) -> str:
        return f"ResNet-18 trained on Fashion-MNIST ({self.cache_path()})"

    def check(self) -> None:
        if not self.is_cached():
            from flexround_pl.data.images import fashion_mnist_paths

            fashion_mnist_paths(self.data_dir)  # training needs the data: clear error naming the package
            self.check_cache()

    # ------------------------------------------------------------------ loading

    def load(self, num_labels: Optional[int] = None) -> nn.Module:
        if num_labels is not None and num_labels != 10:
            raise ValueError(f"the Fashion-MNIST ResNet-18 predicts 10 classes but the data has {num_labels}")
        if not self.is_cached():
            self.train_and_cache()
        model = build_model("resnet18", 10, in_channels=1)
        model.load_state_dict(load_state_dict_file(os.path.join(self.cache_path(), MODEL_FILE)))
        return model.eval()

    def train_and_cache(self, log: Any = print) -> dict[str, Any]:
        """Train (seeded), evaluate on the test split, write ``model.pt`` + ``info.json`` atomically."""
        path = self.cache_path()
        os.makedirs(path, exist_ok=True)
        log(f"training the Fashion-MNIST ResNet-18 once (cached in {path}) ...")
        with torch_threads(self.num_threads):
            model, seconds = self._train(log)
            accuracy = evaluate_accuracy(model, self.data_dir, self.image_size)
        info = {"test_accuracy": accuracy, "train_seconds": seconds, "settings": self.settings(),
                "torch": torch.__version__}
        # info first: model.pt is what marks the cache entry complete
        _atomic_write(path, INFO_FILE, lambda f: f.write(json.dumps(info, indent=2).encode() + b"\n"))
        _atomic_write(path, MODEL_FILE, lambda f: torch.save(model.state_dict(), f))
        log(f"Fashion-MNIST ResNet-18: test accuracy {accuracy:.4f} after {seconds:.0f} s of training")
        return info

    def _train(self, log: Any) -> tuple[nn.Module, float]:
        from flexround_pl.data.images import (
            FASHION_MNIST_MEAN,
            FASHION_MNIST_STD,
            load_fashion_mnist,
            to_pixel_values,
        )

        images, labels = load_fashion_mnist("train", self.data_dir)
        g = torch.Generator().manual_seed(self.seed)
        order = torch.randperm(len(images), generator=g)
        order = order[: self.num_train]
        torch.manual_seed(self.seed)
        model = build_model("resnet18", 10, in_channels=1).train()
        decay = [p for n, p in model.named_parameters() if p.dim() > 1]
        no_decay = [p for n, p in model.named_parameters() if p.dim() <= 1]
        opt = torch.optim.SGD(
            [{"params": decay, "weight_decay": self.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=self.lr, momentum=0.9, nesterov=True,
        )
        steps_per_epoch = len(order) // self.batch_size
        total = steps_per_epoch * self.epochs
        warmup = max(1, total // 20)

        def schedule(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
        start = time.perf_counter()
        with progress.Progress("Fashion-MNIST ResNet-18 training", total, unit="step") as bar:
            for epoch in range(self.epochs):
                perm = order[torch.randperm(len(order), generator=g)]
                for b in range(steps_per_epoch):
                    idx = perm[b * self.batch_size : (b + 1) * self.batch_size]
                    x = to_pixel_values(images[idx], self.image_size, 1, FASHION_MNIST_MEAN, FASHION_MNIST_STD)
                    loss = nn.functional.cross_entropy(model(x), labels[idx])
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    sched.step()
                    bar.update(loss=loss.item())
        return model.eval(), time.perf_counter() - start


@torch.no_grad()
def evaluate_accuracy(model: nn.Module, data_dir: Optional[str] = None, image_size: int = 32,
                      batch_size: int = 500) -> float:
    """Top-1 accuracy of a 1-channel Fashion-MNIST model on the 10k test images."""
    from flexround_pl.data.images import (
        FASHION_MNIST_DIR,
        FASHION_MNIST_MEAN,
        FASHION_MNIST_STD,
        load_fashion_mnist,
        to_pixel_values,
    )

    images, labels = load_fashion_mnist("test", data_dir or FASHION_MNIST_DIR)
    model.eval()
    correct = 0
    for start in progress.track(range(0, len(images), batch_size), "Fashion-MNIST test accuracy"):
        x = to_pixel_values(images[start : start + batch_size], image_size, 1, FASHION_MNIST_MEAN, FASHION_MNIST_STD)
        correct += int((model(x).argmax(-1) == labels[start : start + batch_size]).sum())
    return correct / len(images)


def _atomic_write(directory: str, name: str, write: Any) -> None:
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp, os.path.join(directory, name))
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
