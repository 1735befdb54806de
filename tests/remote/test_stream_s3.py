"""StreamLoader over an object-store prefix (moto's S3 server on loopback): objects appear
whole when uploaded, are cut into windows by rank 0, read through the remote shard cache,
exactly once across a restart while more objects arrive."""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

import mmload
from mmload.errors import ConfigError
from mmload.sources.growing import list_committed
from mmload.sources.write import write_parquet
from tests.remote import servers
from tests.streams import drain

moto_s3 = servers.moto_s3


def _put(client: Any, tmp: Path, key: str, part: int, n: int) -> None:
    local = write_parquet(
        [{"__key__": f"s{part:03d}-{i:03d}", "x": part * 100 + i} for i in range(n)],
        str(tmp / f"up-{part}.parquet"),
    )
    client.upload_file(local, "remote", key)
    os.unlink(local)


def test_s3_prefix_stream_exactly_once_across_a_restart(moto_s3: Any, tmp_path: Path) -> None:
    for p in range(3):
        _put(moto_s3, tmp_path, f"events/2026-12-06--03/part-{p}.parquet", p, 7)
    moto_s3.put_object(Bucket="remote", Key="events/_SUCCESS", Body=b"")
    moto_s3.put_object(Bucket="remote", Key="events/notes.txt", Body=b"x")
    got = [f.path for f in list_committed("s3://remote/events")]
    assert sorted(got) == [f"2026-12-06--03/part-{p}.parquet" for p in range(3)]
    kw: dict[str, Any] = dict(
        batch_size=4,
        ledger=tmp_path / "ledger",
        cache_dir=tmp_path / "cache",
        poll_s=0.05,
        max_wait_s=0.5,
        window_files=2,
    )
    with mmload.StreamLoader("s3://remote/events", **kw) as sl:
        it = iter(sl)
        head = [next(it) for _ in range(2)]
        state = sl.state_dict()
    for p in range(3, 5):  # arriving while the trainer is down
        _put(moto_s3, tmp_path, f"events/2026-12-06--04/part-{p}.parquet", p, 7)
    with mmload.StreamLoader("s3://remote/events", **kw) as sl:
        sl.load_state_dict(state)
        rest = drain(sl)
    keys = Counter(k for b in head + rest for k in b["__key__"])
    assert keys == Counter(f"s{p:03d}-{i:03d}" for p in range(5) for i in range(7))


def test_object_store_prefix_needs_a_ledger() -> None:
    with pytest.raises(ConfigError, match="needs ledger="):
        mmload.StreamLoader("s3://remote/events", batch_size=2)
    with pytest.raises(ConfigError, match="fsspec URL"):
        mmload.StreamLoader("nosuchproto://x/y", batch_size=2, ledger="/tmp/unused-ledger")
