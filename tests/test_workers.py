"""Loader(workers=N): CPU stages in spawned processes, everything else as with workers=0.

Oracles: the same Loader with ``workers=0`` (batches, order, resume, bad-sample list and budget,
statistics), the processes themselves (gone after close, an exception or a kill), and
``/dev/shm`` (nothing left behind).
"""

from __future__ import annotations

import os
import pickle
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import mmload
from mmload.demo import demo_samples
from mmload.errors import DecodeError
from mmload.sources.write import write_tar_shards
from mmload.workers import WorkerError, WorkerPool

pytestmark = pytest.mark.timeout(240)


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """78 multimodal samples (jpg, wav, txt, cls, json) in 4 shards; samples 10 and 41 carry
    a corrupt JPEG."""
    root = tmp_path_factory.mktemp("workers")

    def samples() -> Iterator[dict[str, Any]]:
        for i, s in enumerate(demo_samples(78, size=(64, 48))):
            if i in (10, 41):
                s["jpg"] = s["jpg"][:200]  # truncated: the header reads, the decode fails
            yield s

    return write_tar_shards(samples(), str(root / "d-%04d.tar"), maxcount=20)


def options(tmp_path: Path, **kw: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "batch_size": 8,
        "shuffle": True,
        "seed": 3,
        "image": mmload.ImageConfig(size=24, backend="pil"),
        "audio": mmload.AudioConfig(seconds=0.25, mel=True, n_mels=16),
        "text": mmload.TextConfig(fields=("txt",), max_length=12),
        "on_error": "skip",
        "max_bad_samples": 4,
        "cache_dir": tmp_path / "cache",
    }
    return base | kw


def assert_same_batches(a: list[dict[str, Any]], b: list[dict[str, Any]]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x.keys() == y.keys()
        for k in x:
            if isinstance(x[k], torch.Tensor):
                assert x[k].dtype == y[k].dtype and torch.equal(x[k], y[k]), k
            else:
                assert x[k] == y[k], k


def run(shards: list[str], tmp_path: Path, epochs: int = 1, **kw: Any) -> tuple[list, dict]:
    with mmload.Loader(shards, **options(tmp_path, **kw)) as ld:
        got = [b for _ in range(epochs) for b in ld]
        return got, ld.stats()


COUNTERS = ("batches", "samples", "samples_replaced", "bad_samples", "samples_padded")


def test_two_epochs_match_in_process(shards: list[str], tmp_path: Path) -> None:
    want, st0 = run(shards, tmp_path, epochs=2, workers=0)
    got, st2 = run(shards, tmp_path, epochs=2, workers=2)
    assert_same_batches(want, got)
    assert len(want) == 2 * 10  # 78 samples / 8: the last batch short
    assert {k: st0[k] for k in COUNTERS} == {k: st2[k] for k in COUNTERS}
    assert st0["bad_samples"] == 4 and st0["bad"] == st2["bad"]  # the same list, same order
    assert st2["seconds"]["decode"] > 0 and st2["seconds"]["read"] > 0


def test_three_workers_and_a_resume(shards: list[str], tmp_path: Path) -> None:
    """A worker count that does not divide the batches; a state taken with workers resumes
    exactly in a loader without (and the other way round)."""
    want, _ = run(shards, tmp_path, workers=0)
    with mmload.Loader(shards, **options(tmp_path, workers=3)) as ld:
        it = iter(ld)
        head = [next(it) for _ in range(4)]
        state = ld.state_dict()
    assert_same_batches(want[:4], head)
    with mmload.Loader(shards, **options(tmp_path, workers=0)) as ld:
        ld.load_state_dict(state)
        assert_same_batches(want[4:], list(ld))
    with mmload.Loader(shards, **options(tmp_path, workers=0)) as ld:
        it = iter(ld)
        for _ in range(7):
            next(it)
        state = ld.state_dict()
    with mmload.Loader(shards, **options(tmp_path, workers=2)) as ld:
        ld.load_state_dict(state)
        assert_same_batches(want[7:], list(ld))


def test_abandoned_epoch_then_reiter(shards: list[str], tmp_path: Path) -> None:
    """Breaking out of an epoch and iterating again behaves as with workers=0 (the workers'
    stale batches of the abandoned run are dropped)."""
    out = {}
    for w in (0, 2):
        with mmload.Loader(shards, **options(tmp_path, workers=w)) as ld:
            seen = []
            for i, b in enumerate(ld):
                seen.append(b)
                if i == 2:
                    break
            seen += list(ld)  # the rest of the epoch
            seen += list(ld)  # the next one
            out[w] = seen
    assert_same_batches(out[0], out[2])


def test_budget_exceeded_at_the_same_batch(shards: list[str], tmp_path: Path) -> None:
    """The budget is the main process's: with 1 bad sample allowed, the second bad sample
    stops the epoch at the same batch with the same error, whatever the worker count."""
    result = {}
    for w in (0, 2):
        got = []
        with (
            mmload.Loader(shards, **options(tmp_path, workers=w, max_bad_samples=1)) as ld,
            pytest.raises(DecodeError, match="budget exceeded") as info,
        ):
            got.extend(b["__key__"] for b in ld)
        result[w] = (got, str(info.value))
    assert result[0] == result[2]
    assert len(result[0][0]) < 10


def test_raise_mode_names_shard_and_key(shards: list[str], tmp_path: Path) -> None:
    with (
        mmload.Loader(shards, **options(tmp_path, workers=2, on_error="raise")) as ld,
        pytest.raises(DecodeError) as info,
    ):
        for _ in ld:
            pass
    assert info.value.key in ("sample000010", "sample000041")
    assert info.value.shard.endswith(".tar")


def test_read_only_workers_decode_here(shards: list[str], tmp_path: Path) -> None:
    """The device='cuda' split (workers read, this process decodes), run on the CPU."""
    want, st0 = run(shards, tmp_path, workers=0)
    with mmload.Loader(shards, **options(tmp_path, workers=2)) as ld:
        ld._pool = WorkerPool(ld._pipe, 2, decode=False)
        assert not ld._pool.decoded
        got = list(ld)
        st = ld.stats()
    assert_same_batches(want, got)
    assert st["bad"] == st0["bad"] and st["samples"] == st0["samples"]


def _alive(pid: int | None) -> bool:
    if pid is None:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (exited, not yet reaped) counts as gone.
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def _shm() -> set[str]:
    """Shared-memory segments in /dev/shm (batch tensors: torch's ``torch_*`` files or any
    other segment), leaving out multiprocessing's named semaphores (``sem.*``): those belong to
    its queues, are unlinked when a queue is collected (a traceback kept by ``pytest.raises``
    can hold one in a cycle for a while) and at exit by its resource tracker."""
    names = os.listdir("/dev/shm") if os.path.isdir("/dev/shm") else []
    return {n for n in names if not n.startswith("sem.")}


def test_killed_worker_is_an_error_not_a_hang(shards: list[str], tmp_path: Path) -> None:
    before = _shm()
    ld = mmload.Loader(shards, **options(tmp_path, workers=2, prefetch=1))
    it = iter(ld)
    next(it)
    assert ld._pool is not None
    pids = ld._pool.pids
    os.kill(pids[1], signal.SIGKILL)
    t0 = time.perf_counter()
    with pytest.raises(WorkerError, match=r"worker 1 \(pid \d+\) exited with code -9"):
        for _ in it:
            pass
    assert time.perf_counter() - t0 < 30
    ld.close()
    assert not any(_alive(p) for p in pids)
    assert _shm() <= before


def test_close_leaves_no_process_or_segment(shards: list[str], tmp_path: Path) -> None:
    """After close (mid-epoch), after an error in a worker, and at garbage collection."""
    before = _shm()
    ld = mmload.Loader(shards, **options(tmp_path, workers=2))
    it = iter(ld)
    next(it)
    assert ld._pool is not None
    pids = ld._pool.pids
    assert all(_alive(p) for p in pids)
    ld.close()
    ld.close()  # idempotent
    assert not any(_alive(p) for p in pids)

    ld = mmload.Loader(shards, **options(tmp_path, workers=2, on_error="raise"))
    with pytest.raises(DecodeError):
        list(ld)
    assert ld._pool is not None
    pids = ld._pool.pids
    ld.close()
    assert not any(_alive(p) for p in pids)
    assert _shm() <= before


def test_features_are_joined_in_the_main_process(shards: list[str], tmp_path: Path) -> None:
    """The live FeatureTable stays here: workers extract key and timestamp, this process
    joins; the joined columns equal workers=0's."""
    from mmload.demo import demo_features

    out = {}
    for w in (0, 2):
        table = mmload.FeatureTable(key="user_id", timestamp="ts")
        table.update(demo_features(78))
        join = mmload.FeatureJoin(table, key="json.user_id", timestamp="json.ts")
        got, _ = run(shards, tmp_path, workers=w, features=join)
        out[w] = got
    assert_same_batches(out[0], out[2])
    assert "__features_found__" in out[2][0]
    assert np.asarray(out[2][0]["__features_found__"]).dtype == bool


def test_workers_must_be_a_non_negative_int(shards: list[str], tmp_path: Path) -> None:
    for bad in (-1, 1.5, True):
        with pytest.raises(mmload.ConfigError, match="workers"):
            mmload.Loader(shards, **options(tmp_path, workers=bad))


# -- regressions found in review ------------------------------------------------------------


@pytest.mark.parametrize("workers", [0, 2])
def test_a_resume_with_other_partitions_is_exact(
    shards: list[str], tmp_path: Path, workers: int
) -> None:
    """A state taken over partitions=4, loaded into a default loader that already ran an
    epoch: the workers' copy of the pipeline and the chain prepared ahead had the old
    partitions and gave another order."""
    with mmload.Loader(shards, **options(tmp_path, partitions=4)) as a:
        for _ in a:
            pass
        state = a.state_dict()
    with mmload.Loader(shards, **options(tmp_path, workers=workers)) as ref:
        ref.load_state_dict(state)
        want = list(ref)
    with mmload.Loader(shards, **options(tmp_path, workers=workers)) as b:
        for _ in b:
            pass
        b.load_state_dict(state)
        assert_same_batches(want, list(b))


def test_worker_killed_mid_message_is_an_error(tmp_path: Path) -> None:
    """Batches of 8 MB of bytes (pickled through the pipe): the worker is killed while its
    queue's feeder is blocked half-way through one. The reader must see EOF (the parent keeps
    no copy of the writer), not wait for the rest of the message forever."""
    rng = np.random.default_rng(0)
    blobs = ({"__key__": f"b{i:03d}", "bin": rng.bytes(1 << 20), "cls": i} for i in range(48))
    paths = write_tar_shards(blobs, str(tmp_path / "big-%03d.tar"), maxcount=16)
    ld = mmload.Loader(
        paths, batch_size=8, workers=1, prefetch=1, cache_dir=tmp_path / "c", fields=("bin", "cls")
    )
    it = iter(ld)
    next(it)
    assert ld._pool is not None
    deadline = time.perf_counter() + 20
    while ld._pool._results[0].empty() and time.perf_counter() < deadline:
        time.sleep(0.05)  # until the worker has a batch queued and is writing the next
    time.sleep(0.5)
    os.kill(ld._pool.pids[0], signal.SIGKILL)
    t0 = time.perf_counter()
    with pytest.raises(WorkerError, match="exited with code -9"):
        for _ in it:
            pass
    assert time.perf_counter() - t0 < 30
    ld.close()


def test_an_abandoned_read_only_run_does_not_eat_the_next(
    shards: list[str], tmp_path: Path
) -> None:
    """Workers that only read (the device='cuda' split): an epoch abandoned while a worker is
    stopped leaves a reader behind; it must end, not drop the next run's batches."""
    import threading

    from mmload.pipeline import iter_epoch
    from mmload.stats import EpochStats

    with mmload.Loader(shards, **options(tmp_path, prefetch=1)) as ld:
        pipe, world = ld._pipe, ld.world
        pool = WorkerPool(pipe, 2, decode=False)
        try:
            os.kill(pool.pids[1], signal.SIGSTOP)  # worker 1 falls behind (sends nothing yet)
            sched = pipe.schedule(1, 0)
            st = EpochStats(ld._stats, 100)
            gen = iter_epoch(pipe, 0, sched, world, st, pool.epoch(0, sched, world, st))
            next(gen)  # batch 0, from worker 0
            wake = threading.Timer(1.0, os.kill, (pool.pids[1], signal.SIGCONT))
            wake.start()
            try:
                t0 = time.perf_counter()
                gen.close()  # abandoned while its reader waits on worker 1
                assert time.perf_counter() - t0 < 10
            finally:
                wake.join()
            st2 = EpochStats(ld._stats, 100)
            run = iter_epoch(pipe, 1, sched, world, st2, pool.epoch(1, sched, world, st2))
            assert sum(1 for _ in run) == sched.num_batches
        finally:
            pool.close()


def test_a_dropped_loader_is_collected_and_its_threads_end(
    shards: list[str], tmp_path: Path
) -> None:
    """A Loader dropped without close() (after a whole epoch, the next one prepared ahead)
    is collected and stops its threads: the decode thread's callback held it strongly."""
    import gc
    import threading
    import weakref

    ld = mmload.Loader(shards, **options(tmp_path))
    for _ in ld:
        pass
    ref = weakref.ref(ld)
    del ld
    deadline = time.perf_counter() + 20
    while time.perf_counter() < deadline:
        gc.collect()
        alive = [t.name for t in threading.enumerate() if t.name.startswith("mmload-")]
        if ref() is None and not alive:
            break
        time.sleep(0.1)
    assert ref() is None
    assert not [t.name for t in threading.enumerate() if t.name.startswith("mmload-")]


def test_read_batch_packs_media_into_one_segment() -> None:
    """A read batch crosses the queue with its media in one shared segment: only spans are
    pickled, values come back as read-only views, errors and other values as they were."""
    from mmload.errors import ShardError
    from mmload.workers import _pack_raw, _unpack_raw

    buf = bytearray(b"abcdefgh")
    raw: list[object] = [
        {"__key__": "a", "jpg": memoryview(buf)[2:5], "cls": b"7", "n": 3},
        ShardError("cut", shard="s.tar", key="b"),
        {"__key__": "c", "jpg": memoryview(buf)[0:0], "txt": "x"},
    ]
    packed = _pack_raw(raw)
    seg, samples, spans = packed
    assert seg.is_shared() and seg.numel() == 4
    assert samples[0]["jpg"] is None and samples[0]["cls"] is None and len(spans) == 3
    blob = pickle.dumps(samples)
    assert b"cde" not in blob  # the media are not in the pickle
    buf[2:5] = b"XYZ"  # the reader's buffer may be reused once packed
    got = _unpack_raw(packed)
    assert isinstance(got[1], ShardError) and got[1].key == "b"
    a, c = got[0], got[2]
    assert isinstance(a, dict) and isinstance(c, dict)
    assert bytes(a["jpg"]) == b"cde" and bytes(a["cls"]) == b"7" and a["n"] == 3
    assert a["jpg"].readonly and bytes(c["jpg"]) == b"" and c["txt"] == "x"
    assert isinstance(raw[0], dict) and isinstance(raw[0]["jpg"], memoryview)  # input unchanged
