"""Image classification data for PTQ of CNNs (task ``image-classification``).

Three data modules share the batch format ``{"pixel_values": float [B, C, H, W],
"labels": long [B]}`` and the metrics (:class:`TopKMetrics`: ``top1``, plus
``top5`` with >= 5 classes):

* :class:`ImageFolderData`: ImageNet-style ``train_dir`` / ``val_dir`` (one
  sub-folder per class) through torchvision ``ImageFolder``, preprocessed with
  ``Resize(256)`` (shorter side, aspect kept) + ``CenterCrop(224)`` + ImageNet
  normalization. ``Resize((256, 256))`` would distort the aspect ratio and
  silently cost ~0.9 pt of FP top-1. Calibration = ``num_calibration`` seeded
  random train images (1024 in the paper); eval = the val folder.
* :class:`FashionMNISTData`: Debian's Fashion-MNIST (``apt-get install
  dataset-fashion-mnist``, IDX ``.gz`` files under
  ``/usr/share/datasets/fashion-mnist``), 28x28 gray images resized
  (bilinear) to ``image_size`` (32) and normalized; calibration = seeded train
  images, eval = the 10k test split (optionally the first ``num_eval``).
* :class:`DigitsData`: scikit-learn's 8x8 digits (1,797 images, shipped in the
  wheel), for fast tests; a seeded split into train and eval.
"""

from __future__ import annotations

import gzip
import os
from typing import Any, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from flexround_pl.data.base import PTQDataModule
from flexround_pl.evaluate.metrics import TopKMetrics

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
#: Mean / std of the Fashion-MNIST train pixels in [0, 1].
FASHION_MNIST_MEAN, FASHION_MNIST_STD = 0.2860, 0.3530


def _check_positive(**values: Optional[int]) -> None:
    for name, value in values.items():
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"{name} must be a positive integer, got {value!r}")


def seeded_subset(n: int, k: int, seed: int) -> list[int]:
    """``k`` distinct indices out of ``range(n)``, a seeded random sample in sampled order."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:k].tolist()


# ----------------------------------------------------------------------------- tensors in memory


def to_pixel_values(
    images: Tensor, image_size: int, channels: int, mean: float, std: float
) -> Tensor:
    """``[N, H, W]`` gray images (uint8 0..255 or float 0..1) -> normalized ``[N, C, S, S]`` float32.

    Bilinear resize to ``image_size`` (skipped when already that size); the
    gray channel is replicated when ``channels == 3``.
    """
    x = images.float()
    if images.dtype == torch.uint8:
        x = x / 255.0
    x = x.unsqueeze(1)
    if x.shape[-2:] != (image_size, image_size):
        x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False)
    x = (x - mean) / std
    return x.expand(-1, channels, -1, -1).contiguous() if channels > 1 else x


class _Indices(Dataset):
    """Row indices of in-memory images; :class:`_Collate` turns a batch of them into tensors."""

    def __init__(self, indices: Sequence[int]) -> None:
        self.indices = list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> int:
        return self.indices[i]


class _Collate:
    def __init__(self, images: Tensor, labels: Tensor, image_size: int, channels: int, mean: float, std: float):
        self.images, self.labels = images, labels
        self.image_size, self.channels, self.mean, self.std = image_size, channels, mean, std

    def __call__(self, indices: list[int]) -> dict[str, Tensor]:
        idx = torch.tensor(indices, dtype=torch.long)
        return {
            "pixel_values": to_pixel_values(self.images[idx], self.image_size, self.channels, self.mean, self.std),
            "labels": self.labels[idx].long(),
        }


class TensorImageData(PTQDataModule):
    """Shared logic of the in-memory gray-image data modules (Fashion-MNIST, digits).

    Subclasses implement :meth:`_load_arrays` -> ``(train_images, train_labels,
    eval_images, eval_labels)`` and set ``mean`` / ``std`` / ``classes``.
    """

    task = "image-classification"
    mean: float = 0.5
    std: float = 0.5
    classes: Sequence[str] = ()

    def __init__(
        self,
        num_calibration: int = 1024,
        num_eval: Optional[int] = None,
        image_size: int = 32,
        channels: int = 1,
        batch_size: int = 32,
        eval_batch_size: int = 256,
        seed: int = 0,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        _check_positive(
            num_calibration=num_calibration, num_eval=num_eval, image_size=image_size,
            batch_size=batch_size, eval_batch_size=eval_batch_size,
        )
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 (gray) or 3 (gray replicated), got {channels!r}")
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        self.num_calibration, self.num_eval = num_calibration, num_eval
        self.image_size, self.channels = image_size, channels
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size
        self.seed, self.num_workers = seed, num_workers
        self._arrays: Optional[tuple[Tensor, Tensor, Tensor, Tensor]] = None
        self._splits: Optional[dict[str, list[int]]] = None

    def _load_arrays(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        raise NotImplementedError

    @property
    def num_labels(self) -> int:
        return len(self.classes)

    @property
    def label_names(self) -> list[str]:
        return list(self.classes)

    def metrics(self) -> TopKMetrics:
        return TopKMetrics(self.num_labels)

    def setup(self, stage: Optional[str] = None) -> None:
        if self._arrays is not None:
            return
        train_x, train_y, eval_x, eval_y = self._load_arrays()
        if self.num_calibration > len(train_x):
            raise ValueError(
                f"num_calibration={self.num_calibration} but the train split holds {len(train_x)} images"
            )
        calibration = seeded_subset(len(train_x), self.num_calibration, self.seed)
        n_eval = len(eval_x) if self.num_eval is None else min(self.num_eval, len(eval_x))
        self._arrays = (train_x, train_y, eval_x, eval_y)
        self._splits = {"calibration": calibration, "train": list(range(len(train_x))), "eval": list(range(n_eval))}

    def _loader(self, split: str, batch_size: int, shuffle: bool = False) -> DataLoader:
        self.setup()
        train_x, train_y, eval_x, eval_y = self._arrays
        images, labels = (eval_x, eval_y) if split == "eval" else (train_x, train_y)
        return DataLoader(
            _Indices(self._splits[split]),
            batch_size=batch_size,
            shuffle=shuffle,
            generator=torch.Generator().manual_seed(self.seed) if shuffle else None,
            collate_fn=_Collate(images, labels, self.image_size, self.channels, self.mean, self.std),
            num_workers=self.num_workers,
        )

    def calibration_dataloader(self) -> DataLoader:
        """The calibration images in a fixed (seeded) order."""
        return self._loader("calibration", self.batch_size)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("eval", self.eval_batch_size)

    def test_dataloader(self) -> DataLoader:
        return self.val_dataloader()


# ----------------------------------------------------------------------------- Fashion-MNIST


def read_idx(path: str) -> np.ndarray:
    """An IDX file (``.gz`` or plain) as a numpy array (MNIST / Fashion-MNIST format)."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise ValueError(f"{path}: not an IDX file (bad magic number)")
    dtypes = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
    if data[2] not in dtypes:
        raise ValueError(f"{path}: unknown IDX element type 0x{data[2]:02x}")
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    offset = 4 + 4 * ndim
    array = np.frombuffer(data, dtype=dtypes[data[2]], offset=offset)
    if array.size != int(np.prod(shape)):
        raise ValueError(f"{path}: truncated IDX file ({array.size} values for shape {shape})")
    return array.reshape(shape)


def fashion_mnist_paths(data_dir: str = FASHION_MNIST_DIR) -> dict[str, tuple[str, str]]:
    """``{split: (images, labels)}`` file paths (``.gz`` or not); clear error if missing."""
    data_dir = os.path.expanduser(data_dir)
    out = {}
    for split, names in FASHION_MNIST_FILES.items():
        paths = []
        for name in names:
            found = [p for p in (os.path.join(data_dir, name + ".gz"), os.path.join(data_dir, name)) if os.path.isfile(p)]
            if not found:
                raise ValueError(
                    f"Fashion-MNIST file {name}(.gz) not found in {data_dir!r}; install Debian's copy with "
                    "`apt-get update && apt-get install -y dataset-fashion-mnist` "
                    f"(files under {FASHION_MNIST_DIR}) or point data_dir at the IDX files"
                )
            paths.append(found[0])
        out[split] = (paths[0], paths[1])
    return out


def load_fashion_mnist(split: str, data_dir: str = FASHION_MNIST_DIR) -> tuple[Tensor, Tensor]:
    """``(images uint8 [N, 28, 28], labels int64 [N])`` of ``split`` (``train`` / ``test``)."""
    if split not in FASHION_MNIST_FILES:
        raise ValueError(f"unknown Fashion-MNIST split {split!r}; use 'train' or 'test'")
    images_path, labels_path = fashion_mnist_paths(data_dir)[split]
    images, labels = read_idx(images_path), read_idx(labels_path)
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise ValueError(f"{images_path} / {labels_path}: unexpected shapes {images.shape} / {labels.shape}")
    return torch.from_numpy(images.copy()), torch.from_numpy(labels.astype(np.int64))


class FashionMNISTData(TensorImageData):
    """Fashion-MNIST from Debian's ``dataset-fashion-mnist`` package (offline).

    Args:
        data_dir: folder of the four IDX files (``.gz`` or not).
        num_calibration: calibration images, a seeded random sample of the 60k train images.
        num_eval: evaluate on the first ``num_eval`` test images (``None``: all 10k).
        image_size: images are resized (bilinear) from 28x28 to this size.
        channels: 1 (gray, the default model's input) or 3 (gray replicated).
        batch_size: calibration batch size; eval_batch_size: evaluation batch size.
        seed: seeds the calibration sample (and the train shuffle).
    """

    mean, std, classes = FASHION_MNIST_MEAN, FASHION_MNIST_STD, FASHION_MNIST_CLASSES

    def __init__(
        self,
        data_dir: str = FASHION_MNIST_DIR,
        num_calibration: int = 1024,
        num_eval: Optional[int] = None,
        image_size: int = 32,
        channels: int = 1,
        batch_size: int = 32,
        eval_batch_size: int = 256,
        seed: int = 0,
        num_workers: int = 0,
    ) -> None:
        super().__init__(num_calibration, num_eval, image_size, channels, batch_size, eval_batch_size, seed, num_workers)
        self.data_dir = data_dir
        fashion_mnist_paths(data_dir)  # fail early, with the install command

    def _load_arrays(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        return (*load_fashion_mnist("train", self.data_dir), *load_fashion_mnist("test", self.data_dir))


class DigitsData(TensorImageData):
    """scikit-learn's 8x8 handwritten digits (10 classes), upsampled; for fast tests and demos.

    The 1,797 images are split by a seeded permutation (``split_seed``): the
    last ``eval_size`` form the eval split, the rest the train split from which
    calibration images are drawn.
    """

    mean, std, classes = 0.3, 0.4, tuple(str(i) for i in range(10))

    def __init__(
        self,
        num_calibration: int = 256,
        num_eval: Optional[int] = None,
        image_size: int = 32,
        channels: int = 1,
        batch_size: int = 32,
        eval_batch_size: int = 256,
        seed: int = 0,
        eval_size: int = 500,
        split_seed: int = 0,
    ) -> None:
        super().__init__(num_calibration, num_eval, image_size, channels, batch_size, eval_batch_size, seed)
        _check_positive(eval_size=eval_size)
        if eval_size >= 1797:
            raise ValueError(f"eval_size must leave train images (< 1797), got {eval_size}")
        self.eval_size, self.split_seed = eval_size, split_seed

    def _load_arrays(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        from sklearn.datasets import load_digits

        digits = load_digits()
        images = torch.from_numpy(digits.images.astype(np.float32) / 16.0)
        labels = torch.from_numpy(digits.target.astype(np.int64))
        order = torch.randperm(len(images), generator=torch.Generator().manual_seed(self.split_seed))
        train, test = order[: -self.eval_size], order[-self.eval_size :]
        return images[train], labels[train], images[test], labels[test]


# ----------------------------------------------------------------------------- ImageNet-style folders


class _AsDict(Dataset):
    """``(image, label)`` items of a torchvision dataset as ``{"pixel_values", "labels"}``."""

    def __init__(self, dataset: Any, indices: Optional[Sequence[int]] = None) -> None:
        self.dataset = dataset
        self.indices = list(range(len(dataset))) if indices is None else list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        image, label = self.dataset[self.indices[i]]
        return {"pixel_values": image, "labels": torch.tensor(label, dtype=torch.long)}


def imagenet_transform(resize_size: int = 256, crop_size: int = 224,
                       mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD) -> Any:
    """``Resize(resize_size)`` (shorter side) + ``CenterCrop(crop_size)`` + normalization."""
    from torchvision import transforms

    return transforms.Compose(
        [
            transforms.Resize(resize_size, interpolation=transforms.InterpolationMode.BILINEAR),
            transforms.CenterCrop(crop_size),
            transforms.ToTensor(),
            transforms.Normalize(list(mean), list(std)),
        ]
    )


class ImageFolderData(PTQDataModule):
    """ImageNet-style class folders through torchvision ``ImageFolder``.

    Args:
        train_dir: training images, one sub-folder per class (``n01440764/...``);
            calibration images are drawn from here.
        val_dir: evaluation images in the same class-folder layout (for ImageNet,
            the validation set reorganized into class folders, as the
            torchvision reference scripts expect).
        num_calibration: calibration images, a seeded random sample of
            ``train_dir`` (1024 in the FlexRound paper).
        num_eval: optional cap: a seeded random subset of ``val_dir`` (class
            folders are sorted, so the first images would all be one class).
        resize_size, crop_size: ``Resize(resize_size)`` of the shorter side,
            then ``CenterCrop(crop_size)`` (256 / 224 for ImageNet).
        mean, std: normalization (ImageNet's by default).
        batch_size: calibration batch size; eval_batch_size: evaluation batch size.
        seed: seeds the calibration sample and the ``num_eval`` subset.
        num_workers: ``DataLoader`` workers (JPEG decoding is the bottleneck on ImageNet).
    """

    task = "image-classification"

    def __init__(
        self,
        train_dir: str,
        val_dir: str,
        num_calibration: int = 1024,
        num_eval: Optional[int] = None,
        resize_size: int = 256,
        crop_size: int = 224,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        batch_size: int = 32,
        eval_batch_size: int = 64,
        seed: int = 0,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        _check_positive(
            num_calibration=num_calibration, num_eval=num_eval, resize_size=resize_size,
            crop_size=crop_size, batch_size=batch_size, eval_batch_size=eval_batch_size,
        )
        if crop_size > resize_size:
            raise ValueError(f"crop_size ({crop_size}) must not exceed resize_size ({resize_size})")
        if len(mean) != len(std) or any(s <= 0 for s in std):
            raise ValueError(f"mean and std must have the same length and std > 0, got {mean} / {std}")
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        for name, path in (("train_dir", train_dir), ("val_dir", val_dir)):
            if not path or not os.path.isdir(os.path.expanduser(path)):
                raise ValueError(
                    f"{name} {path!r} is not a directory; point data.init_args.{name} at an "
                    "ImageNet-style folder with one sub-folder of images per class"
                )
        self.train_dir, self.val_dir = os.path.expanduser(train_dir), os.path.expanduser(val_dir)
        self.num_calibration, self.num_eval = num_calibration, num_eval
        self.resize_size, self.crop_size = resize_size, crop_size
        self.mean, self.std = tuple(mean), tuple(std)
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size
        self.seed, self.num_workers = seed, num_workers
        self._train: Any = None
        self._val: Any = None
        self._splits: Optional[dict[str, list[int]]] = None

    def _image_folder(self, path: str, name: str) -> Any:
        from torchvision.datasets import ImageFolder

        try:
            return ImageFolder(path, transform=imagenet_transform(self.resize_size, self.crop_size, self.mean, self.std))
        except (FileNotFoundError, RuntimeError) as e:  # no class folders / no images
            raise ValueError(f"{name} {path!r}: {e}") from None

    def setup(self, stage: Optional[str] = None) -> None:
        if self._train is not None:
            return
        train = self._image_folder(self.train_dir, "train_dir")
        val = self._image_folder(self.val_dir, "val_dir")
        if train.classes != val.classes:
            missing = sorted(set(train.classes) ^ set(val.classes))[:5]
            raise ValueError(
                f"train_dir and val_dir have different class folders ({len(train.classes)} vs "
                f"{len(val.classes)}; e.g. {missing}); labels are folder indices, so they must match"
            )
        if self.num_calibration > len(train):
            raise ValueError(f"num_calibration={self.num_calibration} but train_dir holds {len(train)} images")
        if self.num_eval is None or self.num_eval >= len(val):
            eval_idx = list(range(len(val)))
        else:
            eval_idx = sorted(seeded_subset(len(val), self.num_eval, self.seed + 1))
        self._train, self._val = train, val
        self._splits = {
            "calibration": seeded_subset(len(train), self.num_calibration, self.seed),
            "eval": eval_idx,
        }

    @property
    def num_labels(self) -> int:
        self.setup()
        return len(self._train.classes)

    @property
    def label_names(self) -> list[str]:
        self.setup()
        return list(self._train.classes)

    def metrics(self) -> TopKMetrics:
        return TopKMetrics(self.num_labels)

    def _loader(self, dataset: Any, indices: Optional[list[int]], batch_size: int, shuffle: bool = False) -> DataLoader:
        return DataLoader(
            _AsDict(dataset, indices),
            batch_size=batch_size,
            shuffle=shuffle,
            generator=torch.Generator().manual_seed(self.seed) if shuffle else None,
            num_workers=self.num_workers,
        )

    def calibration_dataloader(self) -> DataLoader:
        self.setup()
        return self._loader(self._train, self._splits["calibration"], self.batch_size)

    def train_dataloader(self) -> DataLoader:
        self.setup()
        return self._loader(self._train, None, self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        self.setup()
        return self._loader(self._val, self._splits["eval"], self.eval_batch_size)

    def test_dataloader(self) -> DataLoader:
        return self.val_dataloader()
