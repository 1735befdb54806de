"""Rank and world size detected at iter(), not at construction (a loader built before the
process group exists, as Lightning and Accelerate build them), unless given."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest

import mmload
from mmload.sources.write import write_parquet


@pytest.fixture
def shards(tmp_path: Path) -> list[str]:
    return [
        write_parquet(
            [{"__key__": f"p{p}-{i:03d}", "x": i} for i in range(n)],
            str(tmp_path / f"p{p}.parquet"),
            row_group_size=5,
        )
        for p, n in enumerate([13, 9, 20])
    ]


def _keys(ld: object) -> list[list[str]]:
    return [list(b["__key__"]) for b in ld]  # type: ignore[attr-defined]


def test_world_detected_at_iter(shards: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    ld = mmload.Loader(shards, batch_size=4, shuffle=True)  # built as a single process
    assert ld.world.world_size == 1
    monkeypatch.setenv("RANK", "1")  # then the launcher's world appears
    monkeypatch.setenv("WORLD_SIZE", "2")
    got = _keys(ld)
    with mmload.Loader(shards, batch_size=4, shuffle=True, rank=1, world_size=2) as want:
        assert got == _keys(want)
        assert len(ld) == len(want)  # len() is the rank's batches, and starts nothing
    assert ld.world.rank == 1 and ld.state_dict()["partitions"] == want.state_dict()["partitions"]
    ld.close()


def test_given_world_is_kept(shards: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with mmload.Loader(shards, batch_size=4, rank=0, world_size=1) as ld:
        assert sum(len(b) for b in _keys(ld)) == 42 and ld.world.world_size == 1


def test_iterable_dataset_pickled_for_workers_carries_the_world(
    shards: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    ds = mmload.IterableDataset(shards, batch_size=4)
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    copy = pickle.loads(pickle.dumps(ds))  # what a DataLoader sends its workers
    assert copy.world.world_size == 2 and copy.world.rank == 0
    ds.close()
    copy.close()


def test_set_epoch_and_load_state_dict_reach_persistent_workers(shards: list[str]) -> None:
    import torch

    with mmload.Loader(shards, batch_size=4, shuffle=True, seed=2) as ld:
        ref = {e: _keys(ld) for e in range(3)}  # epochs 0, 1, 2 as the Loader gives them
        ld.set_epoch(1)
        it = iter(ld)
        for _ in range(3):
            next(it)
        mid = ld.state_dict()  # epoch 1 after 3 batches
    assert ref[0] != ref[1] != ref[2]
    ds = mmload.IterableDataset(shards, batch_size=4, shuffle=True, seed=2)
    dl = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=2, persistent_workers=True)
    for e in range(3):
        ds.set_epoch(e)
        assert _keys(dl) == ref[e], e  # the workers made at epoch 0 run epochs 1 and 2
    ds.load_state_dict(mid)
    assert _keys(dl) == ref[1][3:]  # and resume where the cursor says
