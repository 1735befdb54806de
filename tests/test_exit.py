"""Interpreter exit with loaders still running: exit status 0 and nothing on stderr.

A Loader and an IterableDataset are left mid-epoch (stage threads busy, DALI pipelines alive,
the next epoch possibly prepared ahead) and the script just ends. Before the exit hooks,
daemon threads inside torch/DALI during teardown aborted the process now and then
("terminate called without an active exception", status 134) and DALI's own hook failed its
assertion that no pipeline is alive. Several runs each, since the race is timing-dependent.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

SCRIPT = textwrap.dedent(
    """
    import os, sys
    import mmload
    from mmload.demo import demo_samples
    from mmload.sources.write import write_tar_shards

    root, backend = sys.argv[1], sys.argv[2]
    paths = write_tar_shards(
        demo_samples(48, size=(64, 48)), os.path.join(root, "s-%04d.tar"), maxcount=12
    )
    cfg = mmload.ImageConfig(size=16, backend=backend)
    kw = dict(batch_size=8, image=cfg, cache_dir=os.path.join(root, "c"))
    loader = mmload.Loader(paths, **kw)
    it = iter(loader)
    next(it)
    ds = mmload.IterableDataset(paths, **kw)
    it2 = iter(ds)
    next(it2)
    print("left running")
    """
)


@pytest.mark.parametrize("backend", ["pil", "dali"])
def test_exit_mid_epoch_is_clean(backend: str, tmp_path: Path) -> None:
    for run in range(3):
        root = tmp_path / f"{backend}{run}"
        root.mkdir()
        proc = subprocess.run(
            [sys.executable, "-c", SCRIPT, str(root), backend],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert proc.stdout.strip() == "left running", proc.stdout
        assert proc.returncode == 0, (run, proc.returncode, proc.stderr[-2000:])
        assert proc.stderr == "", (run, proc.stderr[-2000:])
