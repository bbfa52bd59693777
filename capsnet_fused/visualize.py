"""Figures: reconstructions, the paper's Figure 4 (capsule dimension perturbations), curves.

matplotlib is imported inside each function (it is an optional dependency, the "plots" extra)
with the Agg backend, so the figures are written without a display; without it they raise
PlotsUnavailable, an ImportError saying what to install.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from capsnet_fused.data import to_float
from capsnet_fused.models import CapsNet
from capsnet_fused.train import (
    METRICS_NAME,
    checkpoint_path,
    load_checkpoint,
    load_test_set,
    model_from_checkpoint,
    resolve_device,
)

# Figure 4 of Sabour et al. (2017): each dimension moved by -0.25, -0.20, ..., 0.25.
PERTURBATIONS = tuple(round(-0.25 + 0.05 * k, 2) for k in range(11))


PLOTS_HINT = "pip install capsnet-fused[plots]"


class PlotsUnavailable(ImportError):
    """matplotlib is not installed."""


def _pyplot():
    try:
        import matplotlib
    except ImportError as exc:
        raise PlotsUnavailable(f"the figures need matplotlib: {PLOTS_HINT}") from exc

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def decode(model: CapsNet, caps: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    """Reconstruct from capsules caps [B, J, M], keeping only capsule classes[b] of each sample.

    Returns images [B, C, H, W] in [0, 1].
    """
    mask = torch.nn.functional.one_hot(classes, caps.shape[1]).to(caps.dtype)
    recon = model.decoder((caps * mask.unsqueeze(-1)).flatten(1))
    return recon.view(-1, *model.image_shape)


@torch.no_grad()
def perturbation_images(
    model: CapsNet, images: torch.Tensor, deltas: tuple[float, ...] = PERTURBATIONS
) -> tuple[torch.Tensor, torch.Tensor]:
    """Figure 4: decode the predicted capsule with one dimension moved by each delta.

    images [B, C, H, W] -> (recon [B, M, len(deltas), C, H, W], predicted classes [B]). Only the
    predicted capsule is perturbed (and only it reaches the decoder).
    """
    model.eval()
    output = model(images)
    predicted = output.lengths.argmax(dim=1)
    batch, _, dims = output.caps.shape
    steps = torch.tensor(deltas, dtype=output.caps.dtype, device=images.device)
    # [B, M, D, J, M]: for sample b, dimension d and delta k, caps with caps[b, pred, d] += delta.
    caps = output.caps[:, None, None].expand(batch, dims, len(deltas), *output.caps.shape[1:])
    caps = caps.clone()
    onehot_class = torch.nn.functional.one_hot(predicted, output.caps.shape[1]).to(caps.dtype)
    eye = torch.eye(dims, dtype=caps.dtype, device=images.device)
    # offset[b, d, k, j, m] = delta_k * [j == pred_b] * [m == d]
    offset = (
        steps[None, None, :, None, None]
        * onehot_class[:, None, None, :, None]
        * eye[None, :, None, None, :]
    )
    caps = (caps + offset).flatten(0, 2)
    classes = predicted.repeat_interleave(dims * len(deltas))
    recon = decode(model, caps, classes)
    return recon.view(batch, dims, len(deltas), *model.image_shape), predicted


def _show(axis, image: torch.Tensor) -> None:
    """Draw image [C, H, W] (grey when C = 1) without ticks."""
    pixels = image.detach().float().cpu()
    if pixels.shape[0] == 1:
        axis.imshow(pixels[0].numpy(), cmap="gray", vmin=0.0, vmax=1.0)
    else:
        axis.imshow(pixels.permute(1, 2, 0).clamp(0, 1).numpy())
    axis.set_xticks([])
    axis.set_yticks([])


@torch.no_grad()
def plot_reconstructions(
    model: CapsNet,
    images: torch.Tensor,
    labels: torch.Tensor,
    path: str | os.PathLike,
    columns: int = 4,
) -> Path:
    """PNG grid: each test image [C, H, W] beside its reconstruction from the predicted capsule."""
    plt = _pyplot()
    model.eval()
    output = model(images)
    predicted = output.lengths.argmax(dim=1)
    count = images.shape[0]
    columns = max(1, min(columns, count))
    rows = -(-count // columns)
    fig, axes = plt.subplots(rows, 2 * columns, figsize=(2.4 * columns, 1.35 * rows), squeeze=False)
    for axis in axes.flat:
        axis.axis("off")
    for k in range(count):
        left, right = (
            axes[k // columns, 2 * (k % columns)],
            axes[k // columns, 2 * (k % columns) + 1],
        )
        for axis in (left, right):
            axis.axis("on")
        _show(left, images[k])
        _show(right, output.reconstructions[k])
        left.set_title(f"label {int(labels[k])}", fontsize=7)
        right.set_title(f"pred {int(predicted[k])}", fontsize=7)
    fig.suptitle("test images (left) and reconstructions from the predicted capsule (right)")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _mosaic(tiles: torch.Tensor, gap: int = 1) -> torch.Tensor:
    """tiles [R, K, C, H, W] -> one image [C, R * (H + gap) - gap, K * (W + gap) - gap]."""
    rows, cols, channels, height, width = tiles.shape
    canvas = tiles.new_ones(channels, rows * (height + gap) - gap, cols * (width + gap) - gap)
    for r in range(rows):
        for k in range(cols):
            top, left = r * (height + gap), k * (width + gap)
            canvas[:, top : top + height, left : left + width] = tiles[r, k]
    return canvas


def plot_perturbations(model: CapsNet, images: torch.Tensor, path: str | os.PathLike) -> Path:
    """PNG of Figure 4: per image, one row per capsule dimension, one column per perturbation."""
    plt = _pyplot()
    recon, predicted = perturbation_images(model, images)
    batch, dims, steps = recon.shape[:3]
    height, width = recon.shape[-2:]
    fig, axes = plt.subplots(1, batch, figsize=(3.2 * batch, 0.3 * dims + 1.2), squeeze=False)
    for b, axis in enumerate(axes[0]):
        _show(axis, _mosaic(recon[b]))
        axis.set_xticks([k * (width + 1) + width / 2 for k in range(steps)])
        axis.set_xticklabels([f"{delta:+.2f}" for delta in PERTURBATIONS], fontsize=5, rotation=90)
        axis.set_yticks([d * (height + 1) + height / 2 for d in range(dims)])
        axis.set_yticklabels([str(d) for d in range(dims)], fontsize=5)
        axis.set_title(f"image {b}, predicted class {int(predicted[b])}", fontsize=8)
        axis.set_ylabel("capsule dimension", fontsize=7)
    fig.suptitle("Figure 4: each dimension of the predicted capsule perturbed by -0.25..0.25")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """The records of a metrics.jsonl file (one JSON object per line, blank lines ignored)."""
    path = Path(path)
    records = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{number}: not a JSON object ({exc})") from exc
    return records


def plot_training_curve(metrics: str | os.PathLike, path: str | os.PathLike) -> Path:
    """PNG of loss and accuracy per epoch (train and test) from a run's metrics.jsonl."""
    records = read_metrics(metrics)
    if not records:
        raise ValueError(f"{metrics} holds no epoch records")
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator

    epochs = [r["epoch"] for r in records]
    fig, (loss_ax, acc_ax) = plt.subplots(1, 2, figsize=(10, 4))
    for split, style in (("train", "-o"), ("test", "-s")):
        loss_ax.plot(epochs, [r[f"{split}_loss"] for r in records], style, label=split)
        acc_ax.plot(epochs, [100 * r[f"{split}_accuracy"] for r in records], style, label=split)
    loss_ax.set(xlabel="epoch", ylabel="loss (margin + scaled reconstruction)", yscale="log")
    best = max(100 * r["test_accuracy"] for r in records)
    acc_ax.set(xlabel="epoch", ylabel="accuracy (%)", title=f"best test accuracy {best:.2f}%")
    for axis in (loss_ax, acc_ax):
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
        axis.grid(alpha=0.3)
        axis.legend()
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def visualize_checkpoint(
    checkpoint: str | os.PathLike,
    out_dir: str | os.PathLike | None = None,
    *,
    data_dir: str | None = None,
    device: str = "auto",
    num_images: int = 16,
    num_perturbed: int = 3,
    backend: str | None = None,
) -> list[Path]:
    """Write reconstructions.png, perturbations.png (Figure 4) and, when the run folder has
    metrics, training_curve.png into out_dir (default: the checkpoint's folder)."""
    if num_images < 1 or num_perturbed < 1:
        raise ValueError(
            f"num_images and num_perturbed must be >= 1, got {num_images}, {num_perturbed}"
        )
    # Everything that can fail is checked before the output folder is created.
    _pyplot()
    dev = resolve_device(device)
    ckpt = checkpoint_path(checkpoint)
    state = load_checkpoint(ckpt)
    model, config = model_from_checkpoint(state, dev, backend, ckpt)
    limit = max(num_images, num_perturbed)
    test_set = load_test_set(config, data_dir, limit, tuple(state["image_shape"]))
    images = to_float(test_set.images.to(dev))
    out = Path(out_dir) if out_dir is not None else ckpt.parent
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ValueError(f"--out {out}: cannot create the folder ({exc.strerror or exc})") from exc
    written = [
        plot_reconstructions(
            model, images[:num_images], test_set.labels[:num_images], out / "reconstructions.png"
        ),
        plot_perturbations(model, images[:num_perturbed], out / "perturbations.png"),
    ]
    metrics = ckpt.parent / METRICS_NAME
    if metrics.is_file() and read_metrics(metrics):
        written.append(plot_training_curve(metrics, out / "training_curve.png"))
    return written
