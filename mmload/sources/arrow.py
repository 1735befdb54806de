"""Arrow IPC, Parquet and JSON-lines shards: one row is one sample, read by record batch / row
group (a JSON-lines file, as Flink's row-format FileSink writes them, is one chunk).

A *chunk* is a Parquet row group or an Arrow record batch; the plan shuffles chunks, then
samples within groups of chunks, so a reader keeps only a few decoded chunks in memory.
Binary columns are media fields (their bytes are returned unchanged), other columns are values.
"""

from __future__ import annotations

import functools
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc
import pyarrow.json as pajson
import pyarrow.parquet as pq

from mmload.errors import ShardError

__all__ = ["ChunkCache", "TableIndex", "TableReader", "index_table"]

_EOS = b"\xff\xff\xff\xff\x00\x00\x00\x00"  # continuation marker + zero length
_LEGACY_EOS = b"\x00\x00\x00\x00"  # streams written before Arrow 0.15


@dataclass
class TableIndex:
    """Row counts per chunk and the column names of one Arrow/Parquet shard."""

    kind: str
    chunk_rows: np.ndarray
    columns: list[str]
    types: list[str]  # each column's Arrow type, as ``str(pa.DataType)``

    @property
    def num_samples(self) -> int:
        return int(self.chunk_rows.sum())

    def to_json(self) -> dict[str, object]:
        return {
            "kind": self.kind,
            "chunk_rows": self.chunk_rows.tolist(),
            "columns": self.columns,
            "types": self.types,
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> TableIndex:
        rows = np.asarray(d["chunk_rows"], dtype=np.int64)
        return cls(d["kind"], rows, list(d["columns"]), list(d["types"]))


def _open_arrow(
    path: str, shard: str
) -> tuple[pa.RecordBatchFileReader | None, list[pa.RecordBatch], pa.Schema]:
    """An IPC *file* is memory-mapped for random access; an IPC *stream* is read whole
    (its schema comes from the stream header, so a stream of zero batches keeps its columns).

    Memory-mapped batches point into the file as it is: nothing is used before
    :func:`_validated` has checked it (a bit flip in an offset buffer is otherwise a SIGSEGV).
    """
    source = pa.memory_map(path, "r")
    try:
        f = ipc.open_file(source)
        return f, [], f.schema
    except pa.ArrowInvalid:
        pass
    try:
        with ipc.open_stream(pa.memory_map(path, "r")) as r:
            batches = list(r)
            schema = r.schema
    except (pa.ArrowException, OSError, ValueError) as e:
        raise ShardError(f"not an Arrow IPC file or stream: {e}", shard=shard) from None
    # A stream cut at a message boundary reads as a shorter, valid stream: only the
    # end-of-stream marker right after the last message tells a complete stream from a cut one.
    try:
        src = pa.memory_map(path, "r")
        messages = ipc.MessageReader.open_stream(src)
        last_end = 0
        while True:
            try:
                messages.read_next_message()
            except StopIteration:
                break
            last_end = src.tell()
        size = src.size()
        src.seek(last_end)
        rest = src.read(size - last_end)
    except (pa.ArrowException, OSError, ValueError) as e:
        raise ShardError(f"not an Arrow IPC stream: {e}", shard=shard) from None
    if rest not in (_EOS, _LEGACY_EOS):
        raise ShardError(
            "Arrow IPC stream does not end with the end-of-stream marker (truncated?); "
            f"{sum(b.num_rows for b in batches)} rows are readable",
            shard=shard,
        )
    return None, batches, schema


def _read_json(path: str) -> pa.Table:
    """A JSON-lines file, whole (types inferred; one chunk)."""
    return pajson.read_json(path, read_options=pajson.ReadOptions(block_size=1 << 24))


def _has_strings(t: pa.DataType) -> bool:
    if pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t):
        return True
    if pa.types.is_dictionary(t):
        return _has_strings(t.value_type)
    return any(_has_strings(t.field(i).type) for i in range(t.num_fields))


def _validated(
    data: pa.RecordBatch | pa.Table, c: int, shard: str, *, decoded: bool = False
) -> pa.RecordBatch | pa.Table:
    """``data`` after a full validation: a corrupt chunk is a ShardError, never memory read
    out of bounds later. A memory-mapped IPC batch is checked whole (offsets, lengths, nested
    children, UTF-8); a chunk the Parquet decoder built (``decoded``) has sound buffers, and
    only its string bytes, which the decoder copies unchecked, need the UTF-8 pass. The cost is
    measured by ``benchmarks/arrow_validate.py`` (docs/reliability.md)."""
    if decoded:
        strings = [f.name for f in data.schema if _has_strings(f.type)]
        if not strings:
            return data
        checked = data.select(strings)
    else:
        checked = data
    try:
        checked.validate(full=True)
    except (pa.ArrowException, ValueError) as e:
        raise ShardError(f"chunk {c} is corrupt: {e}", shard=shard) from None
    return data


def index_table(path: str, kind: str, *, shard: str, key_column: str | None) -> TableIndex:
    """Read the footer/metadata of an Arrow or Parquet shard (no column data)."""
    try:
        if kind == "parquet":
            md = pq.ParquetFile(path).metadata
            rows = np.array([md.row_group(i).num_rows for i in range(md.num_row_groups)], np.int64)
            schema = md.schema.to_arrow_schema()
        elif kind == "json":
            whole = _read_json(path)
            rows = np.array([whole.num_rows], np.int64)
            schema = whole.schema
        else:
            reader, batches, schema = _open_arrow(path, shard)
            if reader is not None:
                rows = np.array(
                    [reader.get_batch(i).num_rows for i in range(reader.num_record_batches)],
                    np.int64,
                )
            else:
                rows = np.array([b.num_rows for b in batches], np.int64)
        columns = list(schema.names)  # decodes the names: invalid UTF-8 raises here
        types = [str(t) for t in schema.types]
    except FileNotFoundError:
        raise ShardError("shard file not found", shard=shard) from None
    except (pa.ArrowException, OSError, ValueError) as e:
        # ValueError covers UnicodeDecodeError in footer metadata; OSError a damaged footer.
        what = {"parquet": "Parquet", "json": "JSON-lines"}.get(kind, "Arrow IPC")
        msg = f"not a readable {what} file: {type(e).__name__}: {e}"
        raise ShardError(msg, shard=shard) from None
    if (rows < 0).any():
        raise ShardError(f"footer claims a negative row count: {rows.tolist()}", shard=shard)
    if len(set(columns)) != len(columns):
        raise ShardError(f"duplicate column names in {columns}", shard=shard)
    if key_column is not None and key_column not in columns:
        raise ShardError(
            f"key column {key_column!r} is missing (columns: {columns}); "
            "pass key_column=<name>, or key_column=None to number rows",
            shard=shard,
        )
    return TableIndex(kind, rows, columns, types)


def _as_array(v: list[Any], dtype: Any = None) -> np.ndarray:
    """A list cell as an array (of the column's element type, so an empty cell is not float64);
    nested lists of unequal lengths as an object array of arrays (NumPy refuses to build an
    inhomogeneous array)."""
    try:
        return np.asarray(v, dtype=dtype)
    except (ValueError, TypeError):
        out = np.empty(len(v), dtype=object)
        for i, x in enumerate(v):
            out[i] = _as_array(x) if isinstance(x, list) else x
        return out


def _element_dtype(t: pa.DataType) -> Any:
    """The NumPy dtype of a list type's numeric elements; None for anything else."""
    v = t.value_type
    if pa.types.is_integer(v) or pa.types.is_floating(v) or pa.types.is_boolean(v):
        return v.to_pandas_dtype()
    return None


@functools.lru_cache(maxsize=256)  # called per chunk read; a data set has few column types
def _times_as_ints(t: pa.DataType) -> pa.DataType:
    """``t`` with every timestamp/date/time/duration inside it (struct fields, list and map
    items) as the integer it is stored as: Python's datetime cannot hold every such value."""
    if pa.types.is_timestamp(t) or pa.types.is_date64(t) or pa.types.is_duration(t):
        return pa.int64()
    if pa.types.is_time64(t):
        return pa.int64()
    if pa.types.is_date32(t) or pa.types.is_time32(t):
        return pa.int32()
    if pa.types.is_struct(t):
        return pa.struct([f.with_type(_times_as_ints(f.type)) for f in t])
    if pa.types.is_map(t):
        return pa.map_(
            t.key_field.with_type(_times_as_ints(t.key_type)),
            t.item_field.with_type(_times_as_ints(t.item_type)),
        )
    if pa.types.is_fixed_size_list(t):
        return pa.list_(t.value_field.with_type(_times_as_ints(t.value_type)), t.list_size)
    if pa.types.is_large_list(t):
        return pa.large_list(t.value_field.with_type(_times_as_ints(t.value_type)))
    if pa.types.is_list(t):
        return pa.list_(t.value_field.with_type(_times_as_ints(t.value_type)))
    return t


def _column_values(col: pa.Array) -> list[Any]:
    t = col.type
    if pa.types.is_nested(t):
        ints = _times_as_ints(t)
        if ints != t:
            col, t = col.cast(ints), ints
    if pa.types.is_binary(t) or pa.types.is_large_binary(t) or pa.types.is_fixed_size_binary(t):
        return col.to_pylist()
    if pa.types.is_list(t) or pa.types.is_fixed_size_list(t) or pa.types.is_large_list(t):
        dtype = _element_dtype(t)
        if dtype is None and not pa.types.is_fixed_size_list(t):
            return col.to_pylist()  # lists of strings, structs or lists: as pyarrow gives them
        return [None if v is None else _as_array(v, dtype) for v in col.to_pylist()]
    if pa.types.is_timestamp(t):
        return col.cast(pa.int64()).to_pylist()
    return col.to_pylist()


ChunkCache = OrderedDict[tuple[str, int, tuple[str, ...]], "pa.RecordBatch | pa.Table"]


class TableReader:
    """Reads rows of one shard. Decoded chunks live in a cache shared by every reader of the
    data set (``cache``, at most ``cache_chunks`` entries, LRU), so memory stays bounded by
    that, not by the number of shards."""

    def __init__(
        self,
        path: str,
        index: TableIndex,
        *,
        shard: str,
        key_column: str | None,
        cache: ChunkCache,
        cache_chunks: int,
        lock: threading.Lock,
    ) -> None:
        self.path = path
        self.index = index
        self.shard = shard
        self.key_column = key_column
        self._cache = cache
        self._cache_chunks = max(1, cache_chunks)
        self._lock = lock
        self._pf: pq.ParquetFile | None = None
        self._arrow: (
            tuple[pa.RecordBatchFileReader | None, list[pa.RecordBatch], pa.Schema] | None
        ) = None

    def _chunk(self, c: int, columns: tuple[str, ...]) -> pa.RecordBatch | pa.Table:
        ckey = (self.shard, c, columns)
        hit = self._cache.get(ckey)
        if hit is not None:
            self._cache.move_to_end(ckey)
            return hit
        try:
            if self.index.kind == "parquet":
                if self._pf is None:
                    self._pf = pq.ParquetFile(self.path)
                data: pa.RecordBatch | pa.Table = self._pf.read_row_group(c, columns=list(columns))
            elif self.index.kind == "json":
                data = _read_json(self.path).select(list(columns))
            else:
                if self._arrow is None:
                    self._arrow = _open_arrow(self.path, self.shard)
                reader, batches, _ = self._arrow
                data = reader.get_batch(c) if reader is not None else batches[c]
                data = data.select(list(columns))
        except (pa.ArrowException, OSError, ValueError) as e:
            raise ShardError(
                f"cannot read chunk {c}: {type(e).__name__}: {e}", shard=self.shard
            ) from None
        data = _validated(data, c, self.shard, decoded=self.index.kind in ("parquet", "json"))
        self._check_schema(data, c, columns)
        if data.num_rows != int(self.index.chunk_rows[c]):
            raise ShardError(
                f"chunk {c} has {data.num_rows} rows, the index says {self.index.chunk_rows[c]} "
                "(shard changed after indexing?)",
                shard=self.shard,
            )
        self._cache[ckey] = data
        while len(self._cache) > self._cache_chunks:
            self._cache.popitem(last=False)
        return data

    def _check_schema(
        self, data: pa.RecordBatch | pa.Table, c: int, columns: tuple[str, ...]
    ) -> None:
        """The chunk's columns and types are the footer's: a corrupt batch header can declare
        other types (even type ids pyarrow has no Python class for: a KeyError on access)."""
        want = dict(zip(self.index.columns, self.index.types, strict=True))
        try:
            got = [(f.name, str(f.type)) for f in data.schema]
        except (pa.ArrowException, KeyError, ValueError) as e:
            raise ShardError(f"chunk {c} has a corrupt schema: {e!r}", shard=self.shard) from None
        if got != [(n, want.get(n)) for n in columns]:
            raise ShardError(
                f"chunk {c} has columns {got}, the file's schema says "
                f"{[(n, want.get(n)) for n in columns]} (corrupt batch header?)",
                shard=self.shard,
            )

    def read(
        self, chunk: int, rows: np.ndarray, fields: set[str] | None
    ) -> list[dict[str, Any] | ShardError]:
        """Samples ``rows`` (row numbers within ``chunk``) as dicts with ``__key__``; a row
        that cannot be a sample (a null key) is its ShardError."""
        wanted = [
            c for c in self.index.columns if fields is None or c in fields or c == self.key_column
        ]
        with self._lock:
            data = self._chunk(chunk, tuple(wanted))
        try:
            taken = data.take(pa.array(rows, pa.int64()))
        except (pa.ArrowException, ValueError, KeyError) as e:  # KeyError: see _check_schema
            raise ShardError(
                f"cannot read rows of chunk {chunk}: {type(e).__name__}: {e}", shard=self.shard
            ) from None
        cols = {}
        for name in wanted:
            try:
                cols[name] = _column_values(taken.column(name))
            except (pa.ArrowException, ValueError, KeyError, OverflowError) as e:
                raise ShardError(
                    f"cannot convert column {name!r} ({taken.schema.field(name).type}) of chunk "
                    f"{chunk}: {type(e).__name__}: {e}",
                    shard=self.shard,
                ) from None
        first_row = int(self.index.chunk_rows[:chunk].sum())
        out: list[dict[str, Any] | ShardError] = []
        for j, r in enumerate(rows):
            s = {name: vals[j] for name, vals in cols.items() if name != self.key_column}
            if self.key_column is None:
                key = f"{first_row + int(r)}"
            else:
                k = cols[self.key_column][j]
                if k is None:
                    out.append(
                        ShardError(f"row {first_row + int(r)} has a null key", shard=self.shard)
                    )
                    continue
                key = k if isinstance(k, str) else str(k)
            s["__key__"] = key
            out.append(s)
        return out

    def close(self) -> None:
        if self._pf is not None:
            self._pf.close()
        self._pf = None
        self._arrow = None
