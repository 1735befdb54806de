"""Small frozen configuration objects, validated at construction.

Every invalid value raises :class:`~mmload.errors.ConfigError` naming the field and the value.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

from mmload.errors import ConfigError

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "AudioConfig",
    "ErrorPolicy",
    "FeatureJoin",
    "ImageConfig",
    "RemoteConfig",
    "ShuffleConfig",
    "TextConfig",
    "VideoConfig",
]

IMAGENET_MEAN = (0.485 * 255, 0.456 * 255, 0.406 * 255)
IMAGENET_STD = (0.229 * 255, 0.224 * 255, 0.225 * 255)

OnError = Literal["raise", "skip"]
ImageBackend = Literal["auto", "dali", "pil", "torchvision"]
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
    Larger groups mix better; for Parquet/Arrow a process keeps at most ``2 * interleave``
    decoded row groups / record batches in memory (64 with ``interleave=0``).
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
        if self.backend not in ("auto", "dali", "pil", "torchvision"):
            raise _fail("backend", self.backend, "must be 'auto', 'dali', 'pil' or 'torchvision'")
        if self.max_pixels <= 0 or self.max_side <= 0:
            raise _fail("max_pixels/max_side", (self.max_pixels, self.max_side), "must be > 0")


@dataclass(frozen=True)
class AudioConfig:
    """Decode of audio fields (``.wav``, ``.flac``, ``.ogg``).

    Every clip is decoded to mono, resampled to ``sample_rate`` and cut to ``seconds``: a longer
    clip is cropped (``crop``: ``"random"`` offset from mmload's seeded RNG, ``"start"`` or
    ``"center"``), a shorter one zero-padded at the end. Output ``float32 [B, T]``, or with
    ``mel=True`` the log-mel spectrogram ``float32 [B, n_mels, 1 + T // hop_length]``.
    """

    sample_rate: int = 16000
    seconds: float = 1.0
    crop: Literal["random", "start", "center"] = "random"
    mel: bool = False
    n_fft: int = 400
    hop_length: int = 160
    n_mels: int = 80
    max_seconds: float = 3600.0

    def __post_init__(self) -> None:
        for name in ("sample_rate", "n_fft", "hop_length", "n_mels"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise _fail(name, v, "must be a positive int")
        if not self.seconds > 0 or not self.max_seconds > 0:
            raise _fail("seconds/max_seconds", (self.seconds, self.max_seconds), "must be > 0")
        if self.crop not in ("random", "start", "center"):
            raise _fail("crop", self.crop, "must be 'random', 'start' or 'center'")
        if round(self.seconds * self.sample_rate) < 1:
            raise _fail("seconds", self.seconds, "gives clips of no samples at this sample_rate")


@dataclass(frozen=True)
class VideoConfig:
    """Decode of video fields (``.mp4``, ``.webm``, ...).

    ``frames`` frames are taken per clip, ``stride`` apart, from a start drawn from mmload's seeded
    RNG (``sampling="random"``) or the clip's middle (``"center"``); clips shorter than needed
    repeat their last frame. Frames are resized to ``size`` (height, width). Output
    ``[B, F, 3, H, W]``: ``uint8``, or normalised ``dtype`` with ``normalize=True``.
    """

    frames: int = 8
    stride: int = 2
    size: tuple[int, int] = (112, 112)
    sampling: Literal["random", "center"] = "random"
    normalize: bool = False
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    dtype: ImageDType = "uint8"
    max_frames: int = 100_000

    def __post_init__(self) -> None:
        if isinstance(self.size, int) and not isinstance(self.size, bool):
            object.__setattr__(self, "size", (self.size, self.size))
        for name in ("frames", "stride", "max_frames"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise _fail(name, v, "must be a positive int")
        if len(self.size) != 2 or not all(isinstance(s, int) and s > 0 for s in self.size):
            raise _fail("size", self.size, "must be a positive int or (height, width)")
        if self.sampling not in ("random", "center"):
            raise _fail("sampling", self.sampling, "must be 'random' or 'center'")
        if self.normalize == (self.dtype == "uint8"):
            raise _fail("dtype", self.dtype, "uint8 without normalize, a float dtype with it")


@dataclass(frozen=True)
class TextConfig:
    """Tokenisation of text fields.

    ``tokenizer``: a path to a Hugging Face ``tokenizers`` JSON file (``pip install tokenizers``),
    a callable ``str -> list[int]``, or None for UTF-8 bytes (ids 1..256; 0 is padding). Each text
    becomes ``<field>`` ``int64 [B, max_length]`` (truncated, right-padded with ``pad_id``) plus
    ``<field>_attention_mask`` ``int64 [B, max_length]``.
    """

    fields: tuple[str, ...] = ("txt",)
    max_length: int = 128
    tokenizer: Any = None
    pad_id: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.fields, str):
            object.__setattr__(self, "fields", (self.fields,))
        if not self.fields or not all(isinstance(f, str) and f for f in self.fields):
            raise _fail("fields", self.fields, "must name at least one text field")
        if (
            isinstance(self.max_length, bool)
            or not isinstance(self.max_length, int)
            or self.max_length < 1
        ):
            raise _fail("max_length", self.max_length, "must be a positive int")
        t = self.tokenizer
        if t is not None and not callable(t) and not isinstance(t, str):
            raise _fail("tokenizer", t, "must be None, a tokenizer.json path or a callable")


@dataclass(frozen=True)
class FeatureJoin:
    """Join a ``FeatureTable`` into every batch as of each sample's timestamp.

    ``key`` and ``timestamp`` name where a sample's key and time live: a field (``"user_id"``, a
    Parquet column or a ``.cls``-like field) or a path into a JSON field (``"json.user_id"``,
    ``"json.ts"``; the longest dotted prefix that is a field name is the field). Timestamps are
    ints in the table's unit. The batch gains one tensor per feature column and
    ``"__features_found__"`` (bool [B]), on the batch device; a sample whose key or timestamp is
    missing or not an int is a bad sample (``DecodeError``, or skipped within the budget).

    ``late``: what to do with a sample newer than the table's watermark (the feature time up to
    which the table is complete: ``FeatureTable.watermark``, or a ``StreamLoader`` window's
    recorded one), whose features may still arrive. None (default): no watermark logic.
    ``"join"``: join what is there; ``"skip"``: join nothing for it (found False, defaults);
    ``"wait"``: wait up to ``max_wait_s`` for the watermark to pass the batch's newest sample,
    then join what is there. With a policy the batch also has ``"__features_early__"`` (bool
    [B]: joined before the watermark), and ``stats()`` counts ``joins_before_watermark`` (in
    all, and per batch for the latest batches in ``stats()["per_batch"]``) and the seconds
    waited (``seconds["join_wait"]``).
    """

    table: Any
    key: str
    timestamp: str
    late: Literal["join", "skip", "wait"] | None = None
    max_wait_s: float = 30.0

    def __post_init__(self) -> None:
        if not callable(getattr(self.table, "join", None)):
            raise _fail("table", type(self.table).__name__, "must be a mmload.FeatureTable")
        for name in ("key", "timestamp"):
            v = getattr(self, name)
            if not isinstance(v, str) or not v:
                raise _fail(name, v, "must name a field or a json path like 'json.ts'")
        if self.late not in (None, "join", "skip", "wait"):
            raise _fail("late", self.late, "must be None, 'join', 'skip' or 'wait'")
        w = self.max_wait_s
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not w >= 0:
            raise _fail("max_wait_s", w, "must be a number >= 0 (seconds)")


@dataclass(frozen=True)
class RemoteConfig:
    """How remote shards (``http(s)://``, ``s3://``, any fsspec URL) are fetched and cached.

    Shards are fetched whole, in the order this process's plan needs them, up to ``lookahead``
    shards ahead of the one being read, by ``fetchers`` threads, into ``<cache_dir>/shards``.
    ``cache_limit`` (bytes, None: unbounded) bounds the disk the cache uses: shards this
    process no longer needs are evicted first; a shard in use is never evicted. Each request
    gets ``connect_timeout`` / ``read_timeout`` seconds (a stalled body fails the attempt);
    a failed attempt (connection error, 5xx, 429, short body, stall) is retried up to
    ``retries`` times with exponential backoff from ``backoff`` seconds (capped at
    ``backoff_max``), resuming at the byte offset reached where the server supports Range.
    """

    cache_limit: int | None = None
    lookahead: int = 8
    fetchers: int = 8
    connect_timeout: float = 10.0
    read_timeout: float = 60.0
    retries: int = 5
    backoff: float = 0.5
    backoff_max: float = 20.0

    def __post_init__(self) -> None:
        c = self.cache_limit
        if c is not None and (isinstance(c, bool) or not isinstance(c, int) or c <= 0):
            raise _fail("cache_limit", c, "must be a positive number of bytes or None")
        for name in ("lookahead", "fetchers"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise _fail(name, v, "must be a positive int")
        if isinstance(self.retries, bool) or not isinstance(self.retries, int) or self.retries < 0:
            raise _fail("retries", self.retries, "must be an int >= 0")
        for name in ("connect_timeout", "read_timeout", "backoff", "backoff_max"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
                raise _fail(name, v, "must be a positive number of seconds")
