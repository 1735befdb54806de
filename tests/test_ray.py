"""mmload's CPU stages on Ray actors (a local Ray cluster, ``ray.init(num_cpus=2)``): the batch
sequence, resume and accounting of ``workers=0``, bytes or decoded batches over Ray, and an
actor killed mid-epoch costing no sample and repeating none."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import torch

import mmload
from mmload.demo import demo_samples
from mmload.sources.write import write_tar_shards

ray = pytest.importorskip("ray", reason="ray is a dev dependency; install mmload[ray]")
from mmload.distributed.ray import RayWorkers  # noqa: E402

# Each actor, and each restart of one, is a new process that imports torch and mmload: on a
# 2-core machine with both cores busy elsewhere one test took 2-5 minutes (measured 2026-12-07).
pytestmark = [pytest.mark.dist, pytest.mark.timeout(900)]


@pytest.fixture(scope="module")
def cluster() -> Any:
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    d = tmp_path_factory.mktemp("ray-shards")
    return write_tar_shards(demo_samples(90, size=(64, 48)), str(d / "s-%04d.tar"), maxcount=12)


def _kw(tmp: Path) -> dict[str, Any]:
    return dict(
        batch_size=8,
        shuffle=True,
        seed=3,
        fields=["jpg", "cls"],
        image=mmload.ImageConfig(size=16, backend="pil"),
        cache_dir=str(tmp / "cache"),
    )


def _same(a: list[dict[str, Any]], b: list[dict[str, Any]]) -> None:
    assert [x["__key__"] for x in a] == [x["__key__"] for x in b]
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x["jpg"], y["jpg"]) and torch.equal(x["cls"], y["cls"])


@pytest.mark.parametrize("decode", [True, False])
def test_same_batches_as_in_process(
    cluster: Any, shards: list[str], tmp_path: Path, decode: bool
) -> None:
    with mmload.Loader(shards, **_kw(tmp_path)) as ld:
        ref = [list(ld), list(ld)]  # two epochs
        ref_stats = ld.stats()
    with mmload.Loader(shards, workers=RayWorkers(2, decode=decode), **_kw(tmp_path)) as ld:
        got = [list(ld), list(ld)]
        st = ld.stats()
    for a, b in zip(ref, got, strict=True):
        _same(a, b)
    for k in ("samples", "batches", "samples_padded", "bad_samples"):
        assert st[k] == ref_stats[k], k


def test_resume_on_ray_matches_in_process(cluster: Any, shards: list[str], tmp_path: Path) -> None:
    with mmload.Loader(shards, **_kw(tmp_path)) as ld:
        ref = list(ld)
    with mmload.Loader(shards, workers=RayWorkers(2), **_kw(tmp_path)) as ld:
        it = iter(ld)
        head = [next(it) for _ in range(5)]
        state = ld.state_dict()
    with mmload.Loader(shards, workers=RayWorkers(2), **_kw(tmp_path)) as ld:
        ld.load_state_dict(state)
        tail = list(ld)
    _same(head + tail, ref)


def test_killed_actor_loses_and_repeats_nothing(
    cluster: Any, shards: list[str], tmp_path: Path
) -> None:
    with mmload.Loader(shards, **_kw(tmp_path)) as ld:
        ref = list(ld)
    with mmload.Loader(shards, workers=RayWorkers(2, max_restarts=2), **_kw(tmp_path)) as ld:
        it = iter(ld)
        got = [next(it) for _ in range(4)]
        pool = ld._pool
        victim = pool._actors[1]
        pid = ray.get(victim.pid.remote())
        os.kill(pid, 9)  # the actor's process dies mid-epoch
        got += list(it)
        assert pool.restarts >= 1
        assert ray.get(victim.pid.remote()) != pid  # Ray restarted it
    _same(got, ref)


def test_checkpoint_after_an_actor_death_resumes_exactly(
    cluster: Any, shards: list[str], tmp_path: Path
) -> None:
    """An actor dies mid-epoch, the trainer checkpoints after the restart, and a new run (new
    actors) resumed from that checkpoint finishes the epoch: every batch once, in plan order."""
    with mmload.Loader(shards, **_kw(tmp_path)) as ld:
        ref = list(ld)
    with mmload.Loader(shards, workers=RayWorkers(2, max_restarts=2), **_kw(tmp_path)) as ld:
        it = iter(ld)
        got = [next(it) for _ in range(3)]
        pool = ld._pool
        victim = pool._actors[0]
        pid = ray.get(victim.pid.remote())
        os.kill(pid, 9)
        while pool.restarts == 0:  # batches the dead actor finished before dying still arrive
            got.append(next(it))
        got.append(next(it))
        assert len(got) < len(ref)  # the checkpoint falls inside the epoch
        state = ld.state_dict()
    with mmload.Loader(shards, workers=RayWorkers(2), **_kw(tmp_path)) as ld:
        ld.load_state_dict(state)
        got += list(ld)
    _same(got, ref)


def test_actor_restarted_between_two_calls(cluster: Any, shards: list[str], tmp_path: Path) -> None:
    """The actor dies while the trainer trains (no call in flight) and Ray restarts it before
    the next call: the pool notices the lost run and restarts the epoch's rest."""
    import time

    with mmload.Loader(shards, **_kw(tmp_path)) as ld:
        ref = list(ld)
    with mmload.Loader(
        shards, workers=RayWorkers(2, max_restarts=2, prefetch=1), **_kw(tmp_path)
    ) as ld:
        it = iter(ld)
        got = [next(it) for _ in range(3)]
        pool = ld._pool
        time.sleep(0.5)  # the actors' prefetched calls are done
        victim = pool._actors[1]
        pid = ray.get(victim.pid.remote())
        os.kill(pid, 9)
        deadline = time.monotonic() + 600
        while True:  # until Ray has restarted it (a new process: minutes on a loaded machine)
            try:
                if ray.get(victim.pid.remote(), timeout=5) != pid:
                    break
            except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
                pass
            assert time.monotonic() < deadline
            time.sleep(0.2)
        got += list(it)
        assert pool.restarts >= 1
    _same(got, ref)


def test_too_many_deaths_is_a_worker_error(cluster: Any, shards: list[str], tmp_path: Path) -> None:
    with mmload.Loader(shards, workers=RayWorkers(2, max_restarts=0), **_kw(tmp_path)) as ld:
        it = iter(ld)
        next(it)
        os.kill(ray.get(ld._pool._actors[0].pid.remote()), 9)
        with pytest.raises(mmload.WorkerError, match="restarts"):
            list(it)


def test_bad_backend_arguments() -> None:
    with pytest.raises(mmload.ConfigError, match="num_workers"):
        RayWorkers(0)
    for bad in (0, -1.0, True, "60"):
        with pytest.raises(mmload.ConfigError) as info:
            RayWorkers(1, restart_timeout_s=bad)  # type: ignore[arg-type]
        assert str(info.value) == f"RayWorkers(restart_timeout_s={bad!r}): must be a number > 0"
    assert RayWorkers(1).restart_timeout_s == 300.0
    with pytest.raises(mmload.ConfigError, match="worker backend"):
        mmload.Loader([], batch_size=1, workers="ray")  # type: ignore[arg-type]


@pytest.mark.slow
def test_ray_train_example(tmp_path: Path) -> None:
    """examples/train_ray.py: a TorchTrainer of 2 workers, each reading through a Ray actor."""
    import json
    import subprocess
    import sys

    example = Path(__file__).resolve().parents[1] / "examples" / "train_ray.py"
    report = tmp_path / "report.json"
    proc = subprocess.run(
        [
            sys.executable,
            str(example),
            "--trainers",
            "2",
            "--readers",
            "1",
            "--num-cpus",
            "2",
            "--batch",
            "7",
            "--report",
            str(report),
        ],
        capture_output=True,
        text=True,
        timeout=840,  # 4.7 minutes with both cores busy elsewhere
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ranks = json.loads(report.read_text())["ranks"]
    assert len(ranks) == 2 and ranks[0]["steps"] == ranks[1]["steps"] > 0  # equal steps
    keys = [k for r in ranks for k in r["keys"]]
    padded = ranks[0]["padded"]
    assert len(set(keys)) == 96 and len(keys) == 96 + padded  # each sample once, padding counted
    assert padded == 2 * 7 * ranks[0]["steps"] - 96


@pytest.mark.slow
def test_torchrun_ranks_read_on_a_ray_cluster(make_shards: Any, tmp_path: Path) -> None:
    """Two torchrun ranks, each reading through a Ray actor of a cluster started with
    ``ray start``: equal steps, every sample once, padding counted (as without Ray)."""
    import json
    import re
    import shutil
    import socket
    import subprocess
    import sys
    from collections import Counter

    paths, keys = make_shards([11, 3, 8, 5])  # 27 samples
    ray_cli = str(Path(sys.executable).with_name("ray"))
    assert shutil.which(ray_cli), "the ray CLI comes with the ray package"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # A cluster of its own (token auth off: the ranks are separate drivers on this host).
    env = {**os.environ, "OMP_NUM_THREADS": "1", "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    head = subprocess.run(
        [ray_cli, "start", "--head", f"--port={port}", "--num-cpus=2",
         "--include-dashboard=false", "--disable-usage-stats"],
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert head.returncode == 0, head.stdout[-2000:] + head.stderr[-2000:]
    found = re.search(r"ray start --address='([^']+)'", head.stdout + head.stderr)
    assert found, head.stdout[-2000:] + head.stderr[-2000:]
    env["RAY_ADDRESS"] = found.group(1)
    try:
        report = tmp_path / "report.json"
        example = Path(__file__).resolve().parents[1] / "examples" / "torchrun_train.py"
        proc = subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
             str(example), "--shards", *paths, "--global-batch", "8", "--report", str(report),
             "--cache-dir", str(tmp_path / "cache"), "--ray-readers", "1"],
            env=env, capture_output=True, text=True, timeout=600,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    finally:
        subprocess.run([ray_cli, "stop", "--force"], env=env, capture_output=True, timeout=120)
    ranks = json.loads(report.read_text())["ranks"]
    assert [x["steps"] for x in ranks] == [4, 4]
    seen = Counter(k for x in ranks for k in x["keys"])
    assert set(seen) == set(keys) and sum(seen.values()) == 32
    assert ranks[0]["stats"]["samples_padded"] == 32 - 27
