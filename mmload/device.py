"""Moving batches to the device: one explicit function; the device is always passed in.

``to_device`` copies every tensor of a batch to ``device``: CPU tensors are staged in pinned
host memory and copied with ``non_blocking=True`` on a side stream, and the consumer's stream
waits on that stream's event, so the copy of batch N+1 overlaps compute on batch N. Tensors
already on the device are left alone (no copy); lists (``__key__``, text) pass through.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from mmload.errors import DeviceError
from mmload.jagged import Jagged

__all__ = ["DeviceCopier", "parse_device", "to_device"]


def parse_device(device: str | torch.device) -> torch.device:
    """Validate ``device`` ("cpu", "cuda", "cuda:N"); raises DeviceError if CUDA is missing.

    ``"cuda"`` is ``cuda:$LOCAL_RANK`` under torchrun (each rank its own GPU), else torch's
    current device."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise DeviceError(f"device={device!r}: {e}") from None
    if dev.type not in ("cpu", "cuda"):
        raise DeviceError(f"device={device!r}: mmload supports 'cpu' and 'cuda[:N]'")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(f"device={device!r}: CUDA is not available on this machine")
        if dev.index is None:  # a torchrun rank's GPU is its LOCAL_RANK, else torch's current
            local = os.environ.get("LOCAL_RANK")
            if local is not None and not local.isdigit():
                raise DeviceError(f"device={device!r}: LOCAL_RANK={local!r} is not an int")
            index = int(local) if local is not None else torch.cuda.current_device()
            dev = torch.device("cuda", index)
        if dev.index >= torch.cuda.device_count():
            raise DeviceError(f"device={device!r}: only {torch.cuda.device_count()} GPUs")
    return dev


def to_device(
    batch: dict[str, Any], device: torch.device, *, non_blocking: bool = True
) -> dict[str, Any]:
    """A copy of ``batch`` with every tensor on ``device`` (same keys, same order)."""
    out: dict[str, Any] = {}
    for k, v in batch.items():
        if isinstance(v, (torch.Tensor, Jagged)) and v.device != device:
            if device.type == "cuda" and v.device.type == "cpu" and not v.is_pinned():
                v = v.pin_memory()
            v = v.to(device, non_blocking=non_blocking)
        out[k] = v
    return out


class DeviceCopier:
    """Copies batches host->device on a dedicated CUDA stream (one per loader thread).

    ``__call__`` runs in the loader's background thread; ``ready`` runs in the consumer thread
    and makes the consumer's current stream wait for the copy, and records the tensors on it so
    the caching allocator does not reuse their memory early.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._stream = torch.cuda.Stream(device) if device.type == "cuda" else None

    def __call__(self, batch: dict[str, Any]) -> tuple[dict[str, Any], torch.cuda.Event | None]:
        if self._stream is None:
            return batch, None
        # Tensors already on the device (DALI `mixed` output, joined features, log-mel) were made
        # on the producing thread's stream: order the copy stream after it, so the event the
        # consumer waits on covers them too.
        self._stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self._stream):
            moved = to_device(batch, self.device, non_blocking=True)
            event = torch.cuda.Event()
            event.record(self._stream)
        return moved, event

    def ready(self, batch: dict[str, Any], event: torch.cuda.Event | None) -> dict[str, Any]:
        if event is None:
            return batch
        current = torch.cuda.current_stream(self.device)
        current.wait_event(event)
        for v in batch.values():
            for t in (v.values, v.offsets) if isinstance(v, Jagged) else (v,):
                if isinstance(t, torch.Tensor) and t.device.type == "cuda":
                    t.record_stream(current)
        return batch
