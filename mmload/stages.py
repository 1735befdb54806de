"""Background stages: a thread that maps a function over an upstream iterable into a bounded queue.

A stage is a small iterable over its upstream. The worker thread stops on a stop event, every
queue wait has a timeout, and an exception in the worker is re-raised in the consumer with the
worker's traceback attached. ``close()`` is idempotent and also closes the upstream.
"""

from __future__ import annotations

import atexit
import logging
import queue
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Generic, Protocol, TypeVar

__all__ = ["Stage", "stop_all", "stop_all_at_exit"]

log = logging.getLogger(__name__)

T = TypeVar("T")
U = TypeVar("U")

_POLL = 0.1
_DONE = object()
_LIVE: weakref.WeakSet[Stage[Any, Any]] = weakref.WeakSet()  # started, not yet closed
_EXIT_LOCK = threading.Lock()
_EXIT_REGISTERED = False
_EXIT_STOPPED = False


def stop_all(timeout: float = 10.0) -> None:
    """Stop every running stage of this process and wait up to ``timeout`` seconds in all for
    their threads: at interpreter exit, daemon threads still inside torch, DALI or PIL while the
    runtime tears down print errors or abort the process. A thread stops at its next item, so
    the wait is as long as one step: 2 s was too short for a decode step on a loaded machine
    (a Lightning run aborted at exit now and then, "terminate called without an active
    exception", with both cores busy)."""
    stages = list(_LIVE)
    for st in stages:
        st._stop.set()
    deadline = time.perf_counter() + timeout
    for st in stages:
        left = deadline - time.perf_counter()
        if left <= 0:
            break
        if st._thread is not threading.current_thread() and st._thread.is_alive():
            st._thread.join(timeout=left)


def stop_all_at_exit() -> None:
    """:func:`stop_all`, once per process: the exit hooks of this module, the pipeline and DALI
    (the last two stop the threads before closing their decoders) all call it, and only the
    first waits; a thread that outlived that wait does not cost another."""
    global _EXIT_STOPPED
    with _EXIT_LOCK:
        if _EXIT_STOPPED:
            return
        _EXIT_STOPPED = True
    stop_all()


def _stop_at_exit() -> None:
    """Register :func:`stop_all_at_exit` to run at interpreter exit, once, when the first stage
    starts (a chain without media decoders needs it as well as the pipeline's hook: its threads
    must not run into the runtime's teardown)."""
    global _EXIT_REGISTERED
    with _EXIT_LOCK:
        if not _EXIT_REGISTERED:
            atexit.register(stop_all_at_exit)
            _EXIT_REGISTERED = True


class _Closable(Protocol):
    def close(self) -> None: ...


class _Failure:
    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


class Stage(Generic[T, U]):
    """``fn`` applied to each item of ``upstream`` in a background thread, ``depth`` ahead."""

    def __init__(
        self,
        upstream: Iterable[T],
        fn: Callable[[T], U],
        *,
        depth: int,
        name: str,
        closes: tuple[_Closable, ...] = (),
        on_wait: Callable[[str, float], None] | None = None,
    ) -> None:
        self._upstream = upstream
        self._closes = closes  # stages a generator upstream reads from, closed with this one
        self._fn = fn
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=max(1, depth))
        self._stop = threading.Event()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name=f"mmload-{name}", daemon=True)
        self._started = False
        self._start_lock = threading.Lock()
        self.name = name
        # Told how long the consumer waited for each item (the stage was behind): the loader's
        # statistics attribute waiting to the stage that starves the consumer.
        self._on_wait = on_wait

    def _put(self, item: Any) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=_POLL)
                return True
            except queue.Full:
                continue
        return False

    def _run(self) -> None:
        try:
            for item in self._upstream:
                if self._stop.is_set() or not self._put(self._fn(item)):
                    return
            self._put(_DONE)
        except BaseException as e:  # noqa: BLE001 - re-raised in the consumer thread
            self._put(_Failure(e))

    def start(self) -> None:
        """Start the worker thread now (it fills the queue before anyone iterates); a closed
        stage is not started. Threads may start and close a stage concurrently (a chain built
        ahead by the decode thread, closed by the consumer)."""
        with self._start_lock:
            if not self._started and not self._closed:
                _stop_at_exit()
                self._thread.start()
                self._started = True
                _LIVE.add(self)

    def __iter__(self) -> Iterator[U]:
        self.start()
        while True:
            t0 = time.perf_counter()
            while True:
                try:
                    item = self._queue.get(timeout=_POLL)
                    break
                except queue.Empty:
                    if not self._thread.is_alive() and self._queue.empty():
                        raise RuntimeError(
                            f"{self._thread.name} stopped without a result"
                        ) from None
            if self._on_wait is not None:
                self._on_wait(self.name, time.perf_counter() - t0)
            if item is _DONE:
                return
            if isinstance(item, _Failure):
                self.close()
                raise item.exc
            yield item

    def close(self) -> None:
        with self._start_lock:
            if self._closed:
                return
            self._closed = True
        _LIVE.discard(self)
        self._stop.set()
        for stage in self._closes:
            stage.close()
        if self._started and self._thread is not threading.current_thread():
            self._thread.join(timeout=30)
            if self._thread.is_alive():
                log.warning("%s did not stop within 30 s; leaving it behind", self._thread.name)
        up = self._upstream
        if isinstance(up, Stage):
            up.close()
