"""Variable-length list feature columns (declared ``pa.list_`` in the table's schema): the
as-of join returns each query's row as a ``Jagged``, checked against a brute-force as-of
search over every update in arrival order; rows dropped by retention release their lists."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

import mmload
from mmload import FeatureTable, Jagged
from mmload.features.schema import FOUND

SCHEMA = pa.schema(
    [
        ("user", pa.int64()),
        ("ts", pa.int64()),
        ("ctr", pa.float32()),
        ("hist", pa.list_(pa.int64())),
        ("w", pa.list_(pa.float32())),
    ]
)


def _update(rng: np.random.Generator, n: int, t0: int) -> dict[str, list]:
    users = rng.integers(0, 6, n).tolist()
    ts = (t0 + rng.integers(0, 50, n)).tolist()
    hist = [
        None if rng.random() < 0.1 else rng.integers(0, 1000, rng.integers(0, 6)).tolist()
        for _ in range(n)
    ]
    w = [[float(x) / 4 for x in rng.integers(0, 9, rng.integers(0, 3))] for _ in range(n)]
    return {"user": users, "ts": ts, "ctr": rng.random(n).tolist(), "hist": hist, "w": w}


def test_list_columns_join_as_of_like_a_brute_force_search() -> None:
    rng = np.random.default_rng(0)
    table = FeatureTable(key="user", timestamp="ts", columns=SCHEMA)
    history: list[tuple[int, int, list[int] | None, list[float]]] = []
    for u in range(5):  # several runs, overlapping times: merges and newer-arrival ties
        up = _update(rng, 30, 20 * u)
        table.update(pa.table(up, schema=SCHEMA))
        history += list(zip(up["user"], up["ts"], up["hist"], up["w"], strict=True))
        q_keys = rng.integers(0, 7, 50)  # key 6 is never in the table
        q_ts = rng.integers(0, 20 * u + 60, 50)
        out = table.join(q_keys.tolist(), q_ts)
        assert isinstance(out["hist"], Jagged) and out["hist"].dtype == torch.int64
        assert isinstance(out["w"], Jagged) and out["w"].dtype == torch.float32
        for i, (k, t) in enumerate(zip(q_keys.tolist(), q_ts.tolist(), strict=True)):
            best = None
            for j, (hk, ht, _, _) in enumerate(history):  # newest ts <= t; later arrival wins
                if hk == k and ht <= t and (best is None or ht >= history[best][1]):
                    best = j
            assert bool(out[FOUND][i]) == (best is not None)
            want_h = [] if best is None or history[best][2] is None else history[best][2]
            want_w = [] if best is None else history[best][3]
            assert out["hist"][i].tolist() == want_h, (k, t)
            assert out["w"][i].tolist() == want_w


def test_retention_releases_list_rows_and_defaults_are_refused() -> None:
    table = FeatureTable(key="user", timestamp="ts", columns=SCHEMA, retention=10)
    for t in range(0, 200, 10):
        table.update(
            pa.table(
                {
                    "user": [1, 2],
                    "ts": [t, t],
                    "ctr": [0.5, 0.5],
                    "hist": [[t], [t, t]],
                    "w": [[], [1.0]],
                },
                schema=SCHEMA,
            )
        )
    table.compact()
    store = table.snapshot().lists
    # only the chunks of ts 180 (each key's newest row at the cutoff) and 190 are left; ids
    # are never reused
    assert [c.base for c in store.chunks] == [36, 38] and store.rows == 4
    assert store.next_id == 40
    out = table.join([1, 2, 1], [195, 195, 185])
    assert out["hist"].tolist() == [[190], [190, 190], [180]]
    with pytest.raises(mmload.ConfigError, match="default is"):
        FeatureTable(key="user", timestamp="ts", columns=SCHEMA, defaults={"hist": 1})
    with pytest.raises(mmload.JoinError, match="null element"):
        table.update(
            pa.table(
                {"user": [1], "ts": [300], "ctr": [0.1], "hist": [[1, None]], "w": [[]]},
                schema=SCHEMA,
            )
        )
    inferred = FeatureTable(key="user", timestamp="ts")  # no schema: a list is a vector...
    with pytest.raises(mmload.JoinError, match=r"pa\.list_"):  # ...and the error says what to do
        inferred.update({"user": [1, 2], "ts": [1, 1], "v": [[1.0], [1.0, 2.0]]})


def test_loader_batches_carry_the_joined_lists(tmp_path: Path) -> None:
    ev = tmp_path / "events.parquet"
    pq.write_table(
        pa.table(
            {
                "__key__": [f"e{i}" for i in range(12)],
                "user": [i % 3 for i in range(12)],
                "event_ts": list(range(100, 112)),
            }
        ),
        ev,
    )
    table = FeatureTable(key="user", timestamp="ts", columns=SCHEMA)
    table.update(
        pa.table(
            {
                "user": [0, 1],
                "ts": [0, 0],
                "ctr": [0.1, 0.2],
                "hist": [[5, 6, 7], []],
                "w": [[0.5], None],
            },
            schema=SCHEMA,
        )
    )
    fj = mmload.FeatureJoin(table, key="user", timestamp="event_ts")
    with mmload.Loader(str(ev), batch_size=6, features=fj) as ld:
        got = {
            k: (b["hist"][j].tolist(), b["w"][j].tolist(), bool(b[FOUND][j]))
            for b in ld
            for j, k in enumerate(b["__key__"])
        }
    want = {0: ([5, 6, 7], [0.5], True), 1: ([], [], True), 2: ([], [], False)}
    assert got == {f"e{i}": want[i % 3] for i in range(12)}
