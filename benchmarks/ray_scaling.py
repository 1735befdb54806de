"""mmload on Ray actors against the local loader, same pipeline, same run: throughput with 1 and
2 Ray CPU workers, decoding on the actors (decoded tensors over Ray) or on the trainer (encoded
bytes over Ray), and the bytes per sample each ships.

The pipeline is ``benchmarks/scaling.py``'s: per sample a 320x240 real-photo JPEG (PIL decode,
RandomResizedCrop, flip, normalise, float16), a 1-3 s WAV (log-mel) and a tokenised caption.
A local Ray cluster (``ray.init(num_cpus=N)``) runs in the same process; its start is not timed.

    python benchmarks/ray_scaling.py --samples 512 --rounds 2
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import Report
from scaling import TOKENS, make_data, mmload_loader


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--samples", type=int, default=512)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--size", type=int, default=160)
    p.add_argument("--seconds", type=float, default=2.0)
    p.add_argument("--rounds", type=int, default=2, help="timed epochs per row")
    p.add_argument("--num-cpus", type=int, default=os.cpu_count() or 2)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    args.image_backend = "pil"  # scaling.py's loader, with PIL images

    import ray
    import torch

    from mmload.distributed.ray import RayWorkers

    ray.init(num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False)
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        paths = make_data(root, args.samples, args.seconds)
        raw_bytes = sum(os.path.getsize(x) for x in paths) / args.samples
        decoded_bytes = 0.0
        variants: dict[str, tuple[Any, float | None]] = {
            "local Loader(workers=0)": (0, None),
            "Ray, 1 actor, decode on actor": (RayWorkers(1, decode=True, num_cpus=0), None),
            "Ray, 2 actors, decode on actors": (RayWorkers(2, decode=True, num_cpus=0), None),
            "Ray, 2 actors, bytes to trainer": (RayWorkers(2, decode=False, num_cpus=0), raw_bytes),
        }
        base = None
        for name, (workers, shipped) in variants.items():
            ld = mmload_loader(paths, args, workers, root / "cache")
            rates = []
            with ld:
                for r in range(args.rounds + 1):
                    t0 = time.perf_counter()
                    n = 0
                    for b in ld:
                        n += len(b["__key__"])
                        if not decoded_bytes:
                            decoded_bytes = sum(
                                v.numel() * v.element_size()
                                for v in b.values()
                                if isinstance(v, torch.Tensor)
                            ) / len(b["__key__"])
                    if r:
                        rates.append(n / (time.perf_counter() - t0))
            rate = statistics.median(rates)
            base = base or rate
            if shipped is None and workers:
                shipped = decoded_bytes
            rows.append(
                {
                    "pipeline": name,
                    "samples_s": rate,
                    "vs_local": rate / base,
                    "kb_shipped_per_sample": round((shipped or 0) / 1e3, 1),
                }
            )
    ray.shutdown()
    rep = Report(
        "mmload on Ray actors vs the local loader (same pipeline, same run)",
        {
            "samples": args.samples,
            "batch": args.batch,
            "ray_num_cpus": args.num_cpus,
            "ray": ray.__version__,
            "pipeline": f"PIL 320x240 -> RRC {args.size} f16 + WAV log-mel + {TOKENS} tokens",
            "rounds": args.rounds,
        },
    )
    for r in rows:
        rep.add(**r)
    rep.notes.append(
        "kb_shipped_per_sample: what crosses from an actor to the trainer per sample (encoded "
        "members, or the decoded tensors); 0 for the local loader"
    )
    rep.print(["pipeline", "samples_s", "vs_local", "kb_shipped_per_sample"])
    rep.save(args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
