"""Affine-perturbed test sets: the affNIST-style robustness check of Sabour et al. (2017).

The paper trains on 2-pixel-shifted MNIST and tests on affNIST (digits under small random
affine transformations) to show that capsules generalise to poses they were not trained on. Here
the same kind of check runs on any test split: every test image gets its own random rotation,
integer shift, scale and shear, drawn from a seeded generator, and the perturbed images are
rounded back to uint8, as a stored dataset like affNIST would hold them. Evaluating two models
with the same spec and seed therefore shows both exactly the same perturbed images, whatever the
batch size or device (`capsnet-fused eval RUN --affine rotate=20,shift=3 --seed 0`).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
from torch.nn import functional as F

from capsnet_fused.data import ImageDataset, to_float


@dataclass(frozen=True)
class AffineSpec:
    """The largest perturbation of each kind; each image draws its own uniformly within them.

    rotate: degrees either way; shift: whole pixels either way, per axis; scale: relative
    change, factors in [1 - scale, 1 + scale]; shear: degrees either way (x sheared by y).
    """

    rotate: float = 0.0
    shift: int = 0
    scale: float = 0.0
    shear: float = 0.0

    def __post_init__(self) -> None:
        for name in ("rotate", "scale", "shear"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"affine {name} must be a finite number >= 0, got {value}")
        if self.scale >= 1:
            raise ValueError(f"affine scale must be < 1 (factors 1 +- scale), got {self.scale}")
        if self.shear >= 90:
            raise ValueError(f"affine shear must be < 90 degrees, got {self.shear}")
        if isinstance(self.shift, bool) or not isinstance(self.shift, int) or self.shift < 0:
            raise ValueError(
                f"affine shift must be a whole number of pixels >= 0, got {self.shift}"
            )

    @classmethod
    def parse(cls, text: str) -> AffineSpec:
        """'rotate=20,shift=3' (any of rotate, shift, scale, shear; unnamed ones are 0)."""
        fields = {field.name for field in dataclasses.fields(cls)}
        values: dict[str, float | int] = {}
        for part in text.split(","):
            name, sep, value = part.strip().partition("=")
            name = name.strip()
            if not sep or name not in fields:
                raise ValueError(
                    f"affine perturbation {text!r}: expected name=value pairs separated by "
                    f"commas, names among {', '.join(sorted(fields))} (e.g. rotate=20,shift=3)"
                )
            if name in values:
                raise ValueError(f"affine perturbation {text!r}: {name} given twice")
            try:
                number = float(value)
            except ValueError:
                raise ValueError(
                    f"affine perturbation {text!r}: {name}={value!r} is not a number"
                ) from None
            if name == "shift":
                if not number.is_integer():
                    raise ValueError(
                        f"affine perturbation {text!r}: shift must be a whole number of pixels"
                    )
                number = int(number)
            values[name] = number
        return cls(**values)

    def __str__(self) -> str:
        """The spec as parse reads it, nonzero entries only ('none' for no perturbation)."""
        fields = [field.name for field in dataclasses.fields(self)]
        return ",".join(f"{n}={getattr(self, n):g}" for n in fields if getattr(self, n)) or "none"

    @property
    def is_identity(self) -> bool:
        return not (self.rotate or self.shift or self.scale or self.shear)


@dataclass(frozen=True)
class AffineParams:
    """One transformation per image: angle and shear in degrees [N], scale factors [N] and
    shifts [N, 2] as (dy, dx) pixels."""

    angle: torch.Tensor
    scale: torch.Tensor
    shear: torch.Tensor
    shift: torch.Tensor

    def __getitem__(self, index: slice) -> AffineParams:
        return AffineParams(
            self.angle[index], self.scale[index], self.shear[index], self.shift[index]
        )


def draw_affine(count: int, spec: AffineSpec, seed: int) -> AffineParams:
    """`count` transformations drawn uniformly within spec from a generator seeded with seed.

    Image k's transformation comes from row k of one [count, 5] draw, whichever kinds the spec
    uses, so it depends only on (spec, seed, k): not on the batch size, not on how many images
    follow it (--limit-test perturbs the first images as the full test set does).
    """
    gen = torch.Generator().manual_seed(seed)
    uniform = torch.rand(count, 5, generator=gen, dtype=torch.float64)
    symmetric = 2 * uniform - 1
    # floor(u * (2s + 1)) - s is uniform over the integers -s..s (u < 1).
    shift = (uniform[:, 3:] * (2 * spec.shift + 1)).floor().long() - spec.shift
    return AffineParams(
        angle=symmetric[:, 0] * spec.rotate,
        scale=1 + symmetric[:, 1] * spec.scale,
        shear=symmetric[:, 2] * spec.shear,
        shift=shift,
    )


def affine_transform(images: torch.Tensor, params: AffineParams) -> torch.Tensor:
    """Apply params[b] to images[b] ([B, C, H, W] float), bilinear, zero fill outside.

    Each image is rotated by `angle` (positive turns it clockwise as displayed, y pointing down),
    sheared, scaled about its centre and then moved by `shift` = (dy, dx) pixels. A zero
    transformation returns the images unchanged (pixel centres land on pixel centres), and an
    integer shift alone moves pixels exactly.
    """
    if images.dim() != 4:
        raise ValueError(f"expected images [B, C, H, W], got {tuple(images.shape)}")
    batch, _, height, width = images.shape
    if params.angle.shape != (batch,):
        raise ValueError(f"expected {batch} transformations, got {params.angle.shape[0]}")
    if batch == 0:
        return images
    angle = torch.deg2rad(params.angle.double())
    shear = torch.tan(torch.deg2rad(params.shear.double()))
    cos, sin = torch.cos(angle), torch.sin(angle)
    zero, one = torch.zeros_like(cos), torch.ones_like(cos)
    # Forward map in pixel coordinates about the image centre, (x, y) with y down:
    # out = rotation @ shear @ scale @ in + (dx, dy).
    rotation = torch.stack([torch.stack([cos, -sin], -1), torch.stack([sin, cos], -1)], -2)
    shearing = torch.stack([torch.stack([one, shear], -1), torch.stack([zero, one], -1)], -2)
    forward = rotation @ shearing * params.scale.double()[:, None, None]
    translation = params.shift.double().flip(-1)  # (dy, dx) -> (dx, dy)
    # grid_sample asks, for each output pixel, where to read the input, in coordinates
    # normalised to [-1, 1] (align_corners=False: n = 2 p / size about the centre). With
    # S = diag(2 / W, 2 / H): n_in = S A^-1 S^-1 n_out - S A^-1 t.
    to_normalised = torch.diag(torch.tensor([2.0 / width, 2.0 / height], dtype=torch.float64))
    inverse = torch.linalg.inv(forward)
    linear = to_normalised @ inverse @ torch.linalg.inv(to_normalised)
    offset = -(to_normalised @ inverse @ translation[:, :, None])
    theta = torch.cat([linear, offset], dim=-1).to(images.dtype).to(images.device)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def perturb_dataset(
    dataset: ImageDataset, spec: AffineSpec, seed: int = 0, chunk: int = 1000
) -> ImageDataset:
    """The dataset with image k transformed by draw_affine(len, spec, seed)[k], as uint8.

    Rounded to uint8 like a stored dataset (at most 0.5 / 255 per pixel); labels unchanged.
    Computed on the CPU in chunks of `chunk` images, which do not change the result.
    """
    params = draw_affine(len(dataset), spec, seed)
    out = torch.empty_like(dataset.images)
    for start in range(0, len(dataset), chunk):
        part = slice(start, start + chunk)
        moved = affine_transform(to_float(dataset.images[part]), params[part])
        out[part] = moved.mul(255.0).round_().clamp_(0, 255).to(torch.uint8)
    return ImageDataset(out, dataset.labels, dataset.source)
