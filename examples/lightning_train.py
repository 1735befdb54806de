"""Lightning: a ``mmload.Loader`` returned from ``train_dataloader()`` is checkpointed and resumed
by Lightning itself (the Loader has ``state_dict``/``load_state_dict``).

    python examples/lightning_train.py --data data            # one process
    python examples/lightning_train.py --data data --devices 2 # DDP on 2 CPU processes

A checkpoint is written every ``--every`` steps; ``--resume CKPT`` continues the run from one,
mid-epoch, with exactly the batches not yet trained on. Without ``--data``-files it trains on a
small generated Parquet data set. ``--report`` writes each rank's batches (epoch and keys; the
test reads it). Every epoch trains on every sample: Lightning re-iterates the Loader per epoch,
and each iteration after a complete one is the next epoch.
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Any

import lightning as L
import torch
from torch import nn

import mmload


class Model(L.LightningModule):
    def __init__(self, paths: list[str], batch: int, seen: list[dict[str, Any]]) -> None:
        super().__init__()
        self.paths, self.batch, self.seen = paths, batch, seen
        self.lin = nn.Linear(1, 1)

    def training_step(self, batch: dict[str, Any], idx: int) -> torch.Tensor:
        self.seen.append({"epoch": self.current_epoch, "keys": list(batch["__key__"])})
        return nn.functional.mse_loss(self.lin(batch["x"][:, None]).squeeze(-1), batch["y"])

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=0.01)

    def train_dataloader(self) -> mmload.Loader:
        # Built here, after the process group exists; Lightning saves its state_dict() in each
        # checkpoint and calls load_state_dict() when resuming.
        return mmload.Loader(self.paths, batch_size=self.batch, shuffle=True, seed=1)


def make_data(root: str) -> list[str]:
    from mmload.sources.write import write_parquet

    os.makedirs(root, exist_ok=True)
    return [
        write_parquet(
            [{"__key__": f"p{p}-{i:03d}", "x": float(i), "y": 2.0 * i} for i in range(n)],
            os.path.join(root, f"part-{p}.parquet"),
        )
        for p, n in enumerate([29, 17, 38])
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="lightning-data", help="Parquet files go/are here")
    ap.add_argument("--devices", type=int, default=1)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--batch", type=int, default=4, help="per process")
    ap.add_argument("--every", type=int, default=5, help="checkpoint every N steps")
    ap.add_argument("--ckpt-dir", default="lightning-ckpt")
    ap.add_argument("--resume", help="a checkpoint to resume from")
    ap.add_argument("--report", help="write this rank's keys here (suffix -rank<N>.json)")
    args = ap.parse_args()
    paths = sorted(
        os.path.join(args.data, f) for f in os.listdir(args.data) if f.endswith(".parquet")
    ) if os.path.isdir(args.data) else make_data(args.data)  # fmt: skip
    seen: list[dict[str, Any]] = []
    ckpt = L.pytorch.callbacks.ModelCheckpoint(
        dirpath=args.ckpt_dir, every_n_train_steps=args.every, save_top_k=-1
    )
    trainer = L.Trainer(
        max_epochs=args.epochs,
        accelerator="cpu",
        devices=args.devices,
        strategy="ddp" if args.devices > 1 else "auto",
        callbacks=[ckpt],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(Model(paths, args.batch, seen), ckpt_path=args.resume)
    if args.report:
        with open(f"{args.report}-rank{trainer.global_rank}.json", "w", encoding="utf-8") as f:
            json.dump(seen, f)


if __name__ == "__main__":
    main()
