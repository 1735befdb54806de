"""Streaming at scale, simulated in one process: R ranks x W workers over S remote shards.

Every (rank, worker) is its own ``Dataset`` over the same loopback HTTP server, as separate
processes would be; the workers of a rank share one cache directory (a node) with a
``cache_limit``, run concurrently in threads, and read their batches through the real read
path (plan -> shard needs -> look-ahead fetch -> pread). Printed per rank: bytes fetched vs its
share (data set / ranks), peak cache bytes vs ``cache_limit``, bytes fetched before the first
batch, and at the end whether every sample was read exactly once across all ranks x workers.

    python benchmarks/remote_scale.py [--shards 1024 --ranks 16 --workers 2]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import Report
from loopback import LoopbackServer


def write_shards(root: Path, shards: int, per_shard: int, sample_bytes: int) -> list[str]:
    import io
    import tarfile

    rng = np.random.default_rng(0)
    names = []
    for s in range(shards):
        name = f"data-{s:05d}.tar"
        with tarfile.open(root / name, "w", format=tarfile.USTAR_FORMAT) as t:
            for i in range(per_shard):
                key = f"{s:05d}_{i:04d}"
                for ext, data in (
                    ("bin", rng.bytes(sample_bytes)),
                    ("cls", str((s * per_shard + i) % 10).encode()),
                ):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    t.addfile(info, io.BytesIO(data))
        names.append(name)
    return names


@dataclass
class _Run:
    url: str
    cfg: Any
    seed: int
    shuffle: Any
    partitions: int
    batch: int
    ranks: int
    workers: int


@dataclass
class _Node:
    """One rank's node: its cache directory and its workers' progress (DataLoader's
    back-pressure) and results."""

    dir: Path
    workers: int
    gate: threading.Condition = field(default_factory=threading.Condition)
    progress: list[int] = field(default_factory=list)
    results: list[dict[str, Any]] = field(default_factory=list)
    errors: list[BaseException] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.progress = [0] * self.workers
        self.results = [{} for _ in range(self.workers)]


def _work(c: _Run, node: _Node, rank: int, w: int) -> None:
    """Worker ``w`` of ``rank``: its own Dataset (as a DataLoader worker process has), the read
    path of every one of its batches."""
    from mmload.pipeline import remote_needs
    from mmload.plan import EpochOrder, Schedule, World
    from mmload.sources import Dataset

    try:
        ds = Dataset.open(c.url, cache_dir=node.dir, remote=c.cfg, key_column="__key__")
        order = EpochOrder(
            ds.chunk_counts,
            seed=c.seed,
            epoch=0,
            shuffle=c.shuffle,
            partitions=c.partitions,
            chunk_shard=ds.chunk_shard,
        )
        sched = Schedule(ds.num_samples, batch_size=c.batch, world_size=c.ranks)
        world = World(rank, c.ranks, w, c.workers)
        ds.expect(remote_needs(ds, order, sched, world), skew=2 * c.workers)
        ids_seen: list[np.ndarray] = []
        first_bytes = None
        peak = 0
        t1 = time.perf_counter()
        first_s = None
        for k in sched.worker_batches(world):
            # DataLoader's back-pressure: a worker is at most prefetch_factor (2)
            # rounds ahead of the slowest (the trainer takes them in turn).
            with node.gate:
                node.progress[w] = k
                node.gate.notify_all()
                while k - min(node.progress) > 2 * c.workers:
                    node.gate.wait(0.05)
            ds.advance(k)
            pos = sched.positions(rank, k)
            ids = order[pos]
            got = ds.read(ids, {"cls"})
            bad = [g for g in got if not isinstance(g, dict)]
            if bad:
                raise bad[0]  # type: ignore[misc]
            if first_bytes is None:
                first_bytes = ds.cache.stats.fetched_bytes
                first_s = time.perf_counter() - t1
            pad = sched.padding_in(rank, k)
            ids_seen.append(ids[: len(ids) - pad])
            peak = max(peak, ds.cache.disk_bytes())
        with node.gate:
            node.progress[w] = 1 << 60  # finished: never holds the others back
            node.gate.notify_all()
        node.results[w] = {
            "ids": np.concatenate(ids_seen) if ids_seen else np.zeros(0, np.int64),
            "fetched": ds.cache.stats.fetched_bytes,
            "first": first_bytes or 0,
            "first_s": first_s or 0.0,
            "peak": max(peak, ds.cache.stats.peak_bytes),
            "hits": ds.cache.stats.hits,
            "evicted": ds.cache.stats.evicted,
        }
        ds.close_cache()
    except BaseException as e:  # noqa: BLE001 - reported by the main thread
        node.errors.append(e)


def simulate(
    *,
    shards: int = 1024,
    per_shard: int = 16,
    sample_bytes: int = 2048,
    ranks: int = 16,
    workers: int = 2,
    batch: int = 8,
    partitions: int | None = None,
    interleave: int = 4,
    lookahead: int = 4,
    cache_shards: int | None = None,
    seed: int = 0,
) -> tuple[Report, dict[str, Any]]:
    from mmload.config import RemoteConfig, ShuffleConfig
    from mmload.sources import Dataset

    tmp = Path(tempfile.mkdtemp(prefix="mmload-scale-"))
    root = tmp / "store"
    root.mkdir()
    t0 = time.perf_counter()
    names = write_shards(root, shards, per_shard, sample_bytes)
    local = Dataset.open([str(root / n) for n in names], cache_dir=tmp / "index")
    local.manifest.write(str(root / "mmload.index.json"), relative_to=str(root))
    gen_s = time.perf_counter() - t0
    total = sum((root / n).stat().st_size for n in names)
    shard_size = max((root / n).stat().st_size for n in names)
    P = partitions or ranks
    per_rank_parts = P // ranks
    need_cache = (interleave * per_rank_parts + lookahead + 2) * shard_size
    limit = (cache_shards * shard_size) if cache_shards else need_cache
    cfg = RemoteConfig(
        cache_limit=limit, lookahead=lookahead, fetchers=4, read_timeout=10.0, backoff=0.05
    )
    shuffle = ShuffleConfig(interleave)
    rep = Report(
        "Streaming at scale: ranks x workers over remote shards (one process, loopback HTTP)",
        {
            "shards": shards,
            "samples_per_shard": per_shard,
            "sample_bytes": sample_bytes,
            "data_set_mb": round(total / 2**20, 2),
            "ranks": ranks,
            "workers_per_rank": workers,
            "batch": batch,
            "partitions": P,
            "interleave": interleave,
            "lookahead": lookahead,
            "cache_limit_mb": round(limit / 2**20, 3),
        },
    )
    seen: list[np.ndarray] = []
    ok = True
    try:
        with LoopbackServer(root) as srv:
            url = srv.url.rstrip("/") + "/data-{00000.." + f"{shards - 1:05d}" + "}.tar"
            run = _Run(url, cfg, seed, shuffle, P, batch, ranks, workers)
            for rank in range(ranks):
                node = _Node(tmp / f"node-{rank}", workers)
                threads = [
                    threading.Thread(target=_work, args=(run, node, rank, w))
                    for w in range(workers)
                ]
                for t in threads:
                    t.start()
                for t in threads:
                    t.join()
                if node.errors:
                    raise node.errors[0]
                results = node.results
                fetched = sum(r["fetched"] for r in results)
                share = total / ranks
                peak = max(r["peak"] for r in results)
                seen += [r["ids"] for r in results]
                rep.add(
                    rank=rank,
                    fetched_mb=fetched / 2**20,
                    share_mb=share / 2**20,
                    fetched_vs_share=fetched / share,
                    first_batch_kb=max(r["first"] for r in results) / 1024,
                    first_batch_s=max(r["first_s"] for r in results),
                    peak_cache_kb=peak / 1024,
                    cache_limit_kb=limit / 1024,
                    peak_vs_limit=peak / limit,
                    evicted=sum(r["evicted"] for r in results),
                )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    all_ids = np.concatenate(seen)
    n = int(local.num_samples)
    exactly_once = len(all_ids) == n and np.array_equal(np.sort(all_ids), np.arange(n))
    ok = exactly_once
    worst = max(r["fetched_vs_share"] for r in rep.rows)
    summary = {
        "exactly_once": exactly_once,
        "samples": n,
        "read": len(all_ids),
        "worst_fetched_vs_share": worst,
        "worst_peak_vs_limit": max(r["peak_vs_limit"] for r in rep.rows),
        "max_first_batch_kb": max(r["first_batch_kb"] for r in rep.rows),
        "shard_kb": shard_size / 1024,
        "lookahead_kb": lookahead * shard_size / 1024,
        "ok": ok,
    }
    rep.notes.append(
        f"exactly once across {ranks} ranks x {workers} workers: {exactly_once} "
        f"({len(all_ids)} samples read of {n})"
    )
    rep.notes.append(
        f"generated {shards} shards in {gen_s:.1f}s; shard {shard_size / 1024:.1f} KiB; "
        f"bytes before the first batch are bounded by (shards of the first batch + lookahead) "
        f"x shard size, not by the data set"
    )
    return rep, summary


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shards", type=int, default=1024)
    ap.add_argument("--per-shard", type=int, default=16)
    ap.add_argument("--sample-bytes", type=int, default=2048)
    ap.add_argument("--ranks", type=int, default=16)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--partitions", type=int)
    ap.add_argument("--interleave", type=int, default=4)
    ap.add_argument("--lookahead", type=int, default=4)
    ap.add_argument("--json")
    a = ap.parse_args()
    rep, summary = simulate(
        shards=a.shards,
        per_shard=a.per_shard,
        sample_bytes=a.sample_bytes,
        ranks=a.ranks,
        workers=a.workers,
        batch=a.batch,
        partitions=a.partitions,
        interleave=a.interleave,
        lookahead=a.lookahead,
    )
    rep.notes.append("summary: " + ", ".join(f"{k}={v}" for k, v in summary.items()))
    rep.print(
        [
            "rank",
            "fetched_mb",
            "share_mb",
            "fetched_vs_share",
            "first_batch_kb",
            "first_batch_s",
            "peak_cache_kb",
            "cache_limit_kb",
            "peak_vs_limit",
            "evicted",
        ]
    )
    rep.save(a.json)
    if not summary["ok"]:
        raise SystemExit("exactly-once check failed")


if __name__ == "__main__":
    main()
