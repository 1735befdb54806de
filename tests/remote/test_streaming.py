"""Training from remote shards through the Loader: manifest start-up, lazy bounded cache, the
partitioned plan's locality, faults mid-epoch, resume, changed objects and S3 (moto)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from mmload import Loader, RemoteConfig
from mmload.errors import ShardError
from tests.remote import servers
from tests.remote.servers import Drop, FileServer, PlainServer, Replace, Short, Stall, Status

range_server = servers.range_server
plain_server = servers.plain_server
moto_s3 = servers.moto_s3

FAST = {"read_timeout": 0.5, "connect_timeout": 1.0, "backoff": 0.01, "backoff_max": 0.05}
pytestmark = pytest.mark.timeout(120)


def _shards(make_shards: Any, root: Path, counts: list[int]) -> tuple[list[str], list[str]]:
    paths, keys = make_shards(counts, image=False)
    names = []
    for p in paths:
        shutil.copy(p, root / Path(p).name)
        names.append(Path(p).name)
    return names, keys


def _index(root: Path, names: list[str]) -> None:
    """``mmload index`` writes the manifest next to the shards (relative names)."""
    r = subprocess.run(
        [sys.executable, "-m", "mmload.cli", "index", *[str(root / n) for n in names]],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    assert (root / "mmload.index.json").exists()


def _pattern(base: str, names: list[str]) -> str:
    return f"{base}/data-{{0000..{len(names) - 1:04d}}}.tar"


def _epoch(loader: Loader, limit: int | None = None) -> list[str]:
    keys: list[str] = []
    for i, b in enumerate(loader):
        keys += b["__key__"]
        if limit is not None and i + 1 >= limit:
            break
    return keys


def _loader(src: str, tmp: Path, rank: int, world: int, **kw: Any) -> Loader:
    remote = kw.pop("remote", RemoteConfig(**FAST))
    return Loader(
        src,
        batch_size=kw.pop("batch_size", 8),
        rank=rank,
        world_size=world,
        fields=["cls"],
        cache_dir=tmp / f"cache-{rank}",
        remote=remote,
        **kw,
    )


def test_manifest_start_lazy_fetch_and_locality(
    make_shards: Any, range_server: FileServer, tmp_path: Path
) -> None:
    """With a manifest next to the shards the start reads it alone; each of 4 ranks fetches
    about its quarter of the shards, lazily, and the ranks see every sample exactly once."""
    names, keys = _shards(make_shards, range_server.root, [10] * 32)
    _index(range_server.root, names)
    src = _pattern(range_server.url, names)
    total = sum((range_server.root / n).stat().st_size for n in names)
    seen: list[str] = []
    for rank in range(4):
        before = len(range_server.log())
        with _loader(src, tmp_path, rank, 4, shuffle=True, partitions=4) as L:
            opened = range_server.log()[before:]
            assert [s.name for s in opened] == ["mmload.index.json"], "start reads the manifest"
            got = _epoch(L)
            st = L.stats()
        seen += got
        fetched = st["cache_fetched_bytes"]
        assert fetched <= 1.15 * total / 4 + 2 * total / 32, (rank, fetched, total)
        shard_gets = {s.name for s in range_server.log()[before:] if s.name.endswith(".tar")}
        assert len(shard_gets) <= 32 // 4 + 2
    assert sorted(seen) == sorted(keys), "exactly once across ranks"


def test_cache_limit_bounds_disk_and_evicts(
    make_shards: Any, range_server: FileServer, tmp_path: Path
) -> None:
    names, keys = _shards(make_shards, range_server.root, [12] * 24)
    _index(range_server.root, names)
    size = max((range_server.root / n).stat().st_size for n in names)
    limit = 6 * size
    cfg = RemoteConfig(cache_limit=limit, lookahead=2, **FAST)
    from mmload.config import ShuffleConfig

    with _loader(
        _pattern(range_server.url, names), tmp_path, 0, 1, remote=cfg, shuffle=ShuffleConfig(2)
    ) as L:
        got = _epoch(L)
        st = L.stats()
    assert sorted(got) == sorted(keys)
    assert st["cache_peak_bytes"] <= limit
    assert st["cache_evicted"] > 0, "24 shards through a 6-shard cache"
    left = [p for p in (tmp_path / "cache-0" / "shards").iterdir() if p.suffix == ".tar"]
    assert sum(p.stat().st_size for p in left) <= limit


def test_plain_http_server_without_manifest_or_range(
    make_shards: Any, plain_server: PlainServer, tmp_path: Path
) -> None:
    """``python -m http.server``: no Range, no manifest (404): indexed by streaming each shard
    once, then read from the cache; a second run starts from the cached manifest."""
    names, keys = _shards(make_shards, plain_server.root, [7, 9, 5])
    src = _pattern(plain_server.url, names)
    with _loader(src, tmp_path, 0, 1, shuffle=True) as L:
        assert sorted(_epoch(L)) == sorted(keys)
        assert L.stats()["cache_fetches"] == 3
    with _loader(src, tmp_path, 0, 1, shuffle=True) as L:
        assert sorted(_epoch(L)) == sorted(keys)
        assert L.stats()["cache_fetches"] == 0, "the cached copies are reused"


def test_faults_mid_epoch_are_retried_and_exact(
    make_shards: Any, range_server: FileServer, tmp_path: Path
) -> None:
    names, keys = _shards(make_shards, range_server.root, [10] * 8)
    _index(range_server.root, names)
    faults = [Drop(300), Status(503), Short(1000), Stall(200, 2.0), Status(500)]
    for name, fault in zip(names, faults, strict=False):
        range_server.script(name, fault)
    with _loader(_pattern(range_server.url, names), tmp_path, 0, 1, shuffle=True) as L:
        assert sorted(_epoch(L)) == sorted(keys)
    for name in names[:5]:
        assert len([s for s in range_server.log(name) if s.method == "GET"]) >= 2


def test_retry_budget_then_clear_error_or_counted_skip(
    make_shards: Any, range_server: FileServer, tmp_path: Path
) -> None:
    names, keys = _shards(make_shards, range_server.root, [10] * 4)
    _index(range_server.root, names)
    src = _pattern(range_server.url, names)
    cfg = RemoteConfig(retries=2, **FAST)
    range_server.script(names[2], *[Status(503)] * 100)
    with _loader(src, tmp_path, 0, 1, remote=cfg) as L, pytest.raises(ShardError) as e:
        _epoch(L)
    assert names[2] in str(e.value) and "attempt" in str(e.value)
    cached = tmp_path / "cache-0" / "shards"
    assert list(cached.glob("*" + names[2])) == [], "a failed shard never enters the cache"
    assert list(cached.glob(".fetch-*")) == [], "nor does a partial download"
    range_server.script(names[2], *[Status(503)] * 100)
    with _loader(
        src, tmp_path / "skip", 0, 1, remote=cfg, on_error="skip", max_bad_samples=10
    ) as L:
        got = _epoch(L)
        st = L.stats()
    assert len(got) == 40, "batch shapes never change: bad samples are replaced"
    assert set(got) <= set(keys)
    assert not any(k.startswith("s002_") for k in got)
    assert st["bad_samples"] == 10
    assert all(names[2] in b["shard"] for b in st["bad"])


def test_resume_mid_epoch_over_remote_shards(
    make_shards: Any, range_server: FileServer, tmp_path: Path
) -> None:
    names, keys = _shards(make_shards, range_server.root, [9, 11, 10, 10, 8, 12])
    _index(range_server.root, names)
    src = _pattern(range_server.url, names)
    consumed: list[str] = []
    state: dict[str, int] = {}
    for rank in range(2):
        with _loader(src, tmp_path, rank, 2, shuffle=True, batch_size=5, partitions=2) as L:
            consumed += _epoch(L, limit=3)
            state = L.state_dict()
    rest: list[str] = []
    for rank in range(2):
        with _loader(
            src, tmp_path / "again", rank, 2, shuffle=True, batch_size=5, partitions=2
        ) as L:
            L.load_state_dict(state)
            rest += _epoch(L)
            padded = L.stats()["samples_padded"]
    seen = Counter(consumed + rest)
    assert set(seen) == set(keys)
    assert sum(seen.values()) - len(keys) == padded


def test_changed_remote_shard_is_detected(
    make_shards: Any, range_server: FileServer, tmp_path: Path
) -> None:
    """A shard rewritten after the manifest was made: a manifest of the remote objects has
    their ETags (checked at fetch); one made from local files before the upload has sizes
    and member-table digests (checked when the fetched copy is indexed)."""
    names, _ = _shards(make_shards, range_server.root, [6, 6, 7])
    src = _pattern(range_server.url, names)
    out = tmp_path / "remote-manifest" / "mmload.index.json"
    r = subprocess.run(
        [sys.executable, "-m", "mmload.cli", "index", src, "--output", str(out),
         "--cache-dir", str(tmp_path / "ic")],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    longer = (range_server.root / names[2]).read_bytes()
    range_server.script(names[1], Replace(longer))  # a new ETag and size
    with (
        _loader(str(out), tmp_path, 0, 1) as L,
        pytest.raises(ShardError, match="changed") as e,
    ):
        _epoch(L)
    assert names[1] in str(e.value)
    # Same size, other keys, manifest from the local files: the member table tells.
    _index(range_server.root, names)
    other, _ = make_shards([3, 6], name="other", image=False)
    assert Path(other[1]).stat().st_size == (range_server.root / names[0]).stat().st_size
    shutil.copy(other[1], range_server.root / names[0])
    with (
        _loader(src, tmp_path / "second", 0, 1) as L,
        pytest.raises(ShardError, match="member table") as e,
    ):
        _epoch(L)
    assert names[0] in str(e.value)


def test_s3_with_manifest(make_shards: Any, moto_s3: Any, tmp_path: Path) -> None:
    root = tmp_path / "local"
    root.mkdir()
    names, keys = _shards(make_shards, root, [8, 5, 9, 6])
    _index(root, names)
    for n in [*names, "mmload.index.json"]:
        moto_s3.upload_file(str(root / n), "remote", f"wds/{n}")
    src = "s3://remote/wds/data-{0000..0003}.tar"
    seen: list[str] = []
    for rank in range(2):
        with _loader(src, tmp_path, rank, 2, shuffle=True, partitions=2, batch_size=4) as L:
            got = _epoch(L)
            padded = L.stats()["samples_padded"]
        seen += got
    c = Counter(seen)
    assert set(c) == set(keys)
    assert sum(c.values()) - len(keys) == padded


def test_dataloader_workers_share_one_fetch_per_shard(
    make_shards: Any, range_server: FileServer, tmp_path: Path
) -> None:
    """Two DataLoader worker processes of one rank read the same shards through one node
    cache: each shard is fetched from the server once, and the batches are exact."""
    import torch

    from mmload import IterableDataset

    names, keys = _shards(make_shards, range_server.root, [10] * 12)
    _index(range_server.root, names)
    ds = IterableDataset(
        _pattern(range_server.url, names),
        batch_size=4,
        fields=["cls"],
        shuffle=True,
        cache_dir=tmp_path / "node",
        remote=RemoteConfig(**FAST),
        rank=0,
        world_size=1,
    )
    loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=2)
    got = [k for b in loader for k in b["__key__"]]
    assert sorted(got) == sorted(keys)
    gets = Counter(s.name for s in range_server.log() if s.method == "GET")
    assert {n: gets[n] for n in names} == dict.fromkeys(names, 1), "one GET per shard per node"
    st = ds.stats()  # the workers' cache counters, merged
    assert st["cache_fetches"] == 12
    assert st["cache_fetched_bytes"] == sum((range_server.root / n).stat().st_size for n in names)


def test_cache_limit_below_the_working_set_fails_at_once(
    make_shards: Any, range_server: FileServer, tmp_path: Path
) -> None:
    """A cache that cannot hold the shards one batch needs is a clear error at the start of the
    epoch, not a wait."""
    import time

    from mmload.errors import ConfigError

    names, _ = _shards(make_shards, range_server.root, [10] * 8)
    _index(range_server.root, names)
    size = (range_server.root / names[0]).stat().st_size
    cfg = RemoteConfig(cache_limit=3 * size, **FAST)  # one group holds all 8 shards
    t0 = time.monotonic()
    with (
        _loader(_pattern(range_server.url, names), tmp_path, 0, 1, shuffle=True, remote=cfg) as L,
        pytest.raises(ConfigError, match="smaller than the shards this process reads at once"),
    ):
        _epoch(L)
    assert time.monotonic() - t0 < 10


def test_loader_worker_processes_over_remote_shards(
    make_shards: Any, range_server: FileServer, tmp_path: Path
) -> None:
    """Loader(workers=2) over HTTP shards: the batches of workers=0, each shard fetched once
    through the node cache the processes share, and the workers' fetches in stats()."""
    names, keys = _shards(make_shards, range_server.root, [10] * 12)
    _index(range_server.root, names)
    src = _pattern(range_server.url, names)
    want = _epoch(_loader(src, tmp_path / "a", 0, 1, shuffle=True))
    first = len(range_server.log())  # the in-process run's requests (its own cache)
    with _loader(src, tmp_path / "b", 0, 1, shuffle=True, workers=2) as ld:
        got = _epoch(ld)
        st = ld.stats()
    assert got == want and sorted(got) == sorted(keys)
    gets = Counter(s.name for s in range_server.log()[first:] if s.method == "GET")
    assert {n: gets[n] for n in names} == dict.fromkeys(names, 1), "one GET per shard per node"
    assert st["cache_fetches"] == 12
    assert st["cache_fetched_bytes"] == sum((range_server.root / n).stat().st_size for n in names)
    assert 0 < st["cache_peak_bytes"] <= st["cache_fetched_bytes"]


@pytest.mark.parametrize("shuffle", [False, True])
def test_more_ranks_than_samples(
    make_shards: Any, range_server: FileServer, tmp_path: Path, shuffle: bool
) -> None:
    """3 remote samples, 4 ranks: the last rank's partition is empty (the plan's pieces of a
    partition past the data were an IndexError); every rank takes one step, the samples are
    seen once and the rest is counted padding."""
    names, keys = _shards(make_shards, range_server.root, [3])
    src = _pattern(range_server.url, names)
    seen: list[str] = []
    for rank in range(4):
        with _loader(src, tmp_path, rank, 4, batch_size=1, shuffle=shuffle) as L:
            got = _epoch(L)
            assert L.stats()["samples_padded"] == 1  # the epoch's padding, known to every rank
        assert len(got) == 1, (rank, got)
        seen += got
    assert sorted(seen[:3]) == sorted(keys) and seen[3] in keys
