"""A small multimodal data set made on the spot: real photos, captions, labels, audio, timestamps.

Photos come from scikit-image's bundled sample images (``pip install "mmload[demo]"``); each
sample is a random crop of one photo, resized and encoded as JPEG, with a caption, a class
label, a short WAV clip (a chirp whose pitch depends on the label) and a JSON record holding a
timestamp and a user id. Everything is a pure function of the seed.
"""

from __future__ import annotations

import io
import math
import os
import wave
from collections.abc import Iterator
from typing import Any

import numpy as np

from mmload.errors import ConfigError, MissingDependencyError

__all__ = ["demo_samples", "load_photos", "make_jpeg", "make_wav"]

_PHOTOS = (
    "astronaut",
    "chelsea",
    "coffee",
    "rocket",
    "hubble_deep_field",
    "retina",
    "immunohistochemistry",
)
_NAMES = ("astronaut", "cat", "coffee", "rocket", "galaxy", "retina", "tissue")


def load_photos() -> list[tuple[str, np.ndarray]]:
    """``(name, uint8 [H, W, 3])`` photos bundled with scikit-image, or the JPEG/PNG files in
    ``$MMLOAD_PHOTOS_DIR`` when set (hosts without scikit-image)."""
    folder = os.environ.get("MMLOAD_PHOTOS_DIR")
    if folder:
        from PIL import Image

        files = sorted(
            f for f in os.listdir(folder) if f.lower().endswith((".jpg", ".jpeg", ".png"))
        )
        if not files:
            raise ConfigError(f"MMLOAD_PHOTOS_DIR={folder!r} holds no .jpg/.png photos")
        return [
            (os.path.splitext(f)[0], np.asarray(Image.open(os.path.join(folder, f)).convert("RGB")))
            for f in files
        ]
    try:
        import skimage.data
    except ImportError:
        raise MissingDependencyError("skimage", "demo", "the demo's photos") from None
    return [
        (n, np.ascontiguousarray(getattr(skimage.data, f)()[..., :3]))
        for f, n in zip(_PHOTOS, _NAMES, strict=True)
    ]


def make_jpeg(
    photo: np.ndarray, rng: np.random.Generator, size: tuple[int, int], quality: int = 90
) -> bytes:
    """A random crop (60-100% of each side) of ``photo`` resized to ``size`` (w, h), as JPEG."""
    from PIL import Image

    h, w = photo.shape[:2]
    s = rng.uniform(0.6, 1.0)
    ch, cw = max(1, int(h * s)), max(1, int(w * s))
    y0 = int(rng.integers(0, h - ch + 1))
    x0 = int(rng.integers(0, w - cw + 1))
    im = Image.fromarray(photo[y0 : y0 + ch, x0 : x0 + cw]).resize(size, Image.Resampling.BILINEAR)
    if rng.random() < 0.5:
        im = im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def make_wav(freq: float, seconds: float = 0.5, rate: int = 16000) -> bytes:
    """A 16-bit mono WAV chirp from ``freq`` to ``2 * freq`` Hz."""
    t = np.arange(int(seconds * rate)) / rate
    phase = 2 * math.pi * freq * (t + t * t / (2 * seconds))
    pcm = (0.3 * np.sin(phase) * 32767).astype("<i2")
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(pcm.tobytes())
    return buf.getvalue()


def demo_samples(
    n: int, *, seed: int = 0, size: tuple[int, int] = (320, 240), t0: int = 1_700_000_000_000_000
) -> Iterator[dict[str, Any]]:
    """``n`` samples: ``jpg``, ``txt`` (caption), ``cls``, ``wav``, ``json`` (ts in µs, user id)."""
    photos = load_photos()
    rng = np.random.default_rng(seed)
    for i in range(n):
        label = int(rng.integers(0, len(photos)))
        name, photo = photos[label]
        yield {
            "__key__": f"sample{i:06d}",
            "jpg": make_jpeg(photo, rng, size),
            "txt": f"a photo of a {name}, number {i}",
            "cls": label,
            "wav": make_wav(220.0 * (1 + label)),
            "json": {
                "ts": t0 + i * 1_000_000,
                "user_id": int(rng.integers(0, 100)),
                "label_name": name,
            },
        }


def demo_features(
    n: int, *, seed: int = 0, t0: int = 1_700_000_000_000_000, users: int = 100
) -> Any:
    """Per-user features for ``demo_samples(n)``: ``user_id``, ``ts`` (µs), ``clicks_1h`` (int)
    and a 4-d ``embedding``, several versions per user spread over the samples' time range
    (rows in arrival order, not sorted). A ``pyarrow.Table``."""
    import pyarrow as pa

    rng = np.random.default_rng(seed + 1)
    rows = users * 8
    user = rng.integers(0, users, rows).astype(np.int64)
    ts = (t0 + rng.integers(-60_000_000, n * 1_000_000, rows)).astype(np.int64)
    emb = rng.standard_normal((rows, 4)).astype(np.float32)
    return pa.table(
        {
            "user_id": user,
            "ts": ts,
            "clicks_1h": rng.poisson(5, rows).astype(np.int64),
            "embedding": pa.FixedSizeListArray.from_arrays(pa.array(emb.reshape(-1)), 4),
        }
    )
