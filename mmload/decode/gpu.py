"""Numba launches on the batch's GPU: the one place decode code selects a device for Numba.

Numba has its own notion of the current device. A launch from the decode thread without
selecting one runs in GPU 0's primary context, so a rank on ``cuda:1`` would get pointers
from one device and a stream from another, plus an extra context on GPU 0. ``numba_on``
selects ``device`` for torch and Numba alike and wraps torch's current stream of that device
inside the device's context, so every Numba launch is ordered with the torch work around it.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

__all__ = ["device_index", "numba_on", "torch_owned"]


def device_index(device: torch.device) -> int:
    """The CUDA ordinal of ``device`` (``cuda`` without an index is torch's current device)."""
    if device.type != "cuda":
        raise ValueError(f"{device} is not a CUDA device")
    return device.index if device.index is not None else torch.cuda.current_device()


@contextmanager
def numba_on(device: torch.device) -> Iterator[Any]:
    """``with numba_on(dev) as stream:`` launch Numba kernels on ``dev`` in ``stream`` (torch's
    current stream of ``dev``, as a Numba external stream created in ``dev``'s context)."""
    from numba import cuda

    index = device_index(device)
    with torch.cuda.device(index), cuda.gpus[index]:
        yield cuda.external_stream(torch.cuda.current_stream(index).cuda_stream)


def torch_owned(
    view: torch.Tensor,
    holds: deque[tuple[torch.Tensor, Any]],
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """DALI's output ``view`` in memory torch owns (converted to ``dtype`` if given).

    On the GPU the batch is copied: torch's caching allocator tracks the streams that use its
    memory, and ``record_stream`` means nothing for DALI's. The copy runs on the current
    stream, after DALI's work (``from_dlpack`` ordered it). The view is held, with an event
    after the copy, until the copy has finished, so DALI cannot reuse its buffer while the copy
    still reads it. On the CPU nothing runs ahead: the view (whose capsule keeps the buffer
    alive) is the batch."""
    if view.device.type != "cuda":
        return view.to(dtype) if dtype is not None else view
    out = view.to(dtype) if dtype is not None and dtype != view.dtype else view.clone()
    event = torch.cuda.Event()
    event.record(torch.cuda.current_stream(view.device))
    holds.append((view, event))
    while holds and holds[0][1].query():
        holds.popleft()
    return out
