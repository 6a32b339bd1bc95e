"""Image data modules: batch shapes, seeded calibration, preprocessing, clear errors (fast)."""

from __future__ import annotations

import gzip
import os
import struct

import numpy as np
import pytest
import torch

from flexround_pl.data.images import (
    DigitsData,
    FashionMNISTData,
    ImageFolderData,
    imagenet_transform,
    load_fashion_mnist,
    read_idx,
)
from flexround_pl.evaluate.metrics import TopKMetrics

DEBIAN_FMNIST = "/usr/share/datasets/fashion-mnist"


def _write_idx(path: str, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(struct.pack(">I", d) for d in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


@pytest.fixture
def fake_fmnist(tmp_path) -> str:
    """A Fashion-MNIST-shaped folder: 64 train / 20 test images with known labels."""
    rng = np.random.default_rng(0)
    d = tmp_path / "fmnist"
    d.mkdir()
    for prefix, n in (("train", 64), ("t10k", 20)):
        _write_idx(str(d / f"{prefix}-images-idx3-ubyte.gz"), rng.integers(0, 256, (n, 28, 28)))
        _write_idx(str(d / f"{prefix}-labels-idx1-ubyte.gz"), np.arange(n) % 10)
    return str(d)


# ----------------------------------------------------------------------------- Fashion-MNIST


def test_read_idx_roundtrip(tmp_path):
    a = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    _write_idx(str(tmp_path / "a.gz"), a)
    np.testing.assert_array_equal(read_idx(str(tmp_path / "a.gz")), a)
    (tmp_path / "bad").write_bytes(b"\x01\x02\x03\x04")
    with pytest.raises(ValueError, match="IDX"):
        read_idx(str(tmp_path / "bad"))


def test_fashion_mnist_batches(fake_fmnist):
    dm = FashionMNISTData(data_dir=fake_fmnist, num_calibration=16, batch_size=8, eval_batch_size=16, num_eval=12)
    dm.setup("fit")
    assert dm.task == "image-classification" and dm.num_labels == 10
    cal = list(dm.calibration_dataloader())
    assert len(cal) == 2
    assert cal[0]["pixel_values"].shape == (8, 1, 32, 32) and cal[0]["pixel_values"].dtype == torch.float32
    assert cal[0]["labels"].dtype == torch.long
    ev = list(dm.val_dataloader())
    assert sum(len(b["labels"]) for b in ev) == 12
    assert torch.equal(ev[0]["labels"], torch.arange(12) % 10)  # the first test images, in order
    # seeded and reproducible, distinct images
    again = FashionMNISTData(data_dir=fake_fmnist, num_calibration=16, batch_size=8)
    assert torch.equal(next(iter(again.calibration_dataloader()))["pixel_values"], cal[0]["pixel_values"])
    other = FashionMNISTData(data_dir=fake_fmnist, num_calibration=16, batch_size=8, seed=1)
    assert not torch.equal(next(iter(other.calibration_dataloader()))["pixel_values"], cal[0]["pixel_values"])
    three = FashionMNISTData(data_dir=fake_fmnist, num_calibration=4, batch_size=4, channels=3, image_size=28)
    assert next(iter(three.calibration_dataloader()))["pixel_values"].shape == (4, 3, 28, 28)
    assert set(dm.metrics().names) == {"top1", "top5"}


def test_fashion_mnist_errors(tmp_path, fake_fmnist):
    with pytest.raises(ValueError, match="apt-get install -y dataset-fashion-mnist"):
        FashionMNISTData(data_dir=str(tmp_path / "nowhere"))
    with pytest.raises(ValueError, match="num_calibration"):
        FashionMNISTData(data_dir=fake_fmnist, num_calibration=0)
    with pytest.raises(ValueError, match="channels"):
        FashionMNISTData(data_dir=fake_fmnist, channels=2)
    with pytest.raises(ValueError, match="64 images"):
        FashionMNISTData(data_dir=fake_fmnist, num_calibration=65).setup()


@pytest.mark.slow  # needs: apt-get install dataset-fashion-mnist
def test_debian_fashion_mnist_files():
    images, labels = load_fashion_mnist("test")
    assert images.shape == (10000, 28, 28) and images.dtype == torch.uint8
    assert labels.shape == (10000,) and int(labels.min()) == 0 and int(labels.max()) == 9


# ----------------------------------------------------------------------------- digits


def test_digits_batches():
    dm = DigitsData(num_calibration=24, num_eval=40, batch_size=8, eval_batch_size=16, image_size=16, channels=3)
    batch = next(iter(dm.calibration_dataloader()))
    assert batch["pixel_values"].shape == (8, 3, 16, 16) and batch["labels"].shape == (8,)
    assert sum(len(b["labels"]) for b in dm.val_dataloader()) == 40
    assert dm.num_labels == 10 and isinstance(dm.metrics(), TopKMetrics)
    with pytest.raises(ValueError, match="eval_size"):
        DigitsData(eval_size=1797)


# ----------------------------------------------------------------------------- image folders


def _image_folder(root, classes=("cat", "dog", "fox"), per_class=4, size=(40, 30)) -> str:
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in classes:
        os.makedirs(root / c, exist_ok=True)
        for i in range(per_class):
            pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / c / f"{i}.png")
    return str(root)


def test_imagenet_preprocessing_keeps_aspect_ratio():
    from torchvision import transforms

    resize, crop = imagenet_transform().transforms[:2]
    assert isinstance(resize, transforms.Resize) and resize.size in (256, [256])  # shorter side, not (256, 256)
    assert isinstance(crop, transforms.CenterCrop) and tuple(crop.size) == (224, 224)


def test_image_folder_batches(tmp_path):
    train = _image_folder(tmp_path / "train")
    val = _image_folder(tmp_path / "val", per_class=3)
    dm = ImageFolderData(train, val, num_calibration=5, resize_size=36, crop_size=32, batch_size=4, eval_batch_size=4)
    dm.setup("fit")
    assert dm.num_labels == 3 and dm.label_names == ["cat", "dog", "fox"]
    cal = list(dm.calibration_dataloader())
    assert [len(b["labels"]) for b in cal] == [4, 1]
    assert cal[0]["pixel_values"].shape == (4, 3, 32, 32) and cal[0]["labels"].dtype == torch.long
    assert sum(len(b["labels"]) for b in dm.val_dataloader()) == 9
    assert set(dm.metrics().names) == {"top1"}  # top5 needs >= 5 classes
    capped = ImageFolderData(train, val, num_calibration=2, num_eval=4, resize_size=36, crop_size=32)
    labels = torch.cat([b["labels"] for b in capped.val_dataloader()])
    assert len(labels) == 4


def test_image_folder_errors(tmp_path):
    train = _image_folder(tmp_path / "train")
    with pytest.raises(ValueError, match="val_dir"):
        ImageFolderData(train, str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="crop_size"):
        ImageFolderData(train, train, resize_size=32, crop_size=64)
    other = _image_folder(tmp_path / "val", classes=("cat", "dog"))
    with pytest.raises(ValueError, match="different class folders"):
        ImageFolderData(train, other, num_calibration=2).setup()
    with pytest.raises(ValueError, match="num_calibration"):
        ImageFolderData(train, train, num_calibration=100).setup()
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="train_dir"):
        ImageFolderData(str(tmp_path / "empty"), train).setup()
