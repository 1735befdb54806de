"""Regression test from the review of issue 8. The defect it pins down (fixed): A manifest made from local files (mtime versions) -> the served copy is checked only by size;
the digest check is skipped whenever the member table comes from the IndexStore (memory/disk)."""

import shutil
import sys

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent))
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[3]))
import numpy as np
from review_common import write_tar

from benchmarks.loopback import LoopbackServer
from mmload.sources import Dataset
from mmload.sources.manifest import MANIFEST_NAME


def test_changed_shard_read_with_old_table(tmp_path):
    d = tmp_path / "srv"
    d.mkdir()
    write_tar(d / "data-0.tar", ["aaa0", "aaa1"])
    write_tar(d / "data-1.tar", ["bbb0", "bbb1"])
    local = Dataset.open([str(d / "data-0.tar"), str(d / "data-1.tar")], cache_dir=tmp_path / "c0")
    local.manifest.write(str(d / MANIFEST_NAME), relative_to=str(d))
    with LoopbackServer(d) as srv:
        url = srv.url + MANIFEST_NAME
        ds = Dataset.open(url, cache_dir=tmp_path / "c1")
        ds.read(np.array([0, 1]))
        ds.close()
        # the shard changes on the server: same size, other keys
        write_tar(d / "data-0.tar", ["zzz0", "zzz1"])
        shutil.rmtree(tmp_path / "c1" / "shards")  # e.g. evicted / a new node: refetched
        ds2 = Dataset.open(url, cache_dir=tmp_path / "c1")  # new process, same cache_dir
        b = ds2.read(np.array([0, 1]))
        assert all(isinstance(s, Exception) for s in b), (
            "changed shard read with the old member table"
        )
