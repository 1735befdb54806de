"""Loader(features=...): point-in-time feature joins in every batch, while features keep arriving."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
import torch
import webdataset as wds

from mmload import ConfigError, DecodeError, FeatureJoin, FeatureTable, ImageConfig, Loader

T0 = 1_000_000


def _shards(
    tmp_path: Path, n: int, jpegs: list[bytes], bad: dict[int, dict[str, object]] | None = None
) -> list[str]:
    paths = []
    for s in range(2):
        p = str(tmp_path / f"f-{s}.tar")
        with wds.TarWriter(p) as w:
            for i in range(s * n // 2, (s + 1) * n // 2):
                meta = {"ts": T0 + 10 * i, "user_id": i % 7}
                meta.update((bad or {}).get(i, {}))
                w.write(
                    {
                        "__key__": f"k{i:04d}",
                        "jpg": jpegs[i % len(jpegs)],
                        "json": json.dumps(meta).encode(),
                    }
                )
        paths.append(p)
    return paths


def _table(rows: int, seed: int = 0) -> tuple[FeatureTable, pd.DataFrame]:
    rng = np.random.default_rng(seed)
    df = pd.DataFrame(
        {
            "user_id": rng.integers(0, 6, rows).astype(np.int64),  # user 6 has no features
            "ts": (T0 + rng.integers(-50, 400, rows)).astype(np.int64),
            "clicks": rng.integers(0, 1000, rows).astype(np.int64),
            "score": rng.random(rows).astype(np.float32),
        }
    )
    t = FeatureTable(key="user_id", timestamp="ts")
    t.update(pa.Table.from_pandas(df, preserve_index=False))
    return t, df


def test_batches_carry_point_in_time_features(tmp_path: Path, jpegs: list[bytes]) -> None:
    table, df = _table(300)
    paths = _shards(tmp_path, 24, jpegs)
    with Loader(
        paths,
        batch_size=8,
        image=ImageConfig(size=16),
        shuffle=True,
        seed=1,
        cache_dir=tmp_path / "c",
        features=FeatureJoin(table, key="json.user_id", timestamp="json.ts"),
    ) as L:
        batches = list(L)
        stats = L.stats()
    b = batches[0]
    assert list(b)[-3:] == ["clicks", "score", "__features_found__"]
    assert b["clicks"].dtype == torch.int64 and b["score"].dtype == torch.float32
    assert b["__features_found__"].dtype == torch.bool and b["clicks"].shape == (8,)
    # Every joined row equals pandas.merge_asof on the same data.
    queries = pd.DataFrame(
        {
            "key": [k for bb in batches for k in bb["__key__"]],
            "ts": [j["ts"] for bb in batches for j in bb["json"]],
            "user_id": [j["user_id"] for bb in batches for j in bb["json"]],
        }
    )
    # FeatureTable's documented rule: among duplicate (user, ts) rows the last written wins.
    df = df.drop_duplicates(["user_id", "ts"], keep="last")
    ref = (
        pd.merge_asof(
            queries.sort_values("ts"),
            df.sort_values("ts"),
            on="ts",
            by="user_id",
            direction="backward",
            allow_exact_matches=True,
        )
        .set_index("key")
        .loc[queries["key"]]
    )
    found = torch.cat([bb["__features_found__"] for bb in batches]).numpy()
    assert found.any() and not found.all(), "the data must exercise both found and missing rows"
    assert np.array_equal(found, ref["clicks"].notna().to_numpy())
    clicks = torch.cat([bb["clicks"] for bb in batches]).numpy()
    assert np.array_equal(clicks[found], ref["clicks"].to_numpy()[found].astype(np.int64))
    assert (clicks[~found] == 0).all()
    assert stats["seconds"]["join"] > 0


def test_hidden_key_field_and_parquet_columns(tmp_path: Path, jpegs: list[bytes]) -> None:
    table, _ = _table(100)
    paths = _shards(tmp_path, 8, jpegs)
    with Loader(
        paths,
        batch_size=4,
        fields=["jpg"],
        image=ImageConfig(size=16),
        cache_dir=tmp_path / "c",
        features=FeatureJoin(table, key="json.user_id", timestamp="json.ts"),
    ) as L:
        b = next(iter(L))
    assert list(b) == ["__key__", "jpg", "clicks", "score", "__features_found__"]
    from mmload.sources.write import write_parquet

    p = write_parquet(
        [{"__key__": f"r{i}", "uid": i % 8, "when": T0 + 100 + i} for i in range(6)],
        str(tmp_path / "q.parquet"),
    )
    with Loader(
        [p],
        batch_size=6,
        cache_dir=tmp_path / "c",
        features=FeatureJoin(table, key="uid", timestamp="when"),
    ) as L:
        b = next(iter(L))
    direct = table.join(np.arange(6) % 8, T0 + 100 + np.arange(6))
    assert torch.equal(b["clicks"], direct["clicks"])


def test_bad_key_or_timestamp_is_a_bad_sample(tmp_path: Path, jpegs: list[bytes]) -> None:
    table, _ = _table(50)
    paths = _shards(tmp_path, 8, jpegs, bad={2: {"ts": "yesterday"}, 5: {"user_id": None}})
    fj = FeatureJoin(table, key="json.user_id", timestamp="json.ts")
    with (
        Loader(
            paths, batch_size=4, image=ImageConfig(size=16), features=fj, cache_dir=tmp_path / "c"
        ) as L,
        pytest.raises(DecodeError, match=r"json\.ts is 'yesterday'") as e,
    ):
        list(L)
    assert e.value.key == "k0002"
    with Loader(
        paths,
        batch_size=4,
        image=ImageConfig(size=16),
        features=fj,
        on_error="skip",
        max_bad_samples=2,
        cache_dir=tmp_path / "c",
    ) as L:
        keys = [k for b in L for k in b["__key__"]]
        assert {x["key"] for x in L.stats()["bad"]} == {"k0002", "k0005"}
    assert "k0002" not in keys and len(keys) == 8


def test_config_errors(tmp_path: Path, jpegs: list[bytes]) -> None:
    table, _ = _table(10)
    paths = _shards(tmp_path, 4, jpegs)
    with pytest.raises(ConfigError, match="no field"):
        Loader(
            paths,
            batch_size=2,
            cache_dir=tmp_path / "c",
            features=FeatureJoin(table, "meta.user", "json.ts"),
        )
    with pytest.raises(ConfigError, match="jpg"):
        Loader(
            paths,
            batch_size=2,
            cache_dir=tmp_path / "c",
            features=FeatureJoin(table, "jpg", "json.ts"),
        )
    with pytest.raises(ConfigError, match="FeatureTable"):
        FeatureJoin(object(), "json.user_id", "json.ts")
    clash = FeatureTable(key="user_id", timestamp="ts")
    clash.update(pa.table({"user_id": [1], "ts": [T0], "jpg": [1.0]}))
    with pytest.raises(ConfigError, match="clash"):
        Loader(
            paths,
            batch_size=2,
            cache_dir=tmp_path / "c",
            features=FeatureJoin(clash, "json.user_id", "json.ts"),
        )


def test_no_future_feature_reaches_a_batch_while_a_producer_writes(
    tmp_path: Path, jpegs: list[bytes]
) -> None:
    """A producer appends rows whose value is their own timestamp, far into the samples' future,
    while the loader runs several epochs; every joined value must be <= its sample's time."""
    table = FeatureTable(key="user_id", timestamp="ts", ttl=300)
    table.update(
        pa.table(
            {
                "user_id": np.arange(7, dtype=np.int64),
                "ts": np.full(7, T0 - 1000, np.int64),
                "feature_ts": np.full(7, T0 - 1000, np.int64),
            }
        )
    )
    paths = _shards(tmp_path, 40, jpegs)
    stop = threading.Event()
    written = [0]

    def produce() -> None:
        rng = np.random.default_rng(0)
        t = T0 - 200
        while not stop.is_set() and t < T0 + 5000:
            ts = t + rng.integers(
                -50, 50, 16
            )  # unsorted, overlapping, often in the samples' future
            users = rng.integers(0, 7, 16)
            table.update(
                pa.table(
                    {
                        "user_id": users.astype(np.int64),
                        "ts": ts.astype(np.int64),
                        "feature_ts": ts.astype(np.int64),
                    }
                )
            )
            written[0] += 16
            t += 7

    producer = threading.Thread(target=produce, daemon=True)
    producer.start()
    checked = found_total = 0
    try:
        with Loader(
            paths,
            batch_size=8,
            image=ImageConfig(size=16),
            shuffle=True,
            cache_dir=tmp_path / "c",
            features=FeatureJoin(table, key="json.user_id", timestamp="json.ts"),
        ) as L:
            # Epochs until the producer has written 100+ rows while the joins ran (at least 3):
            # the joins and the updates overlap however the machine schedules the threads.
            epochs, deadline = 0, time.monotonic() + 120
            while epochs < 3 or (written[0] <= 100 and time.monotonic() < deadline):
                epochs += 1
                for b in L:
                    sample_ts = torch.tensor([j["ts"] for j in b["json"]])
                    found = b["__features_found__"]
                    assert (b["feature_ts"][found] <= sample_ts[found]).all(), (
                        "a feature from the future"
                    )
                    assert (sample_ts[found] - b["feature_ts"][found] <= 300).all(), (
                        "older than ttl"
                    )
                    checked += len(found)
                    found_total += int(found.sum())
    finally:
        stop.set()
        producer.join(timeout=30)
    assert written[0] > 100 and checked == 40 * epochs and found_total > 0
    assert table.stats()["joins"] >= 15
