"""Non-media fields: which decoder a field gets, value decoding, and collation into tensors.

* ``.cls`` (and ``*.cls``, ``.index``, ``.label``) -> int; ``.json`` -> dict; ``.txt``/``.text``
  -> str; every other field passes through as ``bytes``. Pickle fields (``.pyd``, ``.pickle``)
  are never unpickled: sample data is untrusted.
* Every non-media field has one :data:`ValueClass`, pinned for the whole data set from its
  extension (tar) or the Arrow type of the first shard that has it, so a batch field never
  switches between a tensor and a list. A value that does not conform (a float in an int
  column, an int beyond int64, a null in a numeric column) makes its sample bad.
* Collation by class: ``int`` -> ``int64 [B]``, ``float`` -> ``float32 [B]``, ``bool`` ->
  ``bool [B]``, ``array`` (fixed-size lists) -> stacked tensors; ``jagged_int``/``jagged_float``/
  ``jagged_bool`` (variable-length lists of numbers) -> one :class:`~mmload.jagged.Jagged`
  ``(values, offsets)``; ``str``/``bytes``/``ragged`` (other lists: of strings, structs or
  lists, as the Python lists pyarrow gives; fixed-size lists of non-numbers as arrays)/``any``
  -> Python lists of length B.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import torch

from mmload.jagged import Jagged

__all__ = [
    "FieldKind",
    "ValueClass",
    "collate",
    "conform",
    "decode_value",
    "field_kind",
    "fixed_shape",
    "jagged_class",
    "kind_class",
]

FieldKind = Literal["image", "int", "json", "text", "audio", "video", "bytes", "value"]
ValueClass = Literal[
    "int",
    "float",
    "bool",
    "str",
    "bytes",
    "array",
    "jagged_int",
    "jagged_float",
    "jagged_bool",
    "ragged",
    "any",
]
JAGGED: dict[str, torch.dtype] = {
    "jagged_int": torch.int64,
    "jagged_float": torch.float32,
    "jagged_bool": torch.bool,
}

_INT64_MIN, _INT64_MAX = -(1 << 63), (1 << 63) - 1
_INT_TYPES = ("int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64")

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
    """Decode one non-media field; raises ValueError (UnicodeDecodeError included) on bad bytes."""
    if kind == "int":
        return int(bytes(raw).decode("ascii").strip())
    if kind == "json":
        try:
            return json.loads(bytes(raw).decode("utf-8"))
        except RecursionError:
            raise ValueError("JSON is nested too deeply") from None
    if kind == "text":
        return bytes(raw).decode("utf-8")
    if kind == "bytes":
        return bytes(raw)
    return raw


def kind_class(kind: FieldKind, arrow_type: str | None) -> ValueClass:
    """The value class of a non-media field: from its kind, or for a typed Arrow/Parquet column
    (kind ``"value"``) from its Arrow type (``str(pa.DataType)``)."""
    if kind == "int":
        return "int"
    if kind == "text":
        return "str"
    if kind == "bytes":
        return "bytes"
    if kind != "value" or arrow_type is None:
        return "any"
    t = arrow_type
    if t.startswith("dictionary<values="):
        t = t[len("dictionary<values=") :].split(",", 1)[0]
    if t in _INT_TYPES or t.startswith("timestamp["):
        return "int"
    if t in ("halffloat", "float", "double"):
        return "float"
    if t == "bool":
        return "bool"
    if t in ("string", "large_string", "string_view"):
        return "str"
    if t in ("binary", "large_binary", "binary_view") or t.startswith("fixed_size_binary"):
        return "bytes"
    if t.startswith("fixed_size_list<"):
        return "array"
    if t.startswith(("list<", "large_list<", "list_view<", "large_list_view<")):
        return jagged_class(t) or "ragged"
    return "any"


_LIST = re.compile(r"^(?:large_)?list(?:_view)?<[^:<>]*: ([a-z0-9]+)(?: not null)?>$")


def jagged_class(arrow_type: str) -> ValueClass | None:
    """The jagged class of a variable-length list of numbers (one level), from its Arrow type
    string: ``"list<item: int32>"`` -> ``"jagged_int"``; None for any other type."""
    m = _LIST.match(arrow_type)
    if m is None:
        return None
    t = m.group(1)
    if t in _INT_TYPES:
        return "jagged_int"
    if t in ("halffloat", "float", "double"):
        return "jagged_float"
    return "jagged_bool" if t == "bool" else None


_FIXED_LIST = re.compile(r"^fixed_size_list<[^:<>]*: (.*)>\[(\d+)\]$")


def fixed_shape(arrow_type: str) -> tuple[int, ...] | None:
    """The row shape of a (nested) fixed-size list of numbers, from its Arrow type string:
    ``"fixed_size_list<item: fixed_size_list<item: float>[2]>[3]"`` -> ``(3, 2)``; None if the
    type is not one."""
    dims: list[int] = []
    t = arrow_type
    while (m := _FIXED_LIST.match(t)) is not None:
        t, dims = m.group(1).removesuffix(" not null"), [*dims, int(m.group(2))]
    numeric = t in _INT_TYPES or t in ("halffloat", "float", "double", "bool")
    return tuple(dims) if dims and numeric else None


def conform(cls: ValueClass, v: Any, shape: tuple[int, ...] | None = None) -> str | None:
    """Why ``v`` cannot be a value of class ``cls`` (None if it can); ``shape``: an ``array``
    field's pinned shape."""
    if cls == "int":
        if isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_)):
            return None if _INT64_MIN <= int(v) <= _INT64_MAX else f"{v} does not fit in int64"
        return f"{_what(v)} is not an integer"
    if cls == "float":
        ok = isinstance(v, (int, float, np.integer, np.floating))
        return None if ok and not isinstance(v, (bool, np.bool_)) else f"{_what(v)} is not a number"
    if cls == "bool":
        return None if isinstance(v, (bool, np.bool_)) else f"{_what(v)} is not a bool"
    if cls == "str":
        return None if v is None or isinstance(v, str) else f"{_what(v)} is not a string"
    if cls == "bytes":
        return None if v is None or isinstance(v, bytes) else f"{_what(v)} is not bytes"
    if cls == "array":
        if not (isinstance(v, np.ndarray) and v.dtype.kind in "iufb"):
            return f"{_what(v)} is not a numeric list (null, or null elements?)"
        if shape is not None and v.shape != shape:
            return f"a list of shape {v.shape}, where the field's values have shape {shape}"
        return None
    if cls in JAGGED:
        if v is None:
            return None  # an empty row
        if not isinstance(v, np.ndarray) or v.ndim != 1:
            return f"{_what(v)} is not a list of numbers"
        want = {"jagged_int": "iu", "jagged_float": "iuf", "jagged_bool": "b"}[cls]
        if v.dtype.kind not in want:
            return f"a list of {v.dtype} (null elements?), where the field holds {cls[7:]}s"
        if v.dtype == np.uint64 and len(v) and int(v.max()) > _INT64_MAX:
            return f"a list with {int(v.max())}, which does not fit in int64"
        return None
    if cls == "ragged":
        ok = v is None or isinstance(v, (np.ndarray, list))
        return None if ok else f"{_what(v)} is not a list"
    return None


def _what(v: Any) -> str:
    return "null" if v is None else f"a {type(v).__name__}"


def collate(values: Sequence[Any], cls: ValueClass = "any") -> torch.Tensor | Jagged | list[Any]:
    """Values of one class (checked by :func:`conform`) as that class's batch type."""
    if cls == "int":
        return torch.tensor(np.asarray(values, dtype=np.int64).reshape(len(values)))
    if cls == "float":
        return torch.tensor(np.asarray(values, dtype=np.float32).reshape(len(values)))
    if cls == "bool":
        return torch.tensor(np.asarray(values, dtype=np.bool_).reshape(len(values)))
    if cls == "array":
        shapes = {v.shape for v in values}
        if len(shapes) != 1:
            raise ValueError(f"fixed-size list values of different shapes {sorted(shapes)}")
        arr = np.stack(values)
        if arr.dtype == np.float64:
            arr = arr.astype(np.float32)
        return torch.from_numpy(arr)
    if cls in JAGGED:
        return Jagged.from_rows(values, JAGGED[cls])
    return list(values)
