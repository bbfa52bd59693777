"""Training and evaluation of CapsNet on MNIST / Fashion-MNIST.

One process or many under torchrun (DistributedDataParallel: gloo on CPU, nccl on CUDA). Rank 0
alone writes the run folder: config.json, metrics.jsonl (one JSON object per epoch) and
checkpoint.pt, all atomically (capsnet_fused.checkpoint). A resumed run restores the model,
optimiser, scheduler, grad scaler, every RNG state and the position in the epoch, so it follows
the trajectory of an uninterrupted run.

A checkpoint holds only a state known to be good: the state after step k is written once the
loss of step k+1, computed from it, is finite (or, at the end of an epoch, once the test loss
is), and its parameters and optimiser state are finite. So a run that diverges keeps the last
good checkpoint. The checkpoint also holds the epoch records, and metrics.jsonl is rewritten
from them, so the two always agree. SIGINT and SIGTERM stop the run at the next step with a
checkpoint (exit status 130 / 143).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import random
import shlex
import signal
import sys
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from capsnet_fused._checks import (
    SHARED_LOGITS,
    SOFTMAX_OVER,
    SQUASH_EPS,
    check_backend_name,
    check_routing_options,
    resolve_device,
)
from capsnet_fused.baseline import BaselineCNN, CrossEntropyCriterion
from capsnet_fused.checkpoint import (
    CHECKPOINT_FORMAT,
    CHECKPOINT_NAME,
    CONFIG_NAME,
    METRICS_NAME,
    RESUME_KEYS,
    SESSIONS_NAME,
    CheckpointWriteError,  # noqa: F401 (raised through save_checkpoint; importable from here)
    checkpoint_path,
    history_for,
    load_checkpoint,
    read_jsonl,
    read_metrics_lenient,
    remove_stale_temporaries,
    save_checkpoint,
    write_metrics,
    write_text_atomic,
)
from capsnet_fused.data import (
    DATASETS,
    ImageDataset,
    Normalization,
    ResumableSampler,
    load_dataset,
    random_hflip,
    random_shift,
    to_float,
)
from capsnet_fused.info import machine_summary
from capsnet_fused.losses import CapsNetLoss
from capsnet_fused.models import CapsNet, CapsNetOutput
from capsnet_fused.ops import BACKENDS, choose_backend
from capsnet_fused.robustness import AffineSpec, perturb_dataset

# capsnet: the paper's CapsNet; cnn: the plain CNN baseline of the same size (baseline.py).
MODELS = ("capsnet", "cnn")


@dataclass
class TrainConfig:
    """Every setting of a training run; defaults follow Sabour et al. (2017)."""

    dataset: str = "fashion-mnist"
    data_dir: str | None = None
    epochs: int = 10
    batch_size: int = 128
    lr: float = 1e-3
    lr_decay: float = 0.96
    recon_scale: float = 0.0005
    max_shift: int = 2
    hflip: bool = False
    normalize: bool = False
    model: str = "capsnet"
    routing_iterations: int = 3
    softmax_over: str = "out_caps"
    learn_prior: bool = False
    learn_bias: bool = False
    detach_inner: bool = False
    leaky: bool = False
    squash_eps: float = SQUASH_EPS
    shared_logits: str | None = None
    backend: str = "auto"
    device: str = "auto"
    seed: int = 0
    out: str | None = None
    num_workers: int = 0
    amp: bool = False
    channels_last: bool = False
    checkpoint_every: int = 0
    limit_train: int | None = None
    limit_test: int | None = None
    progress: bool = True
    conv_channels: int = 256
    kernel_size: int = 9
    primary_caps: int = 32
    primary_dim: int = 8
    digit_dim: int = 16
    decoder_hidden: tuple[int, int] = (512, 1024)
    digit_init_scale: float = 0.01

    def validate(self) -> None:
        """Raise ValueError naming the first setting out of range."""
        if self.dataset not in DATASETS:
            raise ValueError(f"dataset must be one of {DATASETS}, got {self.dataset!r}")
        if self.model not in MODELS:
            raise ValueError(f"model must be one of {MODELS}, got {self.model!r}")
        check_routing_options(
            self.routing_iterations, self.softmax_over, self.leaky, self.squash_eps,
            self.shared_logits,
        )  # fmt: skip
        check_backend_name(self.backend)
        positive = (
            "epochs",
            "batch_size",
            "routing_iterations",
            "conv_channels",
            "kernel_size",
            "primary_caps",
            "primary_dim",
            "digit_dim",
        )
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("limit_train", "limit_test"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1 or unset, got {getattr(self, name)}")
        for name in ("num_workers", "checkpoint_every", "max_shift"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        # `not x > 0` also refuses NaN; math.isfinite refuses inf (lr = inf diverges at once).
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr must be a finite number > 0, got {self.lr}")
        if not 0 < self.lr_decay <= 1:
            raise ValueError(f"lr_decay must be in (0, 1], got {self.lr_decay}")
        if not (math.isfinite(self.recon_scale) and self.recon_scale >= 0):
            raise ValueError(f"recon_scale must be a finite number >= 0, got {self.recon_scale}")
        if not (math.isfinite(self.digit_init_scale) and self.digit_init_scale > 0):
            raise ValueError(f"digit_init_scale must be > 0, got {self.digit_init_scale}")
        if len(self.decoder_hidden) != 2 or min(self.decoder_hidden) < 1:
            raise ValueError(f"decoder_hidden must be two sizes >= 1, got {self.decoder_hidden}")
        if self.model == "cnn":
            # The baseline has no routing: such a setting would be silently unused.
            default = TrainConfig()
            unused = [
                name for name in CAPSULE_ONLY if getattr(self, name) != getattr(default, name)
            ]
            if unused:
                raise ValueError(
                    f"model 'cnn' has no capsule routing; these settings do not apply "
                    f"to it: {', '.join(unused)}"
                )


# Settings of the capsule routing, which the CNN baseline (model "cnn") does not have.
CAPSULE_ONLY = (
    "routing_iterations", "softmax_over", "learn_prior", "learn_bias", "detach_inner", "leaky",
    "squash_eps", "shared_logits",
)  # fmt: skip


# Settings added after checkpoints were first written, with the values that reproduce what a
# checkpoint without them trained with: such a checkpoint resumes with these.
ADDED_SETTINGS = {
    "hflip": False,
    "normalize": False,
    "model": "capsnet",
    "learn_bias": False,
    "leaky": False,
    "squash_eps": SQUASH_EPS,
    "shared_logits": None,
}

# Settings a resumed run may change; all others come from the checkpoint. The backend changes
# only how the routing is computed, not what (every backend computes the same function).
RESUMABLE_OVERRIDES = (
    "epochs",
    "data_dir",
    "device",
    "backend",
    "out",
    "num_workers",
    "checkpoint_every",
    "progress",
    "limit_test",
)


def _flag(name: str) -> str:
    """The command-line flag of a TrainConfig field."""
    return "--no-progress" if name == "progress" else "--" + name.replace("_", "-")


class TrainingDiverged(RuntimeError):
    """The loss, the test loss or the parameters became NaN or Inf; the last good checkpoint
    is kept."""


class TrainingInterrupted(RuntimeError):
    """SIGINT or SIGTERM stopped the run after writing a checkpoint; exit_status is 128 + the
    signal number (130, 143)."""

    def __init__(self, message: str, exit_status: int) -> None:
        super().__init__(message)
        self.exit_status = exit_status


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    """Define the flags of `capsnet-fused train`. Unset flags stay None (see config_from_args)."""
    d = TrainConfig()
    add = parser.add_argument
    add("--dataset", choices=DATASETS, help=f"dataset to train on (default {d.dataset})")
    add(
        "--data-dir",
        help="folder with the IDX files (or its <dataset> subfolder); an error when they are "
        "not there. Without it: ./data, ./data/<dataset>, /usr/share/datasets/fashion-mnist, "
        "else a download to ./data/<dataset>",
    )
    add("--epochs", type=int, help=f"number of epochs to train in total (default {d.epochs})")
    add("--batch-size", type=int, help=f"images per step per process (default {d.batch_size})")
    add("--lr", type=float, help=f"Adam learning rate (default {d.lr})")
    add(
        "--lr-decay",
        type=float,
        help=f"ExponentialLR factor applied after every epoch (default {d.lr_decay})",
    )
    add(
        "--recon-scale",
        type=float,
        help=f"weight of the reconstruction loss (default {d.recon_scale})",
    )
    add(
        "--max-shift",
        type=int,
        help="largest random shift in pixels, each direction, for "
        f"training images; 0 disables augmentation (default {d.max_shift})",
    )
    add(
        "--hflip",
        action="store_true",
        default=None,
        help="also mirror each training image left to right with probability 1/2 (default off)",
    )
    add(
        "--normalize",
        action="store_true",
        default=None,
        help="feed the model (x - mean) / std, with the mean and std of the training images "
        "used (recorded in config.json and the checkpoint); reconstructions are still "
        "compared with the images in [0, 1] (default off)",
    )
    add(
        "--model",
        choices=MODELS,
        help="capsnet (the paper's CapsNet) or cnn (a plain CNN of the same size, the baseline: "
        "CapsNet's two convolutions, then fully connected 328, 192, dropout, cross entropy; "
        f"routing and decoder flags do not apply) (default {d.model})",
    )
    add(
        "--routing-iterations",
        type=int,
        help=f"dynamic routing iterations (default {d.routing_iterations})",
    )
    add(
        "--softmax-over",
        choices=SOFTMAX_OVER,
        help="normalise couplings over output capsules "
        f"(paper) or input capsules (default {d.softmax_over})",
    )
    add(
        "--learn-prior",
        action="store_true",
        default=None,
        help="learn the initial routing logits (default off)",
    )
    add(
        "--learn-bias",
        action="store_true",
        default=None,
        help="learn a DigitCaps bias [J, M] added to s before every squash, starting at 0.1 "
        "(the official code's; default off)",
    )
    add(
        "--detach-inner",
        action="store_true",
        default=None,
        help="no gradient through the inner routing iterations (default off)",
    )
    add(
        "--leaky",
        action="store_true",
        default=None,
        help="leaky routing: one extra logit fixed at 0 on the softmax axis (the official "
        "code's; default off)",
    )
    add(
        "--squash-eps",
        type=float,
        metavar="EPS",
        help=f"eps of every squash, |s|^2/(1+|s|^2) s/sqrt(|s|^2+EPS); 0 is the eps-free "
        f"squash, NaN at s = 0 (default {d.squash_eps:g})",
    )
    add(
        "--shared-logits",
        choices=[mode for mode in SHARED_LOGITS if mode is not None],
        help="one set of routing logits for the whole batch, updated with the batch mean or "
        "sum of the agreements (pyCapsNet, jindongwang/Pytorch-CapsuleNet); a sample's output "
        "then depends on the rest of its batch (default: logits per sample)",
    )
    add(
        "--backend",
        choices=("auto", *BACKENDS),
        help=f"routing backend (default {d.backend}: the fastest available)",
    )
    add("--device", help="cpu, cuda, cuda:N or auto (default auto: cuda when available)")
    add(
        "--seed", type=int, help=f"seed for initialisation, shuffling and shifts (default {d.seed})"
    )
    add(
        "--out",
        help="run folder for config, metrics and checkpoints "
        "(default runs/<dataset>-<time>; the checkpoint's folder when resuming)",
    )
    add(
        "--resume",
        metavar="CHECKPOINT",
        help="continue from a checkpoint file or run folder (settings come from it, except "
        f"{', '.join(_flag(n) for n in RESUMABLE_OVERRIDES)})",
    )
    add("--num-workers", type=int, help=f"DataLoader worker processes (default {d.num_workers})")
    add(
        "--amp",
        action="store_true",
        default=None,
        help="mixed precision: bfloat16 autocast on CPU, float16 with GradScaler on CUDA",
    )
    add(
        "--channels-last",
        action="store_true",
        default=None,
        help="channels-last memory order for the convolutions (see the README for where it is "
        "faster)",
    )
    add(
        "--checkpoint-every",
        type=int,
        metavar="N",
        help="also checkpoint every N steps (default 0: only at the end of each epoch)",
    )
    add("--limit-train", type=int, metavar="N", help="train on the first N training images only")
    add("--limit-test", type=int, metavar="N", help="evaluate on the first N test images only")
    add(
        "--no-progress",
        dest="progress",
        action="store_false",
        default=None,
        help="no progress bars (the per-epoch line is still printed)",
    )
    model = parser.add_argument_group("model size (defaults are the paper's CapsNet)")
    model.add_argument(
        "--conv-channels",
        type=int,
        help=f"channels of the first convolution (default {d.conv_channels})",
    )
    model.add_argument(
        "--kernel-size", type=int, help=f"kernel of both convolutions (default {d.kernel_size})"
    )
    model.add_argument(
        "--primary-caps", type=int, help=f"primary capsule channels (default {d.primary_caps})"
    )
    model.add_argument(
        "--primary-dim",
        type=int,
        help=f"pose size N of a primary capsule (default {d.primary_dim})",
    )
    model.add_argument(
        "--digit-dim", type=int, help=f"pose size M of a digit capsule (default {d.digit_dim})"
    )
    model.add_argument(
        "--decoder-hidden",
        type=int,
        nargs=2,
        metavar=("H1", "H2"),
        help=f"decoder hidden sizes (default {d.decoder_hidden[0]} {d.decoder_hidden[1]})",
    )
    model.add_argument(
        "--digit-init-scale",
        type=float,
        help=f"DigitCaps weights start at this x randn (default {d.digit_init_scale})",
    )


def config_from_args(args: argparse.Namespace) -> tuple[TrainConfig, dict[str, Any]]:
    """The run's config (defaults filled in) and the settings given explicitly."""
    given = {
        field.name: getattr(args, field.name)
        for field in dataclasses.fields(TrainConfig)
        if getattr(args, field.name, None) is not None
    }
    if "decoder_hidden" in given:
        given["decoder_hidden"] = tuple(given["decoder_hidden"])
    return dataclasses.replace(TrainConfig(), **given), given


def build_model(config: TrainConfig, image_shape: tuple[int, int, int]) -> nn.Module:
    """CapsNet for images [C, H, W] with the sizes and routing options of `config` (or the CNN
    baseline of the same convolutions for model "cnn")."""
    channels, height, width = image_shape
    if config.model == "cnn":
        return BaselineCNN(
            channels,
            (height, width),
            conv_channels=config.conv_channels,
            kernel_size=config.kernel_size,
            conv2_channels=config.primary_caps * config.primary_dim,
        )
    return CapsNet(
        channels,
        (height, width),
        conv_channels=config.conv_channels,
        kernel_size=config.kernel_size,
        primary_caps=config.primary_caps,
        primary_dim=config.primary_dim,
        digit_dim=config.digit_dim,
        decoder_hidden=tuple(config.decoder_hidden),
        routing_iterations=config.routing_iterations,
        softmax_over=config.softmax_over,
        learn_prior=config.learn_prior,
        learn_bias=config.learn_bias,
        detach_inner=config.detach_inner,
        leaky=config.leaky,
        squash_eps=config.squash_eps,
        shared_logits=config.shared_logits,
        backend=config.backend,
        digit_init_scale=config.digit_init_scale,
        channels_last=config.channels_last,
    )


def make_criterion(config: TrainConfig) -> nn.Module:
    """The training loss of config.model: forward(output, images, labels) -> (loss, *parts),
    parts named by its part_names."""
    if config.model == "cnn":
        return CrossEntropyCriterion()
    return CapsNetLoss(config.recon_scale)


def class_scores(output: CapsNetOutput | torch.Tensor) -> torch.Tensor:
    """[B, J] scores whose argmax is the prediction: capsule lengths, or a CNN's logits."""
    return output.lengths if isinstance(output, CapsNetOutput) else output


def autocast_context(device: torch.device, enabled: bool):
    """bfloat16 autocast on CPU, float16 on CUDA; a no-op when disabled."""
    dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
    return torch.autocast(device.type, dtype=dtype, enabled=enabled)


# ---------------------------------------------------------------- checkpoints


def config_from_checkpoint(state: dict[str, Any], path: str | os.PathLike = "") -> TrainConfig:
    """The TrainConfig stored in a checkpoint; ValueError naming `path` when it does not fit
    this version's settings (unknown or missing fields, values out of range)."""
    config = state["config"]
    if not isinstance(config, dict):
        raise ValueError(f"{path}: the checkpoint's config is not a dict of settings")
    known = {field.name for field in dataclasses.fields(TrainConfig)}
    config = {**{k: v for k, v in ADDED_SETTINGS.items() if k not in config}, **config}
    unknown, missing = sorted(set(config) - known), sorted(known - set(config))
    if unknown or missing:
        raise ValueError(
            f"{path}: the checkpoint's config does not match this version of capsnet-fused "
            f"(unknown settings: {', '.join(unknown) or 'none'}; missing: "
            f"{', '.join(missing) or 'none'})"
        )
    config = dict(config)
    try:
        config["decoder_hidden"] = tuple(config["decoder_hidden"])
        result = TrainConfig(**config)
        result.validate()
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{path}: the checkpoint's config is invalid ({exc})") from exc
    return result


def _load_state_dict(target, state: dict, what: str, path: str | os.PathLike) -> None:
    """target.load_state_dict(state) with a one-line error naming the checkpoint."""
    try:
        target.load_state_dict(state)
    except (RuntimeError, ValueError, KeyError, TypeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(
            f"{path}: the checkpoint's {what} does not fit the model its config describes "
            f"({first[:200]})"
        ) from exc


def normalization_from_checkpoint(
    state: dict[str, Any], config: TrainConfig, path: str | os.PathLike = ""
) -> Normalization | None:
    """The input normalisation a run was trained with (None without --normalize); ValueError
    naming `path` when a --normalize checkpoint lacks its statistics."""
    if not config.normalize:
        return None
    stored = state.get("normalization")
    try:
        return Normalization.from_dict(stored)
    except (TypeError, KeyError, ValueError) as exc:
        raise ValueError(
            f"{path}: the run was trained with --normalize but its checkpoint holds no valid "
            f"normalization statistics ({stored!r})"
        ) from exc


def model_from_checkpoint(
    state: dict[str, Any],
    device: torch.device | str = "cpu",
    backend: str | None = None,
    path: str | os.PathLike = "",
) -> tuple[nn.Module, TrainConfig]:
    """The trained model (eval mode) and its config; backend overrides the trained one.

    With --normalize the model expects normalised images: see normalization_from_checkpoint.
    """
    config = config_from_checkpoint(state, path)
    if backend is not None:
        config.backend = backend
    model = build_model(config, tuple(state["image_shape"]))
    _load_state_dict(model, state["model"], "model", path)
    return model.to(device).eval(), config


def _rng_state(augment_gen: torch.Generator) -> dict[str, Any]:
    # numpy's state is stored as plain lists so that the checkpoint loads with weights_only.
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": [kind, keys.tolist(), pos, has_gauss, cached],
        "python": random.getstate(),
        "augment": augment_gen.get_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any], augment_gen: torch.Generator) -> None:
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    augment_gen.set_state(state["augment"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---------------------------------------------------------------- distributed


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    owns_group: bool = False

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_distributed(device_hint: str) -> DistInfo:
    """Join the process group torchrun describes (WORLD_SIZE > 1) or the one already set up."""
    if dist.is_available() and dist.is_initialized():
        return DistInfo(
            dist.get_rank(),
            dist.get_world_size(),
            int(os.environ.get("LOCAL_RANK", dist.get_rank())),
        )
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistInfo()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = resolve_device(device_hint, local_rank).type == "cuda"
    if use_cuda:
        torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl" if use_cuda else "gloo")
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, owns_group=True)


def _all_sum(values: list[float], info: DistInfo, device: torch.device) -> list[float]:
    """Element-wise sum over processes (identity for one process)."""
    if not info.enabled:
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return tensor.tolist()


# ---------------------------------------------------------------- evaluation


@torch.no_grad()
def evaluate(
    model: nn.Module,
    dataset: ImageDataset,
    criterion: nn.Module,
    device: torch.device,
    *,
    batch_size: int = 256,
    amp: bool = False,
    info: DistInfo | None = None,
    progress: bool = False,
    stop: Callable[[], bool] | None = None,
    normalization: Normalization | None = None,
) -> dict[str, float]:
    """Test loss (for CapsNet: margin + scaled reconstruction of the predicted capsule, also
    reported apart as margin_loss and recon_loss; the criterion's part_names) and accuracy.

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
    sums = [0.0] * (3 + len(names))  # correct, count, loss, parts...
    complete = True
    for images, labels in tqdm(
        loader, desc="eval", unit="batch", leave=False, disable=not (progress and info.main)
    ):
        if stop is not None and not info.enabled and sums[1] > 0 and stop():
            complete = False
            break
        images, labels = to_float(images.to(device)), labels.to(device)
        inputs = normalization(images) if normalization is not None else images
        with autocast_context(device, amp):
            output = model(inputs)
        losses = criterion(output, images, labels)
        n = labels.shape[0]
        correct = (class_scores(output).argmax(dim=1) == labels).sum().item()
        batch = (correct, n, *(value.item() * n for value in losses))
        sums = [a + b for a, b in zip(sums, batch, strict=True)]
    model.train(was_training)
    correct, count, loss, *parts = _all_sum(sums, info, device)
    count = max(count, 1.0)
    return {
        "loss": loss / count,
        **{name: value / count for name, value in zip(names, parts, strict=True)},
        "accuracy": correct / count,
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


# ---------------------------------------------------------------- training


def _default_out(config: TrainConfig) -> Path:
    return Path("runs") / f"{config.dataset}-{time.strftime('%Y%m%d-%H%M%S')}"


def _prepare_config(
    config: TrainConfig, given: dict[str, Any] | None, resume: str | None
) -> tuple[TrainConfig, dict[str, Any] | None]:
    """The effective config and the checkpoint to resume from (None for a fresh run)."""
    if resume is None:
        config.validate()
        return config, None
    path = checkpoint_path(resume)
    state = load_checkpoint(path, require=RESUME_KEYS)
    state["path"] = str(path)
    saved = config_from_checkpoint(state, path)
    given = given if given is not None else {}
    for name, value in given.items():
        if name in RESUMABLE_OVERRIDES:
            setattr(saved, name, value)
        elif value != getattr(saved, name):
            raise ValueError(
                f"{_flag(name)} {value!r} differs from the checkpoint's "
                f"{getattr(saved, name)!r}; a resumed run keeps its settings except "
                f"{', '.join(_flag(n) for n in RESUMABLE_OVERRIDES)}"
            )
    if "out" not in given:
        saved.out = str(path.parent)
    saved.validate()
    return saved, state


def _format_epoch(record: dict[str, Any], epochs: int) -> str:
    return (
        f"epoch {record['epoch']}/{epochs}: train loss {record['train_loss']:.4f} "
        f"acc {100 * record['train_accuracy']:.2f}% | test loss {record['test_loss']:.4f} "
        f"acc {100 * record['test_accuracy']:.2f}% | {record['images_per_s']:.1f} img/s, "
        f"{record['epoch_time_s']:.1f} s | lr {record['lr']:.3g} | backend {record['backend']}"
    )


def _position(epoch: int, step_in_epoch: int, step: int) -> str:
    """Where training stands, in words: after `epoch` whole epochs and step_in_epoch steps."""
    if step_in_epoch == 0:
        return f"the end of epoch {epoch} (step {step})"
    return f"step {step_in_epoch} of epoch {epoch + 1} (step {step} overall)"


class _StopSignals:
    """While active (main thread only), SIGINT and SIGTERM ask the training loop to stop at
    its next safe point, with a checkpoint, instead of killing it; a second SIGINT stops at
    once (KeyboardInterrupt, the last checkpoint kept). The previous handlers come back on
    exit."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> _StopSignals:
        if threading.current_thread() is threading.main_thread():
            for signum in self.SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc_info) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def _handle(self, signum: int, frame) -> None:
        if self.signum is not None:
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            return
        self.signum = signum
        sys.stderr.write(
            f"\n{signal.Signals(signum).name} received: stopping after the current step with "
            "a checkpoint (Ctrl-C again to stop at once, without one)\n"
        )

    @property
    def requested(self) -> bool:
        return self.signum is not None


def _ignore_stop_signals(worker_id: int) -> None:
    """DataLoader workers leave SIGINT and SIGTERM to the main process (a Ctrl-C reaches the
    whole process group; a dead worker would end the epoch with an error, not a checkpoint).
    They exit with it."""
    for signum in _StopSignals.SIGNALS:
        signal.signal(signum, signal.SIG_IGN)


def _prepare_out(out: Path) -> None:
    """Create the run folder and check that it can be written, before any work is done."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file, not a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise ValueError(
            f"--out {out} cannot be used as a run folder: {exc.strerror or exc}"
        ) from exc


def _finite_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> bool:
    """Whether every parameter and every floating-point optimiser state is finite."""
    tensors = [p.detach() for p in model.parameters()]
    for per_param in optimizer.state.values():
        tensors += [t for t in per_param.values() if torch.is_tensor(t) and t.is_floating_point()]
    return all(bool(torch.isfinite(t).all()) for t in tensors)


def train(
    config: TrainConfig,
    *,
    resume: str | os.PathLike | None = None,
    given: dict[str, Any] | None = None,
    log=print,
    command: str | None = None,
) -> dict[str, Any]:
    """Train per `config` (or continue the checkpoint `resume`); returns the last epoch's record.

    `command` (the command line that started this process) is recorded in the run folder's
    sessions.jsonl beside the machine, for the run's report.

    `given` holds the settings passed explicitly (see config_from_args): on resume those among
    RESUMABLE_OVERRIDES replace the checkpoint's, and any other that differs is an error.
    Raises TrainingDiverged when the loss, the test loss or the state becomes NaN or Inf (the
    last good checkpoint is kept), TrainingInterrupted after SIGINT / SIGTERM (a checkpoint is
    written first) and CheckpointWriteError when the run folder cannot be written.
    """
    config, state = _prepare_config(config, given, None if resume is None else str(resume))
    if state is not None and state["epoch"] >= config.epochs:
        log(
            f"{state['path']} has already trained {state['epoch']} epochs (--epochs "
            f"{config.epochs}); nothing to do"
        )
        history = state.get("history") or read_metrics_lenient(Path(config.out) / METRICS_NAME)
        return history[-1] if history else {}
    resolve_device(config.device)
    with _StopSignals() as stop:
        info = setup_distributed(config.device)
        try:
            return _train(config, state, info, log, stop, command)
        finally:
            if info.owns_group:
                dist.destroy_process_group()


def _train(
    config: TrainConfig,
    state: dict | None,
    info: DistInfo,
    log,
    stop: _StopSignals,
    command: str | None = None,
) -> dict[str, Any]:
    device = resolve_device(config.device, info.local_rank)
    out = Path(config.out) if config.out else _default_out(config)
    ckpt_file = out / CHECKPOINT_NAME
    if info.main:
        _prepare_out(out)
        for stale in remove_stale_temporaries(out):
            log(f"removed {stale}, left by a process that no longer runs")
    if state is None and ckpt_file.exists():
        raise ValueError(
            f"{out} already holds a checkpoint; resume it with --resume {out} "
            "or choose another --out"
        )
    config.out = str(out)

    torch.manual_seed(config.seed)
    np.random.seed(config.seed)
    random.seed(config.seed)
    # One generator per process for the shifts, so ranks augment independently.
    augment_gen = torch.Generator().manual_seed(config.seed + 7919 * (info.rank + 1))

    # An explicit data folder is the only place looked at (no download); the folder actually
    # read is recorded as an absolute path, so eval and visualize find it from anywhere.
    explicit = config.data_dir is not None
    train_set = load_dataset(
        config.dataset, "train", config.data_dir, limit=config.limit_train, download=not explicit
    )
    config.data_dir = str(Path(train_set.source).resolve())
    test_set = load_dataset(
        config.dataset, "test", config.data_dir, limit=config.limit_test, download=False
    )
    image_shape = train_set.image_shape
    if test_set.image_shape != image_shape:
        raise ValueError(
            f"test images in {config.data_dir} are {list(test_set.image_shape)} [C, H, W] but "
            f"training images are {list(image_shape)}"
        )
    if state is not None and tuple(state["image_shape"]) != image_shape:
        raise ValueError(
            f"{state['path']} was trained on images {list(state['image_shape'])}, but those in "
            f"{config.data_dir} are {list(image_shape)}"
        )
    # The statistics of the training images actually used (after --limit-train), computed once:
    # a resumed run keeps the checkpoint's, as eval and visualize do.
    normalization = None
    if state is not None:
        normalization = normalization_from_checkpoint(state, config, state["path"])
    elif config.normalize:
        normalization = Normalization.of_images(train_set.images)
    model = build_model(config, image_shape).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    scheduler = torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=config.lr_decay)
    use_scaler = config.amp and device.type == "cuda"
    scaler = torch.amp.GradScaler(device.type, enabled=use_scaler)
    criterion = make_criterion(config)
    backend = choose_backend(device, torch.float32, config.backend)
    machine = machine_summary(device)

    sampler = ResumableSampler(
        train_set, info.world_size, info.rank, shuffle=True, seed=config.seed
    )
    loader = DataLoader(
        train_set,
        batch_size=config.batch_size,
        sampler=sampler,
        num_workers=config.num_workers,
        pin_memory=device.type == "cuda",
        worker_init_fn=_ignore_stop_signals if config.num_workers else None,
    )
    steps_per_epoch = math.ceil(len(sampler) / config.batch_size)

    epoch, step, step_in_epoch = 0, 0, 0
    # loss sum, correct, images (without the sampler's padding), seconds, images processed
    epoch_sums = [0.0, 0.0, 0.0, 0.0, 0.0]
    history: list[dict[str, Any]] = []
    saved_at: tuple[int, int, int] | None = None  # (epoch, step_in_epoch, step) of ckpt_file
    if state is not None:
        path = state["path"]
        if state["world_size"] != info.world_size:
            raise ValueError(
                f"checkpoint was written by {state['world_size']} processes; "
                f"resume it with the same number (got {info.world_size})"
            )
        _load_state_dict(model, state["model"], "model", path)
        _load_state_dict(optimizer, state["optimizer"], "optimizer state", path)
        _load_state_dict(scheduler, state["scheduler"], "scheduler state", path)
        _load_state_dict(scaler, state["scaler"], "grad scaler state", path)
        _set_rng_state(state["rng"], augment_gen)
        epoch, step, step_in_epoch = state["epoch"], state["step"], state["step_in_epoch"]
        saved_at = (epoch, step_in_epoch, step)
        sums = list(state["epoch_sums"])
        # Checkpoints from before the padding was told apart counted processed images only.
        epoch_sums = sums + [sums[2]] if len(sums) == 4 else sums
        history = state.get("history")
        if history is None:  # an older checkpoint: its epochs from metrics.jsonl, once each
            history = history_for(read_metrics_lenient(out / METRICS_NAME), epoch)

    ddp_model: nn.Module = model
    if info.enabled:
        ddp_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )

    if info.main:
        # metrics.jsonl agrees with the checkpoint: the epochs it holds, no more, none twice
        # (a fresh run removes a stale file).
        if history:
            write_metrics(out / METRICS_NAME, history)
        else:
            (out / METRICS_NAME).unlink(missing_ok=True)
        recorded = dataclasses.asdict(config)
        if normalization is not None:
            recorded["normalization"] = normalization.to_dict()
        write_text_atomic(out / CONFIG_NAME, json.dumps(recorded, indent=2) + "\n")
        # A long run may be resumed on other machines: each session says where it ran and how
        # it was started (a fresh run starts the list anew).
        sessions = read_jsonl(out / SESSIONS_NAME) if state is not None else []
        session = {
            "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "command": command,
            "cwd": os.getcwd(),
            "from_epoch": epoch,
            "from_step": step,
            "machine": machine,
            "device": str(device),
            "world_size": info.world_size,
            "backend": backend,
            "torch": torch.__version__,
        }
        write_metrics(out / SESSIONS_NAME, [*sessions, session])
        log(
            f"training {config.dataset} ({len(train_set)} train / {len(test_set)} test images "
            f"from {config.data_dir}) on {device} x{info.world_size}, backend {backend}, "
            f"run folder {out}"
        )
        if normalization is not None:
            log(
                f"inputs normalised with mean {list(normalization.mean)} and std "
                f"{list(normalization.std)} of the {len(train_set)} training images"
            )

    def kept() -> str:
        if saved_at is None:
            return "no checkpoint was written yet"
        return f"the last good checkpoint {ckpt_file} holds {_position(*saved_at)}"

    def snapshot(rng: dict[str, Any], sums: list[float]) -> None:
        """Checkpoint the current model and optimiser state at (epoch, step_in_epoch, step)."""
        nonlocal saved_at
        # Every rank holds the same state, so every rank reaches the same verdict.
        if not _finite_state(model, optimizer):
            raise TrainingDiverged(
                f"parameters or optimiser state became NaN or Inf by "
                f"{_position(epoch, step_in_epoch, step)}; stopping ({kept()}). "
                "Try a lower --lr or disabling --amp."
            )
        if info.main:
            save_checkpoint(
                {
                    "format": CHECKPOINT_FORMAT,
                    "config": dataclasses.asdict(config),
                    "image_shape": list(image_shape),
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "scaler": scaler.state_dict(),
                    "rng": rng,
                    "epoch": epoch,
                    "step": step,
                    "step_in_epoch": step_in_epoch,
                    "epoch_sums": sums,
                    "world_size": info.world_size,
                    "history": history,
                    "normalization": normalization.to_dict() if normalization else None,
                },
                ckpt_file,
            )
        saved_at = (epoch, step_in_epoch, step)

    def interrupted() -> TrainingInterrupted:
        name = signal.Signals(stop.signum).name
        where = _position(*saved_at) if saved_at else "nothing"
        return TrainingInterrupted(
            f"stopped by {name}; {ckpt_file} holds {where}. Continue with: "
            f"capsnet-fused train --resume {out}",
            128 + stop.signum,
        )

    record: dict[str, Any] = history[-1] if history else {}
    # A --checkpoint-every checkpoint is due; it is written once the next loss, computed from
    # the same state, has come out finite.
    due = False
    while epoch < config.epochs:
        sampler.set_epoch(epoch)
        sampler.set_start(step_in_epoch * config.batch_size)
        model.train()
        bar = tqdm(
            loader,
            desc=f"epoch {epoch + 1}/{config.epochs}",
            unit="batch",
            initial=step_in_epoch,
            total=steps_per_epoch,
            disable=not (config.progress and info.main),
            dynamic_ncols=True,
        )
        start = time.perf_counter()
        for images, labels in bar:
            # The state a checkpoint written at this step resumes from: before this batch.
            rng = _rng_state(augment_gen)
            sums_before = [
                *epoch_sums[:3],
                epoch_sums[3] + time.perf_counter() - start,
                epoch_sums[4],
            ]
            first = step_in_epoch * config.batch_size
            real = sampler.real_samples(first, first + labels.shape[0])
            images, labels = images.to(device, non_blocking=True), labels.to(device)
            images = to_float(images)
            if config.max_shift:
                images = random_shift(images, config.max_shift, augment_gen)
            if config.hflip:
                images = random_hflip(images, augment_gen)
            # Normalised after augmenting, so shifted-in pixels are background (0) like the
            # image's own border. Only the model's input is normalised: the decoder ends in a
            # sigmoid, so its reconstruction is compared with the image in [0, 1], and the
            # reconstruction loss keeps the paper's scale.
            inputs = normalization(images) if normalization is not None else images
            with autocast_context(device, config.amp):
                output = ddp_model(inputs, labels)
            loss = criterion(output, images, labels)[0]
            hits = class_scores(output).argmax(dim=1) == labels
            stats = torch.stack(
                [
                    loss.detach().double() * labels.shape[0],
                    hits[:real].sum().double(),
                    torch.tensor(real, device=device, dtype=torch.float64),
                    torch.tensor(labels.shape[0], device=device, dtype=torch.float64),
                    torch.tensor(float(stop.requested), device=device, dtype=torch.float64),
                ]
            )
            if info.enabled:
                dist.all_reduce(stats)
            loss_sum, batch_correct, batch_real, batch_images, stopping = stats.tolist()
            if not math.isfinite(loss_sum):
                bar.close()
                raise TrainingDiverged(
                    f"loss became {loss_sum / batch_images} at epoch {epoch + 1}, step "
                    f"{step + 1}; stopping ({kept()}). Try a lower --lr or disabling --amp."
                )
            # The loss is finite: the state after the previous step is good to keep.
            if due or stopping:
                snapshot(rng, sums_before)
                due = False
            if stopping:
                bar.close()
                raise interrupted()
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            step += 1
            step_in_epoch += 1
            elapsed = time.perf_counter() - start
            epoch_sums = [
                epoch_sums[0] + loss_sum,
                epoch_sums[1] + batch_correct,
                epoch_sums[2] + batch_real,
                epoch_sums[3],
                epoch_sums[4] + batch_images,
            ]
            if step_in_epoch % 10 == 0 or step_in_epoch == steps_per_epoch:
                seconds = epoch_sums[3] + elapsed
                bar.set_postfix(
                    loss=f"{epoch_sums[0] / epoch_sums[4]:.4f}",
                    acc=f"{100 * epoch_sums[1] / max(epoch_sums[2], 1.0):.2f}%",
                    img_s=f"{epoch_sums[2] / max(seconds, 1e-9):.1f}",
                )
            if config.checkpoint_every and step % config.checkpoint_every == 0:
                due = True
        bar.close()
        epoch_sums[3] += time.perf_counter() - start
        # The test loss checks the state after the epoch's last step, as the next step's loss
        # checks a mid-epoch one.
        test_start = time.perf_counter()
        test = evaluate(
            model,
            test_set,
            criterion,
            device,
            batch_size=max(config.batch_size, 256),
            amp=config.amp,
            info=info,
            progress=config.progress,
            stop=lambda: stop.requested,
            normalization=normalization,
        )
        if not math.isfinite(test["loss"]):
            raise TrainingDiverged(
                f"test loss became {test['loss']} after epoch {epoch + 1} (step {step}); "
                f"stopping ({kept()}). Try a lower --lr or disabling --amp."
            )
        if not test["complete"]:
            # Stopped during the evaluation: keep the epoch's training, evaluate on resume.
            snapshot(_rng_state(augment_gen), list(epoch_sums))
            raise interrupted()
        images_seen = max(epoch_sums[2], 1.0)
        record = {
            "epoch": epoch + 1,
            "step": step,
            "train_loss": epoch_sums[0] / max(epoch_sums[4], 1.0),
            "train_accuracy": epoch_sums[1] / images_seen,
            "train_images": int(epoch_sums[2]),
            "test_loss": test["loss"],
            "test_accuracy": test["accuracy"],
            # CapsNet's test_margin_loss and test_recon_loss; the CNN's loss has no parts.
            **{f"test_{name}": test[name] for name in criterion.part_names},
            "lr": optimizer.param_groups[0]["lr"],
            "epoch_time_s": epoch_sums[3],
            "images_per_s": epoch_sums[2] / max(epoch_sums[3], 1e-9),
            # epoch_time_s is the training alone; an epoch's wall time adds this.
            "test_time_s": time.perf_counter() - test_start,
            "world_size": info.world_size,
            "device": str(device),
            # Where this epoch finished (a run resumed elsewhere changes machine mid-run).
            "machine": machine,
            "backend": backend,
            "amp": config.amp,
            "model": config.model,
        }
        with warnings.catch_warnings():
            # A run resumed after its epoch's last step (stopped during the evaluation) steps
            # the scheduler before this process stepped the optimiser; the schedule is right.
            warnings.filterwarnings("ignore", "Detected call of `lr_scheduler.step", UserWarning)
            scheduler.step()
        epoch += 1
        step_in_epoch = 0
        epoch_sums = [0.0, 0.0, 0.0, 0.0, 0.0]
        history = [*history, record]
        due = False
        # The checkpoint first: metrics.jsonl never shows an epoch the checkpoint lacks.
        snapshot(_rng_state(augment_gen), list(epoch_sums))
        if info.main:
            write_metrics(out / METRICS_NAME, history)
            log(_format_epoch(record, config.epochs))
        # Every process takes part in the vote, or the others would wait for it forever.
        if _any_rank(stop.requested, info, device) if info.enabled else stop.requested:
            raise interrupted()
    if info.enabled:
        dist.barrier()
    return record


def _any_rank(flag: bool, info: DistInfo, device: torch.device) -> bool:
    """Whether any process has `flag` set (every process must call this)."""
    return _all_sum([float(flag)], info, device)[0] > 0


def main_train(args: argparse.Namespace, argv: list[str] | None = None) -> int:
    """Entry point of `capsnet-fused train` (see cli.py); argv, the command's arguments, is
    recorded in the run folder. Exit status: 0 done, 3 diverged, 130 / 143 stopped by SIGINT /
    SIGTERM with a checkpoint; cli.py maps other errors."""
    config, given = config_from_args(args)
    command = None if argv is None else shlex.join(["capsnet-fused", *argv])
    try:
        train(config, resume=args.resume, given=given, command=command)
    except TrainingDiverged as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 3
    except TrainingInterrupted as exc:
        print(exc, file=sys.stderr)
        return exc.exit_status
    return 0
