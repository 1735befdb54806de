"""Batch-level augmentation parameters, drawn from mmload's seeded, counter-based RNG.

Parameters are a pure function of (seed, epoch, global sample id): the same sample gets the
same crop and flip on any rank, worker, world size or device, and after a resume. Decoders
(DALI on CPU/GPU, PIL, the fused Numba kernel) consume the same :class:`CropParams`.

Output contract of the image path: ``[B, 3, H, W]`` (NCHW), ``ImageConfig.dtype``, on the
batch device.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from mmload.config import ImageConfig
from mmload.plan import hash_uniform

__all__ = ["CropParams", "draw_crops"]

_STREAM = 1 << 48  # well above the plan's streams
_ATTEMPTS = 10


@dataclass(frozen=True)
class CropParams:
    """Per-sample crop window in source pixels and horizontal flip.

    ``y0, x0, h, w``: int64 ``[B]``; ``flip``: bool ``[B]``.
    """

    y0: np.ndarray
    x0: np.ndarray
    h: np.ndarray
    w: np.ndarray
    flip: np.ndarray

    def __len__(self) -> int:
        return len(self.y0)

    def take(self, idx: np.ndarray) -> CropParams:
        return CropParams(self.y0[idx], self.x0[idx], self.h[idx], self.w[idx], self.flip[idx])


_DRAWS = 2 * _ATTEMPTS + 3  # (area, ratio) per attempt, then y, x, flip


def _u(seed: int, epoch: int, ids: np.ndarray) -> np.ndarray:
    """All of a batch's uniforms in one vectorised pass: ``[_DRAWS, n]``."""
    return hash_uniform(seed, epoch, _STREAM + np.arange(_DRAWS), ids)


def draw_crops(
    heights: np.ndarray,
    widths: np.ndarray,
    cfg: ImageConfig,
    *,
    seed: int,
    epoch: int,
    ids: np.ndarray,
) -> CropParams:
    """Crop windows and flips for images of the given sizes (vectorised over the batch).

    ``random_resized`` follows torchvision's RandomResizedCrop: up to 10 draws of area fraction
    in ``scale`` and log-uniform aspect ratio in ``ratio``, the first that fits wins, else a
    center crop clamped to ``ratio``.
    """
    H = np.asarray(heights, dtype=np.int64)
    W = np.asarray(widths, dtype=np.int64)
    ids = np.asarray(ids, dtype=np.int64)
    n = len(H)
    out_h, out_w = cfg.size
    u = _u(seed, epoch, ids) if cfg.crop == "random_resized" or cfg.flip else None
    if cfg.crop == "resize":
        h, w = H.copy(), W.copy()
        y0 = np.zeros(n, np.int64)
        x0 = np.zeros(n, np.int64)
    elif cfg.crop == "center":
        # Largest window of the output's aspect ratio, shrunk by 0.875 (resize 256 -> crop 224).
        s = np.minimum(H / out_h, W / out_w) * 0.875
        h = np.clip(np.round(out_h * s), 1, H).astype(np.int64)
        w = np.clip(np.round(out_w * s), 1, W).astype(np.int64)
        y0 = (H - h) // 2
        x0 = (W - w) // 2
    else:
        area = (H * W).astype(np.float64)
        log_lo, log_hi = math.log(cfg.ratio[0]), math.log(cfg.ratio[1])
        h = np.zeros(n, np.int64)
        w = np.zeros(n, np.int64)
        done = np.zeros(n, bool)
        for a in range(_ATTEMPTS):
            assert u is not None
            frac = cfg.scale[0] + (cfg.scale[1] - cfg.scale[0]) * u[2 * a]
            target = area * frac
            ar = np.exp(log_lo + (log_hi - log_lo) * u[2 * a + 1])
            cw = np.round(np.sqrt(target * ar)).astype(np.int64)
            ch = np.round(np.sqrt(target / ar)).astype(np.int64)
            ok = ~done & (cw > 0) & (ch > 0) & (cw <= W) & (ch <= H)
            w[ok], h[ok] = cw[ok], ch[ok]
            done |= ok
        rest = ~done
        if rest.any():
            in_ratio = W[rest] / H[rest]
            fw = W[rest].copy()
            fh = H[rest].copy()
            lo = in_ratio < cfg.ratio[0]
            hi = in_ratio > cfg.ratio[1]
            fh[lo] = np.round(fw[lo] / cfg.ratio[0]).astype(np.int64)
            fw[hi] = np.round(fh[hi] * cfg.ratio[1]).astype(np.int64)
            h[rest], w[rest] = np.minimum(fh, H[rest]), np.minimum(fw, W[rest])
        assert u is not None
        uy, ux = u[2 * _ATTEMPTS], u[2 * _ATTEMPTS + 1]
        y0 = np.where(done, np.floor(uy * (H - h + 1)), (H - h) // 2).astype(np.int64)
        x0 = np.where(done, np.floor(ux * (W - w + 1)), (W - w) // 2).astype(np.int64)
    flip = u[2 * _ATTEMPTS + 2] < 0.5 if u is not None and cfg.flip else np.zeros(n, bool)
    return CropParams(y0, x0, h, w, flip)
