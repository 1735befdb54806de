"""Small frozen configuration objects, validated at construction.

Every invalid value raises :class:`~mmload.errors.ConfigError` naming the field and the value.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from mmload.errors import ConfigError

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "ErrorPolicy",
    "ImageConfig",
    "ShuffleConfig",
]

IMAGENET_MEAN = (0.485 * 255, 0.456 * 255, 0.406 * 255)
IMAGENET_STD = (0.229 * 255, 0.224 * 255, 0.225 * 255)

OnError = Literal["raise", "skip"]
ImageBackend = Literal["auto", "dali", "pil"]
CropMode = Literal["random_resized", "center", "resize"]
ImageDType = Literal["uint8", "float16", "bfloat16", "float32"]


def _fail(field: str, value: object, why: str) -> ConfigError:
    return ConfigError(f"{field}={value!r}: {why}")


@dataclass(frozen=True)
class ShuffleConfig:
    """How an epoch is shuffled.

    The epoch order is built from *chunks* (a tar shard, a Parquet row group, an Arrow record
    batch): the chunks are permuted, then consecutive groups of ``interleave`` chunks have their
    samples shuffled together uniformly. ``interleave=0`` shuffles the whole data set at once.
    Larger groups mix better; for Parquet a reader keeps about ``interleave`` decoded row groups
    in memory.
    """

    interleave: int = 32

    def __post_init__(self) -> None:
        if isinstance(self.interleave, bool) or not isinstance(self.interleave, int):
            raise _fail("interleave", self.interleave, "must be an int")
        if self.interleave < 0:
            raise _fail("interleave", self.interleave, "must be >= 0 (0 = whole data set)")


@dataclass(frozen=True)
class ErrorPolicy:
    """What to do with a bad sample or shard.

    ``on_error="raise"`` (default) raises the first error. ``"skip"`` replaces a bad sample by
    a good one of the same batch, counts it and lists it in ``stats()``, until more than
    ``max_bad_samples`` (an int count, or a float fraction in (0, 1) of the epoch's samples)
    have been seen; then it raises.
    """

    on_error: OnError = "raise"
    max_bad_samples: int | float = 0

    def __post_init__(self) -> None:
        if self.on_error not in ("raise", "skip"):
            raise _fail("on_error", self.on_error, "must be 'raise' or 'skip'")
        m = self.max_bad_samples
        if isinstance(m, bool) or not isinstance(m, (int, float)):
            raise _fail("max_bad_samples", m, "must be an int count or a float fraction")
        if isinstance(m, float) and not (0.0 < m < 1.0):
            raise _fail("max_bad_samples", m, "a float budget is a fraction in (0, 1)")
        if isinstance(m, int) and m < 0:
            raise _fail("max_bad_samples", m, "must be >= 0")
        if self.on_error == "skip" and m == 0:
            raise _fail(
                "max_bad_samples", m, "on_error='skip' needs a budget > 0 (count or fraction)"
            )

    def budget(self, num_samples: int) -> int:
        """The number of bad samples allowed for an epoch of ``num_samples`` samples."""
        if self.on_error == "raise":
            return 0
        if isinstance(self.max_bad_samples, float):
            return max(1, math.floor(self.max_bad_samples * num_samples))
        return int(self.max_bad_samples)


@dataclass(frozen=True)
class ImageConfig:
    """Decode and augmentation of image fields.

    Output per image field: ``[B, 3, H, W]`` NCHW. With ``normalize=True`` the values are
    ``(pixel - mean) / std`` in ``dtype`` (default float16); with ``normalize=False`` and
    ``dtype="uint8"`` raw RGB pixels.

    ``crop``: ``"random_resized"`` (torchvision's RandomResizedCrop with ``scale``/``ratio``),
    ``"center"`` (resize the short side to ``size / 0.875`` then center-crop) or ``"resize"``
    (squash the whole image to ``size``). Crop windows and flips are drawn from mmload's seeded
    RNG, per sample, so CPU and GPU runs see the same parameters.
    """

    size: tuple[int, int] = (224, 224)
    crop: CropMode = "random_resized"
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip: bool = True
    normalize: bool = True
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    dtype: ImageDType = "float16"
    backend: ImageBackend = "auto"
    max_pixels: int = 64_000_000
    max_side: int = 32_768

    def __post_init__(self) -> None:
        size = self.size
        if isinstance(size, int) and not isinstance(size, bool):
            object.__setattr__(self, "size", (size, size))
            size = (size, size)
        if (
            not isinstance(size, tuple)
            or len(size) != 2
            or not all(isinstance(s, int) and s > 0 for s in size)
        ):
            raise _fail("size", self.size, "must be a positive int or (height, width)")
        if self.crop not in ("random_resized", "center", "resize"):
            raise _fail("crop", self.crop, "must be 'random_resized', 'center' or 'resize'")
        lo, hi = self.scale
        if not (0.0 < lo <= hi <= 1.0):
            raise _fail("scale", self.scale, "must satisfy 0 < lo <= hi <= 1")
        rlo, rhi = self.ratio
        if not (0.0 < rlo <= rhi):
            raise _fail("ratio", self.ratio, "must satisfy 0 < lo <= hi")
        if self.dtype not in ("uint8", "float16", "bfloat16", "float32"):
            raise _fail("dtype", self.dtype, "must be uint8, float16, bfloat16 or float32")
        if self.normalize and self.dtype == "uint8":
            raise _fail("dtype", self.dtype, "normalize=True needs a float dtype")
        if len(self.mean) != 3 or len(self.std) != 3 or any(s <= 0 for s in self.std):
            raise _fail("mean/std", (self.mean, self.std), "need 3 values each, std > 0")
        if self.backend not in ("auto", "dali", "pil"):
            raise _fail("backend", self.backend, "must be 'auto', 'dali' or 'pil'")
        if self.max_pixels <= 0 or self.max_side <= 0:
            raise _fail("max_pixels/max_side", (self.max_pixels, self.max_side), "must be > 0")
