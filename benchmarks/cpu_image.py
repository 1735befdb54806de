"""mmload's CPU image pipeline vs torch DataLoader + webdataset + PIL, same data, same transforms.

Both decode JPEGs from WebDataset shards, apply RandomResizedCrop(224, scale=(0.08, 1)) + random
horizontal flip + ImageNet normalisation to float16 NCHW, and yield batches; both shuffle. The
baseline is the standard recipe: ``DataLoader(num_workers=<cores>, persistent_workers=True)`` over
``webdataset.WebDataset(...).shuffle(1000).decode("pil").map(transform).batched(B)``.
All pipelines are built once; each round runs one epoch of each in turn (round 0 is a warm-up),
and the ratio is the median epoch's images/s over the baseline's median.

    python benchmarks/cpu_image.py --images 2048 --batch-size 128
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import Report

from mmload.bench import dali_reader_epoch, dataloader_baseline


def make_data(root: Path, images: int, per_shard: int) -> list[str]:
    """JPEGs of 500x375 at quality 95 (the DESIGN.md anchor's format), as WebDataset shards."""
    from mmload.demo import load_photos, make_jpeg
    from mmload.sources.write import write_tar_shards

    n_shards = math.ceil(images / per_shard)
    paths = [str(root / f"img-{i:05d}.tar") for i in range(n_shards)]
    if all(os.path.exists(p) for p in paths):
        return paths
    root.mkdir(parents=True, exist_ok=True)
    photos = load_photos()
    rng = np.random.default_rng(0)

    def samples():  # type: ignore[no-untyped-def]
        for i in range(images):
            label = i % len(photos)
            yield {
                "__key__": f"{i:07d}",
                "jpg": make_jpeg(photos[label][1], rng, (500, 375), 95),
                "cls": label,
            }

    return write_tar_shards(samples(), str(root / "img-%05d.tar"), maxcount=per_shard)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=2048)
    ap.add_argument("--per-shard", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--epochs", type=int, default=6, help="rounds; round 0 is a warm-up")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--data", default="bench-out/cpu_image_data")
    ap.add_argument("--json", help="save the report here")
    args = ap.parse_args()

    import torch

    import mmload

    cores = len(os.sched_getaffinity(0))
    paths = make_data(Path(args.data), args.images, args.per_shard)
    avg_kb = sum(os.path.getsize(p) for p in paths) / args.images / 1e3
    rep = Report(
        "CPU image pipeline: mmload vs torch DataLoader + webdataset + PIL",
        {
            "images": args.images,
            "jpeg": "500x375 q95",
            "avg_kb": round(avg_kb, 1),
            "batch": args.batch_size,
            "transform": f"RandomResizedCrop({args.size}) + flip + normalize -> fp16 NCHW",
            "epochs_timed": args.epochs - 1,
            "cores": cores,
            "baseline_workers": cores,
        },
    )
    torch.set_num_threads(cores)
    # Every pipeline stays built; rounds run one epoch of each in turn, so drift in the machine's
    # speed (it is shared) hits all of them alike. Round 0 is a warm-up.
    base = dataloader_baseline(paths, args.batch_size, cores, args.size, "jpg", "cls")
    loaders = {
        backend: mmload.Loader(
            paths,
            batch_size=args.batch_size,
            shuffle=True,
            seed=0,
            image=mmload.ImageConfig(size=args.size, backend=backend),
            fields=["jpg", "cls"],
            cache_dir=Path(args.data) / ".cache",
        )
        for backend in ("dali", "pil")
    }
    base_name = f"torch DataLoader({cores} workers) + webdataset + PIL"
    runs: dict[str, Any] = {
        base_name: lambda: sum(len(x) for x, _ in base),
        f"mmload Loader, dali backend ({cores} threads)": lambda: sum(
            len(b["__key__"]) for b in loaders["dali"]
        ),
        f"mmload Loader, pil backend ({cores} threads)": lambda: sum(
            len(b["__key__"]) for b in loaders["pil"]
        ),
        f"reference: DALI fn.readers.webdataset + ROI decode ({cores} threads)": dali_reader_epoch(
            paths, args.batch_size, cores, args.size, args.images, "jpg"
        ),
    }
    rates: dict[str, list[float]] = {k: [] for k in runs}
    for r in range(args.epochs):
        for name, fn in runs.items():
            t0 = time.perf_counter()
            n = fn()
            if r > 0:
                rates[name].append(n / (time.perf_counter() - t0))
    for L in loaders.values():
        L.close()
    base_median = float(np.median(rates[base_name]))
    for name, rs in rates.items():
        rep.add(
            pipeline=name,
            median=float(np.median(rs)),
            min=min(rs),
            max=max(rs),
            ratio=float(np.median(rs)) / base_median,
        )
    rep.notes.append(
        "the DALI reference has none of mmload's guarantees (no exact resume, "
        "1024-sample buffer shuffle, a bad JPEG fails the run)"
    )
    rep.notes.append(
        "ratio = median warm epoch / the baseline's median warm epoch; "
        "rounds interleave the pipelines"
    )
    rep.print(["pipeline", "median", "min", "max", "ratio"])
    rep.save(args.json)


if __name__ == "__main__":
    main()
