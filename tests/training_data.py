"""The tiny training setup the training tests share: a synthetic dataset (12x12 images written
as Fashion-MNIST-named IDX files) and a tiny CapsNet config, so that each run takes a second or
two. tests/conftest.py builds the fixtures dataset_dir and straight_run from them.
"""

from __future__ import annotations

import dataclasses
import gzip
from pathlib import Path

import numpy as np
import torch

from capsnet_fused import data
from capsnet_fused.data import load_dataset, to_float
from capsnet_fused.train import TrainConfig

SIZE = 12


def idx_bytes(array: np.ndarray) -> bytes:
    header = bytes([0, 0, 8, array.ndim]) + b"".join(d.to_bytes(4, "big") for d in array.shape)
    return header + array.tobytes()


def write_synthetic_dataset(directory: Path, n_train: int = 64, n_test: int = 40) -> Path:
    """Fashion-MNIST-named IDX files of 12x12 images: class k is a bright block at spot k."""
    rng = np.random.default_rng(0)
    directory.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("test", n_test)):
        labels = rng.integers(0, 10, size=n).astype(np.uint8)
        images = rng.integers(0, 60, size=(n, SIZE, SIZE)).astype(np.uint8)
        for k, label in enumerate(labels):
            top, left = 2 * (label // 5) + 3, 2 * (label % 5)
            images[k, top : top + 3, left : left + 3] = 255
        image_name, label_name = data.FILES[split]
        (directory / image_name).write_bytes(gzip.compress(idx_bytes(images)))
        # Labels unzipped: both forms are accepted.
        (directory / label_name[: -len(".gz")]).write_bytes(idx_bytes(labels))
    return directory


def tiny_config(data_dir: Path, out: Path, **changes) -> TrainConfig:
    config = TrainConfig(
        dataset="fashion-mnist",
        data_dir=str(data_dir),
        out=str(out),
        epochs=2,
        batch_size=16,
        conv_channels=6,
        kernel_size=3,
        primary_caps=2,
        primary_dim=4,
        digit_dim=6,
        decoder_hidden=(24, 32),
        progress=False,
        seed=3,
        # Not "auto": the same precision and layout on every CPU the tests run on.
        amp=False,
        channels_last=False,
    )
    return dataclasses.replace(config, **changes)


def assert_same_state(a: dict, b: dict, atol: float = 1e-6) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.allclose(a[name], b[name], rtol=1e-5, atol=atol), name


def global_batch(dataset_dir: Path, size: int = 8):
    """The first `size` training images (floats in [0, 1]) and their labels."""
    train_set = load_dataset("fashion-mnist", "train", dataset_dir, limit=size, download=False)
    return to_float(train_set.images), train_set.labels
