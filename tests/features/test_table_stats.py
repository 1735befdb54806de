"""``FeatureTable.stats()`` value by value, counted by hand: rows, runs, merges (by updates and
by ``compact``), dropped rows, string keys, joins, newest times and the feature lag."""

from __future__ import annotations

import datetime
import time

import numpy as np
import pyarrow as pa
import pytest

from mmload.errors import ConfigError, JoinError
from mmload.features import FOUND, FeatureTable
from mmload.features.stats import LISTED, UpdateLog


def _rows(key: object, ts: list[int]) -> pa.Table:
    return pa.table({"k": [key] * len(ts), "ts": ts, "v": [float(t) for t in ts]})


def test_a_fresh_table() -> None:
    assert FeatureTable(key="k", timestamp="ts").stats() == {
        "device": "cpu",
        "version": 0,
        "rows": 0,
        "runs": 0,
        "string_keys": 0,
        "rows_ingested": 0,
        "updates_applied": 0,
        "update_errors": 0,
        "errors": [],
        "newest_feature_ts": None,
        "newest_sample_ts": None,
        "rows_dropped": 0,
        "merges": 0,
        "joins": 0,
        "rows_joined": 0,
        "feature_lag": None,
        "sources": [],
    }


def test_counters_through_updates_compaction_and_joins() -> None:
    t = FeatureTable(key="k", timestamp="ts")
    # 100, 20 and 4 rows: each older run is more than 4x the newer, so none merge
    for key, n in (("a", 100), ("b", 20), ("c", 4)):
        t.update(_rows(key, list(range(300 - n, 300))))
    s = t.stats()
    assert (s["runs"], s["merges"], s["rows"], s["string_keys"]) == (3, 0, 124, 3)
    assert (s["version"], s["updates_applied"], s["rows_ingested"]) == (3, 3, 124)
    assert s["newest_feature_ts"] == 299 and s["feature_lag"] is None
    t.compact()  # three runs into one: two merges
    s = t.stats()
    assert (s["runs"], s["merges"], s["version"], s["rows"]) == (1, 2, 4, 124)
    for i in (1, 2):  # the same 4 (key, ts) pairs again, compacted away each time
        t.update(_rows("c", list(range(296, 300))))
        assert t.stats()["runs"] == 2
        t.compact()
        s = t.stats()
        assert (s["runs"], s["merges"], s["rows"], s["rows_dropped"]) == (1, 2 + i, 124, 4 * i)
    t.join(["a", "zz", "b"], np.array([310, 500, 5]))
    s = t.stats()
    assert (s["joins"], s["rows_joined"], s["newest_sample_ts"]) == (1, 3, 500)
    assert s["feature_lag"] == 500 - 299
    t.join(["a", "b"], np.array([7, 400]))
    s = t.stats()
    assert (s["joins"], s["rows_joined"], s["newest_sample_ts"]) == (2, 5, 500)
    t.advance_watermark(290)
    t.advance_watermark(280)  # never moves back
    assert t.watermark == 290


def test_failed_updates_are_listed_with_origin_reason_and_time() -> None:
    t = FeatureTable(key="k", timestamp="ts")
    t.update(_rows("a", [1]))
    before = time.time()
    with pytest.raises(JoinError):
        t.update(pa.table({"k": [1], "ts": [2], "v": [1.0]}), origin="part-7.parquet")
    (err,) = t.stats()["errors"]
    assert sorted(err) == ["origin", "reason", "time"]
    assert err["origin"] == "part-7.parquet"
    assert err["reason"] == "key column 'k' has type int64; this table has string keys"
    assert before <= err["time"] <= time.time()
    assert t.stats()["update_errors"] == 1


def test_a_join_before_the_first_update() -> None:
    t = FeatureTable(key="k", timestamp="ts")
    with pytest.raises(JoinError) as info:
        t.join([1], np.array([1]))
    assert str(info.value) == (
        "join before any feature update: the table has no schema yet (pass "
        "columns=pyarrow.schema([...]) to join before the first update)"
    )


BASE = pa.table({"k": [1], "ts": [1], "a": [1.0], "n": pa.array([1], pa.int64())})


@pytest.mark.parametrize(
    ("defaults", "message"),
    [
        ({"zz": 1}, "defaults={'zz': 1}: names unknown column(s) ['zz']"),
        ({"a": "x"}, "defaults['a']='x': must be a number"),
        ({"a": True}, "defaults['a']=True: must be a number"),
        ({"n": 1.5}, "defaults['n']=1.5: column holds int64; need an integer"),
    ],
)
def test_defaults_the_first_update_refuses(defaults: dict[str, object], message: str) -> None:
    t = FeatureTable(key="k", timestamp="ts", defaults=defaults)  # type: ignore[arg-type]
    with pytest.raises(JoinError) as info:
        t.update(BASE)
    assert str(info.value) == f"the first update fixes the schema, and then {message}"


def test_defaults_name_some_columns_and_the_rest_are_zero() -> None:
    t = FeatureTable(key="k", timestamp="ts", defaults={"a": 5.0})
    t.update(BASE)
    out = t.join([9], np.array([1]))
    assert out["a"].tolist() == [5.0] and out["n"].tolist() == [0]
    t = FeatureTable(key="k", timestamp="ts", defaults=-1)
    t.update(BASE)
    assert t.join([9], np.array([1]))["n"].tolist() == [-1]


def test_a_list_columns_default_and_the_reserved_name() -> None:
    schema = pa.schema([("k", pa.int64()), ("ts", pa.int64()), ("h", pa.list_(pa.int32()))])
    with pytest.raises(ConfigError) as info:
        FeatureTable(key="k", timestamp="ts", columns=schema, defaults={"h": 1})
    assert str(info.value) == "defaults['h']=1: a list column's default is []"
    with pytest.raises(JoinError) as jinfo:
        FeatureTable(key="k", timestamp="ts").update(pa.table({"k": [1], "ts": [1], FOUND: [1.0]}))
    assert str(jinfo.value) == f"feature column name {FOUND!r} is reserved"


def test_rows_dropped_when_updates_merge() -> None:
    t = FeatureTable(key="k", timestamp="ts")
    t.update(_rows("a", list(range(100))))
    for _ in range(2):  # 100, 4, 4: the two small runs merge, and 4 rows are duplicates
        t.update(_rows("b", [1, 2, 3, 4]))
    s = t.stats()
    assert (s["runs"], s["merges"], s["rows"], s["rows_dropped"]) == (2, 1, 104, 4)


def test_the_newest_100_failures_are_listed_and_all_counted() -> None:
    log = UpdateLog()
    for i in range(LISTED + 5):
        log.failed(f"part-{i}", "bad")
    snap = log.snapshot()
    assert LISTED == 100 and snap["update_errors"] == 105
    assert [e["origin"] for e in snap["errors"]] == [f"part-{i}" for i in range(5, 105)]


def test_repr() -> None:
    t = FeatureTable(key="k", timestamp="ts")
    assert repr(t) == (
        "FeatureTable(key='k', timestamp='ts', columns=[], device='cpu', rows=0, runs=0)"
    )
    t.update(_rows("a", [1, 2]))
    assert repr(t) == (
        "FeatureTable(key='k', timestamp='ts', columns=['v'], device='cpu', rows=2, runs=1)"
    )


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"key": ""}, "key='': must be a non-empty column name"),
        ({"timestamp": 5}, "timestamp=5: must be a non-empty column name"),
        ({"timestamp": "k"}, "timestamp='k': must differ from key"),
        ({"duplicate": "newest"}, "duplicate='newest': must be 'last' or 'first'"),
        ({"defaults": "x"}, "defaults='x': must be a number or a mapping column -> number"),
        ({"defaults": True}, "defaults=True: must be a number or a mapping column -> number"),
        ({"columns": "v"}, "columns='v': must be a list of column names or a Schema"),
        ({"columns": ["v", 3]}, "columns=['v', 3]: must be a list of column names or a Schema"),
        ({"columns": ["v", "v"]}, "columns=['v', 'v']: need unique names other than key/timestamp"),
        ({"columns": ["ts"]}, "columns=['ts']: need unique names other than key/timestamp"),
        ({"columns": [FOUND]}, f"columns=[{FOUND!r}]: need unique names other than key/timestamp"),
    ],
)
def test_settings_refused_with_the_setting_and_value(
    kwargs: dict[str, object], message: str
) -> None:
    args: dict[str, object] = {"key": "k", "timestamp": "ts", **kwargs}
    with pytest.raises(ConfigError) as info:
        FeatureTable(**args)  # type: ignore[arg-type]
    assert str(info.value) == message


def test_a_schema_given_up_front() -> None:
    schema = pa.schema([("k", pa.int64()), ("ts", pa.int64()), ("v", pa.float32())])
    t = FeatureTable(key="k", timestamp="ts", columns=schema)
    s = t.stats()
    assert (s["rows"], s["runs"], t.column_names) == (0, 0, ("v",))
    assert t.join([1], np.array([1]))[FOUND].tolist() == [False]  # joins before any update
    bad = pa.schema([("k", pa.int64()), ("ts", pa.int64()), (FOUND, pa.float32())])
    with pytest.raises(ConfigError) as info:
        FeatureTable(key="k", timestamp="ts", columns=bad)
    assert str(info.value) == f"columns={bad!r}: {FOUND!r} is reserved"
    text = pa.schema([("k", pa.int64()), ("ts", pa.int64()), ("s", pa.string())])
    with pytest.raises(ConfigError) as info:
        FeatureTable(key="k", timestamp="ts", columns=text)
    assert str(info.value) == (
        f"columns={text!r}: feature column 's' has type string; need a numeric scalar or a "
        "list of numbers"
    )


@pytest.mark.parametrize("field", ["ttl", "retention"])
def test_timedeltas_need_an_arrow_timestamp_column(field: str) -> None:
    t = FeatureTable(key="k", timestamp="ts", **{field: datetime.timedelta(seconds=1)})  # type: ignore[arg-type]
    with pytest.raises(JoinError) as info:
        t.update(_rows("a", [1]))
    assert str(info.value) == (
        f"the first update fixes the schema, and then {field}=datetime.timedelta(seconds=1): "
        "a timedelta needs an Arrow timestamp column; give an int"
    )


def test_a_timedelta_retention_in_the_columns_unit() -> None:
    t = FeatureTable(key="k", timestamp="ts", retention=datetime.timedelta(seconds=1))
    ts = pa.array([0, 500, 1000, 3000], pa.timestamp("ms"))
    t.update(pa.table({"k": ["a"] * 4, "ts": ts, "v": [0.0, 0.5, 1.0, 3.0]}))
    # cutoff 3000 - 1000 ms: the rows after it and the newest at or before it (1000) are kept
    assert t.stats()["rows"] == 2 and t.stats()["rows_dropped"] == 2
