"""Data stall: the share of a training loop's time spent waiting for the next batch.

A training loop whose step costs a fixed ``step`` seconds (``time.sleep``: a GPU-bound step
leaves the CPU to the loader, as a sleep does) consumes batches of the multimodal pipeline of
``benchmarks/scaling.py`` (PIL image, WAV log-mel, tokens). For each step cost, each loader
runs ``--steps`` timed steps after ``--warmup`` untimed ones:

* mmload ``Loader(workers=N)`` (and ``workers=0``), whose ``stats()`` also says which stage the
  waiting is attributed to (``bottleneck``);
* the baseline ``DataLoader(num_workers=N)`` + webdataset doing the same work.

stall = time blocked in ``next(batch)`` / loop time. A loader whose capacity exceeds what the step
consumes should stall < 1%; ``capacity / demand`` is printed next to it (capacity: the loader's
samples/s with no step, measured first in the same run).

    python benchmarks/stall.py [--samples 512] [--steps 24] [--step-ms 50,100,200,400]
"""

from __future__ import annotations

import argparse
import itertools
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import Report
from scaling import baseline_loader, make_data, mmload_loader


def forever(loader: Any) -> Iterator[Any]:
    """Batches across epochs without end (each pass over the loader is one epoch)."""
    while True:
        yield from loader


def batch_len(b: Any) -> int:
    return len(b["__key__"]) if isinstance(b, dict) else len(b[3])


def capacity(it: Iterator[Any], batches: int) -> float:
    """Samples/s with no training step (after one warm-up batch)."""
    next(it)
    t0 = time.perf_counter()
    n = sum(batch_len(b) for b in itertools.islice(it, batches))
    return n / (time.perf_counter() - t0)


def stalled(it: Iterator[Any], step: float, steps: int, warmup: int) -> tuple[float, float]:
    """(stall fraction, loop seconds) of ``steps`` steps of ``step`` seconds."""
    for _ in range(warmup):
        next(it)
        time.sleep(step)
    waited = 0.0
    t0 = time.perf_counter()
    for _ in range(steps):
        w0 = time.perf_counter()
        next(it)
        waited += time.perf_counter() - w0
        time.sleep(step)
    total = time.perf_counter() - t0
    return waited / total, total


def attribute(before: dict[str, Any], after: dict[str, Any]) -> str | None:
    """The loader's own attribution (``stats()["bottleneck"]``) of the waiting in between."""
    from mmload.stats import bottleneck

    waits = {k: v - before["stage_wait"].get(k, 0.0) for k, v in after["stage_wait"].items()}
    wait = after["seconds"]["wait"] - before["seconds"]["wait"]
    elapsed = after["seconds"]["elapsed"] - before["seconds"]["elapsed"]
    return bottleneck(wait, waits, elapsed)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--samples", type=int, default=512)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--size", type=int, default=160)
    p.add_argument("--seconds", type=float, default=2.0)
    p.add_argument("--steps", type=int, default=24)
    p.add_argument("--warmup", type=int, default=4)
    p.add_argument("--step-ms", default="50,100,200,400")
    p.add_argument("--image-backend", default="pil", choices=["pil", "dali"])
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    steps_ms = [float(s) for s in args.step_ms.split(",")]
    rep = Report(
        "data stall of a fixed-cost training step",
        {
            "pipeline": "benchmarks/scaling.py: PIL image + WAV log-mel + tokens",
            "samples": args.samples,
            "batch": args.batch,
            "timed steps": args.steps,
            "warm-up steps": args.warmup,
            "step": "time.sleep (GPU-bound step stand-in)",
        },
    )
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        paths = make_data(root, args.samples, args.seconds)
        makers = {
            "mmload workers=0": lambda: mmload_loader(paths, args, 0, root / "c"),
            f"mmload workers={args.workers}": lambda: mmload_loader(
                paths, args, args.workers, root / "c"
            ),
            f"DataLoader(num_workers={args.workers}) + webdataset": lambda: baseline_loader(
                paths, args
            ),
        }
        # One loader at a time, closed before the next is built: a loader whose workers run
        # ahead must not fill its queues while another is measured.
        for name, make in makers.items():
            ld = make()
            it = forever(ld)  # one stream of batches across epochs, as a training run reads
            try:
                cap = capacity(it, 2 * args.steps // 3)
                print(f"capacity: {name}: {cap:,.0f} samples/s", flush=True)
                for ms in steps_ms:
                    demand = args.batch / (ms / 1e3)
                    before = ld.stats() if hasattr(ld, "stats") else None
                    frac, total = stalled(it, ms / 1e3, args.steps, args.warmup)
                    where = None
                    if before is not None:
                        where = attribute(before, ld.stats())
                    print(f"step {ms:g} ms: {name}: stall {frac:.2%} ({where})", flush=True)
                    rep.add(step_ms=ms, loader=name, stall_pct=100 * frac,
                            capacity_vs_demand=cap / demand, bottleneck=where,
                            loop_s=total)  # fmt: skip
            finally:
                it.close()
                close = getattr(ld, "close", None)
                if close is not None:
                    close()
    rep.notes.append("target: stall < 1% wherever capacity_vs_demand > 1")
    rep.print(["step_ms", "loader", "stall_pct", "capacity_vs_demand", "bottleneck", "loop_s"])
    rep.save(args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
