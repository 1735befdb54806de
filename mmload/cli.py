"""The ``mmload`` command: demo | inspect | index | bench | write."""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

from mmload.errors import MmloadError

__all__ = ["main"]


def _describe(value: Any) -> str:
    import torch

    if isinstance(value, torch.Tensor):
        dtype = str(value.dtype).replace("torch.", "")
        return f"tensor {tuple(value.shape)} {dtype} on {value.device}"
    from mmload.jagged import Jagged

    if isinstance(value, Jagged):
        dtype = str(value.dtype).replace("torch.", "")
        return f"jagged {len(value)} rows, {value.values.numel()} {dtype} values on {value.device}"
    if isinstance(value, list):
        inner = type(value[0]).__name__ if value else "?"
        return f"list[{inner}] of {len(value)}"
    return type(value).__name__


def _progress(total: int | None, desc: str, unit: str, quiet: bool) -> Any:
    from tqdm import tqdm

    return tqdm(
        total=total, desc=desc, unit=unit, disable=quiet, file=sys.stderr, dynamic_ncols=True
    )


def cmd_demo(args: argparse.Namespace) -> int:
    import mmload
    from mmload.demo import demo_features, demo_samples
    from mmload.device import parse_device
    from mmload.sources.write import write_tar_shards

    parse_device(args.device)  # a missing GPU is said first, before any data is generated
    out = args.out or tempfile.mkdtemp(prefix="mmload-demo-")
    os.makedirs(out, exist_ok=True)
    try:
        print(f"mmload {mmload.__version__} demo: {args.samples} samples into {out}")
        with _progress(args.samples, "generate", "sample", args.quiet) as bar:

            def counted() -> Any:
                for s in demo_samples(args.samples, seed=args.seed):
                    bar.update(1)
                    yield s

            paths = write_tar_shards(
                counted(), os.path.join(out, "demo-%05d.tar"), maxcount=args.per_shard
            )
        print(
            f"wrote {len(paths)} WebDataset shards "
            f"({sum(os.path.getsize(p) for p in paths) / 1e6:.1f} MB)"
        )
        features = None
        if not args.no_features:
            # Per-user features arrive while the loader runs: half now, half from a "streaming job"
            # thread; each batch joins them as of every sample's own json.ts.
            rows = demo_features(args.samples, seed=args.seed)
            table = mmload.FeatureTable(key="user_id", timestamp="ts", device=args.device)
            table.update(rows.slice(0, rows.num_rows // 2))
            late = rows.slice(rows.num_rows // 2)
            feeder = threading.Thread(
                target=lambda: [table.update(b) for b in late.to_batches(max_chunksize=50)],
                daemon=True,
            )
            features = mmload.FeatureJoin(table, key="json.user_id", timestamp="json.ts")
        loader = mmload.Loader(
            paths,
            batch_size=args.batch_size,
            device=args.device,
            shuffle=True,
            seed=args.seed,
            image=mmload.ImageConfig(size=args.image_size),
            audio=mmload.AudioConfig(seconds=0.5, mel=True, n_mels=64),
            text=mmload.TextConfig(max_length=32),
            features=features,
            cache_dir=os.path.join(out, ".cache"),
        )
        if features is not None:
            feeder.start()
        with loader:
            first: dict[str, Any] | None = None
            t0 = time.perf_counter()
            for epoch in range(args.epochs):
                with _progress(len(loader), f"epoch {epoch}", "batch", args.quiet) as bar:
                    for batch in loader:
                        first = first or batch
                        bar.update(1)
            dt = time.perf_counter() - t0
            stats = loader.stats()
            n = stats["samples"]  # unique samples: padding repeats are not throughput
        assert first is not None
        print(
            f"\nstreamed {n} samples in {dt:.2f}s: {n / dt:,.0f} samples/s on {args.device} "
            f"({os.cpu_count()} CPUs, {platform.processor() or platform.machine()})"
        )
        print("one batch:")
        for k, v in first.items():
            print(f"  {k:20s} {_describe(v)}")
        print(f"  first keys: {first['__key__'][:3]}; first json: {first['json'][0]}")
        if features is not None:
            found = first["__features_found__"].float().mean().item()
            fstats = features.table.stats()
            print(
                f"  features joined as of each sample's json.ts: {found:.0%} of the batch found; "
                f"table rows {fstats['rows']}, updates {fstats['updates_applied']}"
            )
        print(
            f"stats: padded={stats['samples_padded']} dropped={stats['samples_dropped']} "
            f"bad={stats['bad_samples']} index={stats['index_seconds']:.3f}s"
        )
        print(f"resume state after the run: {loader.state_dict()}")
    finally:
        if not args.keep and not args.out:
            shutil.rmtree(out, ignore_errors=True)
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from mmload.sources import Dataset
    from mmload.sources.arrow import TableIndex
    from mmload.sources.tar import TarIndex

    ds = Dataset.open(
        args.shards,
        key_column=args.key_column or None,
        skip_bad=args.skip_bad,
        allow_pipe=args.allow_pipe,
    )
    rows: list[dict[str, Any]] = []
    for sh in range(ds.num_shards):
        idx = ds.index(sh)
        rec = ds.records[sh]
        row: dict[str, Any] = {
            "shard": ds.shard_url(sh),
            "format": rec.kind,
            "samples": idx.num_samples,
            "bytes": rec.size,
        }
        if isinstance(idx, TarIndex):
            per: dict[str, int] = defaultdict(int)
            for f, size in zip(idx.fields, idx.sizes.tolist(), strict=True):
                per[f] += size
            row["fields"] = dict(sorted(per.items()))
        elif isinstance(idx, TableIndex):
            row["fields"] = idx.columns
            row["chunks"] = len(idx.chunk_rows)
        rows.append(row)
    if args.json:
        print(json.dumps({"shards": rows, "bad": [b.as_dict() for b in ds.bad]}, indent=2))
        return 0
    for r in rows:
        fields = r["fields"]
        desc = (
            ", ".join(
                f"{k} {v / max(r['samples'], 1) / 1e3:.1f} KB/sample" for k, v in fields.items()
            )
            if isinstance(fields, dict)
            else ", ".join(fields)
        )
        print(
            f"{r['shard']}: {r['format']}, {r['samples']} samples, "
            f"{r['bytes'] / 1e6:.2f} MB; {desc}"
        )
    print(
        f"total: {len(rows)} shards, {ds.num_samples} samples (indexed in {ds.index_seconds:.3f}s)"
    )
    for b in ds.bad:
        print(f"BAD {b.shard} key={b.key}: {b.reason}")
    return 0


def cmd_index(args: argparse.Namespace) -> int:
    from mmload.sources import Dataset
    from mmload.sources.manifest import MANIFEST_NAME, common_base, join
    from mmload.sources.spec import is_local, local_path
    from mmload.sources.tar import TarIndex, write_dali_idx

    ds = Dataset.open(
        args.shards,
        key_column=args.key_column or None,
        cache_dir=args.cache_dir,
        skip_bad=args.skip_bad,
    )
    urls = [ds.shard_url(s) for s in range(ds.num_shards)]
    base = common_base(urls)
    target = args.output or (join(base, MANIFEST_NAME) if base is not None else None)
    wrote = None
    if target is not None:
        beside = base is not None and target == join(base, MANIFEST_NAME)
        try:
            ds.manifest.write(target, relative_to=base if beside else None)
            wrote = target
        except Exception as e:  # noqa: BLE001 - a read-only store (HTTP), no permission, full disk
            print(
                f"cannot write the manifest to {target}: {type(e).__name__}: {e}", file=sys.stderr
            )
    if wrote is None:
        cached = ds.manifest_cache_file
        print(f"the manifest stays in the cache: {cached}", file=sys.stderr)
    written = 0
    if args.dali_idx:
        for sh in range(ds.num_shards):
            url = ds.shard_url(sh)
            if not is_local(url) or ds.specs[sh].compressed:
                continue
            idx = ds.index(sh)
            if not isinstance(idx, TarIndex):
                continue
            path = local_path(url)
            idx_path = path[: -len(".tar")] + ".idx" if path.endswith(".tar") else path + ".idx"
            why_not = write_dali_idx(idx, idx_path)
            if why_not is None:
                written += 1
            else:
                print(f"no DALI .idx for {url}: {why_not}", file=sys.stderr)
    print(
        f"indexed {ds.num_shards} shards, {ds.num_samples} samples in {ds.index_seconds:.3f}s"
        + (f"; manifest {wrote}" if wrote else "")
        + (f"; wrote {written} DALI .idx files" if args.dali_idx else "")
    )
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    import mmload
    from mmload import bench
    from mmload.demo import demo_samples
    from mmload.sources.write import write_tar_shards

    bench.check_args(args.batch_size, args.epochs, args.workers, args.image_size)
    tmp = None
    shards = args.shards
    if not shards:  # generated: demo photos as 500x375 JPEGs (the DESIGN.md anchor's size)
        tmp = tempfile.TemporaryDirectory(prefix="mmload-bench-")
        samples = demo_samples(args.samples, seed=args.seed, size=(500, 375))
        shards = write_tar_shards(samples, os.path.join(tmp.name, "bench-%05d.tar"), maxcount=64)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    base_workers = args.baseline_workers if args.baseline_workers is not None else cores or 1

    def make(fields: list[str] | None) -> mmload.Loader:
        return mmload.Loader(
            shards,
            batch_size=args.batch_size,
            device=args.device,
            shuffle=True,
            seed=args.seed,
            workers=args.workers,
            fields=fields,
            image=mmload.ImageConfig(size=args.image_size, backend=args.backend),
        )

    loader = make(None)  # to learn the fields (no batch is read)
    try:
        kinds = loader._pipe.fields.kinds
        image = next((f for f, k in kinds.items() if k == "image"), None)
        if image is None:
            raise mmload.ConfigError("mmload bench: the shards have no image field (jpg, png...)")
        label = "cls" if "cls" in kinds else None
        n = loader.num_samples
        loader.close()
        fields = [image] + ([label] if label else [])

        def build_mmload() -> tuple[Any, Any]:
            ld = make(fields)
            return (lambda: sum(len(b["__key__"]) for b in ld)), ld.close

        def build_dataloader() -> tuple[Any, Any]:
            dl = bench.dataloader_baseline(
                shards, args.batch_size, base_workers, args.image_size, image, label
            )
            return (lambda: sum(len(y) for _, y in dl)), None

        def build_dali() -> tuple[Any, Any]:
            epoch = bench.dali_reader_epoch(
                shards, args.batch_size, cores or 1, args.image_size, n, image
            )
            return epoch, None

        runs: dict[str, Any] = {
            f"mmload Loader (workers={args.workers}, {args.backend} images, {args.device})": (
                build_mmload
            ),
        }
        base_name = None
        wanted = set(args.baselines.split(",")) if args.baselines else set()
        if "dataloader" in wanted:
            base_name = f"DataLoader(num_workers={base_workers}) + webdataset + PIL"
            runs[base_name] = build_dataloader
        if "dali" in wanted:
            try:
                import nvidia.dali  # noqa: F401
            except ImportError:
                print("DALI is not installed: its reader row is left out", file=sys.stderr)
            else:
                runs[f"DALI fn.readers.webdataset + ROI decode ({cores} threads, CPU)"] = build_dali
        rows = bench.run_bench(runs, epochs=args.epochs, progress=not args.no_progress)
    finally:
        loader.close()
        if tmp is not None:
            tmp.cleanup()
    env = bench.environment()
    base = next((r.median for r in rows if r.name == base_name), 0.0)
    config = {
        "shards": len(shards),
        "samples": n,
        "generated": tmp is not None,
        "batch_size": args.batch_size,
        "work": f"{image}: decode + RandomResizedCrop({args.image_size}) + flip + normalize "
        "-> f16 NCHW" + (f"; {label}" if label else ""),
        "timed_epochs": args.epochs - 1,
    }
    print(f"hardware: {env['cpu']} x{env['cpus']}; python {env['python']}")
    print("versions: " + ", ".join(f"{k} {v}" for k, v in env["versions"].items()))
    print("config: " + json.dumps(config, sort_keys=True))
    width = max(len(r.name) for r in rows)
    print(f"{'pipeline'.ljust(width)}  samples/s  ratio  cpu cores  peak RSS MB")
    for r in rows:
        ratio = f"{r.median / base:5.2f}" if base else "    -"
        cores_busy = statistics.median(r.cores) if r.cores else 0.0
        print(
            f"{r.name.ljust(width)}  {r.median:9,.0f}  {ratio}  {cores_busy:9.2f}  "
            f"{r.peak_rss_mb:11,.0f}"
        )
    if base:
        print(f"ratio: samples/s over {base_name}")
    report = {
        "config": config,
        "environment": env,
        "rows": [
            {
                "pipeline": r.name,
                "samples_per_s": r.median,
                "runs": r.rates,
                "ratio": r.median / base if base else None,
                "cpu_cores": statistics.median(r.cores) if r.cores else None,
                "peak_rss_mb": r.peak_rss_mb,
            }
            for r in rows
        ],
    }
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=2)
    if args.plot:
        bench.plot(rows, base, args.plot, f"mmload bench: {n} samples, {env['cpu']}")
    return 0


def cmd_write(args: argparse.Namespace) -> int:
    from mmload.sources.tar import split_name
    from mmload.sources.write import write_tar_shards

    files = sorted(
        os.path.relpath(os.path.join(d, f), args.source)
        for d, _, fs in os.walk(args.source)
        for f in fs
        if not f.startswith(".")
    )
    samples: dict[str, dict[str, Any]] = {}
    for rel in files:
        parts = split_name(rel)
        if parts is None:
            print(f"skipping {rel}: no key.field name", file=sys.stderr)
            continue
        key, field = parts
        with open(os.path.join(args.source, rel), "rb") as f:
            samples.setdefault(key, {"__key__": key})[field] = f.read()
    paths = write_tar_shards(samples.values(), args.pattern, maxcount=args.maxcount)
    print(f"wrote {len(samples)} samples into {len(paths)} shards")
    return 0


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mmload", description="GPU-accelerated multimodal dataloader")
    fmt = argparse.ArgumentDefaultsHelpFormatter  # every option's help shows its default
    p.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = p.add_subparsers(dest="cmd", required=True)

    d = sub.add_parser(
        "demo", help="generate a small multimodal data set and stream it", formatter_class=fmt
    )
    d.add_argument("--samples", type=int, default=512, help="samples to generate")
    d.add_argument("--per-shard", type=int, default=64, help="samples per tar shard")
    d.add_argument("--batch-size", type=int, default=32, help="samples per batch")
    d.add_argument("--image-size", type=int, default=224, help="square output image side")
    d.add_argument("--epochs", type=int, default=2, help="epochs to stream")
    d.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (needs mmload[gpu])")
    d.add_argument("--seed", type=int, default=0, help="seed of the order and augmentations")
    d.add_argument("--out", help="write the data set here (kept); default: a temporary folder")
    d.add_argument("--keep", action="store_true", help="keep the temporary folder")
    d.add_argument("--quiet", action="store_true", help="no progress bars")
    d.add_argument("--no-features", action="store_true", help="skip the live feature join")
    d.set_defaults(fn=cmd_demo)

    def shard_args(sp: argparse.ArgumentParser) -> None:
        sp.add_argument(
            "shards", nargs="+", help="paths, brace patterns, globs, directories or URLs"
        )
        sp.add_argument(
            "--key-column",
            default="__key__",
            help="Arrow/Parquet column holding each row's key ('' numbers the rows)",
        )

    i = sub.add_parser(
        "inspect", help="per-shard sample counts, fields and sizes", formatter_class=fmt
    )
    shard_args(i)
    i.add_argument("--json", action="store_true", help="print JSON instead of a table")
    i.add_argument("--skip-bad", action="store_true", help="report bad shards instead of failing")
    i.add_argument(
        "--allow-pipe", action="store_true", help="allow pipe: URLs (they run a shell command)"
    )
    i.set_defaults(fn=cmd_inspect)

    x = sub.add_parser(
        "index",
        help="write the data set's manifest (mmload.index.json) next to the shards or to "
        "--output, index every shard (optionally DALI .idx files)",
        formatter_class=fmt,
    )
    shard_args(x)
    x.add_argument(
        "--cache-dir", help="index cache folder (default: $MMLOAD_CACHE_DIR or ~/.cache/mmload)"
    )
    x.add_argument(
        "--output",
        help="where the manifest goes (a path or an fsspec URL); default: mmload.index.json in "
        "the shards' directory, else the cache",
    )
    x.add_argument("--skip-bad", action="store_true", help="leave bad shards/samples out")
    x.add_argument("--dali-idx", action="store_true", help="also write DALI v1.2 .idx files")
    x.set_defaults(fn=cmd_index)

    b = sub.add_parser(
        "bench",
        help="mmload vs DataLoader + webdataset + PIL (and DALI's reader) on your shards or on "
        "generated data: samples/s, ratio, CPU cores, peak RSS",
        formatter_class=fmt,
    )
    b.add_argument(
        "shards", nargs="*", help="shards to read (default: generate --samples demo samples)"
    )
    b.add_argument("--samples", type=int, default=1024, help="generated samples (no shards)")
    b.add_argument("--batch-size", type=int, default=128, help="samples per batch")
    b.add_argument("--image-size", type=int, default=224, help="square output image side")
    b.add_argument("--epochs", type=int, default=3, help="epochs per pipeline; the first warms up")
    b.add_argument("--device", default="cpu", help="where mmload decodes: cpu, cuda, cuda:N")
    b.add_argument(
        "--backend",
        default="auto",
        choices=["auto", "dali", "pil"],
        help="mmload's image decoder (auto: DALI when installed, else PIL)",
    )
    b.add_argument("--workers", type=int, default=0, help="mmload worker processes")
    b.add_argument("--baseline-workers", type=int, help="DataLoader workers (default: cores)")
    b.add_argument(
        "--baselines", default="dataloader,dali", help="comma list of dataloader, dali ('' none)"
    )
    b.add_argument("--seed", type=int, default=0, help="seed of the data and the order")
    b.add_argument("--json", help="save the report here")
    b.add_argument("--plot", help="draw the table as a PNG here (pip install 'mmload[plot]')")
    b.add_argument("--no-progress", action="store_true", help="no progress bars")
    b.set_defaults(fn=cmd_bench)

    w = sub.add_parser(
        "write", help="pack a folder of key.field files into tar shards", formatter_class=fmt
    )
    w.add_argument("source", help="folder of key.field files (e.g. 0001.jpg, 0001.cls)")
    w.add_argument("pattern", help="output pattern with a %%-format, e.g. out/train-%%05d.tar")
    w.add_argument("--maxcount", type=int, default=1000, help="samples per shard at most")
    w.set_defaults(fn=cmd_write)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        return int(args.fn(args))
    except MmloadError as e:
        print(f"mmload: error: {type(e).__name__}: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
