"""Ray Train: a TorchTrainer whose workers train on mmload batches, with the reading (and, if
asked, the decoding) on Ray actors.

    python examples/train_ray.py --shards 'data/train-*.tar' --trainers 2 --readers 1

Each Ray Train worker is one rank: it builds its own ``mmload.Loader`` with the rank and world
size Ray Train gives it (``mmload.distributed.ray.dataset_shard(...)``, as
``ray.train.get_dataset_shard`` is for Ray Data) and
``workers=RayWorkers(--readers)``, so its share of the plan is read by actors anywhere in the
cluster and handed to it in plan order: every sample once per epoch, equal steps per rank
(padding counted), and ``state_dict()`` resumes exactly. Encoded bytes travel to the trainer,
which decodes them (``--decode-on-readers`` decodes on the actors instead). Without
``--shards`` it trains on a small generated data set. ``--report`` writes each rank's keys and
steps to a JSON file (the test reads it).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from typing import Any


def train_loop(config: dict[str, Any]) -> None:
    import torch
    from ray import train
    from torch import nn

    import mmload
    from mmload.distributed.ray import RayWorkers, dataset_shard, train_world

    rank, _ = train_world()
    torch.manual_seed(0)
    model = nn.Sequential(nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(48, 10))
    model = train.torch.prepare_model(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    # This worker's shard of the plan (as ray.train.get_dataset_shard is for Ray Data).
    loader = dataset_shard(
        config["shards"],
        batch_size=config["batch"],
        shuffle=True,
        seed=0,
        fields=["jpg", "cls"],
        image=mmload.ImageConfig(size=32, dtype="float32", backend="pil"),
        workers=RayWorkers(config["readers"], decode=config["decode"], num_cpus=0),
        cache_dir=config["cache_dir"],
    )
    keys: list[str] = []
    steps = 0
    with loader:
        for _epoch in range(config["epochs"]):
            for batch in loader:
                loss = nn.functional.cross_entropy(model(batch["jpg"]), batch["cls"])
                opt.zero_grad()
                loss.backward()
                opt.step()
                keys += batch["__key__"]
                steps += 1
        stats = loader.stats()
    out = {"rank": rank, "steps": steps, "keys": keys, "padded": stats["samples_padded"]}
    with open(os.path.join(config["out"], f"rank-{rank}.json"), "w", encoding="utf-8") as f:
        json.dump(out, f)
    train.report({"steps": steps, "loss": float(loss.detach())})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shards", nargs="+")
    ap.add_argument("--trainers", type=int, default=2)
    ap.add_argument("--readers", type=int, default=1, help="Ray reader actors per trainer")
    ap.add_argument("--decode-on-readers", action="store_true")
    ap.add_argument("--batch", type=int, default=8, help="per trainer")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--num-cpus", type=int, help="for a local Ray cluster (default: all)")
    ap.add_argument("--report", help="write every rank's keys and steps here (JSON)")
    args = ap.parse_args()

    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    work = tempfile.mkdtemp(prefix="mmload-ray-")
    shards = args.shards
    if not shards:
        from mmload.demo import demo_samples
        from mmload.sources.write import write_tar_shards

        shards = write_tar_shards(
            demo_samples(96, size=(64, 48)), os.path.join(work, "s-%04d.tar"), maxcount=12
        )
    if not ray.is_initialized():
        ray.init(num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False)
    out = os.path.join(work, "ranks")
    os.makedirs(out)
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={
            "shards": shards,
            "batch": args.batch,
            "readers": args.readers,
            "decode": args.decode_on_readers,
            "epochs": args.epochs,
            "cache_dir": os.path.join(work, "cache"),
            "out": out,
        },
        scaling_config=ScalingConfig(num_workers=args.trainers, use_gpu=False),
        run_config=RunConfig(storage_path=os.path.join(work, "ray-results")),
    )
    trainer.fit()
    ranks = []
    for name in sorted(os.listdir(out)):
        with open(os.path.join(out, name), encoding="utf-8") as f:
            ranks.append(json.load(f))
    n = sum(len(r["keys"]) for r in ranks)
    print(f"{len(ranks)} trainers, steps {[r['steps'] for r in ranks]}, {n} samples")
    if args.report:
        with open(args.report, "w", encoding="utf-8") as f:
            json.dump({"ranks": ranks}, f)


if __name__ == "__main__":
    main()
