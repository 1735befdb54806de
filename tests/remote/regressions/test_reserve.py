"""Regression test from the review of issue 8. The defect it pins down (fixed): A process killed mid-fetch leaves its .reserve-* file: every process counts it forever."""

import multiprocessing as mp
import os
import signal
import sys
import time

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[3]))
from pathlib import Path

from mmload.config import RemoteConfig
from mmload.sources.cache import ShardCache, _NoRoom
from tests.remote.servers import FileServer, Stall


def child(url, root, limit):
    c = ShardCache(Path(root), RemoteConfig(cache_limit=limit))
    c.fetch(url, size=1000, version=None, compressed=False)


def test_stale_reservation(tmp_path):
    srv_dir = tmp_path / "srv"
    srv_dir.mkdir()
    for n in ("a.tar", "b.tar"):
        (srv_dir / n).write_bytes(b"x" * 1000)
    srv = FileServer(srv_dir)
    srv.script("a.tar", Stall(after=10, seconds=30))
    root = tmp_path / "shards"
    p = mp.get_context("fork").Process(target=child, args=(srv.url_for("a.tar"), str(root), 1500))
    p.start()
    deadline = time.monotonic() + 30
    while not list(root.glob(".reserve-*")) or srv.sent("a.tar") < 10:  # reserved, fetching
        assert time.monotonic() < deadline, "the child never started its fetch"
        time.sleep(0.01)
    os.kill(p.pid, signal.SIGKILL)
    p.join()
    c = ShardCache(root, RemoteConfig(cache_limit=1500, read_timeout=1.0))
    # a look-ahead fetch of b (1000 bytes, fits a 1500-byte cache) now never gets room
    try:
        c.fetch(srv.url_for("b.tar"), size=1000, version=None, compressed=False, wait=False)
        ok = True
    except _NoRoom:
        ok = False
    assert ok, "stale reservation blocks the cache"
