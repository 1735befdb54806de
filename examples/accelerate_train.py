"""Train a tiny image classifier with Hugging Face Accelerate on mmload batches.

    accelerate launch --multi_gpu --num_processes 2 examples/accelerate_train.py \
        --shards 'data/train-*.tar'          # 2 processes; on a CPU-only host gloo is used

Make data with ``mmload demo --out data --keep``. The supported way: ``accelerator.prepare()``
takes the model and optimizer, and the ``mmload.Loader`` is passed through it unchanged (it is
not a DataLoader; each rank already reads its own batches, rank and world size from the launcher's
environment). ``--wrap`` instead passes ``DataLoader(mmload.IterableDataset(...))`` to
``prepare()``, which mmload refuses with a clear error (Accelerate would dispatch or shard the
batches a second time); ``--wrap-workers N`` gives that DataLoader N workers;
``--no-dispatch`` sets ``dispatch_batches=False`` (Accelerate then fails on its own, see
docs/integrations.md).

With ``--report`` process 0 writes the keys each process saw and its step count to a JSON file
(the test reads it).
"""

from __future__ import annotations

import argparse
import json
import os

import torch
from accelerate import Accelerator, DataLoaderConfiguration
from accelerate.utils import gather_object
from torch import nn

import mmload


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shards", required=True, nargs="+")
    ap.add_argument("--global-batch", type=int, default=8)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--report", help="process 0 writes a JSON report here")
    ap.add_argument("--wrap", action="store_true", help="prepare() a DataLoader (refused)")
    ap.add_argument("--wrap-workers", type=int, default=0)
    ap.add_argument("--no-dispatch", action="store_true", help="dispatch_batches=False")
    args = ap.parse_args()

    config = DataLoaderConfiguration(dispatch_batches=False if args.no_dispatch else None)
    acc = Accelerator(cpu=not torch.cuda.is_available(), dataloader_config=config)
    world = acc.num_processes
    if args.global_batch % world:
        raise SystemExit(f"--global-batch {args.global_batch} is not divisible by {world}")
    torch.manual_seed(0)
    model = nn.Sequential(nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(48, 10))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    opts = {
        "batch_size": args.global_batch // world,
        "shuffle": True,
        "seed": 0,
        "fields": ["jpg", "cls"],
        "image": mmload.ImageConfig(size=32, dtype="float32"),
        "device": "cpu",
    }
    if args.wrap:
        ds = mmload.IterableDataset(args.shards, **opts)
        data = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=args.wrap_workers)
        model, opt, data = acc.prepare(model, opt, data)
    else:
        data = mmload.Loader(args.shards, **opts)
        model, opt, data = acc.prepare(model, opt, data)
        assert isinstance(data, mmload.Loader)  # passed through unchanged

    keys: list[list[str]] = []
    steps = 0
    for epoch in range(args.epochs):
        if hasattr(data, "set_epoch"):
            data.set_epoch(epoch)
        keys.append([])
        for batch in data:
            loss = nn.functional.cross_entropy(model(batch["jpg"]), batch["cls"])
            opt.zero_grad()
            acc.backward(loss)
            opt.step()
            keys[-1] += batch["__key__"]
            steps += 1
        acc.print(f"epoch {epoch}: {steps} steps, loss {loss.item():.3f}")
    reports = gather_object([{"rank": acc.process_index, "steps": steps, "keys": keys}])
    if acc.is_main_process and args.report:
        with open(args.report, "w", encoding="utf-8") as f:
            json.dump({"world_size": world, "ranks": reports}, f)
    acc.wait_for_everyone()
    if isinstance(data, mmload.Loader):
        data.close()
    acc.end_training()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
