"""Joins that know which features may still arrive: the watermark policies, and a table seen
at one version.

A sample is *early* when its timestamp is newer than the table's watermark (the feature time up
to which the table is complete): rows with a feature ts between the watermark and the sample's
ts may still arrive, so the join may miss its newest value. ``join_with_watermark`` applies the
``FeatureJoin.late`` policy and says which samples were joined early.
"""

from __future__ import annotations

import time
from typing import Any, Literal

import numpy as np
import torch

from mmload.features.schema import FOUND
from mmload.features.snapshot import Snapshot
from mmload.features.table import FeatureTable

__all__ = ["EARLY", "PinnedTable", "join_with_watermark"]

EARLY = "__features_early__"
Late = Literal["join", "skip", "wait"]
_NEVER = np.iinfo(np.int64).min  # a query time no feature row is at or before


class PinnedTable:
    """``table`` as of one of its snapshots, with the watermark recorded for it: what a
    ``StreamLoader`` window joins against (the same on every rank and in every run)."""

    live = False

    def __init__(self, table: FeatureTable, snapshot: Snapshot, watermark: int | None) -> None:
        self.table = table
        self.snapshot = snapshot
        self.watermark = watermark

    @property
    def version(self) -> int:
        return self.snapshot.version

    @property
    def layout(self) -> Any:
        return self.snapshot.layout

    @property
    def column_names(self) -> tuple[str, ...]:
        layout = self.snapshot.layout
        return layout.names if layout is not None else self.table.column_names

    def join(self, keys: Any, timestamps: Any) -> dict[str, torch.Tensor]:
        return self.table.join(keys, timestamps, snapshot=self.snapshot)

    def __getattr__(self, name: str) -> Any:  # key, timestamp, device, ... of the table
        return getattr(self.table, name)


def join_with_watermark(
    table: Any, keys: Any, ts: np.ndarray, late: Late, max_wait_s: float
) -> tuple[dict[str, torch.Tensor], int, float]:
    """The join under ``late``; returns (columns with ``EARLY`` added, samples joined early,
    seconds waited). ``table``: a FeatureTable (its live watermark) or a PinnedTable (fixed)."""
    ts = np.asarray(ts, dtype=np.int64)
    waited = 0.0
    newest = int(ts.max()) if len(ts) else None
    if late == "wait" and newest is not None and getattr(table, "live", True):
        t0 = time.monotonic()
        while True:
            wm = table.watermark
            if (wm is not None and wm >= newest) or time.monotonic() - t0 >= max_wait_s:
                break
            time.sleep(min(0.01, max(0.0, max_wait_s - (time.monotonic() - t0))))
        waited = time.monotonic() - t0
    wm = table.watermark
    early = np.ones(len(ts), dtype=bool) if wm is None else ts > wm
    query = np.where(early, _NEVER, ts) if late == "skip" else ts
    out = table.join(keys, query)
    found = out[FOUND]
    out[EARLY] = torch.from_numpy(early).to(found.device)
    return out, int(early.sum()), waited
