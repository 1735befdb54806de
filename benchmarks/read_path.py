"""The read stage alone: mmload's ``Dataset.read`` vs raw ``os.pread`` and DALI's native reader.

Same tar shards (small JPEGs plus a ``.cls`` member), page cache warm, media passed through
as bytes (nothing decoded). Rows, all in one run:

- raw ``os.pread``: one thread, one call per member over the same offsets in plan order (the
  upper bound: no bookkeeping at all); also with each batch's results kept, and kept with the
  batch split over two threads;
- DALI ``fn.readers.webdataset`` (CPU, ``device_id=None``) outputting the jpg and cls bytes
  undecoded: the baseline;
- mmload read stage: ``Dataset.read`` over the epoch plan's batches, called exactly as
  ``Pipeline.run`` calls it, twice: members as read-only views of the batch buffer (how media
  that mmload decodes are read), and with the jpg read into ``bytes`` of its own (how a field
  handed on to the user as ``bytes`` is read, e.g. with ``image_fields=[]``);
- mmload ``Loader(..., image_fields=[], device="cpu")``: the whole loader over an epoch.

Every row is built once; each round runs one epoch of each in turn (round 0 is a warm-up);
the table shows the median, and ratios to the baseline's median.

    python benchmarks/read_path.py            # 8,192 samples in 32 shards, batch 256
    python benchmarks/read_path.py --quick
    python benchmarks/read_path.py --profile  # cProfile of the mmload read stage instead
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import Report


def make_data(root: Path, samples: int, shards: int, size: tuple[int, int]) -> list[str]:
    """``samples`` small JPEGs (``size`` w x h, q90) with a ``cls`` member, in ``shards`` tars."""
    from mmload.demo import load_photos, make_jpeg
    from mmload.sources.write import write_tar_shards

    per_shard = -(-samples // shards)
    n = -(-samples // per_shard)
    paths = [str(root / f"read-{i:05d}.tar") for i in range(n)]
    if all(os.path.exists(p) for p in paths):
        return paths
    root.mkdir(parents=True, exist_ok=True)
    photos = load_photos()
    rng = np.random.default_rng(0)

    def gen():  # type: ignore[no-untyped-def]
        for i in range(samples):
            label = i % len(photos)
            yield {
                "__key__": f"{i:07d}",
                "jpg": make_jpeg(photos[label][1], rng, size, 90),
                "cls": label,
            }

    return write_tar_shards(gen(), str(root / "read-%05d.tar"), maxcount=per_shard)


def warm(paths: list[str]) -> None:
    for p in paths:
        with open(p, "rb") as f:
            while f.read(1 << 22):
                pass


def mmload_read_stage(
    loader: Any, as_bytes: frozenset[str] = frozenset()
) -> tuple[Callable[[], int], Callable[[], list[np.ndarray]]]:
    """One epoch of ``Dataset.read`` over the plan's batches, as ``Pipeline.run`` calls it
    (rank 0 of a world of 1, epoch 0), and the batches' ids. ``as_bytes``: the fields read into
    ``bytes`` of their own (``Pipeline.run`` passes the fields the user gets as ``bytes``; media
    it decodes are read as views of the batch buffer)."""
    pipe = loader._pipe
    world = loader.world
    # Its own handles and batch buffers, as the loader's read thread has: the Loader row's
    # threads (read-ahead, the next epoch prepared) hold buffers of ``pipe.ds`` meanwhile.
    ds = pipe.ds.private_copy()
    fields = pipe._read_fields
    sched = pipe.schedule(world.world_size, 0)
    order = pipe.order(0)

    def batches() -> list[np.ndarray]:
        return [order[sched.positions(world.rank, k)] for k in sched.worker_batches(world)]

    def epoch() -> int:
        n = 0
        for k in sched.worker_batches(world):
            ds.advance(k)
            ids = order[sched.positions(world.rank, k)]
            n += len(ds.read(ids, fields, as_bytes))
        return n

    return epoch, batches


def raw_pread(
    loader: Any, ids: np.ndarray, batch: int
) -> tuple[Callable[[], int], Callable[[], int], Callable[[], int], Callable[[], None]]:
    """One thread of ``os.pread``, one call per member, over the same ids in the same order:
    each result dropped at once, or a batch's results kept until the batch ends (as a reader
    that hands batches on must: fresh memory for every batch); and the kept variant with each
    batch split in two halves, one on a second thread (what reading on threads can gain at
    best: ``pread`` releases the GIL)."""
    ds = loader._pipe.ds
    _chunk, shard, row = ds.locate(ids)
    fds = {int(s): os.open(ds._path(int(s)), os.O_RDONLY) for s in np.unique(shard)}
    per_batch: list[list[tuple[int, int, int]]] = []
    for i, (s, r) in enumerate(zip(shard.tolist(), row.tolist(), strict=True)):
        if i % batch == 0:
            per_batch.append([])
        idx = ds.index(s)
        for m in idx.members(r):
            per_batch[-1].append((fds[s], int(idx.sizes[m]), int(idx.offsets[m])))
    ops = [op for part in per_batch for op in part]
    pread = os.pread

    def epoch() -> int:
        for fd, n, off in ops:
            pread(fd, n, off)
        return len(ids)

    def epoch_kept() -> int:
        for part in per_batch:
            kept = [pread(fd, n, off) for fd, n, off in part]
            del kept
        return len(ids)

    pool = ThreadPoolExecutor(1)

    def part(ops: list[tuple[int, int, int]]) -> list[bytes]:
        return [pread(fd, n, off) for fd, n, off in ops]

    def epoch_two() -> int:
        for ops in per_batch:
            half = len(ops) // 2
            other = pool.submit(part, ops[half:])
            kept = part(ops[:half])
            kept += other.result()
            del kept
        return len(ids)

    def close() -> None:
        pool.shutdown()
        for fd in fds.values():
            os.close(fd)

    return epoch, epoch_kept, epoch_two, close


def dali_reader(paths: list[str], batch: int, threads: int, samples: int) -> Callable[[], int]:
    """DALI's ``fn.readers.webdataset`` on the CPU, jpg and cls out as undecoded bytes."""
    from nvidia.dali import fn, pipeline_def

    @pipeline_def(batch_size=batch, num_threads=threads, device_id=None, seed=1)
    def pipe():  # type: ignore[no-untyped-def]
        jpg, cls = fn.readers.webdataset(
            paths=paths, ext=["jpg", "cls"], random_shuffle=True, initial_fill=1024, name="reader"
        )
        return jpg, cls

    p = pipe()
    p.build()
    steps = samples // batch

    def epoch() -> int:
        for _ in range(steps):
            p.run()
        return steps * batch

    return epoch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=8192)
    ap.add_argument("--shards", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--size", type=int, nargs=2, default=(64, 48), metavar=("W", "H"))
    ap.add_argument("--rounds", type=int, default=8, help="rounds; round 0 is a warm-up")
    ap.add_argument("--quick", action="store_true", help="2,048 samples, 8 shards, 4 rounds")
    ap.add_argument("--profile", action="store_true", help="cProfile the mmload read stage")
    ap.add_argument("--data", default="bench-out/read_path_data")
    ap.add_argument("--json", help="save the report here")
    args = ap.parse_args()
    if args.quick:
        args.samples, args.shards, args.rounds = 2048, 8, 4

    import mmload

    cores = len(os.sched_getaffinity(0))
    data = Path(args.data) / f"{args.samples}x{args.shards}-{args.size[0]}x{args.size[1]}"
    paths = make_data(data, args.samples, args.shards, tuple(args.size))
    warm(paths)
    avg_kb = sum(os.path.getsize(p) for p in paths) / args.samples / 1e3
    loader = mmload.Loader(
        paths,
        batch_size=args.batch_size,
        shuffle=True,
        seed=0,
        image_fields=[],
        device="cpu",
        cache_dir=data / ".cache",
    )
    read_epoch, batches = mmload_read_stage(loader)
    read_epoch()  # indexes loaded, descriptors open
    if args.profile:
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(5):
            read_epoch()
        prof.disable()
        loader.close()
        pstats.Stats(prof).sort_stats("tottime").print_stats(20)
        return

    ids = np.concatenate(batches())
    pread_epoch, pread_kept, pread_two, pread_close = raw_pread(loader, ids, args.batch_size)
    base = f"DALI fn.readers.webdataset, bytes out ({cores} threads)"
    read_name = "mmload read stage: Dataset.read per batch, members as views (media to decode)"
    bytes_name = "mmload read stage, jpg read as bytes (media passed on to the user)"
    bytes_epoch, _ = mmload_read_stage(loader, frozenset({"jpg"}))
    loader_name = "mmload Loader(image_fields=[], device='cpu')"
    runs: dict[str, Callable[[], int]] = {
        "raw os.pread, 1 thread, 1 call per member": pread_epoch,
        "raw os.pread, as above, a batch's bytes kept": pread_kept,
        "raw os.pread, as above, kept, batch split over 2 threads": pread_two,
        base: dali_reader(paths, args.batch_size, cores, args.samples),
        read_name: read_epoch,
        bytes_name: bytes_epoch,
        loader_name: lambda: sum(len(b["__key__"]) for b in loader),
    }
    rates: dict[str, list[float]] = {k: [] for k in runs}
    for r in range(args.rounds):
        for name, fn in runs.items():
            t0 = time.perf_counter()
            n = fn()
            if r > 0:
                rates[name].append(n / (time.perf_counter() - t0))
    loader.close()
    pread_close()

    rep = Report(
        "Read path: samples/s with media passed as bytes",
        {
            "samples": args.samples,
            "shards": len(paths),
            "jpeg": f"{args.size[0]}x{args.size[1]} q90 + cls",
            "avg_kb_per_sample": round(avg_kb, 2),
            "batch": args.batch_size,
            "rounds_timed": args.rounds - 1,
            "cores": cores,
            "page_cache": "warm",
        },
    )
    base_median = float(np.median(rates[base]))
    for name, rs in rates.items():
        med = float(np.median(rs))
        rep.add(
            row=name,
            median=med,
            min=min(rs),
            max=max(rs),
            us_per_sample=1e6 / med,
            vs_dali=med / base_median,
        )
    rep.notes.append(
        f"read stage / DALI reader = {float(np.median(rates[read_name])) / base_median:.2f}x; "
        f"Loader / DALI reader = {float(np.median(rates[loader_name])) / base_median:.2f}x"
    )
    rep.notes.append(
        "median of the warm rounds; rounds interleave the rows so machine drift hits all alike"
    )
    rep.print(["row", "median", "min", "max", "us_per_sample", "vs_dali"])
    rep.save(args.json)


if __name__ == "__main__":
    main()
