"""Training and evaluation of CapsNet on MNIST / Fashion-MNIST.

One process or many under torchrun (DistributedDataParallel: gloo on CPU, nccl on CUDA). Rank 0
alone writes the run folder: config.json, metrics.jsonl (one JSON object per epoch) and
checkpoint.pt (written atomically every epoch and every --checkpoint-every steps). A resumed run
restores the model, optimiser, scheduler, grad scaler, every RNG state and the position in the
epoch, so it follows the trajectory of an uninterrupted run.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from capsnet_fused.data import (
    DATASETS,
    ImageDataset,
    ResumableSampler,
    load_dataset,
    random_shift,
    to_float,
)
from capsnet_fused.losses import MarginLoss, ReconstructionLoss
from capsnet_fused.models import CapsNet
from capsnet_fused.ops import BACKENDS, choose_backend
from capsnet_fused.reference import SOFTMAX_OVER

CHECKPOINT_NAME = "checkpoint.pt"
METRICS_NAME = "metrics.jsonl"
CONFIG_NAME = "config.json"
CHECKPOINT_FORMAT = 1


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
    routing_iterations: int = 3
    softmax_over: str = "out_caps"
    learn_prior: bool = False
    detach_inner: bool = False
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
        if self.softmax_over not in SOFTMAX_OVER:
            raise ValueError(
                f"softmax_over must be one of {SOFTMAX_OVER}, got {self.softmax_over!r}"
            )
        if self.backend != "auto" and self.backend not in BACKENDS:
            raise ValueError(f"backend must be 'auto' or one of {BACKENDS}, got {self.backend!r}")
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
        if not self.lr > 0 or not 0 < self.lr_decay <= 1:
            raise ValueError(f"need lr > 0 and 0 < lr_decay <= 1, got {self.lr}, {self.lr_decay}")
        if not self.digit_init_scale > 0:
            raise ValueError(f"digit_init_scale must be > 0, got {self.digit_init_scale}")
        if len(self.decoder_hidden) != 2 or min(self.decoder_hidden) < 1:
            raise ValueError(f"decoder_hidden must be two sizes >= 1, got {self.decoder_hidden}")


# Settings a resumed run may change; all others come from the checkpoint.
RESUMABLE_OVERRIDES = (
    "epochs",
    "data_dir",
    "device",
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
    """The loss became NaN or Inf; the last good checkpoint is kept."""


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    """Define the flags of `capsnet-fused train`. Unset flags stay None (see config_from_args)."""
    d = TrainConfig()
    add = parser.add_argument
    add("--dataset", choices=DATASETS, help=f"dataset to train on (default {d.dataset})")
    add(
        "--data-dir",
        help="folder with the IDX files (searched before "
        "/usr/share/datasets/fashion-mnist; downloads go to DATA_DIR/<dataset>; default ./data)",
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
        "--detach-inner",
        action="store_true",
        default=None,
        help="no gradient through the inner routing iterations (default off)",
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


def build_model(config: TrainConfig, image_shape: tuple[int, int, int]) -> CapsNet:
    """CapsNet for images [C, H, W] with the sizes and routing options of `config`."""
    channels, height, width = image_shape
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
        detach_inner=config.detach_inner,
        backend=config.backend,
        digit_init_scale=config.digit_init_scale,
        channels_last=config.channels_last,
    )


class CapsNetLoss(nn.Module):
    """margin loss + recon_scale x reconstruction loss, computed in float32.

    forward(output: CapsNetOutput, images [B, C, H, W], labels [B]) -> (loss, margin, recon).
    """

    def __init__(self, recon_scale: float = 0.0005) -> None:
        super().__init__()
        self.margin = MarginLoss()
        self.recon = ReconstructionLoss(recon_scale)

    def forward(self, output, images: torch.Tensor, labels: torch.Tensor):
        margin = self.margin(output.lengths.float(), labels)
        recon = self.recon(output.reconstructions.float(), images.float())
        return margin + recon, margin, recon


def resolve_device(device: str, local_rank: int = 0) -> torch.device:
    """'auto' -> cuda:local_rank when CUDA is available, else cpu."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", local_rank)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available")
    return dev


def autocast_context(device: torch.device, enabled: bool):
    """bfloat16 autocast on CPU, float16 on CUDA; a no-op when disabled."""
    dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
    return torch.autocast(device.type, dtype=dtype, enabled=enabled)


# ---------------------------------------------------------------- checkpoints


def save_checkpoint(state: dict[str, Any], path: str | os.PathLike) -> Path:
    """Write `state` to path atomically: a temporary file in the same folder, then os.replace.

    A crash at any moment leaves either the previous checkpoint or the new one, never a torn file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with tmp.open("wb") as handle:
            torch.save(state, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def checkpoint_path(path: str | os.PathLike) -> Path:
    """A checkpoint file, or the checkpoint inside a run folder."""
    path = Path(path)
    return path / CHECKPOINT_NAME if path.is_dir() else path


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict:
    """Load a checkpoint written by save_checkpoint (a file or its run folder)."""
    path = checkpoint_path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:
        raise ValueError(f"{path} is not a readable capsnet-fused checkpoint ({exc})") from exc
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not a capsnet-fused checkpoint (format {CHECKPOINT_FORMAT})")
    return state


def config_from_checkpoint(state: dict[str, Any]) -> TrainConfig:
    config = dict(state["config"])
    config["decoder_hidden"] = tuple(config["decoder_hidden"])
    return TrainConfig(**config)


def model_from_checkpoint(
    state: dict[str, Any], device: torch.device | str = "cpu", backend: str | None = None
) -> tuple[CapsNet, TrainConfig]:
    """The trained model (eval mode) and its config; backend overrides the trained one."""
    config = config_from_checkpoint(state)
    if backend is not None:
        config.backend = backend
    model = build_model(config, tuple(state["image_shape"]))
    model.load_state_dict(state["model"])
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
    criterion: CapsNetLoss,
    device: torch.device,
    *,
    batch_size: int = 256,
    amp: bool = False,
    info: DistInfo | None = None,
    progress: bool = False,
) -> dict[str, float]:
    """Test loss (margin + scaled reconstruction of the predicted capsule) and accuracy.

    Under DDP each process takes every world_size-th image, so the sums cover each image once.
    """
    info = info or DistInfo()
    shard = Subset(dataset, range(info.rank, len(dataset), info.world_size))
    loader = DataLoader(shard, batch_size=batch_size, shuffle=False)
    was_training = model.training
    model.eval()
    sums = [0.0, 0.0, 0.0, 0.0, 0.0]  # loss, margin, recon, correct, count
    for images, labels in tqdm(
        loader, desc="eval", unit="batch", leave=False, disable=not (progress and info.main)
    ):
        images, labels = to_float(images.to(device)), labels.to(device)
        with autocast_context(device, amp):
            output = model(images)
        loss, margin, recon = criterion(output, images, labels)
        n = labels.shape[0]
        correct = (output.lengths.argmax(dim=1) == labels).sum().item()
        sums = [
            a + b
            for a, b in zip(
                sums,
                (loss.item() * n, margin.item() * n, recon.item() * n, correct, n),
                strict=True,
            )
        ]
    model.train(was_training)
    loss, margin, recon, correct, count = _all_sum(sums, info, device)
    count = max(count, 1.0)
    return {
        "loss": loss / count,
        "margin_loss": margin / count,
        "recon_loss": recon / count,
        "accuracy": correct / count,
        "images": int(count),
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
) -> dict[str, float]:
    """Test accuracy and loss of a checkpoint on its dataset's test split."""
    dev = resolve_device(device)
    state = load_checkpoint(checkpoint)
    model, config = model_from_checkpoint(state, dev, backend)
    test_set = load_dataset(config.dataset, "test", data_dir or config.data_dir, limit=limit)
    if test_set.image_shape != tuple(state["image_shape"]):
        raise ValueError(
            f"test images are {test_set.image_shape}, the model expects "
            f"{tuple(state['image_shape'])}"
        )
    criterion = CapsNetLoss(config.recon_scale)
    metrics = evaluate(model, test_set, criterion, dev, batch_size=batch_size, progress=progress)
    metrics["backend"] = choose_backend(dev, torch.float32, config.backend)
    return metrics


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
    state = load_checkpoint(resume)
    saved = config_from_checkpoint(state)
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
        saved.out = str(checkpoint_path(resume).parent)
    saved.validate()
    return saved, state


def _format_epoch(record: dict[str, Any], epochs: int) -> str:
    return (
        f"epoch {record['epoch']}/{epochs}: train loss {record['train_loss']:.4f} "
        f"acc {100 * record['train_accuracy']:.2f}% | test loss {record['test_loss']:.4f} "
        f"acc {100 * record['test_accuracy']:.2f}% | {record['images_per_s']:.1f} img/s, "
        f"{record['epoch_time_s']:.1f} s | lr {record['lr']:.3g} | backend {record['backend']}"
    )


def train(
    config: TrainConfig,
    *,
    resume: str | os.PathLike | None = None,
    given: dict[str, Any] | None = None,
    log=print,
) -> dict[str, Any]:
    """Train per `config` (or continue the checkpoint `resume`); returns the last epoch's record.

    `given` holds the settings passed explicitly (see config_from_args): on resume those among
    RESUMABLE_OVERRIDES replace the checkpoint's, and any other that differs is an error.
    Raises TrainingDiverged when the loss becomes NaN or Inf (the last checkpoint is kept).
    """
    config, state = _prepare_config(config, given, None if resume is None else str(resume))
    info = setup_distributed(config.device)
    try:
        return _train(config, state, info, log)
    finally:
        if info.owns_group:
            dist.destroy_process_group()


def _train(config: TrainConfig, state: dict | None, info: DistInfo, log) -> dict[str, Any]:
    device = resolve_device(config.device, info.local_rank)
    out = Path(config.out) if config.out else _default_out(config)
    ckpt_file = out / CHECKPOINT_NAME
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

    train_set = load_dataset(config.dataset, "train", config.data_dir, limit=config.limit_train)
    test_set = load_dataset(config.dataset, "test", config.data_dir, limit=config.limit_test)
    image_shape = train_set.image_shape
    model = build_model(config, image_shape).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    scheduler = torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=config.lr_decay)
    use_scaler = config.amp and device.type == "cuda"
    scaler = torch.amp.GradScaler(device.type, enabled=use_scaler)
    criterion = CapsNetLoss(config.recon_scale)
    backend = choose_backend(device, torch.float32, config.backend)

    sampler = ResumableSampler(
        train_set, info.world_size, info.rank, shuffle=True, seed=config.seed
    )
    loader = DataLoader(
        train_set,
        batch_size=config.batch_size,
        sampler=sampler,
        num_workers=config.num_workers,
        pin_memory=device.type == "cuda",
    )
    steps_per_epoch = math.ceil(len(sampler) / config.batch_size)

    epoch, step, step_in_epoch = 0, 0, 0
    epoch_sums = [0.0, 0.0, 0.0, 0.0]  # loss sum, correct, images, seconds
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        _set_rng_state(state["rng"], augment_gen)
        epoch, step, step_in_epoch = state["epoch"], state["step"], state["step_in_epoch"]
        epoch_sums = list(state["epoch_sums"])
        if state["world_size"] != info.world_size:
            raise ValueError(
                f"checkpoint was written by {state['world_size']} processes; "
                f"resume it with the same number (got {info.world_size})"
            )

    ddp_model: nn.Module = model
    if info.enabled:
        ddp_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )

    if info.main:
        out.mkdir(parents=True, exist_ok=True)
        (out / CONFIG_NAME).write_text(json.dumps(dataclasses.asdict(config), indent=2) + "\n")
        log(
            f"training {config.dataset} ({len(train_set)} train / {len(test_set)} test images) "
            f"on {device} x{info.world_size}, backend {backend}, run folder {out}"
        )

    def snapshot() -> None:
        if not info.main:
            return
        save_checkpoint(
            {
                "format": CHECKPOINT_FORMAT,
                "config": dataclasses.asdict(config),
                "image_shape": list(image_shape),
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict(),
                "rng": _rng_state(augment_gen),
                "epoch": epoch,
                "step": step,
                "step_in_epoch": step_in_epoch,
                "epoch_sums": epoch_sums,
                "world_size": info.world_size,
            },
            ckpt_file,
        )

    record: dict[str, Any] = {}
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
            images, labels = images.to(device, non_blocking=True), labels.to(device)
            images = to_float(images)
            if config.max_shift:
                images = random_shift(images, config.max_shift, augment_gen)
            with autocast_context(device, config.amp):
                output = ddp_model(images, labels)
            loss, _, _ = criterion(output, images, labels)
            correct = (output.lengths.argmax(dim=1) == labels).sum()
            stats = torch.stack(
                [
                    loss.detach().double() * labels.shape[0],
                    correct.double(),
                    torch.tensor(labels.shape[0], device=device, dtype=torch.float64),
                ]
            )
            if info.enabled:
                dist.all_reduce(stats)
            loss_sum, batch_correct, batch_images = stats.tolist()
            if not math.isfinite(loss_sum):
                bar.close()
                kept = (
                    f"the last good checkpoint is {ckpt_file}"
                    if ckpt_file.exists()
                    else "no checkpoint was written yet"
                )
                raise TrainingDiverged(
                    f"loss became {loss_sum / batch_images} at epoch {epoch + 1}, step "
                    f"{step + 1}; stopping ({kept}). Try a lower --lr or disabling --amp."
                )
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
                epoch_sums[2] + batch_images,
                epoch_sums[3],
            ]
            if step_in_epoch % 10 == 0 or step_in_epoch == steps_per_epoch:
                seconds = epoch_sums[3] + elapsed
                bar.set_postfix(
                    loss=f"{epoch_sums[0] / epoch_sums[2]:.4f}",
                    acc=f"{100 * epoch_sums[1] / epoch_sums[2]:.2f}%",
                    img_s=f"{epoch_sums[2] / max(seconds, 1e-9):.1f}",
                )
            if config.checkpoint_every and step % config.checkpoint_every == 0:
                saved_sums = epoch_sums
                epoch_sums = [*epoch_sums[:3], epoch_sums[3] + elapsed]
                snapshot()
                epoch_sums = saved_sums
        bar.close()
        epoch_sums[3] += time.perf_counter() - start
        test = evaluate(
            model,
            test_set,
            criterion,
            device,
            batch_size=max(config.batch_size, 256),
            amp=config.amp,
            info=info,
            progress=config.progress,
        )
        images_seen = max(epoch_sums[2], 1.0)
        record = {
            "epoch": epoch + 1,
            "step": step,
            "train_loss": epoch_sums[0] / images_seen,
            "train_accuracy": epoch_sums[1] / images_seen,
            "test_loss": test["loss"],
            "test_accuracy": test["accuracy"],
            "test_margin_loss": test["margin_loss"],
            "test_recon_loss": test["recon_loss"],
            "lr": optimizer.param_groups[0]["lr"],
            "epoch_time_s": epoch_sums[3],
            "images_per_s": epoch_sums[2] / max(epoch_sums[3], 1e-9),
            "world_size": info.world_size,
            "device": str(device),
            "backend": backend,
            "amp": config.amp,
        }
        scheduler.step()
        epoch += 1
        step_in_epoch = 0
        epoch_sums = [0.0, 0.0, 0.0, 0.0]
        if info.main:
            with (out / METRICS_NAME).open("a") as handle:
                handle.write(json.dumps(record) + "\n")
            log(_format_epoch(record, config.epochs))
        snapshot()
    if info.enabled:
        dist.barrier()
    return record


def main_train(args: argparse.Namespace) -> int:
    """Entry point of `capsnet-fused train` (see cli.py)."""
    config, given = config_from_args(args)
    try:
        train(config, resume=args.resume, given=given)
    except TrainingDiverged as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 3
    return 0
