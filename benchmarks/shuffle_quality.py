"""Shuffle quality: mmload's epoch order vs shard shuffle + a 1,000-sample buffer (webdataset).

The data set is the hard case: every shard holds a single label, shards are stored in label
order. Metrics, averaged over epochs/seeds:
* distinct labels in the first batch and entropy of the labels in the first 10 batches (bits;
  the ideal is log2(labels));
* mean normalised displacement |out position - stored position| / N (ideal 1/3);
* fraction of neighbouring samples from the same shard (ideal ~ 1 / shards).
The baseline uses webdataset's own ``_shuffle`` (bufsize=1000, initial=100) after a shard shuffle.

    python benchmarks/shuffle_quality.py
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import Report


def metrics(
    order: np.ndarray, shard_of: np.ndarray, labels: np.ndarray, batch: int
) -> dict[str, float]:
    n = len(order)
    lab = labels[order]
    first = lab[:batch]
    ten = lab[: 10 * batch]
    p = np.bincount(ten) / len(ten)
    p = p[p > 0]
    total = len(labels)  # a rank's order is a subset: compare positions on the same scale
    disp = np.abs(np.arange(n) * (total / n) - order).mean() / total
    same = (shard_of[order][1:] == shard_of[order][:-1]).mean()
    return {
        "labels_first_batch": float(len(np.unique(first))),
        "entropy_10_batches": float(-(p * np.log2(p)).sum()),
        "displacement": float(disp),
        "same_shard_neighbours": float(same),
    }


def webdataset_order(counts: np.ndarray, seed: int, bufsize: int) -> np.ndarray:
    from webdataset.filters import _shuffle

    starts = np.concatenate([[0], np.cumsum(counts)])
    rng = random.Random(seed)
    shards = list(range(len(counts)))
    rng.shuffle(shards)
    stream = iter([int(i) for s in shards for i in range(starts[s], starts[s + 1])])
    return np.fromiter(
        _shuffle(stream, bufsize=bufsize, initial=100, rng=random.Random(seed + 1)), dtype=np.int64
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shards", type=int, default=200)
    ap.add_argument("--per-shard", type=int, default=500)
    ap.add_argument("--labels", type=int, default=100)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--json")
    args = ap.parse_args()

    from mmload.config import ShuffleConfig
    from mmload.pipeline import default_partitions
    from mmload.plan import EpochOrder

    counts = np.full(args.shards, args.per_shard, dtype=np.int64)
    shard_of = np.repeat(np.arange(args.shards), counts)
    labels = shard_of * args.labels // args.shards  # each shard one label, stored in label order
    rep = Report(
        "Shuffle quality (label-sorted shards)",
        {
            "shards": args.shards,
            "samples_per_shard": args.per_shard,
            "labels": args.labels,
            "batch": args.batch,
            "seeds": args.seeds,
            "ideal_entropy_bits": round(float(np.log2(args.labels)), 2),
        },
    )
    variants: list[tuple[str, tuple[object, ...]]] = [
        ("webdataset: shard shuffle + buffer 1000", ("wds", 1000))
    ]
    default_p = default_partitions(args.shards, 1)
    for inter in (8, 32, 0):
        variants.append(
            (f"mmload ShuffleConfig(interleave={inter}), P=1", (ShuffleConfig(inter), 1, 1))
        )
    variants.append(
        (
            f"mmload default: interleave=32, P={default_p} (one rank)",
            (ShuffleConfig(), default_p, 1),
        )
    )
    for w in (8, 16):
        p = default_partitions(args.shards, w)
        variants.append(
            (
                f"mmload default for {w} ranks (P={p}): the global batch",
                (ShuffleConfig(), p, 1),
            )
        )
        variants.append(
            (
                f"mmload default for {w} ranks (P={p}): what rank 0 reads",
                (ShuffleConfig(), p, w),
            )
        )
    for name, v in variants:
        rows = []
        for seed in range(args.seeds):
            if isinstance(v[0], str):
                order = webdataset_order(counts, seed, v[1])
            else:
                cfg, parts, ranks = v
                assert isinstance(cfg, ShuffleConfig)
                order = EpochOrder(counts, seed=seed, epoch=0, shuffle=cfg, partitions=parts).full()
                order = order[0::ranks]  # rank 0 of `ranks` takes positions 0 mod ranks
            assert len(np.unique(order)) == len(order)
            rows.append(metrics(order, shard_of, labels, args.batch))
        rep.add(order=name, **{k: float(np.mean([r[k] for r in rows])) for k in rows[0]})
    rep.notes.append("interleave=0 shuffles the whole data set (pread-able shards make that free)")
    rep.print(
        [
            "order",
            "labels_first_batch",
            "entropy_10_batches",
            "displacement",
            "same_shard_neighbours",
        ]
    )
    rep.save(args.json)


if __name__ == "__main__":
    main()
