"""Test loss and accuracy: of the model being trained (evaluate, every epoch) and of a
checkpoint (evaluate_checkpoint, `capsnet-fused eval`), on the test split (load_test_set)."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from capsnet_fused._checks import resolve_device
from capsnet_fused.checkpoint import checkpoint_path, load_checkpoint
from capsnet_fused.data import ImageDataset, Normalization, load_dataset, to_float
from capsnet_fused.ops import choose_backend
from capsnet_fused.robustness import AffineSpec, perturb_dataset
from capsnet_fused.train.config import TrainConfig
from capsnet_fused.train.distributed import DistInfo, _all_sum
from capsnet_fused.train.model import class_scores, make_criterion
from capsnet_fused.train.resume import model_from_checkpoint, normalization_from_checkpoint
from capsnet_fused.train.stats import EpochStats


@torch.no_grad()
def evaluate(
    model: nn.Module,
    dataset: ImageDataset,
    criterion: nn.Module,
    device: torch.device,
    *,
    batch_size: int = 256,
    info: DistInfo | None = None,
    progress: bool = False,
    stop: Callable[[], bool] | None = None,
    normalization: Normalization | None = None,
) -> dict[str, float]:
    """Test loss (for CapsNet: margin + scaled reconstruction of the predicted capsule, also
    reported apart as margin_loss and recon_loss; the criterion's part_names) and accuracy,
    in the model's own precision (float32 also for a run trained under --amp).

    normalization, when given, is applied to the model's input only (the loss compares
    reconstructions with the images in [0, 1]). Under DDP each process takes every
    world_size-th image, so the sums cover each image once. stop (one process only) is asked
    after every batch; when it says True the evaluation ends there, and "complete" is False in
    the result (which covers the images seen).
    """
    info = info or DistInfo()
    shard = Subset(dataset, range(info.rank, len(dataset), info.world_size))
    loader = DataLoader(shard, batch_size=batch_size, shuffle=False)
    was_training = model.training
    model.eval()
    names = tuple(criterion.part_names)
    sums = EpochStats(part_sums=[0.0] * len(names))
    complete = True
    for images, labels in tqdm(
        loader, desc="eval", unit="batch", leave=False, disable=not (progress and info.main)
    ):
        if stop is not None and not info.enabled and sums.images > 0 and stop():
            complete = False
            break
        images, labels = to_float(images.to(device)), labels.to(device)
        inputs = normalization(images) if normalization is not None else images
        output = model(inputs)
        losses = criterion(output, images, labels)
        n = labels.shape[0]
        correct = (class_scores(output).argmax(dim=1) == labels).sum().item()
        loss_sum, *part_sums = (value.item() * n for value in losses)
        batch = EpochStats(
            loss_sum=loss_sum, correct=correct, images=n, processed=n, part_sums=part_sums
        )
        sums = sums + batch
    model.train(was_training)
    sums = EpochStats.from_list(_all_sum(sums.to_list(), info, device))
    count = max(sums.images, 1.0)
    return {
        "loss": sums.loss_sum / count,
        **{name: value / count for name, value in zip(names, sums.part_sums, strict=True)},
        "accuracy": sums.correct / count,
        "images": int(count),
        "complete": complete,
    }


def evaluate_checkpoint(
    checkpoint: str | os.PathLike,
    *,
    data_dir: str | None = None,
    device: str = "auto",
    batch_size: int = 256,
    limit: int | None = None,
    backend: str | None = None,
    progress: bool = True,
    affine: AffineSpec | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Test accuracy and loss of a checkpoint on its dataset's test split.

    The data folder is data_dir, else the one the run was trained on (recorded as an absolute
    path); only checkpoints of runs that searched the default folders search them again. With
    `affine`, each test image is first perturbed by its own random affine transformation
    (capsnet_fused.robustness, seeded with `seed`): the same images for every model.
    The run's input normalisation, if any, is applied as in training.
    """
    if batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {batch_size}")
    dev = resolve_device(device)
    ckpt = checkpoint_path(checkpoint)
    state = load_checkpoint(ckpt)
    model, config = model_from_checkpoint(state, dev, backend, ckpt)
    normalization = normalization_from_checkpoint(state, config, ckpt)
    test_set = load_test_set(config, data_dir, limit, tuple(state["image_shape"]))
    if affine is not None:
        test_set = perturb_dataset(test_set, affine, seed)
    metrics: dict[str, Any] = evaluate(
        model,
        test_set,
        make_criterion(config),
        dev,
        batch_size=batch_size,
        progress=progress,
        normalization=normalization,
    )
    metrics["model"] = config.model
    metrics["backend"] = choose_backend(dev, torch.float32, config.backend)
    if affine is not None:
        metrics["affine"] = str(affine)
        metrics["affine_seed"] = seed
    return metrics


def load_test_set(
    config: TrainConfig,
    data_dir: str | None,
    limit: int | None,
    image_shape: tuple[int, ...],
) -> ImageDataset:
    """The test split a trained model is evaluated on: from data_dir, else the folder its run
    read (config.data_dir); ValueError when the images do not have image_shape [C, H, W]."""
    folder = data_dir or config.data_dir
    test_set = load_dataset(config.dataset, "test", folder, limit=limit, download=folder is None)
    if test_set.image_shape != image_shape:
        raise ValueError(
            f"test images in {test_set.source} are {list(test_set.image_shape)} "
            f"[C, H, W]; the model expects {list(image_shape)}"
        )
    return test_set
