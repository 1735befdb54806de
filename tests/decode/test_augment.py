"""Crop windows and flips: valid, torchvision's RandomResizedCrop distribution, pure."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest

from mmload.augment import draw_crops
from mmload.config import ImageConfig
from mmload.errors import ConfigError
from mmload.plan import hash_uniform


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


# The crops' RNG stream and draws: part of the resume contract (a resumed run must draw the
# same windows), so they are pinned here, not read from the module.
_CROP_STREAM = 1 << 48
_CROP_ATTEMPTS = 10


def _reference_crop(
    height: int, width: int, cfg: ImageConfig, u: list[float]
) -> tuple[int, int, int, int, bool, str]:
    """One sample's window, flip and the way the window was found, written out per sample in plain Python from
    torchvision's RandomResizedCrop.get_params (the ``random`` draws replaced by ``u``: two per
    attempt, then y, x and flip), its CenterCrop after a ``size / 0.875`` resize, or the whole
    image for ``resize``."""
    flip = cfg.flip and u[2 * _CROP_ATTEMPTS + 2] < 0.5
    if cfg.crop == "resize":
        return 0, 0, height, width, flip, "resize"
    out_h, out_w = cfg.size
    if cfg.crop == "center":
        s = min(height / out_h, width / out_w) * 0.875
        h = min(max(round(out_h * s), 1), height)
        w = min(max(round(out_w * s), 1), width)
        return (height - h) // 2, (width - w) // 2, h, w, flip, "center"
    lo, hi = cfg.scale
    rlo, rhi = math.log(cfg.ratio[0]), math.log(cfg.ratio[1])
    for a in range(_CROP_ATTEMPTS):
        target = height * width * (lo + (hi - lo) * u[2 * a])
        ar = math.exp(rlo + (rhi - rlo) * u[2 * a + 1])
        w = round(math.sqrt(target * ar))
        h = round(math.sqrt(target / ar))
        if 0 < w <= width and 0 < h <= height:
            uy, ux = u[2 * _CROP_ATTEMPTS], u[2 * _CROP_ATTEMPTS + 1]
            y0, x0 = math.floor(uy * (height - h + 1)), math.floor(ux * (width - w + 1))
            return y0, x0, h, w, flip, "fit"
    in_ratio = width / height
    if in_ratio < cfg.ratio[0]:
        w, h, path = width, round(width / cfg.ratio[0]), "too tall"
    elif in_ratio > cfg.ratio[1]:
        h, w, path = height, round(height * cfg.ratio[1]), "too wide"
    else:
        w, h, path = width, height, "whole"
    h, w = min(h, height), min(w, width)
    return (height - h) // 2, (width - w) // 2, h, w, flip, path


@pytest.mark.parametrize(
    "cfg",
    [
        ImageConfig(),
        ImageConfig(size=(96, 160), scale=(0.5, 0.5), ratio=(1.0, 1.0), flip=False),
        ImageConfig(size=(32, 32), scale=(0.9, 1.0), ratio=(0.2, 5.0)),
        ImageConfig(size=(8, 8), scale=(0.001, 0.01), ratio=(1 / 3, 3.0)),
        ImageConfig(size=(96, 160), crop="center"),
        ImageConfig(size=(160, 96), crop="center", flip=False),
        ImageConfig(size=(16, 224), crop="center"),  # windows under a pixel, raised to 1
        ImageConfig(size=(224, 16), crop="center"),
        ImageConfig(size=(50, 50), crop="resize"),
    ],
    ids=[
        "default",
        "fixed",
        "wide-ratio",
        "tiny-area",
        "center-wide",
        "center-tall",
        "center-very-wide",
        "center-very-tall",
        "resize",
    ],
)
def test_draw_crops_equals_a_per_sample_reference(cfg: ImageConfig) -> None:
    rng = np.random.default_rng(7)
    sizes = [(1, 1), (1, 500), (500, 1), (2, 3), (3, 2), (7, 700), (700, 7), (224, 224)]
    sizes += [(int(h), int(w)) for h, w in rng.integers(1, 640, (400, 2))]
    sizes += [(h, w) for h in range(1, 41, 3) for w in range(1, 41, 3)]  # windows of a pixel or two
    # Narrow integer inputs (as header readers give): the windows are int64 all the same.
    H = np.array([h for h, _ in sizes], dtype=np.int32)
    W = np.array([w for _, w in sizes], dtype=np.uint16)
    ids = rng.permutation(10_000)[: len(sizes)] * 3 + 5  # ids need not be 0..n-1
    seed, epoch = 11, 4
    got = draw_crops(H, W, cfg, seed=seed, epoch=epoch, ids=ids)
    draws = [
        hash_uniform(seed, epoch, _CROP_STREAM + k, ids) for k in range(2 * _CROP_ATTEMPTS + 3)
    ]
    paths = set()
    for i, (h, w) in enumerate(sizes):
        u = [float(d[i]) for d in draws]
        *want, path = _reference_crop(h, w, cfg, u)
        paths.add(path)
        have = [int(got.y0[i]), int(got.x0[i]), int(got.h[i]), int(got.w[i]), bool(got.flip[i])]
        assert have == want, (h, w, cfg)
    for arr in (got.y0, got.x0, got.h, got.w):
        assert arr.dtype == np.int64
    assert got.flip.dtype == bool
    assert len(got) == len(sizes)
    # Every way to a window happens in this set (the branches are exercised).
    if cfg.crop == "random_resized":
        # (windows under a pixel at tiny scales: 1-pixel images fall back to the whole image)
        must = {"fit", "too tall", "too wide"} if cfg.scale[0] >= 0.08 else {"fit", "whole"}
        assert must <= paths, paths
    if cfg.flip:
        assert got.flip.any() and not got.flip.all()
    else:
        assert not got.flip.any()


def test_crop_params_take_selects_rows_of_every_field() -> None:
    c = draw_crops(
        np.array([100, 200, 300, 400]), np.array([50, 60, 70, 80]), ImageConfig(), seed=0,
        epoch=0, ids=np.arange(4),
    )  # fmt: skip
    idx = np.array([3, 1])
    t = c.take(idx)
    assert len(t) == 2
    for name in ("y0", "x0", "h", "w", "flip"):
        np.testing.assert_array_equal(getattr(t, name), getattr(c, name)[idx], err_msg=name)
