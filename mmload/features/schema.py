"""Phase 1 of an update: the table's column layout, and Arrow input -> validated host arrays.

The layout is fixed by the first update (or by a ``pyarrow.Schema`` given to the table): a key
column (any integer type, held as int64, or a string type), a timestamp column (any integer type,
or an Arrow ``timestamp`` compared as int64 in its own unit), and the feature columns, each a
numeric scalar, a fixed-length numeric vector (``fixed_size_list``, or ``list`` whose rows all
have the same length in the first update), or a variable-length list of numbers (a ``list``
column declared in the table's ``pyarrow.Schema``; joined as a :class:`~mmload.jagged.Jagged`).
Float columns are held as float32 (nulls become NaN), integer and bool columns as int64 (nulls
are an error; a null list is an empty list). Every later update must match; anything else raises a
:class:`~mmload.errors.JoinError` naming the column and the type, before the table changes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from mmload.errors import JoinError

__all__ = ["FOUND", "Column", "Layout", "Rows", "infer_layout", "normalize", "to_arrow"]

FOUND = "__features_found__"

KeyKind = Literal["int", "string"]
Kind = Literal["float", "int"]


@dataclass(frozen=True)
class Column:
    """One feature column: ``kind`` "float" (float32) or "int" (int64); ``width`` 0 for a
    scalar, D for a [D] vector; ``offset``: its first position in the packed matrix of its kind.
    A variable-length list column has ``elem`` (its elements' kind) set: it takes one int slot,
    a row id into the snapshot's list store (-1: none)."""

    name: str
    kind: Kind
    width: int
    offset: int
    elem: Kind | None = None

    @property
    def jagged(self) -> bool:
        return self.elem is not None

    @property
    def span(self) -> int:
        return max(self.width, 1)


@dataclass(frozen=True)
class Layout:
    """Key, timestamp and feature columns (sorted by name) of a table; ``ts_unit`` is None for
    integer timestamps, else the Arrow timestamp unit ("s", "ms", "us", "ns")."""

    key: str
    timestamp: str
    key_kind: KeyKind
    ts_unit: str | None
    columns: tuple[Column, ...]
    n_float: int
    n_int: int
    strict: bool  # extra columns in an update are an error (columns were inferred, not picked)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(c.name for c in self.columns)


@dataclass(frozen=True)
class Rows:
    """One validated update on the host: ``keys`` int64 [n] (or a string ChunkedArray),
    ``ts`` int64 [n], ``floats`` float32 [n, n_float], ``ints`` int64 [n, n_int]; ``lists``:
    per variable-length list column, its rows as (values, int64 offsets [n + 1]), and its int
    slot holds the row number (0..n-1) until the table numbers the rows."""

    keys: np.ndarray | pa.ChunkedArray
    ts: np.ndarray
    floats: np.ndarray
    ints: np.ndarray
    lists: Mapping[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.ts.shape[0])


def _column(v: Any) -> Any:
    """A 2-D NumPy array [n, D] in a dict of columns is a vector column."""
    if isinstance(v, np.ndarray) and v.ndim == 2:
        flat = pa.array(np.ascontiguousarray(v).reshape(-1))
        return pa.FixedSizeListArray.from_arrays(flat, int(v.shape[1]))
    return v


def to_arrow(data: Any) -> pa.Table:
    """A pyarrow Table from a Table, RecordBatch, pandas DataFrame or dict of columns (lists,
    NumPy arrays, 2-D [n, D] for vectors, or Arrow arrays)."""
    if isinstance(data, pa.Table):
        return data
    if isinstance(data, pa.RecordBatch):
        return pa.Table.from_batches([data])
    if type(data).__module__.startswith("pandas") and hasattr(data, "columns"):
        try:
            return pa.Table.from_pandas(data, preserve_index=False)
        except (pa.ArrowException, TypeError, ValueError) as e:
            raise JoinError(f"update: cannot convert the pandas DataFrame to Arrow: {e}") from e
    if isinstance(data, Mapping):
        try:
            return pa.table({name: _column(v) for name, v in data.items()})
        except (pa.ArrowException, TypeError, ValueError) as e:
            raise JoinError(f"update: cannot convert the dict of columns to Arrow: {e}") from e
    raise JoinError(
        "update: expected a pyarrow.Table, pyarrow.RecordBatch, pandas.DataFrame or dict of "
        f"columns, got {type(data).__name__}"
    )


def _is_string(t: pa.DataType) -> bool:
    if pa.types.is_dictionary(t):
        return _is_string(t.value_type)
    return pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t)


def _is_list(t: pa.DataType) -> bool:
    return pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t)


def _numeric_kind(t: pa.DataType) -> Kind | None:
    if pa.types.is_floating(t):
        return "float"
    if pa.types.is_integer(t) or pa.types.is_boolean(t):
        return "int"
    return None


def _list_width(name: str, col: pa.ChunkedArray | None, t: pa.DataType) -> int:
    if pa.types.is_fixed_size_list(t):
        width = int(t.list_size)
    else:
        assert col is not None  # a list type in a schema is a variable-length list column
        lengths = pc.list_value_length(col).drop_null().unique().to_pylist()
        if len(lengths) != 1:
            raise JoinError(
                f"column {name!r}: vector rows need one length, found lengths {sorted(lengths)} "
                "(for variable-length lists, declare the column as pa.list_(...) in the table's "
                "columns=pyarrow.schema([...]))"
            )
        width = int(lengths[0])
    if width < 1:
        raise JoinError(f"column {name!r}: vectors need length >= 1, got {width}")
    return width


def infer_layout(
    schema: pa.Schema,
    *,
    key: str,
    timestamp: str,
    columns: Sequence[str] | None,
    sample: pa.Table | None = None,
) -> Layout:
    """The layout of ``schema`` (``sample``, when given, fixes the length of list columns)."""
    names = list(schema.names)
    for role, name in (("key", key), ("timestamp", timestamp)):
        if name not in names:
            raise JoinError(f"{role} column {name!r} is missing (columns: {names})")
    kt = schema.field(key).type
    if _is_string(kt):
        key_kind: KeyKind = "string"
    elif pa.types.is_integer(kt):
        key_kind = "int"
    else:
        raise JoinError(f"key column {key!r} has type {kt}; need an integer or string type")
    tt = schema.field(timestamp).type
    if pa.types.is_timestamp(tt):
        ts_unit: str | None = tt.unit
    elif pa.types.is_integer(tt):
        ts_unit = None
    else:
        raise JoinError(
            f"timestamp column {timestamp!r} has type {tt}; need an integer or Arrow timestamp type"
        )
    picked = [n for n in names if n not in (key, timestamp)] if columns is None else list(columns)
    missing = [n for n in picked if n not in names]
    if missing:
        raise JoinError(f"feature column(s) {missing} are missing (columns: {names})")
    cols: list[Column] = []
    offsets = {"float": 0, "int": 0}
    for name in sorted(picked):
        t = schema.field(name).type
        width = 0
        value_type = t
        jagged = False
        if _is_list(t):
            value_type = t.value_type
            if sample is None and not pa.types.is_fixed_size_list(t):
                jagged = True  # declared in a schema: rows of any length
            else:
                col = sample.column(name) if sample is not None else None
                width = _list_width(name, col, t)
        kind = _numeric_kind(value_type)
        if kind is None:
            raise JoinError(
                f"feature column {name!r} has type {t}; need a numeric scalar or a list of numbers"
            )
        if jagged:
            cols.append(Column(name, "int", 0, offsets["int"], elem=kind))
            offsets["int"] += 1
            continue
        cols.append(Column(name, kind, width, offsets[kind]))
        offsets[kind] += max(width, 1)
    return Layout(
        key=key,
        timestamp=timestamp,
        key_kind=key_kind,
        ts_unit=ts_unit,
        columns=tuple(cols),
        n_float=offsets["float"],
        n_int=offsets["int"],
        strict=columns is None,
    )


def _keys(col: pa.ChunkedArray, layout: Layout) -> np.ndarray | pa.ChunkedArray:
    name = layout.key
    if col.null_count:
        raise JoinError(f"key column {name!r} has {col.null_count} null(s)")
    t = col.type
    if layout.key_kind == "string":
        if not _is_string(t):
            raise JoinError(f"key column {name!r} has type {t}; this table has string keys")
        if pa.types.is_dictionary(t):
            col = col.cast(t.value_type)
        return col
    if not pa.types.is_integer(t):
        raise JoinError(f"key column {name!r} has type {t}; this table has integer keys")
    try:
        return np.asarray(col.cast(pa.int64()).to_numpy(), dtype=np.int64)
    except pa.ArrowInvalid as e:
        raise JoinError(f"key column {name!r} does not fit int64: {e}") from e


def _timestamps(col: pa.ChunkedArray, layout: Layout) -> np.ndarray:
    name, t = layout.timestamp, col.type
    if col.null_count:
        raise JoinError(f"timestamp column {name!r} has {col.null_count} null(s)")
    if layout.ts_unit is None:
        if not pa.types.is_integer(t):
            raise JoinError(f"timestamp column {name!r} has type {t}; this table needs integers")
    elif pa.types.is_timestamp(t):
        try:
            col = col.cast(pa.timestamp(layout.ts_unit))
        except pa.ArrowInvalid as e:
            raise JoinError(
                f"timestamp column {name!r} ({t}) does not convert to the table's unit "
                f"{layout.ts_unit!r} without loss: {e}"
            ) from e
    else:
        raise JoinError(
            f"timestamp column {name!r} has type {t}; this table needs timestamp[{layout.ts_unit}]"
        )
    try:
        return np.asarray(col.cast(pa.int64()).to_numpy(), dtype=np.int64)
    except pa.ArrowInvalid as e:
        raise JoinError(f"timestamp column {name!r} does not fit int64: {e}") from e


def _values(arr: pa.Array | pa.ChunkedArray, c: Column, t: pa.DataType) -> np.ndarray:
    kind = _numeric_kind(t)
    if kind is None or (c.kind == "int" and kind == "float"):
        raise JoinError(
            f"feature column {c.name!r} has values of type {t}; the table holds {c.kind}"
        )
    if c.kind == "float":  # float32, rounding (float64, large ints) as NumPy's astype would
        return np.asarray(arr.cast(pa.float32(), safe=False).to_numpy(zero_copy_only=False))
    if arr.null_count:
        raise JoinError(f"integer feature column {c.name!r} has {arr.null_count} null value(s)")
    try:
        return np.asarray(arr.cast(pa.int64()).to_numpy(zero_copy_only=False), dtype=np.int64)
    except pa.ArrowInvalid as e:
        raise JoinError(f"feature column {c.name!r} does not fit int64: {e}") from e


def _vector(col: pa.ChunkedArray, c: Column, n: int) -> np.ndarray:
    t = col.type
    if not _is_list(t):
        raise JoinError(f"feature column {c.name!r} has type {t}; the table holds a vector")
    arr = col.combine_chunks()
    if pa.types.is_fixed_size_list(t) and t.list_size != c.width:
        raise JoinError(f"feature column {c.name!r} has length {t.list_size}, expected {c.width}")
    valid = None
    if arr.null_count:
        if c.kind == "int":
            raise JoinError(f"integer vector column {c.name!r} has {arr.null_count} null row(s)")
        valid = np.asarray(arr.is_valid().to_numpy(zero_copy_only=False), dtype=bool)
        arr = arr.filter(pa.array(valid))
    if not pa.types.is_fixed_size_list(t) and len(arr):
        bad = pc.not_equal(pc.list_value_length(arr), c.width)
        if pc.any(bad).as_py():
            lengths = pc.list_value_length(arr).unique().to_pylist()
            raise JoinError(
                f"feature column {c.name!r}: vector rows have lengths {sorted(lengths)}, "
                f"expected {c.width}"
            )
    flat = _values(arr.flatten(), c, t.value_type).reshape(-1, c.width)
    if valid is None:
        return flat
    out = np.full((n, c.width), np.nan)
    out[valid] = flat
    return out


def normalize(table: pa.Table, layout: Layout) -> Rows:
    """Validate ``table`` against ``layout`` and convert it to host arrays."""
    names = set(table.column_names)
    needed = [layout.key, layout.timestamp, *layout.names]
    missing = [n for n in needed if n not in names]
    if missing:
        raise JoinError(f"update is missing column(s) {missing} (it has {table.column_names})")
    if layout.strict:
        extra = sorted(names - set(needed))
        if extra:
            raise JoinError(
                f"update has unexpected column(s) {extra}; the table's columns are {needed} "
                "(pass columns=[...] to the table to pick some)"
            )
    n = table.num_rows
    keys = _keys(table.column(layout.key), layout)
    ts = _timestamps(table.column(layout.timestamp), layout)
    floats = np.empty((n, layout.n_float), np.float32)
    ints = np.empty((n, layout.n_int), np.int64)
    lists: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for c in layout.columns:
        col = table.column(c.name)
        if c.elem is not None:
            lists[c.name] = _list_rows(col, c)
            ints[:, c.offset] = np.arange(n)
            continue
        if c.width:
            v = _vector(col, c, n)
        else:
            if _is_list(col.type):
                raise JoinError(f"feature column {c.name!r} has type {col.type}; expected a scalar")
            v = _values(col, c, col.type)
        target = floats if c.kind == "float" else ints
        if c.width:
            target[:, c.offset : c.offset + c.width] = v
        else:
            target[:, c.offset] = v
    return Rows(keys, ts, floats, ints, lists)


def _list_rows(col: pa.ChunkedArray, c: Column) -> tuple[np.ndarray, np.ndarray]:
    """A variable-length list column as (values, offsets [n + 1]); a null row is empty."""
    t = col.type
    if not _is_list(t) or pa.types.is_fixed_size_list(t):
        raise JoinError(f"feature column {c.name!r} has type {t}; the table holds a list")
    assert c.elem is not None
    arr = col.combine_chunks()
    lengths = pc.fill_null(pc.list_value_length(arr), 0).to_numpy(zero_copy_only=False)
    offsets = np.zeros(len(arr) + 1, np.int64)
    np.cumsum(lengths, out=offsets[1:])
    flat = pc.list_flatten(arr)  # the valid rows' elements, in order
    elem = Column(c.name, c.elem, 0, 0)
    if c.elem == "int" and flat.null_count:
        raise JoinError(f"list feature column {c.name!r} has {flat.null_count} null element(s)")
    return _values(flat, elem, t.value_type), offsets
