"""FeatureTable: construction, output contract, input types, timestamps, and bad input."""

from __future__ import annotations

import datetime
import importlib.util
import subprocess
import sys

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
import torch

from mmload.errors import ConfigError, JoinError, MissingDependencyError
from mmload.features import FOUND, FeatureTable


def table_and_rows() -> tuple[FeatureTable, pa.Table]:
    rows = pa.table(
        {
            "user": ["a", "b", "a"],
            "ts": pa.array([10, 20, 30], pa.int64()),
            "ctr": pa.array([0.5, 0.25, 0.75], pa.float64()),
            "clicks": pa.array([1, 2, 3], pa.int16()),
            "emb": pa.array([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]], pa.list_(pa.float32())),
            "flag": [True, False, True],
        }
    )
    t = FeatureTable(key="user", timestamp="ts")
    t.update(rows)
    return t, rows


def test_output_contract() -> None:
    t, _ = table_and_rows()
    assert t.column_names == ("clicks", "ctr", "emb", "flag")
    out = t.join(["a", "b", "zz", "a"], np.array([15, 5, 100, 30]))
    assert list(out) == ["clicks", "ctr", "emb", "flag", FOUND]
    assert out["ctr"].dtype == torch.float32 and out["ctr"].shape == (4,)
    assert out["clicks"].dtype == torch.int64 and out["flag"].dtype == torch.int64
    assert out["emb"].dtype == torch.float32 and out["emb"].shape == (4, 2)
    assert out[FOUND].dtype == torch.bool
    assert all(v.is_contiguous() and v.device.type == "cpu" for v in out.values())
    assert out[FOUND].tolist() == [True, False, False, True]
    assert out["ctr"].tolist() == [0.5, 0.0, 0.0, 0.75]
    assert out["clicks"].tolist() == [1, 0, 0, 3]
    assert out["emb"].tolist() == [[1, 2], [0, 0], [0, 0], [5, 6]]
    assert out["flag"].tolist() == [1, 0, 0, 1]


def test_empty_batch_and_tensor_queries() -> None:
    t = FeatureTable(key="k", timestamp="ts", defaults=-1)
    t.update({"k": [1, 2], "ts": [5, 5], "x": [1.0, 2.0], "v": [[1, 2, 3], [4, 5, 6]]})
    out = t.join([], np.zeros(0, np.int64))
    assert out["x"].shape == (0,) and out["v"].shape == (0, 3) and out[FOUND].shape == (0,)
    out = t.join(torch.tensor([2, 3]), torch.tensor([9, 9]))
    assert out["x"].tolist() == [2.0, -1.0] and out["v"].tolist() == [[4, 5, 6], [-1, -1, -1]]


def test_defaults_mapping_and_validation() -> None:
    t = FeatureTable(key="k", timestamp="ts", defaults={"x": float("nan"), "n": 7})
    t.update({"k": [1], "ts": [5], "x": [1.0], "n": [3]})
    out = t.join([1, 1], [4, 5])
    assert np.isnan(out["x"][0].item()) and out["x"][1].item() == 1.0
    assert out["n"].tolist() == [7, 3]
    bad = FeatureTable(key="k", timestamp="ts", defaults={"nope": 1})
    with pytest.raises(JoinError, match="nope"):
        bad.update({"k": [1], "ts": [5], "x": [1.0]})
    assert bad.stats()["rows"] == 0 and bad.layout is None
    with pytest.raises(JoinError, match="integer"):
        FeatureTable(key="k", timestamp="ts", defaults=0.5).update({"k": [1], "ts": [1], "n": [1]})


def test_schema_given_allows_join_before_first_update() -> None:
    schema = pa.schema(
        [
            ("k", pa.string()),
            ("ts", pa.timestamp("ms")),
            ("x", pa.float32()),
            ("v", pa.list_(pa.float64(), 4)),
        ]
    )
    t = FeatureTable(key="k", timestamp="ts", columns=schema, defaults=2)
    assert t.column_names == ("v", "x")
    out = t.join(["a"], np.array([0]))
    assert out["v"].tolist() == [[2, 2, 2, 2]] and out[FOUND].tolist() == [False]
    # A variable-length list in a schema is a list column: joined as a Jagged, [] if not found.
    lists = FeatureTable(
        key="k",
        timestamp="ts",
        columns=pa.schema([("k", pa.int64()), ("ts", pa.int64()), ("v", pa.list_(pa.float32()))]),
    )
    assert lists.join([1], [1])["v"].tolist() == [[]]
    with pytest.raises(ConfigError, match="list of numbers"):
        FeatureTable(
            key="k",
            timestamp="ts",
            columns=pa.schema(
                [("k", pa.int64()), ("ts", pa.int64()), ("v", pa.list_(pa.string()))]
            ),
        )
    with pytest.raises(JoinError, match="no schema yet"):
        FeatureTable(key="k", timestamp="ts").join([1], [1])


def test_picked_columns_ignore_others() -> None:
    t = FeatureTable(key="k", timestamp="ts", columns=["b"])
    assert t.column_names == ("b",)
    t.update({"k": [1], "ts": [1], "a": ["text is fine when not picked"], "b": [2.0]})
    assert list(t.join([1], [1])) == ["b", FOUND]


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"key": "", "timestamp": "ts"}, "key"),
        ({"key": "k", "timestamp": "k"}, "timestamp"),
        ({"key": "k", "timestamp": "ts", "duplicate": "max"}, "duplicate"),
        ({"key": "k", "timestamp": "ts", "ttl": -1}, "ttl"),
        ({"key": "k", "timestamp": "ts", "ttl": True}, "ttl"),
        ({"key": "k", "timestamp": "ts", "retention": 1.5}, "retention"),
        ({"key": "k", "timestamp": "ts", "columns": "x"}, "columns"),
        ({"key": "k", "timestamp": "ts", "columns": ["x", "k"]}, "columns"),
        ({"key": "k", "timestamp": "ts", "columns": [FOUND]}, "columns"),
        ({"key": "k", "timestamp": "ts", "defaults": "zero"}, "defaults"),
        ({"key": "k", "timestamp": "ts", "columns": pa.schema([("k", pa.int64())])}, "columns"),
    ],
)
def test_config_errors_name_the_field(kwargs: dict, field: str) -> None:
    with pytest.raises(ConfigError, match=f"^{field}="):
        FeatureTable(**kwargs)


def test_cuda_table_needs_cudf_here() -> None:
    if importlib.util.find_spec("cudf") is not None:
        pytest.skip("cudf is installed: the GPU tests cover device='cuda'")
    with pytest.raises(MissingDependencyError, match=r'pip install "mmload\[gpu\]"'):
        FeatureTable(key="k", timestamp="ts", device="cuda")


def test_input_types_pandas_batch_dict() -> None:
    t = FeatureTable(key="k", timestamp="ts")
    t.update(pd.DataFrame({"k": ["a", "b"], "ts": [1, 2], "x": [1.0, 2.0]}))
    t.update(pa.RecordBatch.from_pydict({"k": ["a"], "ts": [3], "x": [3.0]}))
    t.update({"k": ["b"], "ts": [4], "x": [4.0]})
    assert t.join(["a", "b"], [9, 9])["x"].tolist() == [3.0, 4.0]
    assert t.stats()["updates_applied"] == 3 and t.stats()["rows_ingested"] == 4
    with pytest.raises(JoinError, match=r"expected a pyarrow\.Table"):
        t.update([("a", 1, 1.0)])


def test_arrow_timestamps_units_and_timedelta_ttl() -> None:
    t = FeatureTable(key="k", timestamp="ts", ttl=datetime.timedelta(seconds=10))
    ms = pa.array([1_000, 20_000], pa.timestamp("ms", tz="UTC"))
    t.update({"k": [1, 1], "ts": ms, "x": [1.0, 2.0]})
    # a later update in another unit is converted to the table's unit (ms)
    t.update({"k": [2], "ts": pa.array([5_000_000], pa.timestamp("us")), "x": [3.0]})
    q = np.array([10_999, 11_001, 25_000, 5_000], "datetime64[ms]")
    out = t.join([1, 1, 1, 2], q)
    assert out[FOUND].tolist() == [True, False, True, True]  # 11.001 s - 1 s > ttl of 10 s
    assert out["x"].tolist() == [1.0, 0.0, 2.0, 3.0]
    assert t.join([1], np.array([20_000]))["x"].tolist() == [2.0]  # plain int64 in ms
    with pytest.raises(JoinError, match="without loss"):
        t.update({"k": [2], "ts": pa.array([5_000_001], pa.timestamp("us")), "x": [3.0]})
    with pytest.raises(JoinError, match="timestamp"):
        t.update({"k": [2], "ts": [5], "x": [3.0]})  # integers into a timestamp[ms] table
    ints = FeatureTable(key="k", timestamp="ts", ttl=datetime.timedelta(seconds=1))
    with pytest.raises(JoinError, match="ttl"):
        ints.update({"k": [1], "ts": [1], "x": [1.0]})


BAD_UPDATES = [
    ({"k": [1], "ts": [1]}, "missing column"),
    ({"k": [1], "ts": [1], "x": [1.0], "v": [[1.0, 2.0]], "extra": [1]}, "unexpected column"),
    ({"k": [1], "ts": [None], "x": [1.0], "v": [[1.0, 2.0]]}, "null"),
    ({"k": [1], "ts": [1.5], "x": [1.0], "v": [[1.0, 2.0]]}, "double"),
    ({"k": [1], "ts": ["yesterday"], "x": [1.0], "v": [[1.0, 2.0]]}, "string"),
    ({"k": [None], "ts": [1], "x": [1.0], "v": [[1.0, 2.0]]}, "null"),
    ({"k": ["a"], "ts": [1], "x": [1.0], "v": [[1.0, 2.0]]}, "integer keys"),
    ({"k": pa.array([2**63], pa.uint64()), "ts": [1], "x": [1.0], "v": [[1.0, 2.0]]}, "int64"),
    ({"k": [1], "ts": [1], "x": ["high"], "v": [[1.0, 2.0]]}, "'x'"),
    ({"k": [1], "ts": [1], "x": [1.0], "v": [[1.0, 2.0, 3.0]]}, "expected 2"),
    ({"k": [1], "ts": [1], "x": [1.0], "v": [1.0]}, "vector"),
    ({"k": [1], "ts": [1], "x": [[1.0]], "v": [[1.0, 2.0]]}, "scalar"),
    ({"k": [1], "ts": [1], "x": [1.0], "v": [[1.0, None]], "n": [1]}, "unexpected"),
]


def test_bad_updates_raise_and_change_nothing() -> None:
    t = FeatureTable(key="k", timestamp="ts")
    t.update({"k": [1, 2], "ts": [1, 1], "x": [1.0, 2.0], "v": [[1.0, 2.0], [3.0, 4.0]]})
    before = t.join([1, 2], [5, 5])
    snap = t.snapshot()
    for data, match in BAD_UPDATES:
        with pytest.raises(JoinError, match=match):
            t.update(data)
        assert t.snapshot() is snap
    after = t.join([1, 2], [5, 5])
    for name in before:
        torch.testing.assert_close(after[name], before[name], equal_nan=True)
    s = t.stats()
    assert s["update_errors"] == len(BAD_UPDATES) and s["updates_applied"] == 1
    assert [e["origin"] for e in s["errors"]] == ["update"] * len(BAD_UPDATES)
    assert "null" in s["errors"][2]["reason"]


def test_null_float_features_become_nan_and_int_nulls_are_errors() -> None:
    t = FeatureTable(key="k", timestamp="ts")
    t.update(
        {
            "k": [1, 2, 3],
            "ts": [1, 1, 1],
            "x": [None, 2.0, 3.0],
            "v": pa.array([[1.0, None], None, [5.0, 6.0]], pa.list_(pa.float32(), 2)),
            "n": [1, 2, 3],
        }
    )
    out = t.join([1, 2, 3], [1, 1, 1])
    assert np.isnan(out["x"][0].item()) and out["x"][1:].tolist() == [2.0, 3.0]
    v = out["v"].numpy()
    assert np.isnan(v[0, 1]) and np.isnan(v[1]).all() and v[2].tolist() == [5.0, 6.0]
    with pytest.raises(JoinError, match="null"):
        t.update({"k": [1], "ts": [2], "x": [1.0], "v": [[1.0, 2.0]], "n": [None]})
    with pytest.raises(JoinError, match="holds int"):
        t.update({"k": [1], "ts": [2], "x": [1.0], "v": [[1.0, 2.0]], "n": [1.5]})


def test_bad_queries() -> None:
    t, _ = table_and_rows()
    with pytest.raises(JoinError, match="string keys"):
        t.join([1, 2], [1, 2])
    with pytest.raises(JoinError, match="2 keys but 1 timestamps"):
        t.join(["a", "b"], [1])
    with pytest.raises(JoinError, match="float64"):
        t.join(["a"], np.array([1.5]))
    with pytest.raises(JoinError, match="integer times"):
        t.join(["a"], np.array(["2024-01-01"], "datetime64[ms]"))
    ints = FeatureTable(key="k", timestamp="ts")
    ints.update({"k": [1], "ts": [1], "x": [1.0]})
    with pytest.raises(JoinError, match="integer keys"):
        ints.join(["1"], [1])
    assert t.stats()["joins"] == 0  # failed joins are not counted


def test_empty_update_fixes_the_schema() -> None:
    t = FeatureTable(key="k", timestamp="ts")
    assert (
        t.update(
            pa.table(
                {
                    "k": pa.array([], pa.int64()),
                    "ts": pa.array([], pa.int64()),
                    "x": pa.array([], pa.float32()),
                }
            )
        )
        == 0
    )
    assert t.column_names == ("x",) and t.join([1], [1])[FOUND].tolist() == [False]


def test_stats_report_lag_and_counts() -> None:
    t, _ = table_and_rows()
    t.join(["a", "b"], [100, 50])
    s = t.stats()
    assert (s["newest_feature_ts"], s["newest_sample_ts"], s["feature_lag"]) == (30, 100, 70)
    assert (s["joins"], s["rows_joined"], s["rows"], s["string_keys"]) == (1, 2, 3, 2)
    assert s["device"] == "cpu" and s["sources"] == [] and s["update_errors"] == 0


def test_import_does_not_load_cudf_or_numba_cuda() -> None:
    code = (
        "import sys, numpy as np, mmload, mmload.features\n"
        "from mmload.features import FeatureTable, DirectorySource, FlightSource\n"
        "t = FeatureTable(key='k', timestamp='ts')\n"
        "t.update({'k': [1], 'ts': [1], 'x': [1.0]}); t.join([1], np.array([1])); t.compact()\n"
        "bad = [m for m in sys.modules if m.split('.')[0] in ('cudf', 'cupy')"
        " or m.startswith('numba.cuda')]\n"
        "assert not bad, bad\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
