"""Online training: a small ranking model learns from events while a streaming job commits them.

    python examples/stream_producer.py --events data/events --features data/features &
    torchrun --standalone --nproc_per_node=2 examples/online_train.py \\
        --events data/events --features data/features

Each rank reads the growing events directory through ``mmload.StreamLoader`` (windows of
committed part files, cut by rank 0, recorded in a ledger) and joins the users' features as of
each event's time from a ``FeatureTable`` that a ``LedgerSource`` fills from the features
directory, in the order of a ledger rank 0 writes, so every rank and a restarted run join a
window against the same feature version; ``--late wait`` (default) cuts a window only once the
features' watermark has passed its events (or ``--max-wait`` has gone by). When no new file
arrives for ``--max-wait`` seconds every rank gets ``StreamIdle`` at the same step;
``--idle-limit`` such waits in a row end the run. ``--stop-after`` steps writes a
checkpoint (model + stream cursor) and stops; ``--resume`` continues from it, exactly after the
last batch trained on. ``--report``: rank 0 writes every rank's keys, times and joined feature
timestamps to a JSON file (the tests check exactly-once and no future feature values with it).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from typing import Any

import pyarrow as pa
import torch
import torch.distributed as dist
from torch import nn

import mmload
from mmload.features import FeatureTable
from mmload.features.ledger import LedgerSource

USERS, ITEMS = 64, 128


class Ranker(nn.Module):
    def __init__(self, dim: int = 16) -> None:
        super().__init__()
        self.user = nn.Embedding(USERS, dim)
        self.item = nn.Embedding(ITEMS, dim)
        self.ctr = nn.Linear(1, 1)

    def forward(self, user: torch.Tensor, item: torch.Tensor, ctr: torch.Tensor) -> torch.Tensor:
        dot = (self.user(user) * self.item(item)).sum(-1)
        return dot + self.ctr(ctr[:, None]).squeeze(-1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--events", required=True, help="the growing directory of event part files")
    ap.add_argument("--features", required=True, help="the directory of feature part files")
    ap.add_argument("--ledger", help="window ledger (default: <events>/_mmload/ledger)")
    ap.add_argument("--global-batch", type=int, default=64)
    ap.add_argument("--max-wait", type=float, default=5.0, help="seconds without a new file")
    ap.add_argument("--idle-limit", type=int, default=1, help="idle waits in a row that end it")
    ap.add_argument("--max-steps", type=int, default=1_000_000)
    ap.add_argument("--checkpoint")
    ap.add_argument("--stop-after", type=int, help="checkpoint after this many steps and stop")
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--report")
    ap.add_argument(
        "--late",
        choices=["join", "skip", "wait"],
        default="wait",
        help="events newer than the features' watermark: join what is there, join nothing, or "
        "wait (up to --max-wait) for the features before cutting the window",
    )
    args = ap.parse_args()

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    model = Ranker()
    ddp = nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.Adam(ddp.parameters(), lr=0.01)

    schema = pa.schema(
        [
            ("user_id", pa.int64()),
            ("ts", pa.int64()),
            ("ctr", pa.float32()),
            ("feat_ts", pa.int64()),
        ]
    )
    # With the whole schema, a batch that comes before the first feature file joins nothing
    # (found = False, defaults) instead of failing.
    table = FeatureTable(key="user_id", timestamp="ts", columns=schema)
    # Feature files are applied in the order of a ledger rank 0 writes: every rank, and a
    # restarted run, joins a window against the same feature version (recorded with it).
    source = LedgerSource(args.features, table, sequencer=rank == 0, poll_interval=0.05)
    stream = mmload.StreamLoader(
        args.events,
        batch_size=args.global_batch // world,
        ledger=args.ledger,
        max_wait_s=args.max_wait,
        poll_s=0.05,
        shuffle=True,
        fields=["user_id", "item_id", "event_ts", "label"],
        features=mmload.FeatureJoin(
            table, key="user_id", timestamp="event_ts", late=args.late, max_wait_s=args.max_wait
        ),
        feature_source=source,
    )
    if args.resume:
        ckpt = torch.load(args.checkpoint, weights_only=True)
        model.load_state_dict(ckpt["model"])
        stream.load_state_dict({k: int(v) for k, v in ckpt["stream"].items()})

    steps, idle, losses = 0, 0, []
    seen: list[dict[str, Any]] = []
    stop = False
    with source, stream:
        while not stop and steps < args.max_steps:
            try:
                for batch in stream:
                    logit = ddp(batch["user_id"], batch["item_id"], batch["ctr"])
                    loss = nn.functional.binary_cross_entropy_with_logits(
                        logit, batch["label"].float()
                    )
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
                    losses.append(float(loss.detach()))
                    seen.append(
                        {
                            "t": time.time(),
                            "window": stream.batch_window,
                            "keys": batch["__key__"],
                            "event_ts": batch["event_ts"].tolist(),
                            "feat_ts": batch["feat_ts"].tolist(),
                            "found": batch["__features_found__"].tolist(),
                            "early": batch["__features_early__"].tolist(),
                            "feature_version": stream.batch_feature_version,
                        }
                    )
                    steps += 1
                    idle = 0
                    if steps == args.stop_after or steps >= args.max_steps:
                        stop = True
                        break
            except mmload.StreamIdle as e:
                idle += 1
                if rank == 0:
                    print(f"idle: {e}", flush=True)
                if idle >= args.idle_limit:
                    break
        if args.stop_after is not None and args.checkpoint and rank == 0:
            torch.save(
                {"model": model.state_dict(), "stream": stream.state_dict()}, args.checkpoint
            )
        stats = stream.stats()

    gathered: list[object] = [None] * world
    dist.all_gather_object(gathered, {"rank": rank, "steps": steps, "seen": seen, "stats": stats})
    if rank == 0:
        n = sum(len(s["keys"]) for g in gathered for s in g["seen"])  # type: ignore[index]
        print(f"{world} ranks, {steps} steps each, {n} samples, last loss {losses[-1]:.3f}")
        if args.report:
            with open(args.report, "w", encoding="utf-8") as f:
                json.dump({"world_size": world, "ranks": gathered, "losses": losses}, f)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
