"""Regression test from the review of issue 8. The defect it pins down (fixed): ShardCache.close() joins the fetch pool: a stalled look-ahead download blocks close()."""

import sys
import time

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[3]))
from mmload.config import RemoteConfig
from mmload.sources.cache import Need, ShardCache
from tests.remote.servers import FileServer, Stall


def test_close_blocks(tmp_path):
    d = tmp_path / "srv"
    d.mkdir()
    (d / "a.tar").write_bytes(b"x" * 1000)
    srv = FileServer(d)
    srv.script("a.tar", Stall(after=10, seconds=60))
    c = ShardCache(tmp_path / "shards", RemoteConfig(read_timeout=30.0, retries=0))
    c.follow([Need(srv.url_for("a.tar"), 1000, None, False, 3, 3)])  # a look-ahead fetch
    deadline = time.monotonic() + 30
    while srv.sent("a.tar") < 10:  # the download has started and stalls
        assert time.monotonic() < deadline, "the look-ahead fetch never started"
        time.sleep(0.01)
    t0 = time.perf_counter()
    c.close()
    dt = time.perf_counter() - t0
    # A close that waited for the download would wait out the 30 s read timeout.
    assert dt < 20
    srv.close()
