"""Non-media fields: which decoder a field gets, value decoding, and collation into tensors.

* ``.cls`` (and ``*.cls``, ``.index``, ``.label``) -> int; ``.json`` -> dict; ``.txt``/``.text``
  -> str; every other field passes through as ``bytes``. Pickle fields (``.pyd``, ``.pickle``)
  are never unpickled: sample data is untrusted.
* Collation: ints -> ``int64 [B]``, floats -> ``float32 [B]``, bools -> ``bool [B]``, equal-shape
  arrays -> stacked tensors; str/dict/bytes/None -> Python lists of length B.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import torch

__all__ = ["FieldKind", "collate", "decode_value", "field_kind"]

FieldKind = Literal["image", "int", "json", "text", "audio", "video", "bytes", "value"]

IMAGE_EXTS = frozenset({"jpg", "jpeg", "png", "webp", "bmp", "gif"})
AUDIO_EXTS = frozenset({"wav", "flac", "ogg"})
VIDEO_EXTS = frozenset({"mp4", "webm", "mkv", "avi", "mov"})
_INT_EXTS = frozenset({"cls", "cls2", "index", "label", "id"})
_TEXT_EXTS = frozenset({"txt", "text"})


def field_kind(name: str, value: Any, image_fields: frozenset[str] | None = None) -> FieldKind:
    """The decoder of a field, from its name (the last dotted part) and its raw value."""
    if not isinstance(value, (bytes, bytearray, memoryview)):
        return "value"  # an Arrow/Parquet column value, already typed
    ext = name.rsplit(".", 1)[-1]
    if image_fields is not None:
        if name in image_fields:
            return "image"
    elif ext in IMAGE_EXTS:
        return "image"
    if ext in AUDIO_EXTS:
        return "audio"
    if ext in VIDEO_EXTS:
        return "video"
    if ext in _INT_EXTS:
        return "int"
    if ext == "json":
        return "json"
    if ext in _TEXT_EXTS:
        return "text"
    return "bytes"


def decode_value(kind: FieldKind, raw: Any) -> Any:
    """Decode one non-media field; raises ValueError/UnicodeDecodeError on bad bytes."""
    if kind == "int":
        return int(bytes(raw).decode("ascii").strip())
    if kind == "json":
        return json.loads(bytes(raw).decode("utf-8"))
    if kind == "text":
        return bytes(raw).decode("utf-8")
    if kind == "bytes":
        return bytes(raw)
    return raw


def _all(values: Sequence[Any], types: type | tuple[type, ...]) -> bool:
    return all(isinstance(v, types) and not isinstance(v, bool) for v in values)


def collate(values: Sequence[Any]) -> torch.Tensor | list[Any]:
    """Stack equal-typed values into a tensor where possible, else keep a list."""
    if not values:
        return []
    if all(isinstance(v, bool) for v in values):
        return torch.tensor(values, dtype=torch.bool)
    if _all(values, (int, np.integer)):
        return torch.tensor(np.asarray(values, dtype=np.int64))
    if _all(values, (int, float, np.integer, np.floating)):
        return torch.tensor(np.asarray(values, dtype=np.float32))
    if _all(values, np.ndarray):
        shapes = {v.shape for v in values}
        kinds = {v.dtype.kind for v in values}
        if len(shapes) == 1 and kinds <= {"i", "u", "f", "b"}:
            arr = np.stack(values)
            if arr.dtype == np.float64:
                arr = arr.astype(np.float32)
            return torch.from_numpy(arr)
    return list(values)
