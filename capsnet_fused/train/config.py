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


def _setting(
    default: Any, help: str, *, flag: str | None = None, group: str | None = None, **kwargs: Any
) -> Any:
    """A TrainConfig field with its flag of `capsnet-fused train`: the flag (default --<name>
    with dashes), its help, where "{default}" stands for the field's default, the argument group
    (None: the general options) and the other keywords of ArgumentParser.add_argument."""
    metadata = {"flag": flag, "help": help, "group": group, "argparse": kwargs}
    return dataclasses.field(default=default, metadata=metadata)


MODEL_SIZE = "model size (defaults are the paper's CapsNet)"


@dataclass
class TrainConfig:
    """Every setting of a training run; defaults follow Sabour et al. (2017).

    Each setting is a flag of `capsnet-fused train`, declared in its field's metadata (see
    _setting and add_train_arguments), in the order --help lists them.
    """

    dataset: str = _setting(
        "fashion-mnist", "dataset to train on (default {default})", choices=DATASETS
    )
    data_dir: str | None = _setting(
        None,
        "folder with the IDX files (or its <dataset> subfolder); an error when they are "
        "not there. Without it: ./data, ./data/<dataset>, /usr/share/datasets/fashion-mnist, "
        "else a download to ./data/<dataset>",
    )
    epochs: int = _setting(10, "number of epochs to train in total (default {default})", type=int)
    batch_size: int = _setting(128, "images per step per process (default {default})", type=int)
    lr: float = _setting(1e-3, "Adam learning rate (default {default})", type=float)
    lr_decay: float = _setting(
        0.96, "ExponentialLR factor applied after every epoch (default {default})", type=float
    )
    recon_scale: float = _setting(
        0.0005, "weight of the reconstruction loss (default {default})", type=float
    )
    max_shift: int = _setting(
        2,
        "largest random shift in pixels, each direction, for "
        "training images; 0 disables augmentation (default {default})",
        type=int,
    )
    hflip: bool = _setting(
        False,
        "also mirror each training image left to right with probability 1/2 (default off)",
        action="store_true",
    )
    normalize: bool = _setting(
        False,
        "feed the model (x - mean) / std, with the mean and std of the training images "
        "used (recorded in config.json and the checkpoint); reconstructions are still "
        "compared with the images in [0, 1] (default off)",
        action="store_true",
    )
    model: str = _setting(
        "capsnet",
        "capsnet (the paper's CapsNet) or cnn (a plain CNN of the same size, the baseline: "
        "CapsNet's two convolutions, then fully connected 328, 192, dropout, cross entropy; "
        "routing and decoder flags do not apply) (default {default})",
        choices=MODELS,
    )
    routing_iterations: int = _setting(
        3, "dynamic routing iterations (default {default})", type=int
    )
    softmax_over: str = _setting(
        "out_caps",
        "normalise couplings over output capsules (paper) or input capsules (default {default})",
        choices=SOFTMAX_OVER,
    )
    learn_prior: bool = _setting(
        False, "learn the initial routing logits (default off)", action="store_true"
    )
    learn_bias: bool = _setting(
        False,
        "learn a DigitCaps bias [J, M] added to s before every squash, starting at 0.1 "
        "(the official code's; default off)",
        action="store_true",
    )
    detach_inner: bool = _setting(
        False,
        "no gradient through the inner routing iterations (default off)",
        action="store_true",
    )
    leaky: bool = _setting(
        False,
        "leaky routing: one extra logit fixed at 0 on the softmax axis (the official "
        "code's; default off)",
        action="store_true",
    )
    squash_eps: float = _setting(
        SQUASH_EPS,
        "eps of every squash, |s|^2/(1+|s|^2) s/sqrt(|s|^2+EPS); 0 is the eps-free "
        "squash, NaN at s = 0 (default {default:g})",
        type=float,
        metavar="EPS",
    )
    shared_logits: str | None = _setting(
        None,
        "one set of routing logits for the whole batch, updated with the batch mean or "
        "sum of the agreements (pyCapsNet, jindongwang/Pytorch-CapsuleNet); a sample's output "
        "then depends on the rest of its batch (default: logits per sample)",
        choices=[mode for mode in SHARED_LOGITS if mode is not None],
    )
    backend: str = _setting(
        "auto",
        "routing backend (default {default}: the fastest available)",
        choices=("auto", *BACKENDS),
    )
    device: str = _setting("auto", "cpu, cuda, cuda:N or auto (default auto: cuda when available)")
    seed: int = _setting(
        0, "seed for initialisation, shuffling and shifts (default {default})", type=int
    )
    out: str | None = _setting(
        None,
        "run folder for config, metrics and checkpoints "
        "(default runs/<dataset>-<time>; the checkpoint's folder when resuming)",
    )
    # --resume, not a setting, comes here in --help (see add_train_arguments).
    num_workers: int = _setting(0, "DataLoader worker processes (default {default})", type=int)
    # amp and channels_last: None is "auto", settled when the run starts (see
    # train.model.resolve_auto_settings) and saved settled in config.json and checkpoints.
    amp: bool | None = _setting(
        None,
        "mixed precision: bfloat16 autocast on CPU, float16 with GradScaler on CUDA (default: "
        "on when training on a CPU with native bfloat16, AVX512_BF16 or AMX; off elsewhere)",
        action=argparse.BooleanOptionalAction,
    )
    channels_last: bool | None = _setting(
        None,
        "channels-last memory order for the convolutions (default: with --amp's default, on "
        "when training on a CPU with native bfloat16; see the README)",
        action=argparse.BooleanOptionalAction,
    )
    checkpoint_every: int = _setting(
        0,
        "also checkpoint every N steps (default 0: only at the end of each epoch)",
        type=int,
        metavar="N",
    )
    limit_train: int | None = _setting(
        None, "train on the first N training images only", type=int, metavar="N"
    )
    limit_test: int | None = _setting(
        None, "evaluate on the first N test images only", type=int, metavar="N"
    )
    progress: bool = _setting(
        True,
        "no progress bars (the per-epoch line is still printed)",
        flag="--no-progress",
        action="store_false",
    )
    conv_channels: int = _setting(
        256, "channels of the first convolution (default {default})", group=MODEL_SIZE, type=int
    )
    kernel_size: int = _setting(
        9, "kernel of both convolutions (default {default})", group=MODEL_SIZE, type=int
    )
    primary_caps: int = _setting(
        32, "primary capsule channels (default {default})", group=MODEL_SIZE, type=int
    )
    primary_dim: int = _setting(
        8, "pose size N of a primary capsule (default {default})", group=MODEL_SIZE, type=int
    )
    digit_dim: int = _setting(
        16, "pose size M of a digit capsule (default {default})", group=MODEL_SIZE, type=int
    )
    decoder_hidden: tuple[int, int] = _setting(
        (512, 1024),
        "decoder hidden sizes (default {default[0]} {default[1]})",
        group=MODEL_SIZE,
        type=int,
        nargs=2,
        metavar=("H1", "H2"),
    )
    digit_init_scale: float = _setting(
        0.01,
        "DigitCaps weights start at this x randn (default {default})",
        group=MODEL_SIZE,
        type=float,
    )

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
        for name in ("amp", "channels_last"):
            value = getattr(self, name)
            if not (value is None or isinstance(value, bool)):
                raise ValueError(f"{name} must be True, False or None (auto), got {value!r}")
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
    field = {field.name: field for field in dataclasses.fields(TrainConfig)}[name]
    return field.metadata["flag"] or "--" + name.replace("_", "-")


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    """Define the flags of `capsnet-fused train`: one per TrainConfig field, from its metadata
    (see _setting), and those of _add_other_arguments after --out. Unset flags stay None (see
    config_from_args)."""
    groups: dict[str | None, Any] = {None: parser}
    for field in dataclasses.fields(TrainConfig):
        spec = field.metadata
        if spec["group"] not in groups:
            groups[spec["group"]] = parser.add_argument_group(spec["group"])
        groups[spec["group"]].add_argument(
            _flag(field.name),
            dest=field.name,
            default=None,
            help=spec["help"].format(default=field.default),
            **spec["argparse"],
        )
        if field.name == "out":  # where --help has always listed --resume
            _add_other_arguments(parser)


def _add_other_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of `capsnet-fused train` that are not settings (TrainConfig fields), declared
    here by hand."""
    parser.add_argument(
        "--resume",
        metavar="CHECKPOINT",
        help="continue from a checkpoint file or run folder (settings come from it, except "
        f"{', '.join(_flag(n) for n in RESUMABLE_OVERRIDES)})",
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
