"""Updates whose vector or list columns do not fit the table's layout: each refused with a
JoinError naming the column, its type or lengths, and what the table holds; null vector rows of
a float column become NaN rows, of an int column an error."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from mmload.errors import JoinError
from mmload.features import FOUND, FeatureTable


def _vectors(kind: pa.DataType) -> FeatureTable:
    t = FeatureTable(key="k", timestamp="ts")  # the first update fixes vec as a [2] vector
    t.update(pa.table({"k": [1], "ts": [1], "vec": pa.array([[1, 2]], pa.list_(kind))}))
    return t


def _refused(t: FeatureTable, table: pa.Table, message: str) -> None:
    with pytest.raises(JoinError) as info:
        t.update(table)
    assert str(info.value) == message


def test_vector_updates_that_do_not_fit() -> None:
    t = _vectors(pa.float32())
    _refused(
        t,
        pa.table({"k": [2], "ts": [2], "vec": pa.array([[1, 2, 3]], pa.list_(pa.float32(), 3))}),
        "feature column 'vec' has length 3, expected 2",
    )
    _refused(
        t,
        pa.table(
            {"k": [2, 3], "ts": [2, 2], "vec": pa.array([[1, 2], [1]], pa.list_(pa.float32()))}
        ),
        "feature column 'vec': vector rows have lengths [1, 2], expected 2",
    )
    _refused(
        t,
        pa.table({"k": [2], "ts": [2], "vec": pa.array([1.5], pa.float32())}),
        "feature column 'vec' has type float; the table holds a vector",
    )
    ti = _vectors(pa.int64())
    _refused(
        ti,
        pa.table(
            {"k": [2, 3], "ts": [2, 2], "vec": pa.array([[1, 2], None], pa.list_(pa.int64()))}
        ),
        "integer vector column 'vec' has 1 null row(s)",
    )


def test_a_null_float_vector_row_is_a_row_of_nan() -> None:
    t = _vectors(pa.float32())
    t.update(
        pa.table(
            {"k": [2, 3], "ts": [5, 5], "vec": pa.array([None, [3, 4]], pa.list_(pa.float32(), 2))}
        )
    )
    out = t.join([2, 3, 1], np.array([9, 9, 9]))
    assert out[FOUND].tolist() == [True, True, True]
    v = out["vec"].numpy()
    assert np.isnan(v[0]).all() and v[1:].tolist() == [[3.0, 4.0], [1.0, 2.0]]


SCHEMA = pa.schema([("k", pa.int64()), ("ts", pa.int64()), ("tags", pa.list_(pa.int32()))])


@pytest.mark.parametrize(
    ("column", "message"),
    [
        (pa.array([7], pa.int32()), "feature column 'tags' has type int32; the table holds a list"),
        (
            pa.array([[7, 8]], pa.list_(pa.int32(), 2)),
            "feature column 'tags' has type fixed_size_list<item: int32>[2]; the table holds a list",
        ),
        (
            pa.array([["a"]], pa.list_(pa.string())),
            "feature column 'tags' has values of type string; the table holds int",
        ),
        (
            pa.array([[1, None]], pa.list_(pa.int32())),
            "list feature column 'tags' has 1 null element(s)",
        ),
    ],
)
def test_list_updates_that_do_not_fit(column: pa.Array, message: str) -> None:
    t = FeatureTable(key="k", timestamp="ts", columns=SCHEMA)
    _refused(t, pa.table({"k": [1], "ts": [1], "tags": column}), message)


def test_update_inputs_that_are_not_tables() -> None:
    t = FeatureTable(key="k", timestamp="ts")
    _refused(
        t,
        42,  # type: ignore[arg-type]
        "update: expected a pyarrow.Table, pyarrow.RecordBatch, pandas.DataFrame or dict of "
        "columns, got int",
    )

    class Frame:  # has .columns but is not pandas: not mistaken for a DataFrame
        columns = ("k", "ts")

    _refused(
        t,
        Frame(),  # type: ignore[arg-type]
        "update: expected a pyarrow.Table, pyarrow.RecordBatch, pandas.DataFrame or dict of "
        "columns, got Frame",
    )
    with pytest.raises(JoinError, match=r"^update: cannot convert the pandas DataFrame to Arrow: "):
        t.update(pd.DataFrame({"k": [1, 2], "ts": [1, 2], "v": [1.0, "x"]}))
    with pytest.raises(JoinError, match=r"^update: cannot convert the dict of columns to Arrow: "):
        t.update({"k": [1, 2], "ts": [1, 2], "v": [1.0, "x"]})


def test_a_dataframes_index_is_not_a_column() -> None:
    t = FeatureTable(key="k", timestamp="ts")
    t.update(pd.DataFrame({"k": [1, 2], "ts": [5, 5], "v": [1.5, 2.5]}, index=[10, 20]))
    assert t.column_names == ("v",)
    assert t.join([2], np.array([9]))["v"].tolist() == [2.5]


def test_key_columns_that_do_not_fit() -> None:
    t = FeatureTable(key="k", timestamp="ts")
    t.update(pa.table({"k": ["a"], "ts": [1], "v": [1.0]}))
    _refused(
        t,
        pa.table({"k": [1], "ts": [2], "v": [1.0]}),
        "key column 'k' has type int64; this table has string keys",
    )
    _refused(
        t,
        pa.table({"k": ["a", None], "ts": [2, 2], "v": [1.0, 2.0]}),
        "key column 'k' has 1 null(s)",
    )


def test_dictionary_encoded_string_keys() -> None:
    t = FeatureTable(key="k", timestamp="ts")
    keys = pa.array(["a", "b", "a"]).dictionary_encode()
    t.update(pa.table({"k": keys, "ts": [1, 1, 2], "v": [1.0, 2.0, 3.0]}))
    t.update(pa.table({"k": pa.array(["b"]).dictionary_encode(), "ts": [3], "v": [4.0]}))
    assert t.join(["a", "b", "c"], np.array([5, 5, 5]))["v"].tolist() == [3.0, 4.0, 0.0]


def test_values_converted_to_the_columns_kind() -> None:
    t = FeatureTable(key="k", timestamp="ts")
    t.update(pa.table({"k": [1], "ts": [1], "f": [0.5], "n": pa.array([1], pa.int64())}))
    # ints into a float column round as NumPy's float32 conversion does (no error)
    big = 2**24 + 1
    t.update(pa.table({"k": [2], "ts": [1], "f": pa.array([big], pa.int64()), "n": [2]}))
    assert t.join([2], np.array([1]))["f"].tolist() == [float(np.float32(big))]
    for table, message in (
        (
            pa.table({"k": [3], "ts": [1], "f": [1.0], "n": pa.array([None], pa.int64())}),
            "integer feature column 'n' has 1 null value(s)",
        ),
        (
            pa.table({"k": [3], "ts": [1], "f": [1.0], "n": pa.array([1], pa.int64()), "x": [1]}),
            "update has unexpected column(s) ['x']; the table's columns are "
            "['k', 'ts', 'f', 'n'] (pass columns=[...] to the table to pick some)",
        ),
    ):
        _refused(t, table, message)
    for table, start in (
        (
            pa.table({"k": [3], "ts": [1], "f": [1.0], "n": pa.array([2**63], pa.uint64())}),
            "feature column 'n' does not fit int64: ",
        ),
        (
            pa.table({"k": [3], "ts": pa.array([2**63], pa.uint64()), "f": [1.0], "n": [1]}),
            "timestamp column 'ts' does not fit int64: ",
        ),
    ):
        with pytest.raises(JoinError) as info:
            t.update(table)
        assert str(info.value).startswith(start)


def test_the_packed_layout_of_every_column_kind() -> None:
    # each kind packs its columns in name order from 0: a float scalar takes one float slot,
    # a [2] vector two, an int one, a variable-length list one int slot (a row id)
    schema = pa.schema(
        [
            ("k", pa.int64()),
            ("ts", pa.int64()),
            ("b", pa.float32()),
            ("a", pa.list_(pa.float32(), 2)),
            ("n", pa.int16()),
            ("h", pa.list_(pa.int32())),
            ("c", pa.float64()),
        ]
    )
    layout = FeatureTable(key="k", timestamp="ts", columns=schema).layout
    assert layout is not None
    got = [(c.name, c.kind, c.width, c.offset, c.elem) for c in layout.columns]
    assert got == [
        ("a", "float", 2, 0, None),
        ("b", "float", 0, 2, None),
        ("c", "float", 0, 3, None),
        ("h", "int", 0, 0, "int"),
        ("n", "int", 0, 1, None),
    ]
    assert (layout.n_float, layout.n_int) == (4, 2)


@pytest.mark.parametrize(
    ("table", "message"),
    [
        (
            pa.table({"k": [1], "v": [1.0]}),
            "timestamp column 'ts' is missing (columns: ['k', 'v'])",
        ),
        (
            pa.table({"k": [1.5], "ts": [1], "v": [1.0]}),
            "key column 'k' has type double; need an integer or string type",
        ),
        (
            pa.table({"k": [1], "ts": ["x"], "v": [1.0]}),
            "timestamp column 'ts' has type string; need an integer or Arrow timestamp type",
        ),
        (
            pa.table({"k": [1, 2], "ts": [1, 1], "v": pa.array([[1.0], [1.0, 2.0]])}),
            "column 'v': vector rows need one length, found lengths [1, 2] (for "
            "variable-length lists, declare the column as pa.list_(...) in the table's "
            "columns=pyarrow.schema([...]))",
        ),
    ],
)
def test_first_updates_that_fix_no_layout(table: pa.Table, message: str) -> None:
    _refused(FeatureTable(key="k", timestamp="ts"), table, message)


def test_picked_columns_that_are_missing() -> None:
    t = FeatureTable(key="k", timestamp="ts", columns=["v", "w"])
    _refused(
        t,
        pa.table({"k": [1], "ts": [1], "v": [1.0]}),
        "feature column(s) ['w'] are missing (columns: ['k', 'ts', 'v'])",
    )
