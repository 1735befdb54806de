"""StreamLoader over an Arrow Flight log (a real Flight server on loopback): windows are row
ranges recorded in the ledger; exactly once while rows keep arriving, across a restart and two
ranks; a log that shrinks or a server that is gone is a clear error."""

from __future__ import annotations

import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest

import mmload
from mmload.errors import ConfigError, ShardError
from mmload.sources.flightlog import FlightLogServer
from tests.streams import Ranks, drain


def _rows(part: int, n: int) -> pa.Table:
    return pa.table(
        {
            "__key__": [f"f{part:04d}-{i:04d}" for i in range(n)],
            "x": [part * 1000 + i for i in range(n)],
        }
    )


@pytest.fixture
def server() -> Any:
    srv = FlightLogServer("grpc://127.0.0.1:0").serve_in_thread()
    yield srv
    srv.shutdown()


def _url(srv: FlightLogServer, name: str = "events") -> str:
    return f"grpc://127.0.0.1:{srv.port}/{name}"


def test_flight_log_consumed_exactly_once_across_a_restart(server: Any, tmp_path: Path) -> None:
    for p in range(3):
        server.append("events", _rows(p, 10))
    kw: dict[str, Any] = dict(
        batch_size=4, ledger=tmp_path / "ledger", poll_s=0.02, max_wait_s=0.5, window_files=12
    )
    with mmload.StreamLoader(_url(server), shuffle=True, **kw) as sl:
        it = iter(sl)
        head = [next(it) for _ in range(4)]  # 16 rows: inside window 1 (rows 12..23)
        state = sl.state_dict()
        spill = sl._spill
    assert state["window"] == 1 and spill is not None and not Path(spill).exists()
    stop = threading.Event()

    def producer() -> None:
        for p in range(3, 7):
            server.append("events", _rows(p, 10))
            time.sleep(0.05)
        stop.set()

    with mmload.StreamLoader(_url(server), shuffle=True, **kw) as sl:
        sl.load_state_dict(state)
        t = threading.Thread(target=producer)
        t.start()
        rest = drain(sl)
        t.join()
        rest += drain(sl)
        st = sl.stats()
    keys = Counter(k for b in head + rest for k in b["__key__"])
    want = Counter(f"f{p:04d}-{i:04d}" for p in range(7) for i in range(10))
    assert keys == want
    assert st["windows_cut"] >= 6
    win = sl.ledger.window(0)
    assert win is not None and win.meta["rows"] == [0, 12]


def test_two_ranks_over_a_flight_log(server: Any, tmp_path: Path) -> None:
    server.append("log", _rows(0, 13))
    ranks = Ranks(
        lambda r: mmload.StreamLoader(
            _url(server, "log"),
            batch_size=3,
            ledger=tmp_path / "ledger",
            rank=r,
            world_size=2,
            poll_s=0.02,
            max_wait_s=1.0,
        )
    )
    time.sleep(0.2)
    server.append("log", _rows(1, 5))
    out = ranks.join().batches
    assert len(out[0]) == len(out[1])
    keys = {k for r in (0, 1) for _, b in out[r] for k in b}
    assert keys == {f"f0000-{i:04d}" for i in range(13)} | {f"f0001-{i:04d}" for i in range(5)}


def test_rows_without_a_key_get_their_log_offset(server: Any, tmp_path: Path) -> None:
    server.append("plain", pa.table({"x": list(range(6))}))
    with mmload.StreamLoader(
        _url(server, "plain"), batch_size=6, ledger=tmp_path / "l", poll_s=0.02, max_wait_s=0.2
    ) as sl:
        (b,) = drain(sl)
    assert b["__key__"] == [str(i) for i in range(6)] and b["x"].tolist() == list(range(6))


def test_flight_errors_are_clear(server: Any, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="needs ledger="):
        mmload.StreamLoader(_url(server), batch_size=2)
    with pytest.raises(ConfigError, match="grpc://host:port/<log name>"):
        mmload.StreamLoader("grpc://127.0.0.1:1", batch_size=2, ledger=tmp_path / "l0")
    gone = FlightLogServer("grpc://127.0.0.1:0")
    port = gone.port
    gone.shutdown()
    with (
        mmload.StreamLoader(
            f"grpc://127.0.0.1:{port}/x", batch_size=2, ledger=tmp_path / "l1", max_wait_s=0.2
        ) as sl,
        pytest.raises(ShardError, match="Flight log unreachable"),
    ):
        next(iter(sl))
