"""Crop windows and flips: valid, torchvision's RandomResizedCrop distribution, pure."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest

from mmload.augment import draw_crops
from mmload.config import ImageConfig
from mmload.errors import ConfigError


def test_random_resized_crop_windows() -> None:
    n = 20_000
    rng = np.random.default_rng(0)
    H = rng.integers(20, 600, n)
    W = rng.integers(20, 600, n)
    cfg = ImageConfig()
    c = draw_crops(H, W, cfg, seed=1, epoch=0, ids=np.arange(n))
    assert (c.y0 >= 0).all() and (c.x0 >= 0).all() and (c.h >= 1).all() and (c.w >= 1).all()
    assert (c.y0 + c.h <= H).all() and (c.x0 + c.w <= W).all()
    frac = c.h * c.w / (H * W)
    ratio = c.w / c.h
    fitted = (frac >= 0.07) & (frac <= 1.01) & (ratio > 0.7) & (ratio < 1.45)
    assert fitted.mean() > 0.97  # the rest fell back to a centred, ratio-clamped crop
    assert 0.48 < c.flip.mean() < 0.52
    # Same distribution as torchvision's RandomResizedCrop.get_params on the same image sizes.
    ref = np.array(
        [
            _torchvision_rrc_frac(int(h), int(w), random.Random(i))
            for i, (h, w) in enumerate(zip(H, W, strict=True))
        ]
    )
    for q in (0.1, 0.25, 0.5, 0.75, 0.9):
        assert abs(np.quantile(frac, q) - np.quantile(ref, q)) < 0.02, q


def _torchvision_rrc_frac(height: int, width: int, rng: random.Random) -> float:
    """torchvision.transforms.RandomResizedCrop.get_params, area fraction of the window."""
    area = height * width
    for _ in range(10):
        target = area * rng.uniform(0.08, 1.0)
        ar = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
        w = round(math.sqrt(target * ar))
        h = round(math.sqrt(target / ar))
        if 0 < w <= width and 0 < h <= height:
            return h * w / area
    in_ratio = width / height
    if in_ratio < 3 / 4:
        w, h = width, round(width / (3 / 4))
    elif in_ratio > 4 / 3:
        h, w = height, round(height * (4 / 3))
    else:
        w, h = width, height
    return min(h, height) * min(w, width) / area


def test_crops_are_pure_and_change_with_epoch_and_id() -> None:
    H, W = np.full(64, 300), np.full(64, 400)
    a = draw_crops(H, W, ImageConfig(), seed=3, epoch=2, ids=np.arange(64))
    b = draw_crops(H, W, ImageConfig(), seed=3, epoch=2, ids=np.arange(64))
    assert all(
        np.array_equal(x, y) for x, y in zip(a.__dict__.values(), b.__dict__.values(), strict=True)
    )
    c = draw_crops(H, W, ImageConfig(), seed=3, epoch=3, ids=np.arange(64))
    assert not np.array_equal(a.x0, c.x0)
    # A sample's crop depends on its id only, not on its batch neighbours.
    d = draw_crops(H[:1], W[:1], ImageConfig(), seed=3, epoch=2, ids=np.array([17]))
    assert (d.x0[0], d.w[0], d.flip[0]) == (a.x0[17], a.w[17], a.flip[17])


def test_center_and_resize_modes() -> None:
    c = draw_crops(
        np.array([400]),
        np.array([600]),
        ImageConfig(crop="center", flip=False),
        seed=0,
        epoch=0,
        ids=np.array([0]),
    )
    assert (c.h[0], c.w[0]) == (350, 350) and (c.y0[0], c.x0[0]) == (25, 125) and not c.flip[0]
    r = draw_crops(
        np.array([400]),
        np.array([600]),
        ImageConfig(crop="resize"),
        seed=0,
        epoch=0,
        ids=np.array([0]),
    )
    assert (r.y0[0], r.x0[0], r.h[0], r.w[0]) == (0, 0, 400, 600)


def test_image_config_validation() -> None:
    for bad in (
        {"size": 0},
        {"crop": "zoom"},
        {"scale": (0.5, 0.2)},
        {"dtype": "uint8"},
        {"backend": "cv2"},
        {"std": (0.0, 1.0, 1.0)},
    ):
        with pytest.raises(ConfigError):
            ImageConfig(**bad)  # type: ignore[arg-type]
    assert ImageConfig(size=96).size == (96, 96)
