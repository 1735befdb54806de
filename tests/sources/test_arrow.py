"""Arrow IPC and Parquet shards: streamed by chunk, byte-identical, bad-input errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc
import pyarrow.parquet as pq
import pytest

from mmload.errors import ShardError
from mmload.sources import Dataset


def _table(n: int, offset: int = 0) -> pa.Table:
    rng = np.random.default_rng(offset)
    return pa.table(
        {
            "__key__": [f"k{offset + i:05d}" for i in range(n)],
            "jpg": [rng.bytes(int(rng.integers(1, 300))) for _ in range(n)],
            "label": pa.array(np.arange(offset, offset + n), pa.int64()),
            "score": pa.array(rng.random(n), pa.float64()),
            "emb": pa.array(
                [rng.random(4).astype(np.float32) for _ in range(n)], pa.list_(pa.float32(), 4)
            ),
        }
    )


def _write(tmp_path: Path, kind: str, table: pa.Table, name: str, chunk: int = 7) -> str:
    if kind == "parquet":
        p = str(tmp_path / f"{name}.parquet")
        pq.write_table(table, p, row_group_size=chunk)
    elif kind == "arrow":
        p = str(tmp_path / f"{name}.arrow")
        with ipc.new_file(p, table.schema) as w:
            for b in table.to_batches(max_chunksize=chunk):
                w.write_batch(b)
    else:
        p = str(tmp_path / f"{name}.arrow")
        with pa.OSFile(p, "wb") as f, ipc.new_stream(f, table.schema) as w:
            for b in table.to_batches(max_chunksize=chunk):
                w.write_batch(b)
    return p


@pytest.mark.parametrize("kind", ["parquet", "arrow", "arrow-stream"])
def test_rows_read_back_byte_identical(tmp_path: Path, kind: str) -> None:
    t1, t2 = _table(20, 0), _table(9, 100)
    paths = [_write(tmp_path, kind, t1, "a"), _write(tmp_path, kind, t2, "b")]
    ds = Dataset.open(paths, index_cache=False)
    assert ds.num_samples == 29
    assert ds.chunk_counts.tolist() == [7, 7, 6, 7, 2]  # one chunk per row group / record batch
    ids = np.random.default_rng(1).permutation(29)
    got = ds.read(ids)
    ref = pa.concat_tables([t1, t2]).to_pylist()
    for i, g in zip(ids, got, strict=True):
        assert isinstance(g, dict)
        r = ref[int(i)]
        assert g["__key__"] == r["__key__"]
        assert g["jpg"] == r["jpg"]  # bytes, unchanged
        assert g["label"] == r["label"]
        assert g["score"] == r["score"]
        assert np.array_equal(g["emb"], np.asarray(r["emb"], np.float32))


def test_field_selection_reads_only_wanted_columns(tmp_path: Path) -> None:
    p = _write(tmp_path, "parquet", _table(10), "a")
    ds = Dataset.open(p, index_cache=False)
    s = ds.read(np.array([3]), {"label"})[0]
    assert isinstance(s, dict)
    assert set(s) == {"__key__", "label", "__shard__", "__id__"}


def test_missing_key_column_names_shard_and_column(tmp_path: Path) -> None:
    p = _write(tmp_path, "parquet", _table(5).drop_columns(["__key__"]), "nokey")
    with pytest.raises(ShardError, match="key column '__key__' is missing") as e:
        Dataset.open(p, index_cache=False)
    assert "nokey.parquet" in str(e.value)
    # key_column=None numbers the rows instead
    ds = Dataset.open(p, index_cache=False, key_column=None)
    s = ds.read(np.array([4]))[0]
    assert isinstance(s, dict)
    assert s["__key__"] == "4"


def test_custom_key_column(tmp_path: Path) -> None:
    t = _table(5).rename_columns(["id", "jpg", "label", "score", "emb"])
    ds = Dataset.open(_write(tmp_path, "parquet", t, "c"), index_cache=False, key_column="id")
    s = ds.read(np.array([2]))[0]
    assert isinstance(s, dict)
    assert s["__key__"] == "k00002"


def test_corrupt_parquet(tmp_path: Path) -> None:
    p = tmp_path / "bad.parquet"
    p.write_bytes(b"PAR1" + b"\0" * 100)
    with pytest.raises(ShardError, match="not a readable Parquet") as e:
        Dataset.open(str(p), index_cache=False)
    assert "bad.parquet" in str(e.value)


def test_not_arrow(tmp_path: Path) -> None:
    p = tmp_path / "bad.arrow"
    p.write_bytes(b"nothing arrow here")
    with pytest.raises(ShardError, match="not an Arrow IPC"):
        Dataset.open(str(p), index_cache=False)


def test_skip_mode_leaves_out_bad_shard(tmp_path: Path) -> None:
    good = _write(tmp_path, "parquet", _table(5), "good")
    bad = _write(tmp_path, "parquet", _table(5, 50).drop_columns(["__key__"]), "bad")
    ds = Dataset.open([good, bad], index_cache=False, skip_bad=True)
    assert ds.num_samples == 5
    assert len(ds.bad) == 1
    assert ds.bad[0].shard == bad


def test_decoded_chunks_are_bounded(tmp_path: Path) -> None:
    from mmload import Loader, ShuffleConfig

    paths = [_write(tmp_path, "parquet", _table(30, 100 * s), f"p{s}", chunk=5) for s in range(12)]
    with Loader(
        paths,
        batch_size=10,
        shuffle=ShuffleConfig(interleave=4),
        fields=["label"],
        cache_dir=tmp_path / "c",
    ) as L:
        labels = sorted(int(x) for b in L for x in b["label"])
        ds = L._pipe.ds
        assert 0 < len(ds._chunk_cache) <= 8  # 2 x interleave, though 72 row groups exist
    assert labels == sorted(int(x) for s in range(12) for x in range(100 * s, 100 * s + 30))
    assert not ds._chunk_cache and not ds._tables  # released on close


def test_null_key_is_a_bad_row_not_a_bad_chunk(tmp_path: Path) -> None:
    t = _table(6)
    keys = t.column("__key__").to_pylist()
    keys[2] = None
    t = t.set_column(0, "__key__", pa.array(keys, pa.string()))
    ds = Dataset.open(_write(tmp_path, "parquet", t, "nulls", chunk=6), index_cache=False)
    got = ds.read(np.arange(6))
    assert isinstance(got[2], ShardError) and "null key" in str(got[2])
    assert all(isinstance(g, dict) for i, g in enumerate(got) if i != 2)
