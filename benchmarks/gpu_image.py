"""GPU image pipelines on the same data in one run: mmload (device="cuda") vs DALI's own
``fn.readers.webdataset`` pipeline vs torch DataLoader + webdataset + PIL.

Workload (DESIGN.md's anchor): JPEGs of 500x375 at quality 95, RandomResizedCrop(224) + flip +
ImageNet normalisation to float16 NCHW **on the GPU**, batch 256, warm epochs (epoch 0 is a
warm-up). The DataLoader baseline decodes on the CPU with ``--workers`` processes and copies
each batch to the GPU (pinned). Targets (issue 3): mmload >= 1.0x DALI's pipeline, >= 4x the
DataLoader. Without a GPU it says so and exits 0.

    python benchmarks/gpu_image.py --images 8192 --json gpu_image.json
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cpu_image import make_data
from harness import Report

from mmload.bench import MEAN, STD, dataloader_baseline


def _sync() -> None:
    import torch

    torch.cuda.synchronize()


def dataloader_rates(paths: list[str], args: argparse.Namespace) -> list[float]:
    import torch

    loader = dataloader_baseline(paths, args.batch_size, args.workers, args.size, "jpg", "cls")
    loader.pin_memory = True
    rates = []
    for _ in range(args.epochs):
        t0 = time.perf_counter()
        n = 0
        for x, y in loader:
            x = x.to("cuda", non_blocking=True)
            torch.as_tensor(y).to("cuda", non_blocking=True)
            n += len(x)
        _sync()
        rates.append(n / (time.perf_counter() - t0))
    return rates


def dali_rates(paths: list[str], args: argparse.Namespace, threads: int) -> list[float]:
    import nvidia.dali.fn as fn
    import nvidia.dali.types as types
    from nvidia.dali import pipeline_def

    @pipeline_def(batch_size=args.batch_size, num_threads=threads, device_id=0, seed=1)
    def pipe():  # type: ignore[no-untyped-def]
        jpg, cls = fn.readers.webdataset(
            paths=paths, ext=["jpg", "cls"], random_shuffle=True, initial_fill=1024, name="reader"
        )
        img = fn.decoders.image_random_crop(jpg, device="mixed", random_area=[0.08, 1.0])
        img = fn.resize(img, resize_x=args.size, resize_y=args.size)
        out = fn.crop_mirror_normalize(
            img,
            mirror=fn.random.coin_flip(),
            mean=MEAN,
            std=STD,
            dtype=types.FLOAT16,
            output_layout="CHW",
        )
        return out, cls.gpu()

    p = pipe()
    p.build()
    steps = args.images // args.batch_size
    rates = []
    for _ in range(args.epochs):
        t0 = time.perf_counter()
        for _ in range(steps):
            out = p.run()
        out[0].as_tensor()  # wait for the last batch
        _sync()
        rates.append(steps * args.batch_size / (time.perf_counter() - t0))
    return rates


def mmload_rates(paths: list[str], args: argparse.Namespace, backend: str) -> list[float]:
    import mmload

    cfg = mmload.ImageConfig(size=args.size, backend=backend)
    rates = []
    with mmload.Loader(
        paths,
        batch_size=args.batch_size,
        device="cuda",
        shuffle=True,
        seed=0,
        image=cfg,
        fields=["jpg", "cls"],
        drop_last=True,
        prefetch=args.prefetch,
        cache_dir=Path(args.data) / ".cache",
    ) as L:
        for _ in range(args.epochs):
            t0 = time.perf_counter()
            n = 0
            for b in L:
                n += len(b["__key__"])
            _sync()
            rates.append(n / (time.perf_counter() - t0))
    return rates


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=8192)
    ap.add_argument("--per-shard", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--epochs", type=int, default=3, help="epoch 0 is warm-up")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)))
    ap.add_argument("--prefetch", type=int, default=3)
    ap.add_argument("--data", default="bench-out/gpu_image_data")
    ap.add_argument(
        "--skip", default="", help="comma list of rows to skip: dataloader,dali,mmload,torchvision"
    )
    ap.add_argument("--json")
    args = ap.parse_args()
    import torch

    if not torch.cuda.is_available():
        print("gpu_image: no CUDA GPU here; nothing measured")
        return
    skip = set(filter(None, args.skip.split(",")))
    paths = make_data(Path(args.data), args.images, args.per_shard)
    cores = len(os.sched_getaffinity(0))
    rep = Report(
        "GPU image pipeline: mmload vs DALI's own reader vs torch DataLoader",
        {
            "images": args.images,
            "jpeg": "500x375 q95",
            "batch": args.batch_size,
            "gpu": torch.cuda.get_device_name(),
            "transform": f"RandomResizedCrop({args.size}) + flip + normalize -> fp16 NCHW on the GPU",
            "epochs_timed": args.epochs - 1,
            "cores": cores,
            "dataloader_workers": args.workers,
        },
    )
    rows: dict[str, list[float]] = {}
    if "dataloader" not in skip:
        rows[f"torch DataLoader({args.workers} workers) + webdataset + PIL -> cuda"] = (
            dataloader_rates(paths, args)
        )
    if "dali" not in skip:
        rows[f"DALI fn.readers.webdataset + mixed ROI decode ({cores} threads)"] = dali_rates(
            paths, args, cores
        )
    if "mmload" not in skip:
        rows["mmload Loader(device='cuda'), DALI mixed"] = mmload_rates(paths, args, "dali")
    if "torchvision" not in skip:
        rows["mmload Loader(device='cuda'), torchvision nvJPEG + fused kernel"] = mmload_rates(
            paths, args, "torchvision"
        )
    best = {k: max(v[1:] or v) for k, v in rows.items()}
    dl = next((v for k, v in best.items() if k.startswith("torch")), None)
    dali = next((v for k, v in best.items() if k.startswith("DALI")), None)
    for k, v in best.items():
        rep.add(
            pipeline=k,
            best=v,
            median=float(np.median(rows[k][1:] or rows[k])),
            vs_dali=v / dali if dali else None,
            vs_dataloader=v / dl if dl else None,
        )
    rep.notes.append("targets: mmload >= 1.0x DALI's own pipeline, >= 4x the DataLoader")
    rep.print(["pipeline", "best", "median", "vs_dali", "vs_dataloader"])
    rep.save(args.json)


if __name__ == "__main__":
    main()
