"""``mmload bench``: mmload and its baselines over the same shards, in one run, one table.

The work measured is the image path people compare loaders on: decode the JPEG field,
RandomResizedCrop to ``size``, random flip, ImageNet normalisation to float16 NCHW, plus the
label. Rows (each built once, then one epoch each per round, in turn; round 0 warms up):

* ``mmload`` ``Loader`` (``workers``, ``backend`` as given);
* ``DataLoader(num_workers=W) + webdataset + PIL``, the standard recipe (the ratio's base);
* ``DALI fn.readers.webdataset`` + ROI random-crop decode, when DALI is installed (the reader
  without mmload's guarantees: no exact resume, a buffer shuffle, a bad JPEG fails the run).

Per row: median samples/s of the timed rounds, its ratio to the DataLoader row, CPU cores kept
busy (this process and its workers, from ``/proc``), and peak resident memory. ``--json``
saves the report; ``--plot`` draws it (``pip install "mmload[plot]"``).
"""

from __future__ import annotations

import io
import math
import os
import platform
import random
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from mmload.errors import ConfigError, MissingDependencyError

__all__ = [
    "BenchRow",
    "dali_reader_epoch",
    "dataloader_baseline",
    "run_bench",
    "webdataset_loader",
]

MEAN = [0.485 * 255, 0.456 * 255, 0.406 * 255]
STD = [0.229 * 255, 0.224 * 255, 0.225 * 255]


@dataclass
class BenchRow:
    name: str
    rates: list[float] = field(default_factory=list)
    cores: list[float] = field(default_factory=list)
    peak_rss_mb: float = 0.0

    @property
    def median(self) -> float:
        return statistics.median(self.rates) if self.rates else 0.0


def random_resized_crop(width: int, height: int, rng: random.Random) -> tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop window ``(top, left, h, w)``: area 8-100%, aspect 3/4-4/3
    (10 tries, then the whole image)."""
    area = width * height
    for _ in range(10):
        target = area * rng.uniform(0.08, 1.0)
        ar = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
        w = round(math.sqrt(target * ar))
        h = round(math.sqrt(target / ar))
        if 0 < w <= width and 0 < h <= height:
            return rng.randint(0, height - h), rng.randint(0, width - w), h, w
    return 0, 0, height, width


def pil_transform(jpg: bytes, size: int) -> Any:
    """The baseline's image work: PIL decode, RandomResizedCrop, flip, normalise: f16 CHW."""
    import torch
    from PIL import Image

    rng = random.Random()
    im = Image.open(io.BytesIO(jpg)).convert("RGB")
    i, j, h, w = random_resized_crop(im.width, im.height, rng)
    im = im.resize((size, size), Image.Resampling.BILINEAR, box=(j, i, j + w, i + h))
    if rng.random() < 0.5:
        im = im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    x = torch.from_numpy(np.asarray(im, dtype=np.float32)).permute(2, 0, 1)
    mean = torch.tensor(MEAN).view(3, 1, 1)
    std = torch.tensor(STD).view(3, 1, 1)
    return ((x - mean) / std).half()


def dataloader_baseline(
    paths: Sequence[str], batch: int, workers: int, size: int, image: str, label: str | None
) -> Any:
    """``torch.utils.data.DataLoader`` over ``webdataset.WebDataset(...).shuffle(1000)`` with
    :func:`pil_transform`, batched; persistent workers. Yields ``(images, labels)``."""

    def transform(sample: dict[str, Any]) -> tuple[Any, int]:
        y = int(sample[label]) if label is not None else 0
        return pil_transform(sample[image], size), y

    return webdataset_loader(paths, batch, workers, transform)


def webdataset_loader(
    paths: Sequence[str],
    batch: int,
    workers: int,
    transform: Callable[[dict[str, Any]], Any],
    shuffle: int = 1000,
) -> Any:
    """The standard recipe around ``transform``: ``DataLoader(num_workers=workers,
    persistent_workers)`` over ``webdataset.WebDataset(paths)`` split by node and worker,
    shuffled in a ``shuffle``-sample buffer, mapped, batched (the last batch partial)."""
    import torch

    try:
        import webdataset as wds
    except ImportError:
        from mmload.errors import MissingDependencyError

        raise MissingDependencyError(
            "webdataset", "bench", "the DataLoader + webdataset baseline"
        ) from None

    ds = (
        wds.WebDataset(
            list(paths),
            shardshuffle=len(paths),
            nodesplitter=wds.split_by_node,
            workersplitter=wds.split_by_worker,
            empty_check=False,
        )
        .shuffle(shuffle)
        .map(transform)
        .batched(batch, partial=True)
    )
    return torch.utils.data.DataLoader(
        ds, batch_size=None, num_workers=workers, persistent_workers=workers > 0
    )


def dali_reader_epoch(
    paths: Sequence[str], batch: int, threads: int, size: int, samples: int, image: str
) -> Callable[[], int]:
    """DALI's own reader + ROI random-crop decode on the CPU; returns a function that runs one
    epoch (``samples // batch`` batches) and returns the samples it produced."""
    import nvidia.dali.fn as fn
    import nvidia.dali.types as types
    from nvidia.dali import pipeline_def

    dali_fn: Any = fn  # DALI's generated stubs type operator outputs loosely
    dali_types: Any = types
    dali_pipeline_def: Any = pipeline_def  # (and want an int device_id; None is the CPU)

    @dali_pipeline_def(batch_size=batch, num_threads=threads, device_id=None, seed=1)
    def pipe() -> Any:
        jpg = dali_fn.readers.webdataset(
            paths=list(paths), ext=[image], random_shuffle=True, initial_fill=1024, name="r"
        )
        img = dali_fn.decoders.image_random_crop(jpg, device="cpu", random_area=[0.08, 1.0])
        img = dali_fn.resize(img, resize_x=size, resize_y=size)
        return dali_fn.crop_mirror_normalize(
            img,
            mirror=dali_fn.random.coin_flip(),
            mean=MEAN,
            std=STD,
            dtype=dali_types.FLOAT16,
            output_layout="CHW",
        )

    p = pipe()
    p.build()
    steps = max(1, samples // batch)

    def epoch() -> int:
        for _ in range(steps):
            p.run()
        return steps * batch

    return epoch


def tree_usage(root: int | None = None) -> tuple[float, float]:
    """(CPU seconds, resident MB) of process ``root`` (default this one) and its live
    descendants, from ``/proc`` (Linux; zeros elsewhere)."""
    if not os.path.isdir("/proc"):
        return 0.0, 0.0
    tick = os.sysconf("SC_CLK_TCK")
    page = os.sysconf("SC_PAGE_SIZE")
    parent: dict[int, int] = {}
    usage: dict[int, tuple[float, float]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", encoding="utf-8") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parent[int(name)] = int(fields[1])
        cpu = (int(fields[11]) + int(fields[12])) / tick
        usage[int(name)] = (cpu, int(fields[21]) * page / 1e6)
    root = os.getpid() if root is None else root
    cpu = rss = 0.0
    todo = [root]
    while todo:
        pid = todo.pop()
        c, r = usage.get(pid, (0.0, 0.0))
        cpu, rss = cpu + c, rss + r
        todo.extend(child for child, p in parent.items() if p == pid)
    return cpu, rss


def run_bench(
    runs: dict[str, Callable[[], Any]], epochs: int, progress: bool = True
) -> list[BenchRow]:
    """Each pipeline in turn: ``runs[name]()`` builds it and returns ``(epoch, close)``; its
    first epoch warms up, the other ``epochs - 1`` are timed back to back, then it is closed
    before the next one is built. (Interleaving the pipelines epoch by epoch would let a
    loader whose workers run ahead, as mmload's do, work while another is being timed.)"""
    rows = {name: BenchRow(name) for name in runs}
    bar: Any = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=epochs * len(runs), unit="epoch", file=sys.stderr)
    try:
        for name, build in runs.items():
            epoch, close = build()
            try:
                for r in range(epochs):
                    c0, _ = tree_usage()
                    t0 = time.perf_counter()
                    n = epoch()
                    wall = time.perf_counter() - t0
                    c1, rss = tree_usage()
                    row = rows[name]
                    row.peak_rss_mb = max(row.peak_rss_mb, rss)
                    if r:
                        row.rates.append(n / wall)
                        row.cores.append((c1 - c0) / wall)
                    if bar is not None:
                        bar.set_postfix_str(f"{name[:40]}: {n / wall:,.0f}/s")
                        bar.update()
            finally:
                if close is not None:
                    close()
    finally:
        if bar is not None:
            bar.close()
    return list(rows.values())


def environment() -> dict[str, Any]:
    from importlib.metadata import PackageNotFoundError, version

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            cpu = next(
                (ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu
            )
    except OSError:
        pass
    versions = {}
    for dist in ("mmload", "torch", "numpy", "nvidia-dali-cuda130", "webdataset", "pillow"):
        try:
            versions[dist] = version(dist)
        except PackageNotFoundError:
            continue
    return {
        "cpu": cpu,
        "cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "python": platform.python_version(),
        "versions": versions,
    }


def plot(rows: list[BenchRow], base: float, path: str, title: str) -> None:
    """A horizontal bar chart of samples/s (ratio to the base in the labels) as a PNG."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise MissingDependencyError("matplotlib", "plot", "mmload bench --plot") from None
    import textwrap

    fig, ax = plt.subplots(figsize=(11, 0.6 * len(rows) + 1.8))
    names = [f"{r.name} ({r.median / base:.2f}x)" if base else r.name for r in rows]
    ax.barh(names[::-1], [r.median for r in rows][::-1], color="#4c72b0")
    ax.set_xlabel("samples/s (median of timed epochs)")
    fig.suptitle("\n".join(textwrap.wrap(title, 100)), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def check_args(batch: int, epochs: int, workers: int, size: int) -> None:
    for name, v, low in (("batch-size", batch, 1), ("epochs", epochs, 2), ("size", size, 1)):
        if v < low:
            raise ConfigError(f"--{name}={v}: must be >= {low}")
    if workers < 0:
        raise ConfigError(f"--workers={workers}: must be >= 0")
