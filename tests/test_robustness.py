"""Affine-perturbed test sets: the spec, the transformation's geometry, seeding."""

from __future__ import annotations

import pytest
import torch

from capsnet_fused.data import ImageDataset
from capsnet_fused.robustness import (
    AffineParams,
    AffineSpec,
    affine_transform,
    draw_affine,
    perturb_dataset,
)
from tests.test_data import _shift


def _params(count: int, angle=0.0, scale=1.0, shear=0.0, shift=(0, 0)) -> AffineParams:
    return AffineParams(
        torch.full((count,), float(angle), dtype=torch.float64),
        torch.full((count,), float(scale), dtype=torch.float64),
        torch.full((count,), float(shear), dtype=torch.float64),
        torch.tensor([shift] * count),
    )


@pytest.mark.parametrize(
    "text, expected",
    [
        ("rotate=20,shift=3", AffineSpec(rotate=20.0, shift=3)),
        (" shift = 2 ", AffineSpec(shift=2)),
        ("rotate=15,shift=1,scale=0.1,shear=10", AffineSpec(15.0, 1, 0.1, 10.0)),
        ("shift=0", AffineSpec()),
    ],
)
def test_spec_parses_and_prints_back(text, expected):
    spec = AffineSpec.parse(text)
    assert spec == expected
    assert AffineSpec.parse(str(spec)) == spec if not spec.is_identity else str(spec) == "none"


@pytest.mark.parametrize(
    "text, message",
    [
        ("rotate20", "name=value pairs"),
        ("spin=3", "names among rotate, scale, shear, shift"),
        ("rotate=a", "'a' is not a number"),
        ("shift=1.5", "whole number of pixels"),
        ("rotate=-5", "rotate must be a finite number >= 0"),
        ("rotate=nan", "rotate must be a finite number >= 0"),
        ("scale=1", "scale must be < 1"),
        ("shear=90", "shear must be < 90"),
        ("shift=1,shift=2", "shift given twice"),
    ],
)
def test_bad_specs_are_refused_naming_the_problem(text, message):
    with pytest.raises(ValueError, match=message):
        AffineSpec.parse(text)


def test_no_transformation_returns_the_images():
    images = torch.rand(3, 2, 7, 9)
    assert torch.allclose(affine_transform(images, _params(3)), images, atol=1e-6)


def test_integer_shift_moves_pixels_exactly():
    images = torch.rand(2, 1, 8, 6)
    for dy, dx in [(1, 2), (-3, 0), (0, -1)]:
        moved = affine_transform(images, _params(2, shift=(dy, dx)))
        for image, out in zip(images, moved, strict=True):
            assert torch.allclose(out, _shift(image, dy, dx), atol=1e-6)


def test_rotation_by_90_degrees_turns_the_image_clockwise():
    images = torch.rand(2, 1, 6, 6)
    turned = affine_transform(images, _params(2, angle=90))
    # rot90 with k=-1 turns clockwise as displayed (rows down, columns right).
    assert torch.allclose(turned, torch.rot90(images, -1, dims=(2, 3)), atol=1e-5)


def test_scale_and_shear_keep_the_centre_and_move_the_rest():
    images = torch.zeros(1, 1, 9, 9)
    images[0, 0, 4, 4] = 1.0  # the centre pixel
    images[0, 0, 4, 6] = 1.0  # two pixels right of it
    half = affine_transform(images, _params(1, scale=0.5))[0, 0]
    # Shrunk by 2 about the centre: the centre stays, the other dot lands one pixel right.
    assert half[4, 4] == pytest.approx(1.0) and half[4, 5] == pytest.approx(1.0)
    assert half.sum() == pytest.approx(2.0, abs=1e-5)
    sheared = affine_transform(images, _params(1, shear=45))[0, 0]
    # x += tan(45 deg) * y: the centre row (y = 0 about the centre) does not move.
    assert torch.allclose(sheared, images[0, 0], atol=1e-5)
    images[0, 0, 6, 4] = 1.0  # two rows below the centre moves two columns right
    sheared = affine_transform(images, _params(1, shear=45))[0, 0]
    assert sheared[6, 6] == pytest.approx(1.0, abs=1e-5) and sheared[6, 4] == pytest.approx(0)


def test_draws_stay_within_the_spec_and_depend_only_on_seed_and_index():
    spec = AffineSpec(rotate=20.0, shift=3, scale=0.1, shear=5.0)
    params = draw_affine(500, spec, seed=0)
    assert params.angle.abs().max() <= 20 and params.angle.abs().max() > 15
    assert set(params.shift.flatten().tolist()) == set(range(-3, 4))
    assert ((params.scale - 1).abs() <= 0.1).all() and (params.shear.abs() <= 5).all()
    fewer = draw_affine(200, spec, seed=0)
    again = draw_affine(500, spec, seed=0)
    other = draw_affine(500, spec, seed=1)
    assert torch.equal(again.angle, params.angle) and torch.equal(again.shift, params.shift)
    assert not torch.equal(other.angle, params.angle)
    # Image k's transformation does not depend on how many images follow it.
    for name in ("angle", "scale", "shear", "shift"):
        assert torch.equal(getattr(fewer, name), getattr(params, name)[:200]), name


def test_perturbed_dataset_is_seeded_uint8_and_independent_of_the_chunk_size():
    images = torch.randint(0, 256, (30, 1, 12, 12), dtype=torch.uint8)
    dataset = ImageDataset(images, torch.arange(30) % 10)
    spec = AffineSpec(rotate=20.0, shift=3)
    first = perturb_dataset(dataset, spec, seed=0)
    assert first.images.dtype == torch.uint8 and first.images.shape == images.shape
    assert torch.equal(first.labels, dataset.labels)
    assert torch.equal(perturb_dataset(dataset, spec, seed=0, chunk=7).images, first.images)
    assert not torch.equal(perturb_dataset(dataset, spec, seed=1).images, first.images)
    assert not torch.equal(first.images, images)
    # No perturbation: the uint8 round trip gives back the same pixels.
    assert torch.equal(perturb_dataset(dataset, AffineSpec(), seed=0).images, images)
