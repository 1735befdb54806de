"""Random feature updates, and the pandas ``merge_asof`` oracle of the as-of join."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import torch


def random_update(
    rng: np.random.Generator, first_id: int, n: int, keys: list[Any], ts_max: int
) -> pa.Table:
    """n rows in random order; row id i is encoded in every feature (x = i, c = 7 i + 1,
    v = [i, -i, i / 2]) so a joined row can be identified exactly."""
    ids = np.arange(first_id, first_id + n)
    k = [keys[j] for j in rng.integers(0, len(keys), n)]
    ts = rng.integers(0, ts_max, n)
    vec = np.stack([ids, -ids, ids / 2], axis=1).astype(np.float32)
    return pa.table(
        {
            "k": pa.array(k, pa.string() if isinstance(keys[0], str) else pa.int64()),
            "ts": pa.array(ts, pa.int64()),
            "x": pa.array(ids.astype(np.float64)),
            "c": pa.array(ids * 7 + 1, pa.int32()),
            "v": pa.FixedSizeListArray.from_arrays(pa.array(vec.reshape(-1)), 3),
        }
    )


def oracle(
    updates: list[pa.Table],
    q_keys: list[Any],
    q_ts: np.ndarray,
    *,
    ttl: int | None = None,
    duplicate: str = "last",
) -> dict[str, np.ndarray]:
    """What the join must return: pandas.merge_asof(by=key, direction="backward",
    allow_exact_matches=True, tolerance=ttl) over all updates in arrival order. Rows with equal
    (key, ts) stay in arrival order (stable sort), so merge_asof picks the last one; for
    duplicate="first" the later ones are dropped first."""
    right = pd.concat([u.select(["k", "ts", "x"]).to_pandas() for u in updates], ignore_index=True)
    right["ts"] = right["ts"].astype("int64")
    if duplicate == "first":
        right = right.drop_duplicates(["k", "ts"], keep="first")
    right = right.sort_values("ts", kind="stable").rename(columns={"x": "row"})
    left = pd.DataFrame({"k": q_keys, "ts": np.asarray(q_ts, np.int64), "q": range(len(q_ts))})
    if len(right) and right["k"].dtype != left["k"].dtype:
        left["k"] = left["k"].astype(right["k"].dtype)
    left = left.sort_values("ts", kind="stable")
    merged = pd.merge_asof(
        left,
        right,
        on="ts",
        by="k",
        direction="backward",
        allow_exact_matches=True,
        tolerance=ttl,
    ).sort_values("q")
    row = merged["row"].to_numpy(dtype=np.float64)
    found = ~np.isnan(row)
    return {"found": found, "row": np.where(found, row, -1).astype(np.int64)}


def check_join(
    out: dict[str, torch.Tensor], want: dict[str, np.ndarray], default: float = 0
) -> None:
    """Every feature of ``out`` encodes the row id the oracle expects (defaults where missing)."""
    found = want["found"]
    assert list(out) == ["c", "v", "x", "__features_found__"]
    np.testing.assert_array_equal(out["__features_found__"].cpu().numpy(), found)
    row = want["row"]
    x = np.where(found, row, default).astype(np.float32)
    np.testing.assert_array_equal(out["x"].cpu().numpy(), x)
    np.testing.assert_array_equal(out["c"].cpu().numpy(), np.where(found, row * 7 + 1, default))
    v = np.where(found[:, None], np.stack([row, -row, row / 2], axis=1), default)
    np.testing.assert_array_equal(out["v"].cpu().numpy(), v.astype(np.float32))
