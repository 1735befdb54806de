"""Train a tiny image classifier with DDP on mmload batches; run it with torchrun.

    mmload demo --out data --samples 512        # writes data/demo-*.tar (JPEG, cls, ...), kept
    torchrun --standalone --nproc_per_node=2 examples/torchrun_train.py --shards 'data/*.tar'

Each rank builds a ``mmload.Loader`` (rank and world size come from torchrun's environment),
trains for ``--epochs`` epochs and checkpoints the loader state with the model. At the end the
keys every rank saw are all-gathered; with ``--report`` rank 0 writes them, the steps per rank and
the loader stats to a JSON file (the distributed test reads it). ``--resume`` restarts from a
checkpoint written by ``--stop-after`` steps, possibly with another number of processes.
"""

from __future__ import annotations

import argparse
import json
import os

import torch
import torch.distributed as dist
from torch import nn

import mmload


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shards", required=True, nargs="+")
    ap.add_argument("--global-batch", type=int, default=8)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--image-size", type=int, default=32)
    ap.add_argument("--report", help="rank 0 writes a JSON report here")
    ap.add_argument("--checkpoint", help="checkpoint path (loader + model state)")
    ap.add_argument("--stop-after", type=int, help="stop after this many steps and checkpoint")
    ap.add_argument("--resume", action="store_true", help="start from --checkpoint")
    ap.add_argument("--cache-dir")
    ap.add_argument(
        "--partitions",
        type=int,
        default=6,
        help="order partitions: every world size you resume on must divide it (6: 1, 2, 3, 6)",
    )
    ap.add_argument(
        "--ray-readers",
        type=int,
        default=0,
        help="read on this many Ray actors per rank, on the running Ray cluster (ray start)",
    )
    args = ap.parse_args()

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    if args.global_batch % world:
        raise SystemExit(f"--global-batch {args.global_batch} is not divisible by {world} ranks")
    torch.manual_seed(args.seed)
    model = nn.Sequential(nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(48, 10))
    ddp = nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1)

    workers: object = 0
    if args.ray_readers:  # this rank's reading on Ray actors of the running cluster
        from mmload.distributed.ray import RayWorkers

        # RAY_ADDRESS names the cluster (``ray start --head`` prints it)
        workers = RayWorkers(args.ray_readers, num_cpus=0)
    loader = mmload.Loader(
        args.shards,
        batch_size=args.global_batch // world,
        shuffle=True,
        seed=args.seed,
        fields=["jpg", "cls"],
        image=mmload.ImageConfig(size=args.image_size, dtype="float32"),
        cache_dir=args.cache_dir,
        partitions=args.partitions,
        workers=workers,  # type: ignore[arg-type]
    )
    if args.resume:
        ckpt = torch.load(args.checkpoint, weights_only=True)
        model.load_state_dict(ckpt["model"])
        loader.load_state_dict({k: int(v) for k, v in ckpt["loader"].items()})

    keys: list[str] = []
    steps = 0
    losses = []
    with loader:
        start_epoch = loader.epoch
        for _epoch in range(start_epoch, args.epochs):
            for batch in loader:
                loss = nn.functional.cross_entropy(ddp(batch["jpg"]), batch["cls"])
                opt.zero_grad()
                loss.backward()
                opt.step()
                losses.append(float(loss.detach()))
                keys += batch["__key__"]
                steps += 1
                if args.stop_after is not None and steps == args.stop_after:
                    break
            if args.stop_after is not None and steps == args.stop_after:
                break
        if args.checkpoint and rank == 0 and not args.resume:
            torch.save(
                {"model": model.state_dict(), "loader": loader.state_dict()}, args.checkpoint
            )
        stats = loader.stats()

    gathered: list[object] = [None] * world
    dist.all_gather_object(gathered, {"rank": rank, "steps": steps, "keys": keys, "stats": stats})
    if rank == 0 and args.report:
        with open(args.report, "w", encoding="utf-8") as f:
            json.dump({"world_size": world, "ranks": gathered, "losses": losses}, f)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
