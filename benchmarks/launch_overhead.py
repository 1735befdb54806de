"""Host-side cost of mmload's kernel launchers, against a baseline revision in the same run.

What a launcher does in Python before the kernel runs (argument checks, per-sample constants,
the pinned parameter upload, views, launch configuration) is time the training step's thread
spends per batch. This measures it for the fused image launcher (``--batch`` images of 375x500
-> 224x224 float16, host metadata, as ``decode/nvjpeg.py`` calls it) with the kernels replaced
by no-ops, under Numba's CUDA simulator (so it runs without a GPU; the simulator's buffers stand
in for device buffers, and Numba's own launch cost, about 10-30 us per launch on a GPU host, is
not included). Each revision runs in its own subprocess from a ``git worktree``; the row
``vs baseline`` is baseline time / this time.

    python benchmarks/launch_overhead.py [--baseline d26b49c] [--calls 3000]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import Report

ROOT = Path(__file__).resolve().parent.parent

# Runs in a subprocess with the revision's root first on sys.path; imports its kernels/ as the
# top-level package ``kernels`` (they use relative imports only).
_MEASURE = r"""
import json, os, sys, time
from types import SimpleNamespace
os.environ["NUMBA_ENABLE_CUDASIM"] = "1"
sys.path.insert(0, sys.argv[1])
import numpy as np
import kernels.crop_resize_normalize as crn

class Noop:
    launches = 0
    def __getitem__(self, config):
        return self
    def __call__(self, *args):
        Noop.launches += 1

crn._compiled = lambda name: Noop()
b, calls = int(sys.argv[2]), int(sys.argv[3])
h, w, s = 375, 500, 224
images = np.zeros(b * h * w * 3, np.uint8)
offsets = np.arange(b, dtype=np.int64) * (h * w * 3)
heights, widths = np.full(b, h, np.int32), np.full(b, w, np.int32)
rng = np.random.default_rng(0)
ch = rng.integers(100, h + 1, b)
cw = rng.integers(100, w + 1, b)
crop = SimpleNamespace(  # what mmload.augment.draw_crops returns: int64 windows, bool flips
    y0=rng.integers(0, h - ch + 1), x0=rng.integers(0, w - cw + 1), h=ch, w=cw,
    flip=rng.random(b) < 0.5,
)
out = np.zeros((b, 3, s, s), np.float16)
mean, std = (123.675, 116.28, 103.53), (58.395, 57.12, 57.375)

def call():
    crn.crop_resize_normalize(
        images, offsets, heights, widths, crop, out, dtype="float16", mean=mean, std=std
    )

for _ in range(50):
    call()
Noop.launches = 0
best = float("inf")
for _ in range(3):
    t0 = time.perf_counter()
    for _ in range(calls):
        call()
    best = min(best, (time.perf_counter() - t0) / calls)
print(json.dumps({"us": best * 1e6, "launches": Noop.launches / (3 * calls)}))
"""


def measure(root: Path, batch: int, calls: int) -> dict[str, float]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run(
        [sys.executable, "-c", _MEASURE, str(root), str(batch), str(calls)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
        check=False,
    )
    if proc.returncode != 0:
        raise SystemExit(f"launch_overhead: measuring {root} failed:\n{proc.stderr[-3000:]}")
    result: dict[str, float] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--baseline", default="d26b49c", help="git revision to compare against")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--calls", type=int, default=3000)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    rev = subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    with tempfile.TemporaryDirectory() as tmp:
        base_dir = Path(tmp) / "baseline"
        subprocess.run(
            ["git", "-C", str(ROOT), "worktree", "add", "--detach", str(base_dir), args.baseline],
            capture_output=True,
            check=True,
        )
        try:
            base = measure(base_dir, args.batch, args.calls)
            cur = measure(ROOT, args.batch, args.calls)
        finally:
            subprocess.run(
                ["git", "-C", str(ROOT), "worktree", "remove", "--force", str(base_dir)],
                capture_output=True,
                check=False,
            )
    rep = Report(
        "host-side cost of the fused image launcher (no-op kernels, CUDA simulator)",
        {
            "batch": args.batch,
            "images": "375x500 uint8, host metadata (int64 windows, bool flips)",
            "output": "224x224 float16, ImageNet mean/std",
            "calls": args.calls,
            "timing": "best of 3 loops, per call",
        },
    )
    rep.add(revision=f"{args.baseline} (baseline)", us_per_call=base["us"],
            launches=base["launches"], vs_baseline=1.0)  # fmt: skip
    rep.add(revision=f"{rev} (working tree)", us_per_call=cur["us"], launches=cur["launches"],
            vs_baseline=base["us"] / cur["us"])  # fmt: skip
    rep.notes.append(
        "Numba's own launch cost (argument marshalling, cuLaunchKernel) is not included: "
        "one launch fewer per batch saves it once more on a GPU host"
    )
    rep.print(["revision", "us_per_call", "launches", "vs_baseline"])
    rep.save(args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
