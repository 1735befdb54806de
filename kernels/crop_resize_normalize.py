"""Fused crop + bilinear resize + horizontal flip + normalize + HWC->NCHW for an image batch.

Input: ``B`` variable-size uint8 RGB images (HWC) packed in one flat buffer, image ``b`` at
``images[offsets[b] : offsets[b] + heights[b] * widths[b] * 3]``, and per-sample crop windows
``y0, x0, h, w`` and ``flip`` exactly as :class:`mmload.augment.CropParams`. Output: a
preallocated ``[B, 3, OH, OW]`` array on the device, float16, float32, bfloat16 or uint8.

Resampling is bilinear with half-pixel centres (``align_corners=False``), source coordinates
clamped to the crop window's edges, and **no antialiasing**: it equals
``F.interpolate(crop, (OH, OW), mode="bilinear", align_corners=False, antialias=False)``
applied to the crop, then ``flip(-1)`` where ``flip`` is set. DALI's resize antialiases when
downscaling, so strong downscales differ from DALI (aliasing shows on fine textures).
Normalization is ``(pixel - mean[c]) / std[c]`` with mean/std in 0..255 units (like
``mmload.config.IMAGENET_MEAN``/``IMAGENET_STD``), computed in float32; with no mean/std the
output is the interpolated pixel value (uint8 output rounds half up). bfloat16 is written as
its bit pattern (round-to-nearest-even from float32) through a uint16 view of the output.

One GPU thread computes one output pixel (all three channels); consecutive threads write
consecutive ``x`` of each channel plane, so stores are coalesced. A first launch, one thread
per sample, computes each sample's constants (base address of the crop, row stride, last
x/y, flip, and the two scales ``w / OW``, ``h / OH``: the only divisions, exactly as the
reference rounds them); the pixel kernel then has no division (normalization multiplies by the
host-computed ``1 / std`` and adds ``-mean / std``) and only 32-bit index math with unsigned
indices (no negative-index wraparound). The launcher refuses outputs of ``2**31`` elements or
more and host-described images of ``2**31`` bytes or more.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any, Literal, Protocol

import numpy as np
from numba import cuda, float32, int32, int64, uint8, uint16, uint32, uint64
from numba.cuda import libdevice

from ._device import (
    MAX_GRID_YZ,
    SIMULATOR,
    Variants,
    device_array,
    device_params,
    host_or_device,
    num_blocks,
    scratch,
    upload_params,
)

__all__ = [
    "CropLike",
    "OutDType",
    "bfloat16_bits",
    "crop_resize_normalize",
    "crop_resize_normalize_reference",
    "kernel_signatures",
]

# Kernels reach threadIdx & co. through this alias: numba's stubs mistype them for mypy.
_cu: Any = cuda

OutDType = Literal["float16", "float32", "bfloat16", "uint8"]

_F32 = "float32"
_ZERO = np.float32(0.0)
_HALF = np.float32(0.5)
_ONE = np.float32(1.0)

_STORE_FLOAT, _STORE_BF16, _STORE_U8 = 0, 1, 2
_INT32_LIMIT = 2**31
_PARAM_THREADS = 128
_ROWS = 4  # output rows per thread of the pixel kernel (blockDim.y apart)


def _f32_bits_simulated(x: Any) -> Any:
    return np.float32(x).view(np.uint32)


# The float32 -> uint32 bit cast; libdevice has no simulator implementation.
_f32_bits: Callable[[Any], Any] = _f32_bits_simulated if SIMULATOR else libdevice.float_as_int


class CropLike(Protocol):
    """Anything with CropParams' fields: ``y0, x0, h, w`` (int ``[B]``), ``flip`` (bool ``[B]``)."""

    @property
    def y0(self) -> Any: ...
    @property
    def x0(self) -> Any: ...
    @property
    def h(self) -> Any: ...
    @property
    def w(self) -> Any: ...
    @property
    def flip(self) -> Any: ...


def _params_kernel(
    offsets: Any,
    widths: Any,
    y0s: Any,
    x0s: Any,
    hs: Any,
    ws: Any,
    flips: Any,
    out_h: Any,
    out_w: Any,
    base: Any,
    ints: Any,
    scales: Any,
) -> None:
    """One thread per sample: everything the pixel kernel needs that is constant per sample
    (the two scale divisions happen here, once per sample, not once per pixel)."""
    b = _cu.blockIdx.x * _cu.blockDim.x + _cu.threadIdx.x
    if b >= base.shape[0]:
        return
    row_bytes = widths[b] * int32(3)
    base[b] = offsets[b] + int64(y0s[b]) * int64(row_bytes) + int64(x0s[b] * int32(3))
    ints[4 * b] = row_bytes
    ints[4 * b + 1] = ws[b] - int32(1)
    ints[4 * b + 2] = hs[b] - int32(1)
    ints[4 * b + 3] = int32(flips[b] != 0)
    scales[2 * b] = float32(ws[b]) / float32(out_w)
    scales[2 * b + 1] = float32(hs[b]) / float32(out_h)


def _make_kernel(store: int) -> Callable[..., None]:
    # ``store`` is a closure constant, so Numba prunes the other branches at compile time.
    def kernel(
        images: Any,
        base: Any,
        ints: Any,
        scales: Any,
        out: Any,
        batch: Any,
        n_out_h: Any,
        n_out_w: Any,
        a0: Any,
        a1: Any,
        a2: Any,
        c0: Any,
        c1: Any,
        c2: Any,
    ) -> None:
        # 32-bit index math throughout (the launcher checks the extents fit); ``out`` is the
        # flat [B * 3 * OH * OW] view; y = v * a[c] + c[c] with a = 1/std, c = -mean/std.
        # Each thread writes ``_ROWS`` pixels of one column, ``blockDim.y`` rows apart: the
        # per-sample loads and the column's taps (x, weights, flip) are shared by them, and
        # consecutive threads still store consecutive x.
        ox = int32(_cu.blockIdx.x * _cu.blockDim.x + _cu.threadIdx.x)
        oy0 = int32(_cu.blockIdx.y * (_cu.blockDim.y * _ROWS) + _cu.threadIdx.y)
        if ox >= n_out_w or oy0 >= n_out_h:
            return
        # Numba widens int32 arithmetic to int64; every int32(...) below narrows it back, so
        # LLVM emits 32-bit instructions.
        scale = (a0, a1, a2)
        bias = (c0, c1, c2)
        step = int32(_cu.blockDim.y)
        plane = uint32(n_out_h * n_out_w)
        fox = float32(ox) + _HALF
        fox_flip = float32(int32(n_out_w - ox)) - _HALF
        # Unsigned indices: Numba emits no negative-index wraparound for them.
        b = uint32(_cu.blockIdx.z)
        while b < uint32(batch):
            i4 = uint32(b << uint32(2))
            row_bytes = ints[i4]
            last_x = ints[uint32(i4 | uint32(1))]
            last_y = ints[uint32(i4 | uint32(2))]
            fxo = fox_flip if ints[uint32(i4 | uint32(3))] != 0 else fox
            fx = max(fxo * scales[uint32(b << uint32(1))] - _HALF, _ZERO)
            sy = scales[uint32((b << uint32(1)) | uint32(1))]
            ix0 = min(int32(fx), last_x)
            dx = uint64(3) if ix0 < last_x else uint64(0)
            lx1 = fx - float32(ix0)
            lx0 = _ONE - lx1
            col = uint64(base[b]) + uint64(uint32(ix0 * int32(3)))
            dst_b = uint32(uint32(b * uint32(3)) * uint32(n_out_h))
            oy = oy0
            for _ in range(_ROWS):
                if oy < n_out_h:
                    fy = max((float32(oy) + _HALF) * sy - _HALF, _ZERO)
                    iy0 = min(int32(fy), last_y)
                    dy = uint64(row_bytes) if iy0 < last_y else uint64(0)
                    ly1 = fy - float32(iy0)
                    ly0 = _ONE - ly1
                    p00 = uint64(col + uint64(uint32(iy0 * row_bytes)))
                    dst = uint32(uint32(dst_b + uint32(oy)) * uint32(n_out_w) + uint32(ox))
                    for c in range(3):
                        p = uint64(p00 + uint64(c))
                        v = ly0 * (lx0 * float32(images[p]) + lx1 * float32(images[uint64(p + dx)]))
                        p1 = uint64(p + dy)
                        v += ly1 * (
                            lx0 * float32(images[p1]) + lx1 * float32(images[uint64(p1 + dx)])
                        )
                        if store == _STORE_U8:
                            out[dst] = uint8(int32(v + _HALF))
                        else:
                            y = v * scale[c] + bias[c]
                            if store == _STORE_BF16:
                                u = uint32(_f32_bits(y))
                                rounded = u + uint32(0x7FFF) + ((u >> uint32(16)) & uint32(1))
                                out[dst] = uint16(rounded >> uint32(16))
                            else:
                                out[dst] = y
                        dst = uint32(dst + plane)
                oy = int32(oy + step)
            b = uint32(b + uint32(_cu.gridDim.z))

    return kernel


_STORE = {
    "float16": _STORE_FLOAT,
    "float32": _STORE_FLOAT,
    "bfloat16": _STORE_BF16,
    "uint8": _STORE_U8,
}
_ELEM = {"float16": "float16", "float32": "float32", "bfloat16": "uint16", "uint8": "uint8"}
_PY_KERNELS = {s: _make_kernel(s) for s in (_STORE_FLOAT, _STORE_BF16, _STORE_U8)}


def _signature(dtype: str) -> str:
    return (
        "void(uint8[::1], int64[::1], int32[::1], float32[::1], "
        f"{_ELEM[dtype]}[::1], int32, int32, int32, {', '.join([_F32] * 6)})"
    )


_PARAMS_SIG = (
    "void(int64[::1], int32[::1], int32[::1], int32[::1], int32[::1], int32[::1], uint8[::1], "
    "int32, int32, int64[::1], int32[::1], float32[::1])"
)

_VARIANTS = Variants(
    {
        "crop_resize_normalize.params": (_params_kernel, _PARAMS_SIG),
        **{f"crop_resize_normalize[{d}]": (_PY_KERNELS[_STORE[d]], _signature(d)) for d in _STORE},
    }
)


def kernel_signatures() -> list[tuple[str, Callable[..., None], str]]:
    """``(name, Python kernel, Numba signature)`` of every variant the launcher compiles."""
    return _VARIANTS.signatures()


def _compiled(name: str) -> Any:
    return _VARIANTS.compile(name)


def _mean_std(
    mean: Sequence[float] | None, std: Sequence[float] | None, dtype: str
) -> tuple[np.ndarray, np.ndarray]:
    if (mean is None) != (std is None):
        raise ValueError("mean and std: give both (normalize) or neither (raw pixel values)")
    if mean is None or std is None:
        return np.zeros(3, np.float32), np.ones(3, np.float32)
    if dtype == "uint8":
        raise ValueError("dtype='uint8' cannot hold normalized values; drop mean/std")
    m = np.asarray(mean, dtype=np.float64)
    s = np.asarray(std, dtype=np.float64)
    if m.shape != (3,) or not np.isfinite(m).all():
        raise ValueError(f"mean: must be 3 finite numbers, got {mean!r}")
    if s.shape != (3,) or not (np.isfinite(s).all() and (s > 0).all()):
        raise ValueError(f"std: must be 3 finite numbers > 0, got {std!r}")
    return m.astype(np.float32), s.astype(np.float32)


@functools.lru_cache(maxsize=16)
def _affine_cached(mean: Any, std: Any, dtype: str) -> tuple[np.float32, ...]:
    m, s = _mean_std(mean, std, dtype)
    inv_std = (np.float32(1.0) / s).astype(np.float32)
    bias = (-m * inv_std).astype(np.float32)
    return tuple(np.float32(v) for v in (*inv_std, *bias))


def _affine(
    mean: Sequence[float] | None, std: Sequence[float] | None, dtype: str
) -> tuple[np.float32, ...]:
    """The kernel's ``(a0, a1, a2, c0, c1, c2)``: ``y = v * (1 / std) + (-mean / std)`` per
    channel (validated; cached for hashable mean/std such as the config's tuples)."""
    try:
        return _affine_cached(mean, std, dtype)
    except TypeError:  # unhashable (a list, an array): computed each call
        return _affine_cached.__wrapped__(mean, std, dtype)


def _check_dtype(dtype: str) -> None:
    if dtype not in _STORE:
        raise ValueError(f"dtype: must be one of {sorted(_STORE)}, got {dtype!r}")


def _check_windows(
    n_bytes: int,
    offsets: np.ndarray | None,
    heights: np.ndarray | None,
    widths: np.ndarray | None,
    crop: dict[str, np.ndarray | None],
) -> None:
    """Validate whatever was given on the host (device-resident values are trusted)."""
    if heights is not None and (heights < 1).any():
        raise ValueError("heights: every image needs height >= 1")
    if widths is not None and (widths < 1).any():
        raise ValueError("widths: every image needs width >= 1")
    if offsets is not None and heights is not None and widths is not None:
        end = offsets + heights.astype(np.int64) * widths.astype(np.int64) * 3
        outside = (offsets < 0) | (end > n_bytes)
        if outside.any():
            bad = np.flatnonzero(outside)
            raise ValueError(
                f"offsets: image {int(bad[0])} spans bytes [{int(offsets[bad[0]])}, "
                f"{int(end[bad[0]])}) outside the {n_bytes}-byte images buffer"
            )
    for field in ("h", "w"):
        v = crop[field]
        if v is not None and (v < 1).any():
            raise ValueError(f"crop.{field}: every crop needs {field} >= 1")
    for lo, ext, size in (("y0", "h", heights), ("x0", "w", widths)):
        start, extent = crop[lo], crop[ext]
        if start is not None and (start < 0).any():
            raise ValueError(f"crop.{lo}: must be >= 0")
        if start is not None and extent is not None and size is not None:
            over = start + extent > size
            if over.any():
                i = int(np.flatnonzero(over)[0])
                raise ValueError(
                    f"crop.{lo}/crop.{ext}: sample {i} window [{int(start[i])}, "
                    f"{int(start[i] + extent[i])}) exceeds the image extent {int(size[i])}"
                )


def _host_constants(
    offsets: np.ndarray,
    widths: np.ndarray,
    crop: dict[str, np.ndarray | None],
    out_h: int,
    out_w: int,
) -> list[np.ndarray]:
    """What ``_params_kernel`` computes, for host metadata: ``[base int64 [B], ints int32
    [4B], scales float32 [2B]]`` (the same IEEE float32 divisions, so the same bits)."""
    y0, x0, h, w, flip = (np.asarray(crop[f]) for f in ("y0", "x0", "h", "w", "flip"))
    row_bytes = widths * np.int32(3)
    base = offsets + y0.astype(np.int64) * row_bytes + (x0 * np.int32(3)).astype(np.int64)
    ints = np.empty((len(offsets), 4), np.int32)
    ints[:, 0] = row_bytes
    ints[:, 1] = w - 1
    ints[:, 2] = h - 1
    ints[:, 3] = flip != 0
    scales = np.empty((len(offsets), 2), np.float32)
    scales[:, 0] = w.astype(np.float32) / np.float32(out_w)
    scales[:, 1] = h.astype(np.float32) / np.float32(out_h)
    return [base, ints.reshape(-1), scales.reshape(-1)]


def crop_resize_normalize(
    images: Any,
    offsets: Any,
    heights: Any,
    widths: Any,
    crop: CropLike,
    out: Any,
    *,
    dtype: OutDType,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    stream: Any = 0,
) -> None:
    """Write ``out[b] = normalize(flip(resize(crop(image b))))`` for the whole batch.

    ``images``: uint8 ``[N]`` device buffer. ``offsets`` (int64), ``heights``, ``widths``
    (int32) and the ``crop`` fields (``[B]`` each) may be host arrays (validated, converted and
    uploaded each call) or device arrays of exactly those dtypes (int32 for the crop window,
    uint8 for ``flip``; their values are trusted). ``out``: preallocated device array
    ``[B, 3, OH, OW]`` of ``dtype`` (bfloat16: a bfloat16 or uint16 array receiving the bits).
    ``stream``: a Numba stream (``cuda.external_stream(torch.cuda.current_stream().cuda_stream)``
    to order it with torch work) or 0. Returns nothing; ``out`` holds the batch on the device.
    """
    _check_dtype(dtype)
    affine = _affine(mean, std, dtype)
    imgs = device_array(images, "images", dtype="uint8", shape=(None,))
    dst = device_array(out, "out", dtype=dtype, shape=(None, 3, None, None))
    batch, _, out_h, out_w = (int(n) for n in dst.shape)
    if batch == 0 or out_h == 0 or out_w == 0:
        return
    n = (batch,)
    off_h, off_d = host_or_device(offsets, "offsets", dtype="int64", shape=n, upload=False)
    # Heights only bound the crop windows (checked here); the kernel needs the row stride.
    hh, _ = host_or_device(heights, "heights", dtype="int32", shape=n, upload=False)
    wh, w_d = host_or_device(widths, "widths", dtype="int32", shape=n, upload=False)
    crop_host: dict[str, np.ndarray | None] = {}
    crop_dev: dict[str, Any] = {}
    for field in ("y0", "x0", "h", "w", "flip"):
        kind = "uint8" if field == "flip" else "int32"
        value = getattr(crop, field, None)
        if value is None:
            raise ValueError(f"crop: has no field {field!r} (expected CropParams)")
        crop_host[field], crop_dev[field] = host_or_device(
            value, f"crop.{field}", dtype=kind, shape=n, upload=False
        )
    _check_windows(int(imgs.shape[0]), off_h, hh, wh, crop_host)
    if batch * 3 * out_h * out_w >= _INT32_LIMIT:
        raise ValueError(f"out: {batch * 3 * out_h * out_w} elements; at most 2**31 - 1")
    if hh is not None and wh is not None and (hh.astype(np.int64) * wh * 3 >= _INT32_LIMIT).any():
        raise ValueError("heights/widths: an image of 2**31 bytes or more")
    # Per-sample constants (base address, row stride, last x/y, flip, the two scales): the
    # pixel kernel then has no division and 32-bit index math. They leave in one non-blocking
    # copy from a pinned slot into a reused device buffer (no allocation per call).
    fields = ("y0", "x0", "h", "w", "flip")
    if off_h is not None and wh is not None and all(crop_host[f] is not None for f in fields):
        # All metadata on the host (the loader's case): the constants are computed here,
        # vectorized, with the params kernel's float32 divisions; one launch, not two.
        base_d, ints_d, scales_d = upload_params(
            _host_constants(off_h, wh, crop_host, out_h, out_w), stream=stream
        )
    else:
        # Some metadata on the device: upload the host rest and compute the constants there,
        # one thread per sample, into reused scratch.
        off_d, w_d, *crop_d = device_params(
            [(off_h, off_d), (wh, w_d), *((crop_host[f], crop_dev[f]) for f in fields)],
            stream=stream,
        )
        crop_dev = dict(zip(fields, crop_d, strict=True))
        base_d, ints_d, scales_d = scratch(
            [((batch,), np.int64), ((4 * batch,), np.int32), ((2 * batch,), np.float32)],
            stream=stream,
        )
        threads = min(_PARAM_THREADS, batch)
        _compiled("crop_resize_normalize.params")[num_blocks(batch, threads), threads, stream](
            off_d,
            w_d,
            crop_dev["y0"],
            crop_dev["x0"],
            crop_dev["h"],
            crop_dev["w"],
            crop_dev["flip"],
            np.int32(out_h),
            np.int32(out_w),
            base_d,
            ints_d,
            scales_d,
        )
    block = (min(32, out_w), min(8, out_h), 1)
    grid = (
        num_blocks(out_w, block[0]),
        num_blocks(out_h, block[1] * _ROWS),
        min(batch, MAX_GRID_YZ),
    )
    _compiled(f"crop_resize_normalize[{dtype}]")[grid, block, stream](
        imgs,
        base_d,
        ints_d,
        scales_d,
        dst.reshape(batch * 3 * out_h * out_w),
        np.int32(batch),
        np.int32(out_h),
        np.int32(out_w),
        *affine,
    )


def _taps(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Bilinear source indices and weights, in the kernel's float32 arithmetic."""
    scale = np.float32(n_in) / np.float32(n_out)
    src = (np.arange(n_out, dtype=np.float32) + _HALF) * scale - _HALF
    src = np.maximum(src, _ZERO)
    i0 = np.minimum(src.astype(np.int64), n_in - 1)
    i1 = np.where(i0 < n_in - 1, i0 + 1, i0)
    l1 = src - i0.astype(np.float32)
    return i0, i1, (_ONE - l1).astype(np.float32), l1.astype(np.float32)


def bfloat16_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit pattern (uint16), round to nearest even; NaN -> 0x7FC0."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32).astype(np.uint64)
    bits = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
    return np.where(np.isnan(x), np.uint16(0x7FC0), bits)


def crop_resize_normalize_reference(
    images: np.ndarray,
    offsets: np.ndarray,
    heights: np.ndarray,
    widths: np.ndarray,
    crop: CropLike,
    out_size: tuple[int, int],
    *,
    dtype: OutDType,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> np.ndarray:
    """NumPy reference of :func:`crop_resize_normalize`.

    Returns a host array ``[B, 3, OH, OW]`` of ``dtype`` (bfloat16: its bits as uint16).
    """
    _check_dtype(dtype)
    m, s = _mean_std(mean, std, dtype)
    out_h, out_w = out_size
    batch = len(offsets)
    res = np.empty((batch, 3, out_h, out_w), np.float32)
    for b in range(batch):
        height, width = int(heights[b]), int(widths[b])
        off = int(offsets[b])
        img = np.asarray(images[off : off + height * width * 3]).reshape(height, width, 3)
        y0, x0, h, w = (int(getattr(crop, f)[b]) for f in ("y0", "x0", "h", "w"))
        win = img[y0 : y0 + h, x0 : x0 + w].astype(np.float32)
        iy0, iy1, ly0, ly1 = _taps(h, out_h)
        ix0, ix1, lx0, lx1 = _taps(w, out_w)
        if crop.flip[b]:
            ix0, ix1, lx0, lx1 = ix0[::-1], ix1[::-1], lx0[::-1], lx1[::-1]
        lx0, lx1 = lx0[None, :, None], lx1[None, :, None]
        top = lx0 * win[iy0][:, ix0] + lx1 * win[iy0][:, ix1]
        bot = lx0 * win[iy1][:, ix0] + lx1 * win[iy1][:, ix1]
        v = ly0[:, None, None] * top + ly1[:, None, None] * bot
        res[b] = v.transpose(2, 0, 1)
    if dtype == "uint8":
        return (res + _HALF).astype(np.int32).astype(np.uint8)
    res = (res - m[None, :, None, None]) / s[None, :, None, None]
    if dtype == "bfloat16":
        return bfloat16_bits(res)
    return res.astype(dtype)
