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


NO_MEDIA = textwrap.dedent(
    """
    import atexit, os, sys, threading

    def threads_left():  # registered first, so it runs after mmload's own exit hooks
        left = sorted(t.name for t in threading.enumerate() if t.name.startswith("mmload-"))
        print("threads at exit:", left, flush=True)

    atexit.register(threads_left)
    import mmload
    from mmload.sources.write import write_tar_shards

    root = sys.argv[1]
    samples = ({"__key__": f"k{i:04d}", "cls": str(i).encode()} for i in range(400))
    paths = write_tar_shards(samples, os.path.join(root, "s-%04d.tar"), maxcount=50)
    loader = mmload.Loader(paths, batch_size=8, cache_dir=os.path.join(root, "c"))
    it = iter(loader)
    next(it)
    print("left running", flush=True)
    """
)


def test_exit_stops_the_stage_threads_of_a_loader_without_media(tmp_path: Path) -> None:
    """A loader with no media decoders (no DALI, no image pool) left mid-epoch: its read and
    decode threads are stopped by the exit hooks before the runtime tears down."""
    proc = subprocess.run(
        [sys.executable, "-c", NO_MEDIA, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, (proc.returncode, proc.stderr[-2000:])
    assert proc.stdout.splitlines() == ["left running", "threads at exit: []"], proc.stdout
    assert proc.stderr == "", proc.stderr[-2000:]


def test_stop_all_waits_out_a_slow_step() -> None:
    """At exit every stage thread is stopped and joined; a thread stops at its next item, so the
    wait must cover one slow step (a decode on a loaded machine). With a 2 s bound a Lightning
    run aborted at exit now and then ("terminate called without an active exception")."""
    import threading
    import time

    from mmload.stages import Stage, stop_all

    entered = threading.Event()

    def slow(x: int) -> int:
        entered.set()
        time.sleep(3.0)
        return x

    stage = Stage(iter(range(10)), slow, depth=1, name="slow-step")
    stage.start()
    assert entered.wait(30)
    stop_all()
    assert not stage._thread.is_alive()
    stage.close()


def test_the_exit_hooks_wait_for_the_threads_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """Three exit hooks stop the stage threads (the stages', the pipeline's before it closes its
    decoders, DALI's before DALI's own): only the first waits, so a thread that outlives the
    wait does not make exit wait again."""
    import weakref

    import mmload.decode.dali as dali_mod
    import mmload.pipeline as pipeline_mod
    from mmload import stages

    calls: list[float] = []
    monkeypatch.setattr(pipeline_mod, "_LIVE", weakref.WeakSet())  # other tests' are theirs
    monkeypatch.setattr(dali_mod, "_DECODERS", weakref.WeakSet())
    monkeypatch.setattr(stages, "_EXIT_STOPPED", False)
    monkeypatch.setattr(stages, "stop_all", lambda timeout=10.0: calls.append(timeout))
    pipeline_mod._close_at_exit()
    dali_mod._close_at_exit()
    stages.stop_all_at_exit()
    assert calls == [10.0]
