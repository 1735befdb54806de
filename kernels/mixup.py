"""Mixup and cutmix on a device batch, plus the matching label mix.

The random draws are inputs (mmload draws them from its seeded RNG), so every kernel is
deterministic. For sample ``b`` with partner ``p = perm[b]``:

* mixup: ``out[b] = lam[b] * x[b] + (1 - lam[b]) * x[p]`` (float32 arithmetic);
* cutmix: ``out[b] = x[b]`` except inside the half-open box ``[y0, y1) x [x0, x1)`` of the
  last two (H, W) axes, where ``out[b] = x[p]``; its label weight is
  ``lam = 1 - box_area / (H * W)`` (:func:`cutmix_lambda`);
* labels: ``[B, K]`` one-hot or soft labels mixed with that ``lam`` by the mixup kernel.

``out`` must not share memory with ``x``: sample ``b`` reads sample ``perm[b]``, which another
thread block may already have overwritten, so in-place mixing would race.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
from numba import cuda, float32, int32, uint32

from ._device import (
    MAX_GRID_YZ,
    Variants,
    check_disjoint,
    device_array,
    device_params,
    host_or_device,
    num_blocks,
)

__all__ = [
    "cutmix",
    "cutmix_lambda",
    "cutmix_reference",
    "kernel_signatures",
    "mix_labels",
    "mix_labels_reference",
    "mixup",
    "mixup_reference",
]

# Kernels reach threadIdx & co. through this alias: numba's stubs mistype them for mypy.
_cu: Any = cuda

_DTYPES = ("float16", "float32")
_ONE = np.float32(1.0)
_THREADS = 256
_MAX_BLOCKS_X = 4096  # the grid-stride loop covers the rest


def _mixup_kernel(x: Any, perm: Any, lam: Any, batch: Any, n: Any, out: Any) -> None:
    # x/out: flat [B * n]; 32-bit unsigned index math (the launcher checks the size fits).
    stride = uint32(_cu.gridDim.x * _cu.blockDim.x)
    b = uint32(_cu.blockIdx.y)
    while b < uint32(batch):
        own = uint32(b * uint32(n))
        partner = uint32(uint32(perm[b]) * uint32(n))
        w = lam[b]
        wp = _ONE - w
        i = uint32(_cu.blockIdx.x * _cu.blockDim.x + _cu.threadIdx.x)
        while i < uint32(n):
            out[uint32(own + i)] = w * float32(x[uint32(own + i)]) + wp * float32(
                x[uint32(partner + i)]
            )
            i = uint32(i + stride)
        b = uint32(b + uint32(_cu.gridDim.y))


def _cutmix_kernel(
    x: Any, perm: Any, boxes: Any, batch: Any, lead: Any, height: Any, width: Any, out: Any
) -> None:
    # x/out: flat [B * lead * H * W]; one thread per (y, x) of a plane pastes that pixel for
    # all ``lead`` planes of the sample (channels, frames), so the box test runs once per
    # pixel and no index needs a division. 32-bit unsigned index math (the launcher checks the
    # size fits), unsigned so Numba adds no negative-index wraparound.
    xx = int32(_cu.blockIdx.x * _cu.blockDim.x + _cu.threadIdx.x)
    if xx >= width:
        return
    plane = uint32(height * width)
    per_sample = uint32(uint32(lead) * plane)
    y_first = int32(_cu.blockIdx.y * _cu.blockDim.y + _cu.threadIdx.y)
    y_step = int32(_cu.blockDim.y * _cu.gridDim.y)
    b = uint32(_cu.blockIdx.z)
    while b < uint32(batch):
        j = uint32(b << uint32(2))
        y0 = boxes[j]
        x0 = boxes[uint32(j | uint32(1))]
        y1 = boxes[uint32(j | uint32(2))]
        x1 = boxes[uint32(j | uint32(3))]
        in_x = x0 <= xx and xx < x1
        own = uint32(b * per_sample)
        partner = uint32(uint32(perm[b]) * per_sample)
        yy = y_first
        while yy < height:
            pix = uint32(uint32(yy) * uint32(width) + uint32(xx))
            src = partner if in_x and y0 <= yy and yy < y1 else own
            src = uint32(src + pix)
            dst = uint32(own + pix)
            for _ in range(lead):
                out[dst] = x[src]
                src = uint32(src + plane)
                dst = uint32(dst + plane)
            yy = int32(yy + y_step)
        b = uint32(b + uint32(_cu.gridDim.z))


def _mixup_signature(dtype: str) -> str:
    return f"void({dtype}[::1], int64[::1], float32[::1], int32, int32, {dtype}[::1])"


def _cutmix_signature(dtype: str) -> str:
    return f"void({dtype}[::1], int64[::1], int32[::1], int32, int32, int32, int32, {dtype}[::1])"


_VARIANTS = Variants(
    {
        **{f"mixup[{d}]": (_mixup_kernel, _mixup_signature(d)) for d in _DTYPES},
        **{f"cutmix[{d}]": (_cutmix_kernel, _cutmix_signature(d)) for d in _DTYPES},
    }
)


def kernel_signatures() -> list[tuple[str, Callable[..., None], str]]:
    """``(name, Python kernel, Numba signature)`` of every variant the launchers compile."""
    return _VARIANTS.signatures()


def _compiled(name: str) -> Any:
    return _VARIANTS.compile(name)


def _dtype_of(arr: Any) -> str:
    return str(np.dtype(arr.dtype))


def _launch_shape(batch: int, n: int) -> tuple[tuple[int, int], int]:
    threads = min(_THREADS, n)
    return (min(num_blocks(n, threads), _MAX_BLOCKS_X), min(batch, MAX_GRID_YZ)), threads


def _prepare(
    x: Any, out: Any, perm: Any, min_ndim: int, stream: Any
) -> tuple[Any, Any, tuple[np.ndarray | None, Any], tuple[int, ...]]:
    """Validated 2-D ``[B, N]`` views of x and out, and perm (``host_or_device`` pair, not
    uploaded yet: the launcher uploads all host parameters in one copy)."""
    src = device_array(x, "x", dtype=_DTYPES, shape=_any_shape(x, "x", min_ndim))
    shape = tuple(int(n) for n in src.shape)
    dst = device_array(out, "out", dtype=_dtype_of(src), shape=shape)
    check_disjoint(x=src, out=dst)
    batch = shape[0]
    perm_h, perm_d = host_or_device(perm, "perm", dtype="int64", shape=(batch,), upload=False)
    if perm_h is not None and perm_h.size and (perm_h.min() < 0 or perm_h.max() >= batch):
        lo, hi = int(perm_h.min()), int(perm_h.max())
        raise ValueError(f"perm: values must be in [0, {batch}), got [{lo}, {hi}]")
    flat = (batch, int(np.prod(shape[1:], dtype=np.int64)))
    return src.reshape(flat), dst.reshape(flat), (perm_h, perm_d), shape


def _any_shape(arr: Any, name: str, min_ndim: int) -> tuple[None, ...]:
    shape = getattr(arr, "shape", None)
    if shape is None or len(shape) < min_ndim:
        raise ValueError(f"{name}: needs at least {min_ndim} dimensions, got shape {shape}")
    return (None,) * len(shape)


def mixup(x: Any, perm: Any, lam: Any, out: Any, *, stream: Any = 0) -> None:
    """``out[b] = lam[b] * x[b] + (1 - lam[b]) * x[perm[b]]``.

    ``x``: float16/float32 device array ``[B, ...]``; ``perm``: int64 ``[B]``; ``lam``:
    float32 ``[B]`` (host arrays are checked and uploaded; device arrays are trusted).
    ``out``: preallocated device array of x's shape and dtype, not overlapping ``x``.
    """
    src, dst, perm_pair, shape = _prepare(x, out, perm, 1, stream)
    batch = shape[0]
    lam_h, lam_d = host_or_device(lam, "lam", dtype="float32", shape=(batch,), upload=False)
    if lam_h is not None and not np.isfinite(lam_h).all():
        raise ValueError("lam: must be finite")
    if batch == 0 or src.shape[1] == 0:
        return
    n = int(src.shape[1])
    if batch * n >= 2**31:
        raise ValueError(f"x: {batch * n} elements; mixup handles at most 2**31 - 1")
    perm_d, lam_d = device_params([perm_pair, (lam_h, lam_d)], stream=stream)
    grid, threads = _launch_shape(batch, n)
    _compiled(f"mixup[{_dtype_of(src)}]")[grid, threads, stream](
        src.reshape(batch * n), perm_d, lam_d, np.int32(batch), np.int32(n), dst.reshape(batch * n)
    )


def mix_labels(labels: Any, perm: Any, lam: Any, out: Any, *, stream: Any = 0) -> None:
    """Mix one-hot or soft labels ``[B, K]`` like :func:`mixup` (``lam`` from mixup, or
    :func:`cutmix_lambda` for cutmix). ``out``: preallocated ``[B, K]``, labels' dtype."""
    shape = getattr(labels, "shape", None)
    if shape is None or len(shape) != 2:
        raise ValueError(f"labels: must be [B, K], got shape {shape}")
    mixup(labels, perm, lam, out, stream=stream)


def cutmix(x: Any, perm: Any, boxes: Any, out: Any, *, stream: Any = 0) -> None:
    """``out[b] = x[b]`` with the box ``boxes[b] = (y0, x0, y1, x1)`` pasted from ``x[perm[b]]``.

    ``x``: float16/float32 device array ``[B, ..., H, W]`` (the box applies to the last two
    axes, for every channel/frame); ``perm``: int64 ``[B]``; ``boxes``: int32 ``[B, 4]``,
    half-open, ``0 <= y0 <= y1 <= H`` and ``0 <= x0 <= x1 <= W`` (an empty box copies x).
    ``out``: preallocated device array of x's shape and dtype, not overlapping ``x``.
    """
    src, dst, perm_pair, shape = _prepare(x, out, perm, 3, stream)
    batch, height, width = shape[0], shape[-2], shape[-1]
    box_h, box_d = host_or_device(boxes, "boxes", dtype="int32", shape=(batch, 4), upload=False)
    if box_h is not None:
        _check_boxes(box_h, height, width)
    if batch == 0 or src.shape[1] == 0:
        return
    n = int(src.shape[1])
    if batch * n >= 2**31:
        raise ValueError(f"x: {batch * n} elements; cutmix handles at most 2**31 - 1")
    perm_d, box_d = device_params([perm_pair, (box_h, box_d)], stream=stream)
    block = (min(32, width), min(8, height), 1)
    grid = (
        num_blocks(width, block[0]),
        min(num_blocks(height, block[1]), MAX_GRID_YZ),
        min(batch, MAX_GRID_YZ),
    )
    _compiled(f"cutmix[{_dtype_of(src)}]")[grid, block, stream](
        src.reshape(batch * n),
        perm_d,
        box_d.reshape(4 * batch),
        np.int32(batch),
        np.int32(n // (height * width)),
        np.int32(height),
        np.int32(width),
        dst.reshape(batch * n),
    )


def _check_boxes(boxes: np.ndarray, height: int, width: int) -> None:
    y0, x0, y1, x1 = boxes.T
    ok = (y0 >= 0) & (y0 <= y1) & (y1 <= height) & (x0 >= 0) & (x0 <= x1) & (x1 <= width)
    bad = np.flatnonzero(~ok)
    if bad.size:
        i = int(bad[0])
        raise ValueError(
            f"boxes: sample {i} box {boxes[i].tolist()} (y0, x0, y1, x1) is not inside "
            f"H={height}, W={width} with y0 <= y1 and x0 <= x1"
        )


def cutmix_lambda(boxes: np.ndarray, height: int, width: int) -> np.ndarray:
    """Label weight of each sample's own image under cutmix: ``1 - box_area / (H * W)``.

    Returns float32 ``[B]`` on the host.
    """
    b = np.asarray(boxes, dtype=np.int64)
    if b.ndim != 2 or b.shape[1] != 4:
        raise ValueError(f"boxes: must be [B, 4], got shape {list(b.shape)}")
    _check_boxes(b, height, width)
    area = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    return (1.0 - area / float(height * width)).astype(np.float32)


def mixup_reference(x: np.ndarray, perm: np.ndarray, lam: np.ndarray) -> np.ndarray:
    """NumPy reference of :func:`mixup`: a host array of x's shape and dtype."""
    x = np.asarray(x)
    w = np.asarray(lam, dtype=np.float32).reshape((-1,) + (1,) * (x.ndim - 1))
    mixed = w * x.astype(np.float32) + (_ONE - w) * x[np.asarray(perm)].astype(np.float32)
    return mixed.astype(x.dtype)


def mix_labels_reference(labels: np.ndarray, perm: np.ndarray, lam: np.ndarray) -> np.ndarray:
    """NumPy reference of :func:`mix_labels`: a host ``[B, K]`` array of labels' dtype."""
    return mixup_reference(labels, perm, lam)


def cutmix_reference(x: np.ndarray, perm: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """NumPy reference of :func:`cutmix`: a host array of x's shape and dtype."""
    x = np.asarray(x)
    out = x.copy()
    for b, (y0, x0, y1, x1) in enumerate(np.asarray(boxes, dtype=np.int64)):
        out[b, ..., y0:y1, x0:x1] = x[int(perm[b]), ..., y0:y1, x0:x1]
    return out
