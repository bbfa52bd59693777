"""The settings of a training run (TrainConfig), their checks and the flags of `capsnet-fused
train`: a config from the command line, and a resumed run's config from its checkpoint's and the
flags given.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from capsnet_fused._checks import (
    SHARED_LOGITS,
    SOFTMAX_OVER,
    SQUASH_EPS,
    check_backend_name,
    check_routing_options,
)
from capsnet_fused.data import DATASETS
from capsnet_fused.ops import BACKENDS

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


def _resumed_config(saved: TrainConfig, given: dict[str, Any], folder: Path) -> TrainConfig:
    """The config of a resumed run: the checkpoint's (`saved`, from `folder`) with the settings
    given explicitly among RESUMABLE_OVERRIDES; any other given setting that differs is an
    error."""
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
        saved.out = str(folder)
    saved.validate()
    return saved
