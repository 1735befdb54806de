"""A GIL-free gather copy: ``memcpy`` of many ``(place, source address, length)`` ranges in one
call, compiled by Numba (``llvm.memcpy``; cached on disk, so a process loads it, ~0.2 s, rather
than compiling it). Imported by the copy thread on first use."""

from __future__ import annotations

from typing import Any

import numba
import numpy as np
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

__all__ = ["copy_ranges"]


@intrinsic
def _memcpy(typingctx: Any, dst: Any, src: Any, n: Any) -> Any:
    sig = types.void(types.intp, types.intp, types.intp)

    def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
        d, s, k = args
        cgutils.raw_memcpy(
            builder,
            builder.inttoptr(d, cgutils.voidptr_t),
            builder.inttoptr(s, cgutils.voidptr_t),
            k,
            1,
        )
        return context.get_dummy_value()

    return sig, codegen


@numba.njit(nogil=True, cache=True)
def _copy_ranges(ops: np.ndarray, dst: int) -> None:  # pragma: no cover - compiled
    for i in range(ops.shape[0]):
        _memcpy(dst + ops[i, 0], ops[i, 1], ops[i, 2])  # type: ignore[call-arg]


def copy_ranges(ops: np.ndarray, dst: int) -> None:
    """For each row ``(place, src, n)`` of ``ops`` (int64, shape ``[k, 3]``), copy ``n`` bytes
    from address ``src`` to address ``dst + place``, without the GIL. The caller keeps the
    memory behind every address alive and large enough."""
    _copy_ranges(ops, dst)
