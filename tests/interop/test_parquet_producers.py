"""Parquet files written by other tools, read by mmload and compared row by row with pyarrow
(the reference reader): the Apache ``parquet-testing`` files with nested columns (committed in
``tests/interop/data``, Apache-2.0, see its README) and files pyarrow writes with every kind of
nesting. Variable-length lists of numbers arrive as ``Jagged`` rows, other nested values as the
Python values pyarrow gives; nothing fails with a NumPy error."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

import mmload
from mmload.sources.arrow import _times_as_ints

DATA = Path(__file__).parent / "data"


def _norm(v: Any) -> Any:
    """A value as plain Python, floats rounded to float32 (mmload's float type)."""
    if isinstance(v, torch.Tensor):
        v = v.tolist()
    if isinstance(v, np.ndarray):
        v = v.tolist()
    if isinstance(v, np.generic):
        v = v.item()
    if isinstance(v, bool) or v is None or isinstance(v, (int, str, bytes)):
        return v
    if isinstance(v, float):
        return "nan" if math.isnan(v) else float(np.float32(v))
    if isinstance(v, dict):
        return {k: _norm(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_norm(x) for x in v]
    return v


def _reference(path: Path) -> list[dict[str, Any]]:
    t = pq.read_table(path)
    t = t.cast(pa.schema([f.with_type(_times_as_ints(f.type)) for f in t.schema]))
    return [{k: _norm(v) for k, v in row.items()} for row in t.to_pylist()]


def _rows(path: Path, tmp: Path, **kw: Any) -> tuple[dict[int, dict[str, Any]], dict[str, Any]]:
    out: dict[int, dict[str, Any]] = {}
    with mmload.Loader(str(path), batch_size=3, key_column=None, cache_dir=tmp, **kw) as ld:
        for b in ld:
            for j, key in enumerate(b["__key__"]):
                out[int(key)] = {
                    k: _norm(v[j].tolist() if isinstance(v, mmload.Jagged) else v[j])
                    for k, v in b.items()
                    if k != "__key__"
                }
        stats = ld.stats()
    return out, stats


@pytest.mark.parametrize(
    "name",
    [
        "nested_lists.snappy.parquet",
        "nonnullable.impala.parquet",
        "nested_maps.snappy.parquet",
        "nested_structs.rust.parquet",
        "repeated_no_annotation.parquet",
    ],
)
def test_parquet_testing_files_match_pyarrow(tmp_path: Path, name: str) -> None:
    got, stats = _rows(DATA / name, tmp_path)
    want = _reference(DATA / name)
    assert [got[i] for i in range(len(want))] == want
    assert stats["samples"] == len(want) and stats["bad_samples"] == 0


def test_null_elements_in_an_int_list_column(tmp_path: Path) -> None:
    """``list_columns.parquet`` holds ``[null, 1]`` in an int64 list column: an int64 Jagged
    cannot hold it, so that row is a bad sample (named), as a null in an int column is;
    ``ragged="list"`` reads it as pyarrow does."""
    path = DATA / "list_columns.parquet"
    want = _reference(path)
    with pytest.raises(mmload.DecodeError, match="int64_list") as err:
        _rows(path, tmp_path / "a")
    assert err.value.key == "1"
    got, stats = _rows(path, tmp_path / "b", on_error="skip", max_bad_samples=1)
    assert stats["bad_samples"] == 1 and stats["bad"][0]["key"] == "1"
    assert got[0] == want[0] and got[2] == want[2]  # the good rows, as pyarrow reads them
    as_lists, _ = _rows(path, tmp_path / "c", ragged="list")
    assert [as_lists[i] for i in range(len(want))] == want


def test_pyarrow_nested_columns(tmp_path: Path) -> None:
    n = 7
    rng = np.random.default_rng(3)
    table = pa.table(
        {
            "ids": pa.array([list(range(i % 4)) for i in range(n)], pa.list_(pa.int32())),
            "big": pa.array([[float(i)] * (i % 3) for i in range(n)], pa.large_list(pa.float64())),
            "nested": pa.array(
                [[[i], [i, i + 1]] if i % 2 else [] for i in range(n)],
                pa.list_(pa.list_(pa.int64())),
            ),
            "words": pa.array([["a", "b"][: i % 3] for i in range(n)], pa.list_(pa.string())),
            "point": pa.array(
                [{"x": i, "y": float(i) / 2, "tag": f"t{i}"} for i in range(n)],
                pa.struct([("x", pa.int64()), ("y", pa.float32()), ("tag", pa.string())]),
            ),
            "attrs": pa.array(
                [[("k", i), ("j", -i)] for i in range(n)], pa.map_(pa.string(), pa.int32())
            ),
            "events": pa.array(
                [[{"t": i, "v": [1.0] * (i % 2)}] for i in range(n)],
                pa.list_(pa.struct([("t", pa.timestamp("ms")), ("v", pa.list_(pa.float32()))])),
            ),
            "vec": pa.FixedSizeListArray.from_arrays(pa.array(rng.random(3 * n)), 3),
        }
    )
    path = tmp_path / "nested.parquet"
    pq.write_table(table, path, row_group_size=3)
    got, stats = _rows(path, tmp_path / "cache")
    want = _reference(path)
    assert [got[i] for i in range(n)] == want
    assert stats["bad_samples"] == 0
    with mmload.Loader(str(path), batch_size=n, key_column=None, cache_dir=tmp_path / "c") as ld:
        b = next(iter(ld))
    assert isinstance(b["ids"], mmload.Jagged) and isinstance(b["big"], mmload.Jagged)
    assert b["vec"].shape == (n, 3)  # fixed-size lists stay a tensor
    assert isinstance(b["nested"], list) and isinstance(b["point"], list)
