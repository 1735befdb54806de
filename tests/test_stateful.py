"""The Stateful protocol: ``IterableDataset.state_dict()`` with no argument inside torchdata's
``StatefulDataLoader`` (num_workers 0, 2, 4): mid-epoch, a second resume in the same epoch, the
epoch's end; ints only (``torch.load(weights_only=True)``); another num_workers through
``cursor()``; ``Loader`` and ``load_state_dict`` before ``iter()``."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import pytest
import torch

import mmload

tdl = pytest.importorskip("torchdata.stateful_dataloader", reason="torchdata is a dev dependency")
StatefulDataLoader = tdl.StatefulDataLoader


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    from mmload.sources.write import write_parquet

    d = tmp_path_factory.mktemp("stateful")
    return [
        write_parquet(
            [{"__key__": f"p{p}-{i:03d}", "x": p * 1000 + i} for i in range(n)],
            str(d / f"part-{p}.parquet"),
            row_group_size=7,
        )
        for p, n in enumerate([23, 17, 30, 11])
    ]


def _ds(shards: list[str]) -> mmload.IterableDataset:
    return mmload.IterableDataset(shards, batch_size=4, shuffle=True, seed=5)


def _dl(ds: Any, workers: int) -> Any:
    return StatefulDataLoader(ds, batch_size=None, num_workers=workers)


def _keys(batches: list[dict[str, Any]]) -> list[list[str]]:
    return [list(b["__key__"]) for b in batches]


def _roundtrip(state: Any) -> Any:
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)  # plain ints and strings only


@pytest.mark.parametrize("workers", [0, 2, 4])
def test_statefuldataloader_resumes_mid_epoch_twice_and_at_the_end(
    shards: list[str], workers: int
) -> None:
    full = _keys(list(_dl(_ds(shards), workers)))
    assert sorted(k for b in full for k in b) == sorted(
        f"p{p}-{i:03d}" for p, n in enumerate([23, 17, 30, 11]) for i in range(n)
    )
    dl = _dl(_ds(shards), workers)
    it = iter(dl)
    head = _keys([next(it) for _ in range(5)])
    state = _roundtrip(dl.state_dict())
    del it, dl
    dl2 = _dl(_ds(shards), workers)
    dl2.load_state_dict(state)
    it2 = iter(dl2)
    mid = _keys([next(it2) for _ in range(3)])
    state2 = _roundtrip(dl2.state_dict())  # a second resume within the same epoch
    del it2, dl2
    dl3 = _dl(_ds(shards), workers)
    dl3.load_state_dict(state2)
    tail = _keys(list(dl3))
    assert head + mid + tail == full  # exactly the remaining batches, in order
    end = _roundtrip(dl3.state_dict())  # at the epoch's end: the next epoch comes next
    ds4 = _ds(shards)
    ds4.set_epoch(1)  # as Lightning does each epoch (worker copies cannot advance it)
    dl4 = _dl(ds4, workers)
    dl4.load_state_dict(end)
    following = _ds(shards)
    following.set_epoch(1)
    assert _keys(list(dl4)) == _keys(list(_dl(following, workers)))


def test_another_num_workers_through_cursor(shards: list[str]) -> None:
    full = _keys(list(_dl(_ds(shards), 0)))
    dl = _dl(_ds(shards), 2)
    it = iter(dl)
    head = _keys([next(it) for _ in range(7)])
    state = dl.state_dict()
    del it, dl
    snaps = state["_snapshot"]["_worker_snapshots"]
    workers = [snaps[f"worker_{i}"]["dataset_state"] for i in range(2)]
    ds = _ds(shards)
    cursor = ds.cursor(workers)
    ds.load_state_dict(cursor)
    tail = _keys(list(_dl(ds, 4)))  # resumed on 4 workers
    assert head + tail == full
    with mmload.Loader(shards, batch_size=4, shuffle=True, seed=5) as ld:  # and on a Loader
        ld.load_state_dict(cursor)
        assert _keys(list(ld)) == full[7:]


def test_in_process_state_dict_without_argument(shards: list[str], tmp_path: Path) -> None:
    ds = _ds(shards)
    it = iter(ds)
    head = _keys([next(it) for _ in range(6)])
    state = _roundtrip(ds.state_dict())
    assert state == ds.state_dict(6)  # the same as counting batches by hand
    ds2 = _ds(shards)
    ds2.load_state_dict(state)  # before iter()
    assert head + _keys(list(ds2)) == _keys(list(_ds(shards)))
    with pytest.raises(mmload.ConfigError, match="worker"):
        _ds(shards).load_state_dict({**state, "worker": 0, "num_workers": 2, "worker_batches": 1})
