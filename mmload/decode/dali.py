"""DALI image decode, fed by mmload (the only module that imports DALI).

mmload hands DALI whole batches of encoded bytes plus the crop windows and flips it drew itself
(``fn.external_source`` in batch mode); DALI owns decode (``cpu``: libjpeg-turbo with ROI decode;
``cuda``: ``mixed`` nvJPEG with the hardware JPEG decoder), resize, flip and normalize. The
output is copied once into a torch tensor the caller owns: ``[B, 3, H, W]`` of ``cfg.dtype`` on
the CPU, or on ``cuda:<device_id>``.

DALI fails a whole batch when one image is bad; :class:`DaliBatchError` reports that, and the
caller isolates the bad sample (see ``decode.batch``). With the dynamic executor the pipeline
stays usable after such an error.
"""

from __future__ import annotations

import atexit
import importlib
import importlib.util
import logging
import os
import sys
import threading
import weakref
from collections import deque
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch

from mmload.augment import CropParams
from mmload.config import ImageConfig
from mmload.decode.gpu import torch_owned
from mmload.errors import MissingDependencyError
from mmload.stages import stop_all_at_exit

__all__ = ["DaliBatchError", "DaliImageDecoder", "dali_available", "import_in_background"]

log = logging.getLogger(__name__)


class DaliBatchError(RuntimeError):
    """DALI failed a batch; which sample caused it is not known yet."""


_NOT_DATA = ("out of memory", "cuda error", "cudaerror", "cuda_error", "cuda driver", "nvml")


def as_batch_error(e: RuntimeError) -> RuntimeError:
    """A DALI failure as a :class:`DaliBatchError` (bad data in the batch: the batch decoder
    then isolates the bad sample), unless it is the device failing (out of memory, a CUDA or
    driver error): that is returned unchanged and propagates, never blamed on a sample."""
    text = str(e)
    if any(m in text.lower() for m in _NOT_DATA):
        return e
    return DaliBatchError(text.splitlines()[0] if text else "DALI error")


def dali_available() -> bool:
    """Whether DALI is installed (without importing it). ``find_spec`` of a dotted name raises
    when the parent package (``nvidia``) is missing, as in a base install without ``[dali]``."""
    try:
        return importlib.util.find_spec("nvidia.dali") is not None
    except ModuleNotFoundError:
        return False


_import_lock = threading.Lock()
_import_thread: threading.Thread | None = None
_FORK_WAIT_S = 60.0


def import_in_background() -> None:
    """Start importing DALI in a daemon thread (~0.3 s), to overlap it with shard indexing.

    A process forked while that import runs (a DataLoader worker, right after the dataset is
    built) would inherit a half-initialised ``nvidia.dali`` module and fail with
    ``AttributeError: partially initialized module``; so every fork waits for the import to
    finish first (``os.register_at_fork``), whatever the timing.
    """
    global _import_thread
    if not dali_available() or "nvidia.dali.fn" in sys.modules:
        return
    with _import_lock:
        if _import_thread is not None:
            return
        t = threading.Thread(target=_warm_import, name="mmload-dali-import", daemon=True)
        _import_thread = t
        t.start()


def _wait_for_import() -> None:
    t = _import_thread
    if t is None or not t.is_alive() or t is threading.current_thread():
        return
    t.join(_FORK_WAIT_S)
    if t.is_alive():
        log.warning(
            "fork while DALI is still importing after %.0fs: the child may fail to import DALI",
            _FORK_WAIT_S,
        )


if hasattr(os, "register_at_fork"):
    os.register_at_fork(before=_wait_for_import)
# Interpreter exit while the daemon thread is inside DALI's native import can abort the process
# (finalisation tears down what the import still uses): exit waits for it too.
atexit.register(_wait_for_import)


def _warm_import() -> None:
    try:
        importlib.import_module("nvidia.dali.fn")
    except ImportError as e:  # the decode thread imports again and reports it
        log.debug("background DALI import failed: %s", e)


def _import_dali() -> Any:
    try:
        import nvidia.dali as dali
        import nvidia.dali.pipeline  # noqa: F401 - registers DALI's exit hook, before ours
    except ImportError:
        raise MissingDependencyError("nvidia.dali", "gpu", "DALI image decode") from None
    # Exit hooks run last-in first-out: (re-)registered after DALI's, ours runs before it and
    # leaves no pipeline for DALI's hook to find (it asserts there is none after its shutdown).
    atexit.unregister(_close_at_exit)
    atexit.register(_close_at_exit)
    return dali


_DECODERS: weakref.WeakSet[DaliImageDecoder] = weakref.WeakSet()


def _close_at_exit() -> None:
    """Stop the loader's threads, then close every DALI decoder of this process, before DALI's
    own exit hook runs: a decode thread still running would build a new pipeline after it."""
    stop_all_at_exit()
    for dec in list(_DECODERS):
        dec.close()


@dataclass(eq=False)
class Ticket:
    """One batch fed to the pipelined DALI pipeline (kept until collected, for fail-over)."""

    data: list[bytes]
    crops: CropParams
    dummy: bool = False
    result: torch.Tensor | None = None
    error: DaliBatchError | None = None


class DaliImageDecoder:
    """A DALI pipeline: encoded bytes + crop windows + flips -> normalised NCHW batch.

    Two ways in: ``decode`` runs one batch synchronously; ``submit``/``collect`` keep ``depth``
    batches in flight (DALI's ``prefetch_queue_depth``), so DALI decodes batch N+1 while batch N
    is assembled and batch N+2 is read: +25-40% on 2 CPU cores at depth 2-3. Tickets are
    collected in submission order. If the pipelined DALI run fails, every batch in flight is
    decoded again one at a time on a synchronous pipeline, so the failure is pinned on the right
    batch (DALI reports it against whichever iteration it was running), and a fresh pipelined
    pipeline takes the next submission.
    """

    def __init__(
        self,
        cfg: ImageConfig,
        max_batch: int,
        *,
        device: Literal["cpu", "cuda"] = "cpu",
        device_id: int | None = None,
        threads: int = 2,
        depth: int = 2,
        hw_decoder_load: float = 0.65,
    ) -> None:
        self.cfg = cfg
        self.max_batch = max_batch
        self.device = device
        self.device_id = device_id if device == "cuda" else None
        self.threads = max(1, threads)
        self.depth = max(1, depth)
        self.hw_decoder_load = hw_decoder_load
        self._sync: Any = None
        self._async: Any = None
        self._closed = False
        _DECODERS.add(self)
        self._inflight: deque[Ticket] = deque()
        self._holds: deque[tuple[torch.Tensor, Any]] = deque()  # GPU views until copied

    def _build(self, depth: int) -> Any:
        if self._closed:
            # A decode thread still running after close() (at interpreter exit) must not make
            # a new pipeline: DALI's exit hook asserts that none is alive after its shutdown.
            raise RuntimeError("this DALI image decoder is closed")
        dali = _import_dali()
        fn = dali.fn
        types = dali.types
        cfg = self.cfg
        out_dtype = {
            "uint8": types.UINT8,
            "float16": types.FLOAT16,
            "float32": types.FLOAT,
            "bfloat16": types.FLOAT,  # DALI has no bfloat16: cast in torch
        }[cfg.dtype]
        mean = list(cfg.mean) if cfg.normalize else [0.0, 0.0, 0.0]
        std = list(cfg.std) if cfg.normalize else [1.0, 1.0, 1.0]
        decoder_device = "mixed" if self.device == "cuda" else "cpu"
        decode_kw: dict[str, Any] = {}
        if self.device == "cuda":
            decode_kw["hw_decoder_load"] = self.hw_decoder_load
        # EXIF orientation is ignored, as by the header check (which takes the crop geometry
        # from the stored dimensions), PIL and torchvision: every backend decodes the same
        # pixels, and crops are drawn for the geometry they are applied to.
        decode_kw["adjust_orientation"] = False

        # The dynamic executor gives every iteration fresh output buffers (zero-copy DLPack
        # views stay valid) and keeps the pipeline usable after a failed iteration.
        @dali.pipeline_def(
            batch_size=self.max_batch,
            num_threads=self.threads,
            device_id=self.device_id,
            prefetch_queue_depth=depth,
            exec_dynamic=True,
        )
        def pipe() -> Any:
            enc = fn.external_source(
                name="enc", batch=True, dtype=types.UINT8, ndim=1, no_copy=True
            )
            anchor = fn.external_source(name="anchor", batch=True, dtype=types.FLOAT, ndim=1)
            shape = fn.external_source(name="shape", batch=True, dtype=types.FLOAT, ndim=1)
            flip = fn.external_source(name="flip", batch=True, dtype=types.INT32, ndim=0)
            img = fn.decoders.image_slice(
                enc,
                anchor,
                shape,
                device=decoder_device,
                output_type=types.RGB,
                normalized_anchor=False,
                normalized_shape=False,
                axis_names="WH",
                **decode_kw,
            )
            img = fn.resize(
                img,
                resize_x=cfg.size[1],
                resize_y=cfg.size[0],
                interp_type=types.INTERP_LINEAR,
                antialias=True,
            )
            return fn.crop_mirror_normalize(
                img, mirror=flip, mean=mean, std=std, dtype=out_dtype, output_layout="CHW"
            )

        p = pipe()
        p.build()
        return p

    def _feed(self, p: Any, data: list[bytes], crops: CropParams) -> None:
        if len(data) > self.max_batch:
            raise ValueError(
                f"batch of {len(data)} exceeds the pipeline's max batch {self.max_batch}"
            )
        p.feed_input("enc", [np.frombuffer(d, dtype=np.uint8) for d in data])
        p.feed_input("anchor", np.stack([crops.x0, crops.y0], axis=1).astype(np.float32))
        p.feed_input("shape", np.stack([crops.w, crops.h], axis=1).astype(np.float32))
        p.feed_input("flip", crops.flip.astype(np.int32))

    def _tensor(self, out: Any) -> torch.Tensor:
        # torch.from_dlpack passes the consumer's current stream to __dlpack__, so DALI orders
        # its producing work before what the consumer queues on that stream. On the CPU the
        # view is the batch (the capsule keeps the buffer alive, and nothing runs ahead). On the
        # GPU the batch is copied into torch-owned memory (see decode/gpu.py: torch_owned).
        view = torch.from_dlpack(out.as_tensor())
        dtype = torch.bfloat16 if self.cfg.dtype == "bfloat16" else None
        return torch_owned(view, self._holds, dtype)

    def decode(
        self, data: list[bytes], sizes: list[tuple[int, int]], crops: CropParams
    ) -> torch.Tensor:
        """``[len(data), 3, H, W]`` now; raises :class:`DaliBatchError` if DALI rejects it."""
        del sizes  # DALI reads the dimensions itself; the windows are in source pixels
        if self._sync is None:
            self._sync = self._build(depth=1)
        try:
            self._feed(self._sync, data, crops)
            (out,) = self._sync.run()
        except RuntimeError as e:
            err = as_batch_error(e)
            if err is e:
                raise
            raise err from e
        return self._tensor(out)

    def submit(self, data: list[bytes], crops: CropParams) -> Ticket:
        """Feed a batch to the pipelined DALI pipeline; ``collect`` returns its output."""
        if self.depth == 1:
            return Ticket(data, crops)
        if self._async is None:
            self._async = self._build(depth=self.depth)
            self._inflight.clear()
        ticket = Ticket(data, crops)
        self._feed(self._async, data, crops)
        self._inflight.append(ticket)
        return ticket

    def collect(self, ticket: Ticket) -> torch.Tensor:
        """The output of a submitted batch (``[B, 3, H, W]``), in submission order."""
        if ticket.result is None and ticket.error is None:
            if ticket not in self._inflight:  # depth 1, or submitted to a pipeline since dropped
                ticket.result = self.decode(ticket.data, [], ticket.crops)
            else:
                self._run_until(ticket)
        if ticket.error is not None:
            raise ticket.error
        assert ticket.result is not None
        return ticket.result

    def _run_until(self, ticket: Ticket) -> None:
        while ticket.result is None and ticket.error is None:
            # DALI runs an iteration only with `depth` batches fed from it on: at the end of a
            # stream, pad with dummy batches (a copy of the last one) whose outputs are dropped.
            while len(self._inflight) < self.depth:
                last = self._inflight[-1]
                self._feed(self._async, last.data, last.crops)
                self._inflight.append(Ticket(last.data, last.crops, dummy=True))
            head = self._inflight[0]
            try:
                (out,) = self._async.run()
            except RuntimeError as e:
                log.info(
                    "pipelined DALI run failed (%s); redoing the batches in flight one by one", e
                )
                self._fail_over()
                return
            self._inflight.popleft()
            if not head.dummy:
                head.result = self._tensor(out)

    def _fail_over(self) -> None:
        pending = [t for t in self._inflight if not t.dummy and t.result is None]
        self._inflight.clear()
        self._async = None
        for t in pending:
            try:
                t.result = self.decode(t.data, [], t.crops)
            except DaliBatchError as e:
                t.error = e

    def reset(self) -> None:
        """Drop batches in flight if an iteration was abandoned (real batches never collected);
        the next submit starts afresh. Dummy padding from a finished stream is kept: the next
        collect drops it without rebuilding the pipeline."""
        if any(not t.dummy and t.result is None and t.error is None for t in self._inflight):
            self._async = None
            self._inflight.clear()

    def close(self) -> None:
        self._closed = True
        self._sync = None
        self._async = None
        self._inflight.clear()
