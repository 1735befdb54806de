"""Launcher plumbing shared by the kernels: argument checks, host->device parameters, grids.

A *device array* is anything exporting ``__cuda_array_interface__`` (Numba device arrays,
torch CUDA tensors, CuPy arrays). Under the Numba CUDA simulator (``NUMBA_ENABLE_CUDASIM=1``)
plain NumPy arrays and ``cuda.to_device`` arrays play that role. Every check raises a
``ValueError`` that names the offending argument.
"""

from __future__ import annotations

import functools
import math
import threading
from collections.abc import Callable, Sequence
from typing import Any

import numba
import numpy as np
from numba import cuda

__all__ = [
    "SIMULATOR",
    "check_disjoint",
    "current_device_id",
    "device_array",
    "device_params",
    "host_or_device",
    "is_device_array",
    "num_blocks",
    "scratch",
    "upload_params",
]

SIMULATOR: bool = bool(getattr(numba.config, "ENABLE_CUDASIM", 0))  # set from the environment

# Largest grid y/z dimension; kernels loop over the rest.
MAX_GRID_YZ = 65535

_BF16 = ("<V2", "<u2")  # torch/ml_dtypes bfloat16, or its bits as uint16


def _typestrs(dtype: str) -> tuple[str, ...]:
    if dtype == "bfloat16":
        return _BF16
    return (np.dtype(dtype).str,)


def _c_contiguous(shape: tuple[int, ...], strides: tuple[int, ...] | None, itemsize: int) -> bool:
    if strides is None:
        return True
    expected = itemsize
    for n, s in zip(reversed(shape), reversed(strides), strict=True):
        if n != 1 and s != expected:
            return False
        expected *= n
    return True


def _describe(obj: Any, name: str) -> tuple[tuple[int, ...], str, bool]:
    """(shape, typestr, C-contiguous) of a NumPy, simulator or CUDA-array-interface array."""
    if isinstance(obj, np.ndarray):
        return obj.shape, obj.dtype.str, bool(obj.flags.c_contiguous)
    try:
        cai = getattr(obj, "__cuda_array_interface__", None)
    except (RuntimeError, TypeError) as e:  # e.g. a torch tensor that requires grad
        raise ValueError(f"{name}: cannot use it as a device array: {e}") from e
    if cai is not None:
        shape = tuple(int(n) for n in cai["shape"])
        typestr = str(cai["typestr"])
        strides = cai.get("strides")
        itemsize = int(typestr[2:]) if typestr[2:].isdigit() else 0
        strides_t = None if strides is None else tuple(int(s) for s in strides)
        return shape, typestr, _c_contiguous(shape, strides_t, itemsize)
    if SIMULATOR and getattr(obj, "__cuda_ndarray__", False):
        return tuple(obj.shape), obj.dtype.str, bool(obj.is_c_contiguous())
    where = "a NumPy or cuda.to_device array" if SIMULATOR else "a CUDA device array"
    raise ValueError(
        f"{name}: expected {where} (anything with __cuda_array_interface__), "
        f"got {type(obj).__name__}"
    )


def is_device_array(obj: Any) -> bool:
    """True for anything exporting ``__cuda_array_interface__`` (a torch CUDA tensor, a Numba
    device array, CuPy) or a simulator device array; False for host data (NumPy, lists, torch
    CPU tensors). Never converts ``obj`` (``np.asarray`` on a CUDA tensor raises)."""
    if isinstance(obj, (np.ndarray, list, tuple)):
        return False
    try:
        getattr(obj, "__cuda_array_interface__")  # noqa: B009 - torch raises non-AttributeErrors
    except AttributeError:
        return bool(SIMULATOR and getattr(obj, "__cuda_ndarray__", False))
    except (RuntimeError, TypeError):
        return True  # a CUDA tensor that cannot export itself: device_array reports why
    return True


class _HostView:
    """``__array_interface__`` over the memory a ``__cuda_array_interface__`` describes: under
    the simulator "device" pointers are host pointers, so a CUDA-like array becomes NumPy."""

    def __init__(self, owner: Any, cai: dict[str, Any]) -> None:
        self.owner = owner  # keeps the memory alive as long as the view
        self.__array_interface__ = {
            "shape": tuple(cai["shape"]),
            "typestr": cai["typestr"],
            "data": (int(cai["data"][0]), False),
            "strides": cai.get("strides"),
            "version": 3,
        }


def device_array(
    obj: Any,
    name: str,
    *,
    dtype: str | Sequence[str],
    shape: Sequence[int | None],
) -> Any:
    """Validate a device array and return it in a form a Numba kernel accepts.

    ``dtype`` is a NumPy dtype name (or several allowed ones); ``"bfloat16"`` accepts a
    bfloat16 or uint16 array and hands the kernel its bits as uint16. ``shape`` gives the
    expected shape, ``None`` where any extent is allowed. The array must be C-contiguous.
    """
    dtypes = (dtype,) if isinstance(dtype, str) else tuple(dtype)
    got_shape, typestr, contiguous = _describe(obj, name)
    allowed = [t for d in dtypes for t in _typestrs(d)]
    if typestr not in allowed:
        raise ValueError(f"{name}: dtype must be {' or '.join(dtypes)}, got typestr {typestr!r}")
    if len(got_shape) != len(shape) or any(
        want is not None and want != got for want, got in zip(shape, got_shape, strict=True)
    ):
        want_s = ", ".join("*" if n is None else str(n) for n in shape)
        raise ValueError(f"{name}: shape must be [{want_s}], got {list(got_shape)}")
    if not contiguous:
        raise ValueError(f"{name}: must be C-contiguous")
    as_u16 = typestr == "<V2"
    if SIMULATOR and not isinstance(obj, np.ndarray) and hasattr(obj, "__cuda_array_interface__"):
        obj = np.asarray(_HostView(obj, obj.__cuda_array_interface__))
    if SIMULATOR or isinstance(obj, np.ndarray):
        if not SIMULATOR:
            raise ValueError(f"{name}: is a host NumPy array; pass a CUDA device array")
        return obj.view(np.uint16) if as_u16 else obj
    if getattr(obj, "__cuda_ndarray__", False) and not as_u16:
        return obj  # already a Numba device array
    desc = dict(obj.__cuda_array_interface__)
    if as_u16:
        desc["typestr"] = "<u2"
    return cuda.from_cuda_array_interface(desc, owner=obj, sync=True)


def device_params(pairs: Sequence[tuple[np.ndarray | None, Any]], *, stream: Any = 0) -> list[Any]:
    """Device arrays for ``host_or_device(..., upload=False)`` results: the host ones uploaded
    together (one staging slot, one copy: :func:`upload_params`), device ones as given."""
    hosts = [h for h, d in pairs if d is None and h is not None]
    uploaded = iter(upload_params(hosts, stream=stream) if hosts else [])
    return [next(uploaded) if d is None else d for _, d in pairs]


@functools.cache
def _iinfo(dtype: np.dtype) -> np.iinfo:
    return np.iinfo(dtype)


def host_or_device(
    obj: Any,
    name: str,
    *,
    dtype: str,
    shape: Sequence[int | None],
    stream: Any = 0,
    upload: bool = True,
) -> tuple[np.ndarray | None, Any]:
    """A small per-sample parameter array given on the host or already on the device.

    Host input (NumPy array, list, tuple) is checked, converted to ``dtype`` (refusing values
    the dtype cannot hold) and uploaded: returns ``(host_copy, device_array)`` so the caller
    can validate the values. A device array must already have ``dtype``: returns
    ``(None, device_array)`` and its values are trusted. ``upload=False`` only validates
    (the device half of the result is then ``None`` for host input).
    """
    if isinstance(obj, (list, tuple)):
        obj = np.asarray(obj)
    if isinstance(obj, np.ndarray):
        target = np.dtype(dtype)
        if obj.dtype.kind not in "biu" + ("f" if target.kind == "f" else ""):
            raise ValueError(f"{name}: dtype must be convertible to {dtype}, got {obj.dtype}")
        if obj.ndim != len(shape) or any(
            want is not None and want != got for want, got in zip(shape, obj.shape, strict=True)
        ):
            want_s = ", ".join("*" if n is None else str(n) for n in shape)
            raise ValueError(f"{name}: shape must be [{want_s}], got {list(obj.shape)}")
        if target.kind in "iu" and obj.size and not np.can_cast(obj.dtype, target, "safe"):
            info = _iinfo(target)
            lo, hi = int(obj.min()), int(obj.max())
            if lo < info.min or hi > info.max:
                raise ValueError(f"{name}: values [{lo}, {hi}] do not fit in {dtype}")
        host = np.ascontiguousarray(obj, dtype=target)
        return host, upload_params([host], stream=stream)[0] if upload else None
    return None, device_array(obj, name, dtype=dtype, shape=shape)


_ALIGN = 256  # bytes between parameter arrays / scratch views (any dtype's alignment)
_SLOTS = 4  # pinned staging slots per stream: the host may run this many launches ahead


class _Arena:
    """Reused buffers of one (device, stream, thread): pinned staging slots, the device parameter
    buffer they are copied into, and device scratch. Grow-only; nothing is allocated per call
    once they are large enough (numba's allocator synchronises the device on every
    allocation, which would stall training each batch)."""

    def __init__(self) -> None:
        self.slots: list[Any] = [None] * _SLOTS
        self.copied: list[Any] = [None] * _SLOTS  # event after each slot's last copy
        self.next = 0
        self.params: Any = None
        self.scratch: Any = None
        # Typed views by layout, for the buffer they were cut from: batches of one shape reuse
        # them (slicing a Numba device array is pure Python, several us per view).
        self.views: dict[tuple[Any, ...], list[Any]] = {}


# Keyed by (device, stream handle, thread): a launcher's upload + launches are then never
# interleaved with another thread's on a shared stream (torch's default stream is shared by
# every thread), so reuse in stream order is safe.
_ARENAS: dict[tuple[int, int, int], _Arena] = {}


def current_device_id() -> int:
    """Numba's current CUDA device ordinal (0 under the simulator or without a device)."""
    try:
        return int(cuda.get_current_device().id)
    except (AttributeError, RuntimeError, ImportError):  # no device (CudaSupportError)
        return 0


def _stream_key(stream: Any) -> int:
    # A Numba stream's int() is its CUstream handle; the simulator's streams have none.
    has_handle = isinstance(stream, int) or hasattr(stream, "__int__")
    return int(stream) if has_handle else id(type(stream))


def _arena(stream: Any) -> _Arena:
    key = (current_device_id(), _stream_key(stream), threading.get_ident())
    return _ARENAS.setdefault(key, _Arena())


def _layout(nbytes: Sequence[int]) -> tuple[list[int], int]:
    offsets, total = [], 0
    for n in nbytes:
        offsets.append(total)
        total += -(-max(int(n), 1) // _ALIGN) * _ALIGN
    return offsets, total


def _grow(buf: Any, total: int, alloc: Callable[[int], Any]) -> Any:
    if buf is not None and int(buf.shape[0]) >= total:
        return buf
    old = 0 if buf is None else int(buf.shape[0])
    return alloc(max(total, 2 * old, 4096))


def _views(
    buf: Any,
    offsets: list[int],
    arrays: Sequence[tuple[tuple[int, ...], Any]],
    cache: dict[tuple[Any, ...], list[Any]] | None = None,
) -> list[Any]:
    key = (id(buf), tuple(offsets), tuple((tuple(s), np.dtype(d).str) for s, d in arrays))
    if cache is not None:
        hit = cache.get(key)
        if hit is not None and hit[0] is buf:
            return hit[1:]
    out = []
    for off, (shape, dtype) in zip(offsets, arrays, strict=True):
        dt = np.dtype(dtype)
        n = math.prod(shape)
        out.append(buf[off : off + n * dt.itemsize].view(dt).reshape(shape))
    if cache is not None:
        if len(cache) >= 64:
            cache.clear()
        cache[key] = [buf, *out]  # the buffer is held, so its id is not reused meanwhile
    return out


def upload_params(hosts: Sequence[np.ndarray], *, stream: Any = 0) -> list[Any]:
    """Copy small host arrays to the device in one non-blocking copy: each is written into a
    pinned staging slot of ``stream``'s arena, the slot is copied into one reused device
    buffer, and typed views of it are returned. The views stay valid until the next
    ``upload_params`` on the same stream (the kernels that read them run before it, in
    stream order).
    """
    arena = _arena(stream)
    hosts = [np.ascontiguousarray(h) for h in hosts]
    offsets, total = _layout([h.nbytes for h in hosts])
    i = arena.next
    arena.next = (i + 1) % _SLOTS
    if arena.copied[i] is not None:
        arena.copied[i].synchronize()  # the copy that last read this slot (launches ago)
    arena.slots[i] = _grow(arena.slots[i], total, lambda n: cuda.pinned_array(n, np.uint8))
    arena.params = _grow(arena.params, total, lambda n: cuda.device_array(n, np.uint8))
    host = arena.slots[i]
    for off, h in zip(offsets, hosts, strict=True):
        host[off : off + h.nbytes] = h.reshape(-1).view(np.uint8)
    arena.params[:total].copy_to_device(host[:total], stream=stream)
    if arena.copied[i] is None:
        arena.copied[i] = cuda.event()
    arena.copied[i].record(stream=stream)
    return _views(arena.params, offsets, [(h.shape, h.dtype) for h in hosts], arena.views)


def scratch(arrays: Sequence[tuple[tuple[int, ...], Any]], *, stream: Any = 0) -> list[Any]:
    """Device scratch arrays ``(shape, dtype)``, disjoint views of ``stream``'s reused scratch
    buffer (grown when too small, never per call); valid until the next ``scratch`` on the
    same stream, which is ordered after the kernels that use them."""
    arena = _arena(stream)
    offsets, total = _layout([math.prod(s) * np.dtype(d).itemsize for s, d in arrays])
    arena.scratch = _grow(arena.scratch, total, lambda n: cuda.device_array(n, np.uint8))
    return _views(arena.scratch, offsets, arrays, arena.views)


def _extent(obj: Any) -> tuple[int, int] | None:
    """(first byte address, byte size) of a contiguous array, or None if unknown."""
    if SIMULATOR:
        obj = getattr(obj, "_ary", obj)  # the NumPy array inside a simulator device array
    if isinstance(obj, np.ndarray):
        return int(obj.__array_interface__["data"][0]), int(obj.nbytes)
    cai = getattr(obj, "__cuda_array_interface__", None)
    if cai is None:
        return None
    typestr = str(cai["typestr"])
    itemsize = int(typestr[2:]) if typestr[2:].isdigit() else 0
    return int(cai["data"][0]), itemsize * math.prod(int(n) for n in cai["shape"])


def check_disjoint(**arrays: Any) -> None:
    """Raise ``ValueError`` if any two of the named (contiguous) arrays share memory."""
    items = [(name, _extent(a)) for name, a in arrays.items()]
    for i, (na, ea) in enumerate(items):
        for nb, eb in items[i + 1 :]:
            if ea is None or eb is None or ea[1] == 0 or eb[1] == 0:
                continue
            if ea[0] < eb[0] + eb[1] and eb[0] < ea[0] + ea[1]:
                raise ValueError(f"{na} and {nb} overlap in memory; pass separate buffers")


def num_blocks(n: int, per_block: int) -> int:
    """Blocks needed to cover ``n`` items with ``per_block`` threads each (at least 1)."""
    return max(1, -(-n // per_block))


_MAX_CONFIGS = 64  # launch configurations kept per kernel (grids change with batch shapes)


class Launchers:
    """A compiled kernel whose launch configurations are kept: ``k[grid, block, stream]``
    returns Numba's configured launcher, built once per (grid, block, device, stream handle)
    instead of on every launch (Numba checks the dimensions, converts the stream and, for grids
    under 128 blocks, raises a performance warning each time it builds one)."""

    def __init__(self, dispatcher: Any) -> None:
        self.dispatcher = dispatcher
        self._configs: dict[tuple[Any, ...], Any] = {}

    def __getitem__(self, config: tuple[Any, Any, Any]) -> Any:
        grid, block, stream = config
        if SIMULATOR:  # the simulator's kernel stores its configuration on itself
            return self.dispatcher[grid, block, stream]
        key = (grid, block, current_device_id(), _stream_key(stream))
        hit = self._configs.get(key)
        if hit is None:
            if len(self._configs) >= _MAX_CONFIGS:
                self._configs.clear()
            hit = self._configs[key] = self.dispatcher[grid, block, stream]
        return hit


class Variants(dict[str, tuple[Callable[..., None], str]]):
    """A kernel module's compiled variants: name -> (Python kernel, Numba signature).

    ``compile(name)`` jits a variant on first use (never at import) and keeps it, as
    :class:`Launchers` (configured launches cached).
    """

    def __init__(self, table: dict[str, tuple[Callable[..., None], str]]) -> None:
        super().__init__(table)
        self._jitted: dict[str, Any] = {}

    def signatures(self) -> list[tuple[str, Callable[..., None], str]]:
        """``(name, Python kernel, Numba signature)`` of every variant."""
        return [(name, fn, sig) for name, (fn, sig) in self.items()]

    def compile(self, name: str) -> Any:
        hit = self._jitted.get(name)
        if hit is None:
            fn, sig = self[name]
            hit = self._jitted[name] = Launchers(cuda.jit(sig)(fn))
        return hit
