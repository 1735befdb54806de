"""mmload.sources.arrow on its own: the table index and its on-disk form, each kind's footer,
IPC streams cut short, validation, column conversion to NumPy/Python values, the chunk cache
and the row reader. Oracles: pyarrow's own reading of the same files, hand-written values.
Written from the module's mutants (issue 15)."""

from __future__ import annotations

import datetime
import json
import logging
import threading
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc
import pyarrow.parquet as pq
import pytest

from mmload.errors import ShardError
from mmload.sources import arrow as A
from mmload.sources.index import IndexStore


def table(n: int = 10) -> pa.Table:
    return pa.table(
        {
            "__key__": [f"k{i:03d}" for i in range(n)],
            "jpg": [bytes([i]) * (i + 1) for i in range(n)],
            "label": pa.array(range(n), pa.int64()),
        }
    )


def write(tmp_path: Path, kind: str, t: pa.Table, name: str = "t", chunk: int = 4) -> str:
    if kind == "parquet":
        p = tmp_path / f"{name}.parquet"
        pq.write_table(t, p, row_group_size=chunk)
    elif kind == "json":
        p = tmp_path / f"{name}.jsonl"
        rows = [
            {k: v.hex() if isinstance(v, bytes) else v for k, v in r.items()} for r in t.to_pylist()
        ]
        p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif kind == "arrow":
        p = tmp_path / f"{name}.arrow"
        with ipc.new_file(p, t.schema) as w:
            for b in t.to_batches(max_chunksize=chunk):
                w.write_batch(b)
    else:  # an IPC stream
        p = tmp_path / f"{name}.arrows"
        with pa.OSFile(str(p), "wb") as f, ipc.new_stream(f, t.schema) as w:
            for b in t.to_batches(max_chunksize=chunk):
                w.write_batch(b)
    return str(p)


def reader(path: str, kind: str, *, key: str | None = "__key__", chunks: int = 8) -> Any:
    index = A.index_table(path, "arrow" if kind == "stream" else kind, shard=path, key_column=key)
    cache: A.ChunkCache = A.ChunkCache()
    r = A.TableReader(
        path,
        index,
        shard=path,
        key_column=key,
        cache=cache,
        cache_chunks=chunks,
        lock=threading.Lock(),
    )
    return r, cache


# -- the index --------------------------------------------------------------------------------


def test_index_json_form_and_round_trip() -> None:
    idx = A.TableIndex("parquet", np.array([4, 4, 2], np.int64), ["a", "b"], ["string", "int64"])
    d = idx.to_json()
    assert d == {
        "kind": "parquet",
        "chunk_rows": [4, 4, 2],
        "columns": ["a", "b"],
        "types": ["string", "int64"],
    }
    back = A.TableIndex.from_json(json.loads(json.dumps(d)))
    assert (back.kind, back.columns, back.types) == ("parquet", ["a", "b"], ["string", "int64"])
    assert back.chunk_rows.dtype == np.int64 and back.chunk_rows.tolist() == [4, 4, 2]
    assert back.num_samples == 10
    empty = A.TableIndex.from_json({**d, "chunk_rows": []})  # a file of no row groups
    assert empty.chunk_rows.dtype == np.int64 and empty.num_samples == 0


@pytest.mark.parametrize("kind", ["parquet", "arrow", "stream", "json"])
def test_the_index_file_is_read_back_as_written(
    tmp_path: Path, kind: str, caplog: pytest.LogCaptureFixture
) -> None:
    p = write(tmp_path, kind, table(10))
    k = "arrow" if kind == "stream" else kind
    built = IndexStore(tmp_path / "c", key_column="__key__", skip=False).build(
        p, k, url=p, version="v1"
    )
    with caplog.at_level(logging.WARNING):
        again = IndexStore(tmp_path / "c", key_column="__key__", skip=False).cached(p, "v1")
    assert not caplog.records  # read, not ignored as unreadable
    assert isinstance(again, A.TableIndex) and isinstance(built, A.TableIndex)
    assert again.kind == built.kind == k
    assert again.chunk_rows.tolist() == built.chunk_rows.tolist()
    assert again.chunk_rows.dtype == np.int64
    assert (again.columns, again.types) == (built.columns, built.types)


@pytest.mark.parametrize(
    ("kind", "rows"),
    [("parquet", [4, 4, 2]), ("arrow", [4, 4, 2]), ("stream", [4, 4, 2]), ("json", [10])],
)
def test_index_table_per_kind(tmp_path: Path, kind: str, rows: list[int]) -> None:
    p = write(tmp_path, kind, table(10))
    idx = A.index_table(p, "arrow" if kind == "stream" else kind, shard=p, key_column="__key__")
    assert idx.chunk_rows.tolist() == rows and idx.chunk_rows.dtype == np.int64
    assert idx.columns == ["__key__", "jpg", "label"]
    want = ["string", "binary", "int64"] if kind != "json" else ["string", "string", "int64"]
    assert idx.types == want


def test_index_table_errors(tmp_path: Path) -> None:
    gone = str(tmp_path / "gone.parquet")
    with pytest.raises(ShardError) as e:
        A.index_table(gone, "parquet", shard="s", key_column=None)
    assert (e.value.reason, e.value.shard) == ("shard file not found", "s")
    bad = tmp_path / "bad"
    bad.write_bytes(b"PAR1" + b"\0" * 64)
    for kind, what in (("parquet", "Parquet"), ("json", "JSON-lines")):
        with pytest.raises(ShardError) as e:
            A.index_table(str(bad), kind, shard="s", key_column=None)
        assert e.value.reason.startswith(f"not a readable {what} file: ")
    (tmp_path / "bad.jsonl").write_text('{"a": 1}\n{"a": \n')
    with pytest.raises(ShardError, match=r"^not a readable JSON-lines file: ArrowInvalid: "):
        A.index_table(str(tmp_path / "bad.jsonl"), "json", shard="s", key_column=None)
    dup = pa.Table.from_arrays([pa.array([1]), pa.array([2])], names=["x", "x"])
    p = str(tmp_path / "dup.parquet")
    pq.write_table(dup, p)
    with pytest.raises(ShardError) as e:
        A.index_table(p, "parquet", shard="s", key_column=None)
    assert e.value.reason == "duplicate column names in ['x', 'x']" and e.value.shard == "s"
    p = write(tmp_path, "parquet", table(3))
    with pytest.raises(ShardError) as e:
        A.index_table(p, "parquet", shard="s", key_column="id")
    assert e.value.reason == (
        "key column 'id' is missing (columns: ['__key__', 'jpg', 'label']); "
        "pass key_column=<name>, or key_column=None to number rows"
    )


def test_a_footer_claiming_a_negative_row_count(tmp_path: Path) -> None:
    # Thrift's compact encoding zigzags an i64: 77 is varint 0x9a 0x01, -77 is 0x99 0x01 (the
    # same length). Field header 0x16 (next field, i64) precedes the file's and the row group's
    # num_rows, and the column chunk's num_values: all three become -77.
    p = tmp_path / "neg.parquet"
    pq.write_table(pa.table({"x": list(range(77))}), p)
    whole = p.read_bytes()
    n = int.from_bytes(whole[-8:-4], "little")
    start = len(whole) - 8 - n
    footer = whole[start:-8]
    assert footer.count(b"\x16\x9a\x01") == 3
    p.write_bytes(whole[:start] + footer.replace(b"\x16\x9a\x01", b"\x16\x99\x01") + whole[-8:])
    assert pq.ParquetFile(p).metadata.row_group(0).num_rows == -77  # pyarrow does not object
    with pytest.raises(ShardError) as e:
        A.index_table(str(p), "parquet", shard="s", key_column=None)
    assert (e.value.reason, e.value.shard) == ("footer claims a negative row count: [-77]", "s")


# -- IPC files and streams --------------------------------------------------------------------


def test_ipc_file_and_stream(tmp_path: Path) -> None:
    t = table(10)
    f, batches, schema = A._open_arrow(write(tmp_path, "arrow", t), "s")
    assert f is not None and batches == [] and schema == t.schema
    assert f.num_record_batches == 3
    f, batches, schema = A._open_arrow(write(tmp_path, "stream", t), "s")
    assert f is None and schema == t.schema
    assert [b.num_rows for b in batches] == [4, 4, 2]
    assert pa.Table.from_batches(batches).equals(t)
    # A stream of no batches keeps its columns.
    f, batches, schema = A._open_arrow(write(tmp_path, "stream", t.slice(0, 0), "empty"), "s")
    assert f is None and batches == [] and schema.names == ["__key__", "jpg", "label"]


def test_a_stream_cut_short_is_an_error_with_the_readable_rows(tmp_path: Path) -> None:
    t = table(10)
    p = Path(write(tmp_path, "stream", t))
    whole = p.read_bytes()
    assert whole.endswith(b"\xff\xff\xff\xff\x00\x00\x00\x00")
    # Cut right after the second batch's message: a valid, shorter stream without its end.
    src = pa.memory_map(str(p), "r")
    messages = ipc.MessageReader.open_stream(src)
    ends = []
    while True:
        try:
            messages.read_next_message()
        except StopIteration:
            break
        ends.append(src.tell())
    cut = tmp_path / "cut.arrows"
    cut.write_bytes(whole[: ends[2]])  # schema, batch 0, batch 1
    with pytest.raises(ShardError) as e:
        A._open_arrow(str(cut), "s")
    assert e.value.reason == (
        "Arrow IPC stream does not end with the end-of-stream marker (truncated?); "
        "8 rows are readable"
    )
    assert e.value.shard == "s"
    # A stream written before Arrow 0.15 ends with a 4-byte zero: complete.
    legacy = tmp_path / "legacy.arrows"
    legacy.write_bytes(whole[: ends[-1]] + b"\x00\x00\x00\x00")
    _, batches, _ = A._open_arrow(str(legacy), "s")
    assert sum(b.num_rows for b in batches) == 10
    junk = tmp_path / "junk.arrows"
    junk.write_bytes(whole[: ends[-1]] + b"\x00\x00\x00\x00\x00")
    with pytest.raises(ShardError, match="does not end with the end-of-stream marker"):
        A._open_arrow(str(junk), "s")
    (tmp_path / "no.arrow").write_bytes(b"no arrow here at all")
    with pytest.raises(ShardError, match=r"^not an Arrow IPC file or stream: ") as e:
        A.index_table(str(tmp_path / "no.arrow"), "arrow", shard="s", key_column=None)
    assert e.value.shard == "s"
    with pytest.raises(ShardError, match=r"^not an Arrow IPC file or stream: ") as e:
        A._open_arrow(str(tmp_path / "no.arrow"), "s")
    assert e.value.shard == "s"


def test_an_io_error_while_checking_a_streams_end(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The stream reads whole; the second pass over its messages (for the end marker) fails.
    p = write(tmp_path, "stream", table(10))

    class FailingMessages:
        @staticmethod
        def open_stream(src: Any) -> Any:
            raise OSError(5, "Input/output error")

    fake = SimpleNamespace(
        open_file=ipc.open_file, open_stream=ipc.open_stream, MessageReader=FailingMessages
    )
    monkeypatch.setattr(A, "ipc", fake)
    with pytest.raises(ShardError) as e:
        A._open_arrow(p, "s")
    assert e.value.reason == "not an Arrow IPC stream: [Errno 5] Input/output error"
    assert e.value.shard == "s"


# -- validation ---------------------------------------------------------------------------------


def test_has_strings() -> None:
    yes = [
        pa.string(),
        pa.large_string(),
        pa.string_view(),
        pa.dictionary(pa.int32(), pa.string()),
        pa.struct([("a", pa.int32()), ("b", pa.string())]),
        pa.list_(pa.string()),
        pa.map_(pa.string(), pa.int32()),
    ]
    no = [
        pa.int64(),
        pa.binary(),
        pa.dictionary(pa.int32(), pa.binary()),
        pa.struct([("a", pa.int32())]),
        pa.list_(pa.float32()),
    ]
    assert [A._has_strings(t) for t in yes] == [True] * len(yes)
    assert [A._has_strings(t) for t in no] == [False] * len(no)


def _bad_utf8_batch() -> pa.RecordBatch:
    good = pa.array(["ab", "cd"])
    validity, offsets, _ = good.buffers()
    bad = pa.Array.from_buffers(pa.string(), 2, [validity, offsets, pa.py_buffer(b"a\xffcd")])
    return pa.record_batch([bad, pa.array([1, 2])], names=["s", "n"])


def test_validated_checks_strings_of_decoded_chunks_and_all_of_mapped_ones() -> None:
    batch = _bad_utf8_batch()
    with pytest.raises(ShardError) as e:
        A._validated(batch, 3, "s", decoded=True)
    assert e.value.reason.startswith("chunk 3 is corrupt: ") and e.value.shard == "s"
    with pytest.raises(ShardError, match=r"^chunk 3 is corrupt: "):
        A._validated(batch, 3, "s")
    ok = pa.record_batch([pa.array([1, 2])], names=["n"])
    assert A._validated(ok, 0, "s", decoded=True) is ok
    assert A._validated(ok, 0, "s") is ok
    # A decoded chunk without string columns is not validated at all (its buffers are sound):
    # a wrong offset buffer in a binary column goes through.
    good = pa.array([b"ab", b"cd"])
    validity, _, data = good.buffers()
    offsets = pa.py_buffer(np.array([0, 9, 4], np.int32).tobytes())
    binary = pa.Array.from_buffers(pa.binary(), 2, [validity, offsets, data])
    unchecked = pa.record_batch([binary], names=["b"])
    assert A._validated(unchecked, 0, "s", decoded=True) is unchecked
    with pytest.raises(ShardError):
        A._validated(unchecked, 0, "s")


# -- values -------------------------------------------------------------------------------------


def test_as_array_and_element_dtype() -> None:
    assert A._as_array([], np.int32).dtype == np.int32
    a = A._as_array([[1, 2], [3]])
    assert a.dtype == object and [x.tolist() for x in a] == [[1, 2], [3]]
    assert isinstance(a[0], np.ndarray)
    b = A._as_array([[1, 2], None])
    assert b.dtype == object and b[0].tolist() == [1, 2] and b[1] is None
    assert A._element_dtype(pa.list_(pa.int16())) == np.int16
    assert A._element_dtype(pa.list_(pa.float32())) == np.float32
    assert A._element_dtype(pa.list_(pa.bool_())) == np.bool_
    assert A._element_dtype(pa.list_(pa.string())) is None
    assert A._element_dtype(pa.list_(pa.list_(pa.int8()))) is None


def test_times_as_ints() -> None:
    ts, i64, i32 = pa.timestamp("us"), pa.int64(), pa.int32()
    cases = [
        (ts, i64),
        (pa.date64(), i64),
        (pa.duration("s"), i64),
        (pa.time64("ns"), i64),
        (pa.date32(), i32),
        (pa.time32("ms"), i32),
        (pa.float64(), pa.float64()),
        (pa.struct([("t", ts), ("x", pa.string())]), pa.struct([("t", i64), ("x", pa.string())])),
        (pa.map_(pa.date32(), ts), pa.map_(i32, i64)),
        (pa.list_(ts, 3), pa.list_(i64, 3)),
        (pa.large_list(pa.date32()), pa.large_list(i32)),
        (pa.list_(pa.list_(ts)), pa.list_(pa.list_(i64))),
    ]
    for t, want in cases:
        assert A._times_as_ints(t) == want, t


def test_column_values() -> None:
    t0 = datetime.datetime(2026, 1, 2, 3, 4, 5)
    us = int(t0.replace(tzinfo=datetime.timezone.utc).timestamp() * 1_000_000)
    cases: list[tuple[pa.Array, list[Any]]] = [
        (pa.array([b"x", None]), [b"x", None]),
        (pa.array([b"x"], pa.large_binary()), [b"x"]),
        (pa.array([b"xy"], pa.binary(2)), [b"xy"]),
        (pa.array([["a", "b"]]), [["a", "b"]]),
        (pa.array([t0], pa.timestamp("us")), [us]),
        (pa.array([1.5, None]), [1.5, None]),
        (pa.array([{"t": t0}], pa.struct([("t", pa.timestamp("us"))])), [{"t": us}]),
    ]
    for col, want in cases:
        assert A._column_values(col) == want, col.type
    got = A._column_values(pa.array([[1, 2], None, []], pa.list_(pa.int16())))
    assert got[1] is None and [x.dtype for x in (got[0], got[2])] == [np.int16, np.int16]
    assert got[0].tolist() == [1, 2] and got[2].tolist() == []
    got = A._column_values(pa.array([[1, 2]], pa.large_list(pa.float32())))
    assert got[0].dtype == np.float32
    fixed = A._column_values(pa.array([["a", "b"]], pa.list_(pa.string(), 2)))
    assert isinstance(fixed[0], np.ndarray) and fixed[0].tolist() == ["a", "b"]
    nested = A._column_values(pa.array([[[t0]]], pa.list_(pa.list_(pa.timestamp("us")))))
    assert nested == [[[us]]]


# -- the reader ---------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["parquet", "arrow", "stream", "json"])
def test_read_rows_keys_and_fields(tmp_path: Path, kind: str) -> None:
    t = table(10)
    p = write(tmp_path, kind, t)
    r, _ = reader(p, kind)
    c = 0 if kind == "json" else 1
    first = 0 if kind == "json" else 4
    got = r.read(c, np.array([2, 0]), None)
    ref = t.to_pylist()
    for s, row in zip(got, [first + 2, first], strict=True):
        assert isinstance(s, dict)
        assert s["__key__"] == ref[row]["__key__"] and s["label"] == ref[row]["label"]
        assert set(s) == {"__key__", "jpg", "label"}
    only = r.read(c, np.array([1]), {"label"})[0]
    assert set(only) == {"__key__", "label"}
    r.close()
    assert r._pf is None and r._arrow is None
    r, _ = reader(p, kind, key=None)
    got = r.read(c, np.array([3, 1]), {"label"})
    assert [s["__key__"] for s in got] == [str(first + 3), str(first + 1)]  # row numbers
    assert set(got[0]) == {"__key__", "label"}
    r.close()


def test_int_keys_become_strings_and_null_keys_bad_rows(tmp_path: Path) -> None:
    t = pa.table({"id": pa.array([7, None, 9], pa.int64()), "v": [1, 2, 3]})
    p = write(tmp_path, "parquet", t, chunk=2)
    r, _ = reader(p, "parquet", key="id")
    assert [s["__key__"] for s in r.read(0, np.array([0]), None)] == ["7"]
    out = r.read(0, np.array([1, 0]), None)
    assert isinstance(out[0], ShardError) and out[0].reason == "row 1 has a null key"
    assert isinstance(out[1], dict) and out[1] == {"__key__": "7", "v": 1}
    assert r.read(1, np.array([0]), None) == [{"__key__": "9", "v": 3}]


def test_the_chunk_cache_is_a_bounded_lru(tmp_path: Path) -> None:
    p = write(tmp_path, "parquet", table(12))  # 3 row groups
    r, cache = reader(p, "parquet", chunks=2)
    cols = ("__key__", "jpg", "label")
    r.read(0, np.array([0]), None)
    r.read(1, np.array([0]), None)
    assert list(cache) == [(p, 0, cols), (p, 1, cols)]
    r.read(0, np.array([1]), None)  # a hit moves it to the end
    assert list(cache) == [(p, 1, cols), (p, 0, cols)]
    r.read(2, np.array([0]), None)  # evicts the least recently used
    assert list(cache) == [(p, 0, cols), (p, 2, cols)]
    r.read(2, np.array([0]), {"label"})
    assert list(cache)[-1] == (p, 2, ("__key__", "label")) and len(cache) == 2
    r0, cache0 = reader(p, "parquet", chunks=0)  # at least one chunk is kept
    r0.read(0, np.array([0]), None)
    r0.read(1, np.array([0]), None)
    assert list(cache0) == [(p, 1, cols)]


def test_a_chunk_that_disagrees_with_the_index(tmp_path: Path) -> None:
    p = write(tmp_path, "parquet", table(10))
    r, _ = reader(p, "parquet")
    r.index.chunk_rows = np.array([5, 3, 2], np.int64)  # the file was rewritten after indexing
    with pytest.raises(ShardError) as e:
        r.read(0, np.array([0]), None)
    assert e.value.reason == (
        "chunk 0 has 4 rows, the index says 5 (shard changed after indexing?)"
    )
    assert e.value.shard == p
    r, _ = reader(p, "parquet")
    r.index.types = ["string", "binary", "int32"]
    with pytest.raises(ShardError) as e:
        r.read(0, np.array([0]), None)
    assert e.value.reason == (
        "chunk 0 has columns [('__key__', 'string'), ('jpg', 'binary'), ('label', 'int64')], "
        "the file's schema says [('__key__', 'string'), ('jpg', 'binary'), ('label', 'int32')] "
        "(corrupt batch header?)"
    )
    assert e.value.shard == p
    r, _ = reader(p, "parquet")
    with pytest.raises(ShardError) as e:
        r.read(5, np.array([0]), None)  # no such row group
    assert e.value.reason.startswith("cannot read chunk 5: ArrowInvalid: ")
    assert e.value.shard == p
    r, _ = reader(p, "parquet")
    with pytest.raises(ShardError) as e:
        r.read(0, np.array([9]), None)  # no such row in the chunk
    assert e.value.reason.startswith("cannot read rows of chunk 0: ArrowIndexError: ")
    assert e.value.shard == p


def test_json_lines_rows_up_to_16_mib(tmp_path: Path) -> None:
    """pyarrow reads JSON-lines in 1 MiB blocks by default, and a row longer than a block (a
    long text, an inline image) fails to read. mmload reads 16 MiB blocks."""
    import pyarrow.json as pajson

    long = "x" * (2 << 20)
    p = tmp_path / "long.jsonl"
    p.write_text(json.dumps({"__key__": "a", "v": long}) + "\n" + '{"__key__": "b", "v": "y"}\n')
    with pytest.raises(pa.ArrowInvalid, match="straddles two block boundaries"):
        pajson.read_json(str(p))  # pyarrow's default block size
    idx = A.index_table(str(p), "json", shard="s", key_column="__key__")
    assert idx.chunk_rows.tolist() == [2] and idx.types == ["string", "string"]
    r, _ = reader(str(p), "json")
    assert r.read(0, np.array([1, 0]), None) == [
        {"__key__": "b", "v": "y"},
        {"__key__": "a", "v": long},
    ]


@pytest.mark.parametrize("kind", ["parquet", "arrow", "stream"])
def test_a_file_of_no_chunks_has_int64_chunk_counts(tmp_path: Path, kind: str) -> None:
    if kind == "parquet":  # a writer closed before any row group
        p = str(tmp_path / "none.parquet")
        pq.ParquetWriter(p, table(0).schema).close()
    else:
        p = write(tmp_path, kind, table(0))
    idx = A.index_table(p, "arrow" if kind == "stream" else kind, shard=p, key_column="__key__")
    assert idx.chunk_rows.tolist() == [] and idx.chunk_rows.dtype == np.int64
    assert idx.num_samples == 0


def test_an_ipc_file_with_a_corrupt_batch_header(tmp_path: Path) -> None:
    """A valid footer, but the first record batch's message length is damaged: the index
    reads each batch's row count and fails with the shard named."""
    p = Path(write(tmp_path, "arrow", table(10)))
    f = ipc.open_file(str(p))
    offset = None
    for off in range(8, p.stat().st_size - 4, 8):  # the first batch's message header
        data = bytearray(p.read_bytes())
        data[off : off + 4] = b"\xff\xff\xff\x7f"
        bad = tmp_path / "bad.arrow"
        bad.write_bytes(data)
        try:
            A.index_table(str(bad), "arrow", shard="s", key_column=None)
        except ShardError as e:
            if e.reason.startswith("not a readable Arrow IPC file: "):
                offset = off
                break
    assert offset is not None and f.num_record_batches == 3
    with pytest.raises(ShardError) as e:
        A.index_table(str(tmp_path / "bad.arrow"), "arrow", shard="s", key_column=None)
    assert e.value.reason.startswith("not a readable Arrow IPC file: ArrowInvalid: ")
    assert e.value.shard == "s"


def test_an_empty_row_group_is_a_chunk_of_no_rows(tmp_path: Path) -> None:
    p = str(tmp_path / "empty.parquet")
    pq.write_table(table(0), p)  # one row group of 0 rows
    idx = A.index_table(p, "parquet", shard=p, key_column="__key__")
    assert idx.chunk_rows.tolist() == [0] and idx.num_samples == 0


def test_reader_errors_name_the_shard_and_cause(tmp_path: Path) -> None:
    """A row's ShardError (a null key) and a chunk's (a value Python cannot hold) carry the
    shard; the chunk-level cases are in test_a_chunk_that_disagrees_with_the_index."""
    # A null key: that row's error names the shard.
    t = pa.table({"id": pa.array([None], pa.string()), "v": [1]})
    q = write(tmp_path, "parquet", t, name="nullkey")
    r, _ = reader(q, "parquet", key="id")
    (err,) = r.read(0, np.array([0]), None)
    assert isinstance(err, ShardError) and (err.reason, err.shard) == ("row 0 has a null key", q)
    # A value Python cannot hold (a date 5.8 million years from 1970).
    t = pa.table({"k": ["a"], "d": pa.array([2**31 - 1], pa.date32())})
    q = write(tmp_path, "parquet", t, name="date")
    r, _ = reader(q, "parquet", key="k")
    with pytest.raises(ShardError) as e:
        r.read(0, np.array([0]), None)
    assert e.value.shard == q
    assert e.value.reason.startswith(
        "cannot convert column 'd' (date32[day]) of chunk 0: OverflowError: "
    )


def test_reader_validates_each_chunk(tmp_path: Path) -> None:
    # A Parquet column of strings whose bytes are not UTF-8 (the decoder copies them unchecked).
    q = tmp_path / "utf8.parquet"
    pq.write_table(pa.Table.from_batches([_bad_utf8_batch()]), q)
    r, _ = reader(str(q), "parquet", key=None)
    with pytest.raises(ShardError) as e:
        r.read(0, np.array([0]), None)
    assert e.value.shard == str(q)
    assert e.value.reason.startswith("chunk 0 is corrupt: ") and "UTF8" in e.value.reason
    # A memory-mapped IPC chunk is checked whole: a binary column (no strings) whose offsets
    # go backwards passes pyarrow's cheap validation, not the full one.
    p = Path(write(tmp_path, "arrow", table(10)))
    data = p.read_bytes()
    offsets = np.array([0, 1, 3, 6, 10], "<i4").tobytes()  # chunk 0's "jpg" offsets
    assert data.count(offsets) == 1
    p.write_bytes(data.replace(offsets, np.array([0, 5, 3, 6, 10], "<i4").tobytes()))
    A.index_table(str(p), "arrow", shard="s", key_column=None)  # the footer is sound
    r, _ = reader(str(p), "arrow")
    with pytest.raises(ShardError) as e:
        r.read(0, np.array([0]), None)
    assert e.value.shard == str(p) and e.value.reason.startswith("chunk 0 is corrupt: ")
    assert r.read(1, np.array([0]), None)[0]["jpg"] == bytes([4]) * 5  # other chunks read


def test_a_shard_replaced_after_indexing(tmp_path: Path) -> None:
    p = Path(write(tmp_path, "stream", table(10)))
    r, _ = reader(str(p), "stream")
    p.write_bytes(b"not arrow any more")
    with pytest.raises(ShardError) as e:
        r.read(0, np.array([0]), None)
    assert e.value.shard == str(p)
    assert e.value.reason.startswith("not an Arrow IPC file or stream: ")


def test_a_chunk_schema_that_cannot_be_read(tmp_path: Path) -> None:
    # pyarrow raises KeyError for a type id it has no Python class for (a corrupt header);
    # stand-in: a chunk whose schema raises it.
    class Corrupt:
        @property
        def schema(self) -> Any:
            raise KeyError(42)

    p = write(tmp_path, "parquet", table(4))
    r, _ = reader(p, "parquet")
    with pytest.raises(ShardError) as e:
        r._check_schema(Corrupt(), 3, ("__key__",))
    assert (e.value.reason, e.value.shard) == ("chunk 3 has a corrupt schema: KeyError(42)", p)
