"""Streaming from a remote store: mmload vs webdataset's own reader, one loopback HTTP server.

One run, one server (``benchmarks/loopback.py`` in a child process: Range, ETag, a byte
counter reset between loaders), one data set of WebDataset tar shards (``--sample-kb`` random
bytes as ``.bin`` plus a ``.cls`` label per sample). Each loader reads one epoch of rank
``--rank`` of ``--world-size`` through its public API, decoding nothing:

* mmload: ``Loader("http://.../data-{0000..N}.tar", rank=, world_size=, fields=["bin", "cls"],
  cache_dir=<fresh dir>, shuffle=True)``; with ``remote=RemoteConfig(...)`` when the Loader
  takes one (``--cache-limit``, ``--lookahead``);
* webdataset: ``WebDataset(urls, shardshuffle=, nodesplitter=<shards[rank::world_size]>)``,
  ``.shuffle(--wds-shuffle-buffer)``, ``.batched(batch)``, raw bytes.

Per loader: time to first batch, samples/s over the epoch (clock from construction), body bytes
the server sent (in all and by the first batch) against this rank's share (data set bytes /
world size), requests, peak disk under the loader's cache dir (sampled every 50 ms), and a check
that the loader saw exactly the samples its rank should (count, and no repeats beyond mmload's
documented tail padding, which repeats the rank's own samples).

    python benchmarks/remote.py                           # 32 x 16 MB shards, rank 0 of 8
    python benchmarks/remote.py --shards 8 --shard-mb 4   # quick
"""

from __future__ import annotations

import argparse
import importlib.util
import inspect
import itertools
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import Report
from loopback import fetch_stats, reset_stats

import mmload

MB = 1 << 20
FIELDS = ["bin", "cls"]
# Recorded when this benchmark was written (pip's resolver, not re-run on every invocation).
MDS_SKIPPED = (
    "MosaicML Streaming not run: `pip install --dry-run mosaicml-streaming` (mosaicml-streaming "
    "0.13.0) would replace torch 2.13.0+cpu with torch 2.14.1 and numpy 2.4.6 with numpy 2.1.3 "
    "(plus torchvision, transformers, cloud SDKs), so it was not installed; pinning torch and "
    "numpy resolves to mosaicml-streaming 0.10.0 but still adds torchvision 0.28.0, which mmload "
    "would pick up as an image backend"
)


# -- data -------------------------------------------------------------------------------------


def make_data(root: Path, shards: int, per_shard: int, sample_bytes: int, seed: int) -> list[str]:
    """``shards`` tar shards of ``per_shard`` samples; returns the shard file names, in order."""
    import numpy as np

    from mmload.sources.write import write_tar_shards

    width = max(4, len(str(shards - 1)))
    rng = np.random.default_rng(seed)

    def samples() -> Iterator[dict[str, Any]]:
        for i in range(shards * per_shard):
            yield {"__key__": f"{i:08d}", "bin": rng.bytes(sample_bytes), "cls": i % 1000}

    paths = write_tar_shards(samples(), str(root / f"data-%0{width}d.tar"), maxcount=per_shard)
    assert len(paths) == shards, (len(paths), shards)
    return [Path(p).name for p in paths]


# -- measurement helpers ----------------------------------------------------------------------


def dir_bytes(path: Path) -> int:
    """Disk used under ``path`` (allocated blocks, like ``du``); 0 if it does not exist."""
    total = 0
    stack = [str(path)]
    while stack:
        try:
            with os.scandir(stack.pop()) as it:
                for e in it:
                    try:
                        if e.is_dir(follow_symlinks=False):
                            stack.append(e.path)
                        else:
                            total += e.stat(follow_symlinks=False).st_blocks * 512
                    except FileNotFoundError:  # a temp file renamed or evicted meanwhile
                        pass
        except (FileNotFoundError, NotADirectoryError):
            pass
    return total


class DiskSampler:
    """Peak of :func:`dir_bytes` over a directory, sampled every ``interval`` s in a thread."""

    def __init__(self, path: Path | None, interval: float = 0.05) -> None:
        self.path, self.interval = path, interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="disk-sampler", daemon=True)

    def _run(self) -> None:
        while True:
            self.sample()
            if self._stop.wait(self.interval):
                return

    def sample(self) -> int:
        n = dir_bytes(self.path) if self.path is not None else 0
        self.peak = max(self.peak, n)
        return n

    def __enter__(self) -> DiskSampler:
        if self.path is not None:
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.path is not None:
            self._stop.set()
            self._thread.join()
            self.sample()


class Server:
    """``benchmarks/loopback.py`` serving ``root`` in a child process; counters over HTTP."""

    def __init__(self, root: Path, ranges: bool) -> None:
        cmd = [sys.executable, str(Path(__file__).with_name("loopback.py")), str(root)]
        cmd += ["--port", "0"] + ([] if ranges else ["--no-range"])
        self.proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().strip()
        if not line.startswith("serving "):
            self.proc.kill()
            raise RuntimeError(f"loopback server did not start: {line!r}")
        self.url = line.split(" ", 1)[1]

    def reset(self) -> None:
        reset_stats(self.url)

    def stats(self) -> dict[str, Any]:
        return fetch_stats(self.url)

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def run_epoch(
    make: Callable[[], Any], batches: Callable[[Any], Iterator[dict[str, Any]]], server: Server
) -> dict[str, Any]:
    """Construct (clock starts), iterate one epoch; keys seen, timings, server bytes."""
    keys: list[str] = []
    out: dict[str, Any] = {"error": None, "first_batch_s": None, "fetched_at_first": None}
    obj = None
    t0 = time.perf_counter()
    try:
        obj = make()
        out["construct_s"] = time.perf_counter() - t0
        for batch in batches(obj):
            keys.extend(batch["__key__"])
            if out["first_batch_s"] is None:
                out["first_batch_s"] = time.perf_counter() - t0
                out["fetched_at_first"] = server.stats()["bytes"]  # ~1 ms, inside the clock
    except Exception as e:  # noqa: BLE001  (a loader that fails is a result row, not a crash)
        out["error"] = f"{type(e).__name__}: {e}"[:300]
    out["epoch_s"] = time.perf_counter() - t0
    out["keys"] = keys
    out["obj"] = obj
    return out


def mmload_expected(n: int, batch: int, world: int, rank: int) -> tuple[int, int]:
    """(samples yielded, distinct samples) for ``rank`` as mmload documents it: the rank takes
    slice ``rank::world`` of every global batch of ``batch * world`` samples, so it owns the
    epoch positions ``rank, rank + world, ...``; with several ranks every rank gets
    ``ceil(n / (batch * world))`` full batches, the tail padded with repeats of its own
    samples from the start of the epoch; one rank gets every sample once."""
    if world == 1:
        return n, n
    return -(-n // (batch * world)) * batch, len(range(rank, n, world))


def accepts(cls: type, name: str) -> bool:
    """Whether ``cls(...)`` takes keyword ``name``: follows ``**kwargs`` up the MRO's
    ``__init__``s (``inspect.signature(mmload.Loader)`` alone shows ``(source, **kwargs)``)."""
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        params = inspect.signature(init).parameters
        if name in params:
            return True
        if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
            return False
    return False


# -- webdataset's HTTP -----------------------------------------------------------------------


def wds_http_opener(choice: str) -> str:
    """Make webdataset open http URLs with curl (its default) or Python; returns a note."""
    import webdataset  # noqa: F401  (registers webdataset.gopen)

    gopen = sys.modules["webdataset.gopen"]  # `webdataset.gopen` is the function, not the module
    curl = shutil.which("curl")
    if choice == "auto":
        choice = "curl" if curl else "python"
    if choice == "curl":
        if not curl:
            raise SystemExit("--wds-opener curl: no curl on PATH")
        ver = subprocess.run([curl, "--version"], capture_output=True, text=True).stdout
        handler = gopen.gopen_schemes["http"]
        return (
            f"webdataset {gopen.__name__}.gopen_schemes['http'] = {handler.__name__}: one "
            f"`curl -f -s -L URL` subprocess per shard read through a pipe "
            f"({ver.split(chr(10))[0].split(' (')[0]})"
        )

    def gopen_python(url: str, mode: str = "rb", bufsize: int = 8192, **kw: Any) -> Any:
        assert mode == "rb", mode
        return urllib.request.urlopen(url, timeout=60)

    gopen.gopen_schemes["http"] = gopen_python
    why = "no curl on PATH" if not curl else "--wds-opener python"
    return f"webdataset http opened with urllib.request.urlopen (Python) instead of curl: {why}"


# -- main -------------------------------------------------------------------------------------


def main() -> None:
    has_remote_cfg = hasattr(mmload, "RemoteConfig")
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shards", type=int, default=32)
    ap.add_argument("--shard-mb", type=float, default=16)
    ap.add_argument("--sample-kb", type=int, default=256)
    ap.add_argument("--rank", type=int, default=0)
    ap.add_argument("--world-size", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--no-range", action="store_true", help="the server ignores Range (python -m http.server)"
    )
    ap.add_argument("--wds-shuffle-buffer", type=int, default=1000, help="0: no sample shuffle")
    ap.add_argument(
        "--wds-cache", action="store_true", help="webdataset caches shards in a dir (FileCache)"
    )
    ap.add_argument("--wds-opener", choices=["auto", "curl", "python"], default="auto")
    ap.add_argument("--loaders", default="mmload,webdataset", help="comma-separated, in order")
    if has_remote_cfg:
        ap.add_argument("--cache-limit", type=int, help="RemoteConfig.cache_limit, bytes")
        ap.add_argument("--lookahead", type=int, help="RemoteConfig.lookahead, shards")
    ap.add_argument(
        "--manifest",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="write mmload.index.json next to the shards first (as `mmload index` does)",
    )
    ap.add_argument("--tmp", help="parent of the temp dir (default: the system's)")
    ap.add_argument("--keep", action="store_true", help="keep the temp dir")
    ap.add_argument("--json")
    args = ap.parse_args()
    if not 0 <= args.rank < args.world_size:
        ap.error(f"--rank {args.rank} outside --world-size {args.world_size}")
    loaders = [s.strip() for s in args.loaders.split(",") if s.strip()]
    unknown = set(loaders) - {"mmload", "webdataset"}
    if unknown:
        ap.error(f"--loaders: unknown {sorted(unknown)}")

    sample_bytes = args.sample_kb * 1024
    per_shard = max(1, int(args.shard_mb * MB) // sample_bytes)
    n = args.shards * per_shard
    work = Path(tempfile.mkdtemp(prefix="mmload-remote-", dir=args.tmp))
    data = work / "data"
    notes: list[str] = []
    try:
        t = time.perf_counter()
        names = make_data(data, args.shards, per_shard, sample_bytes, args.seed)
        gen_s = time.perf_counter() - t
        if args.manifest:  # what a user does once: `mmload index` next to the shards
            from mmload.sources import Dataset

            local = Dataset.open([str(data / m) for m in names], cache_dir=work / "index")
            local.manifest.write(str(data / "mmload.index.json"), relative_to=str(data))
            notes.append("mmload: a manifest (mmload.index.json) sits next to the shards")
        else:
            notes.append("mmload: no manifest: every shard is fetched once to index it")
        sizes = {name: (data / name).stat().st_size for name in names}
        total = sum(sizes.values())
        share = total / args.world_size
        rank_names = names[args.rank :: args.world_size]

        remote_kwargs: dict[str, Any] = {}
        remote_desc: Any = "no mmload.RemoteConfig"
        if not has_remote_cfg:
            notes.append("mmload has no RemoteConfig: --cache-limit/--lookahead are not offered")
        else:
            given = {
                k: v
                for k, v in (("cache_limit", args.cache_limit), ("lookahead", args.lookahead))
                if v is not None
            }
            if accepts(mmload.Loader, "remote"):
                cfg = mmload.RemoteConfig(**given)
                remote_kwargs["remote"] = cfg
                remote_desc = {"cache_limit": cfg.cache_limit, "lookahead": cfg.lookahead}
            else:
                remote_desc = "not passed (Loader has no remote=)"
                notes.append(
                    "mmload.RemoteConfig exists but mmload.Loader takes no `remote` parameter "
                    "(inspect.signature over Loader's __init__ chain): --cache-limit/--lookahead"
                    + (f" ignored (given: {given})" if given else " not used")
                )

        opener_note = wds_http_opener(args.wds_opener) if "webdataset" in loaders else None
        server = Server(data, ranges=not args.no_range)
        rep = Report(
            "Remote streaming over loopback HTTP: mmload vs webdataset",
            {
                "shards": args.shards,
                "samples_per_shard": per_shard,
                "samples": n,
                "sample_kb": args.sample_kb,
                "dataset_mb": round(total / MB, 1),
                "rank": args.rank,
                "world_size": args.world_size,
                "batch": args.batch_size,
                "shuffle": True,
                "server_range": not args.no_range,
                "mmload_remote": remote_desc,
                "wds_shuffle_buffer": args.wds_shuffle_buffer,
                "wds_cache": args.wds_cache,
                "mmload_manifest": args.manifest,
            },
        )
        pad = max(4, len(str(args.shards - 1)))
        pattern = f"{server.url}data-{{{0:0{pad}d}..{args.shards - 1:0{pad}d}}}.tar"
        urls = [server.url + name for name in names]
        try:
            for which in loaders:
                cache = work / f"{which}-cache"
                if which == "mmload":
                    exp_seen, exp_unique = mmload_expected(
                        n, args.batch_size, args.world_size, args.rank
                    )

                    def make(cache: Path = cache) -> Any:
                        return mmload.Loader(
                            pattern,
                            batch_size=args.batch_size,
                            rank=args.rank,
                            world_size=args.world_size,
                            fields=FIELDS,
                            cache_dir=str(cache),
                            shuffle=True,
                            seed=args.seed,
                            **remote_kwargs,
                        )

                    def batches(loader: Any) -> Iterator[dict[str, Any]]:
                        return iter(loader)

                    watched: Path | None = cache
                else:
                    exp_seen = exp_unique = per_shard * len(rank_names)
                    watched = cache if args.wds_cache else None

                    def make(cache: Path = cache) -> Any:
                        import webdataset as wds

                        if args.wds_cache:
                            cache.mkdir(parents=True, exist_ok=True)  # FileCache wants it to exist

                        def by_rank(src: Iterator[Any]) -> Iterator[Any]:
                            # What a user writes (webdataset.split_by_node without torch.distributed)
                            return itertools.islice(src, args.rank, None, args.world_size)

                        ds = wds.WebDataset(
                            urls,
                            shardshuffle=max(1, len(rank_names)),
                            nodesplitter=by_rank,
                            seed=args.seed,
                            empty_check=False,
                            cache_dir=str(cache) if args.wds_cache else None,
                        )
                        if args.wds_shuffle_buffer:
                            ds = ds.shuffle(args.wds_shuffle_buffer)
                        return ds.batched(args.batch_size, partial=True)

                    def batches(ds: Any) -> Iterator[dict[str, Any]]:
                        return iter(ds)

                server.reset()
                with DiskSampler(watched) as disk:
                    res = run_epoch(make, batches, server)
                st = server.stats()
                obj = res.pop("obj")
                extra = ""
                if which == "mmload" and obj is not None:
                    s = obj.stats()
                    extra = f", padded_per_epoch {s['padded_per_epoch']}"
                    obj.close()
                keys = res["keys"]
                seen, unique = len(keys), len(set(keys))
                ok = res["error"] is None and (seen, unique) == (exp_seen, exp_unique)
                touched = sum(1 for b in st["path_bytes"].values() if b > 0)
                tb = res["first_batch_s"]
                rep.add(
                    loader=which,
                    first_batch_s=tb,
                    construct_s=res.get("construct_s"),
                    epoch_s=res["epoch_s"],
                    samples_per_s=unique / res["epoch_s"] if res["error"] is None else None,
                    fetched_mb=st["bytes"] / MB,
                    fetched_at_first_mb=(
                        res["fetched_at_first"] / MB
                        if res["fetched_at_first"] is not None
                        else None
                    ),
                    fetched_vs_share=st["bytes"] / share,
                    requests=st["requests"],
                    shards_fetched=f"{touched}/{args.shards}",
                    by_status=st["by_status"],
                    by_method=st["by_method"],
                    peak_cache_mb=disk.peak / MB,
                    seen=seen,
                    unique=unique,
                    expected_seen=exp_seen,
                    expected_unique=exp_unique,
                    check="OK" if ok else "FAIL",
                    error=res["error"],
                )
                notes.append(
                    f"{which} check: saw {seen} samples, {unique} distinct; expected {exp_seen} "
                    f"yielded / {exp_unique} distinct for rank {args.rank} of {args.world_size}"
                    f"{extra}: {'OK' if ok else 'FAIL'}"
                    + (f" ({res['error']})" if res["error"] else "")
                )
                shutil.rmtree(cache, ignore_errors=True)
        finally:
            server.close()

        notes.insert(
            0,
            f"data set {total:,} bytes ({total / MB:.1f} MiB, {args.shards} shards, generated in "
            f"{gen_s:.1f}s); this rank's share = data set / world size = {share:,.0f} bytes "
            f"({share / MB:.1f} MiB); webdataset's shards for rank {args.rank}: "
            f"{len(rank_names)} ({sum(sizes[x] for x in rank_names) / MB:.1f} MiB)",
        )
        for r in rep.rows:
            notes.append(
                f"{r['loader']}: fetched {r['fetched_mb']:.1f} MiB = {r['fetched_vs_share']:.2f}x"
                f" this rank's share, in {r['requests']} requests {r['by_status']}"
            )
        if opener_note:
            notes.append(opener_note)
        if importlib.util.find_spec("streaming") is None:
            notes.append(MDS_SKIPPED)
        else:
            notes.append("mosaicml-streaming is installed, but this benchmark has no MDS run")
        notes.append(
            "clocks start at the loader's construction (imports excluded); samples_per_s = "
            "distinct samples seen / epoch_s; fetched = response body bytes the server sent"
        )
        rep.notes.extend(notes)
        rep.print(
            [
                "loader",
                "first_batch_s",
                "construct_s",
                "epoch_s",
                "samples_per_s",
                "fetched_mb",
                "fetched_at_first_mb",
                "fetched_vs_share",
                "requests",
                "shards_fetched",
                "peak_cache_mb",
                "seen",
                "unique",
                "expected_seen",
                "expected_unique",
                "check",
            ]
        )
        rep.save(args.json)
    finally:
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
