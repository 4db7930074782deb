"""Augmentations are correct, not just fast: each op against its definition or torch's own."""
from __future__ import annotations

import pytest
import torch

from cnnkit.augment import PRESETS, Augment, affine_grid, perspective_grid, translate, warp


def batch(n: int = 8, c: int = 3, h: int = 12, w: int = 12, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, c, h, w), generator=g, dtype=torch.uint8)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_a_flip_of_a_flip_is_the_identity():
    x = batch()
    flip = Augment(hflip=1.0, vflip=1.0)
    once = flip(x, gen())
    assert torch.equal(once, x.flip(2).flip(3).float())
    assert torch.equal(flip(once, gen()), x.float())


def test_a_shift_moves_content_by_the_stated_pixels_and_replicates_edges():
    x = batch(n=2, h=10, w=10)
    moved = translate(x, torch.tensor([2, -3]), torch.tensor([-1, 4]))
    # image 0: content 2 rows down and 1 column left
    assert torch.equal(moved[0, :, 2:, :9], x[0, :, :8, 1:])
    assert torch.equal(moved[0, :, 0], moved[0, :, 2]) and torch.equal(moved[0, :, :, 9], moved[0, :, :, 8])
    # image 1: 3 rows up and 4 columns right
    assert torch.equal(moved[1, :, :7, 4:], x[1, :, 3:, :6])
    # the random shift stays within its bound: every output row is some input row moved by at most 2
    out = Augment(shift=0.2)(x, gen())  # 0.2 of 10 px: up to 2 px
    for i in range(2):
        found = [(dy, dx) for dy in range(-2, 3) for dx in range(-2, 3)
                 if torch.equal(out[i], translate(x[i:i + 1], torch.tensor([dy]), torch.tensor([dx]))[0].float())]
        assert found, i


@pytest.mark.parametrize("k,angle", [(1, 90.0), (2, 180.0), (-1, -90.0)])
def test_rotation_by_right_angles_matches_torch_rot90(k, angle):
    x = batch(h=9, w=9).float()
    rotated = warp(x, affine_grid(torch.full((8,), angle), torch.ones(8), torch.zeros(8), (9, 9)))
    assert torch.allclose(rotated, torch.rot90(x, k, dims=(2, 3)), atol=1e-3)


def test_identity_warps_are_exact():
    x = batch().float()
    assert torch.allclose(warp(x, affine_grid(torch.zeros(8), torch.ones(8), torch.zeros(8), (12, 12))), x, atol=1e-3)
    assert torch.allclose(warp(x, perspective_grid(torch.zeros(8, 4, 2), (12, 12))), x, atol=1e-3)


def test_a_fixed_seed_augments_the_same_batch_the_same_way():
    x = batch()
    strong = Augment.preset("strong")
    assert torch.equal(strong(x, gen(3)), strong(x, gen(3)))
    assert not torch.equal(strong(x, gen(3)), strong(x, gen(4)))
    out = strong(x, gen(3))
    assert out.dtype == torch.float32 and out.shape == x.shape and 0 <= out.min() and out.max() <= 255


def test_presets_and_dataset_facts():
    assert Augment.preset("light") == Augment(shift=0.1, hflip=0.5)  # the notes' CIFAR-10 augmentation
    assert Augment.preset("light", flips_allowed=False).hflip == 0  # digits are never mirrored
    assert Augment.preset("none").active is False and all(Augment.preset(p).active for p in PRESETS if p != "none")
    assert Augment.preset("standard", rotate=30).rotate == 30
    with pytest.raises(ValueError):
        Augment.preset("extreme")


def test_photometric_ops_keep_the_geometry():
    x = batch().float() * 0.6 + 1  # 1..154: no pixel reaches 255 even at x1.5
    bright = Augment(brightness=0.5)(x, gen())
    ratio = bright / x.clamp_min(1)
    per_image = ratio.flatten(1)
    assert torch.allclose(per_image, per_image[:, :1].expand_as(per_image), atol=0.02)  # one factor per image
    grey = batch(c=1).float()
    assert torch.equal(Augment(saturation=0.5)(grey, gen()), grey)  # no colour, nothing to saturate
    blurred = Augment(blur=2.0)(x, gen())
    assert blurred.std() < x.std() and abs(blurred.mean() - x.mean()) < 3
