"""The array primitives of runs and joins, for one device: NumPy on the CPU, torch on a GPU.

``runs.py`` and ``join.py`` are written once against these few functions. The CPU uses NumPy,
single-threaded on purpose: torch's intra-op threads make the many small ops of a join several
times slower as soon as another process (the trainer) keeps the cores busy.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

__all__ = ["Array", "NumpyOps", "Ops", "TorchOps"]

Array = Any  # np.ndarray (NumpyOps) or torch.Tensor (TorchOps)


class Ops:
    """Array primitives; ``asarray`` moves host data in, ``to_torch`` hands results out."""

    def asarray(self, a: np.ndarray) -> Array:
        raise NotImplementedError

    def to_torch(self, a: Array) -> torch.Tensor:
        raise NotImplementedError

    def sort_perm(self, codes: Array, ts: Array) -> Array:
        """int64 [n] permutation sorting rows by (code, ts), equal pairs in arrival order."""
        raise NotImplementedError

    def searchsorted(self, a: Array, v: Array, *, right: bool = False) -> Array:
        raise NotImplementedError

    def arange(self, n: int) -> Array:
        raise NotImplementedError

    def mask(self, n: int, value: bool) -> Array:
        """bool [n], all ``value``."""
        raise NotImplementedError

    def full(self, n: int, value: int) -> Array:
        """int64 [n]."""
        raise NotImplementedError

    def empty_rows(self, like: Array, n: int) -> Array:
        """Uninitialized [n, *like.shape[1:]] of like's dtype."""
        raise NotImplementedError

    def nonzero(self, mask: Array) -> Array:
        """int64 indices of the True entries of a 1-D mask."""
        raise NotImplementedError

    def cat(self, arrays: Sequence[Array]) -> Array:
        raise NotImplementedError

    def repeat_rows(self, row: Array, n: int) -> Array:
        """[n, len(row)]: ``row`` repeated (a fresh, writable array)."""
        raise NotImplementedError

    where: Callable[..., Array]
    minimum: Callable[..., Array]
    maximum: Callable[..., Array]


class NumpyOps(Ops):
    """The CPU: NumPy arrays."""

    where = staticmethod(np.where)
    minimum = staticmethod(np.minimum)
    maximum = staticmethod(np.maximum)

    def asarray(self, a: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(a)

    def to_torch(self, a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(a))

    def sort_perm(self, codes: np.ndarray, ts: np.ndarray) -> np.ndarray:
        if ts.shape[0] > 1 and bool((ts[1:] >= ts[:-1]).all()):
            return np.argsort(codes, kind="stable")  # a time-ordered log: one stable sort
        return np.lexsort((ts, codes))

    def searchsorted(self, a: np.ndarray, v: np.ndarray, *, right: bool = False) -> np.ndarray:
        return np.searchsorted(a, v, side="right" if right else "left")

    def arange(self, n: int) -> np.ndarray:
        return np.arange(n, dtype=np.int64)

    def mask(self, n: int, value: bool) -> np.ndarray:
        return np.full(n, value, dtype=bool)

    def full(self, n: int, value: int) -> np.ndarray:
        return np.full(n, value, dtype=np.int64)

    def empty_rows(self, like: np.ndarray, n: int) -> np.ndarray:
        return np.empty((n, *like.shape[1:]), dtype=like.dtype)

    def nonzero(self, mask: np.ndarray) -> np.ndarray:
        return np.flatnonzero(mask)

    def cat(self, arrays: Sequence[np.ndarray]) -> np.ndarray:
        return np.concatenate(arrays)

    def repeat_rows(self, row: np.ndarray, n: int) -> np.ndarray:
        return np.repeat(row[None, :], n, axis=0)


class TorchOps(Ops):
    """A GPU (or any torch device): tensors on ``device``; ``sort_perm`` may be replaced (the
    GPU table sorts with cuDF)."""

    where = staticmethod(torch.where)
    minimum = staticmethod(torch.clamp_max)
    maximum = staticmethod(torch.clamp_min)

    def __init__(
        self,
        device: torch.device,
        sort_perm: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        self.device = device
        self._sort_perm = sort_perm

    def asarray(self, a: np.ndarray) -> torch.Tensor:
        if not a.flags.writeable or not a.flags.c_contiguous:
            a = np.array(a, copy=True, order="C")  # torch.from_numpy wants writable memory
        return torch.from_numpy(a).to(self.device)

    def to_torch(self, a: torch.Tensor) -> torch.Tensor:
        return a

    def sort_perm(self, codes: torch.Tensor, ts: torch.Tensor) -> torch.Tensor:
        if self._sort_perm is not None:
            return self._sort_perm(codes, ts)
        if ts.shape[0] > 1 and bool((ts[1:] >= ts[:-1]).all()):
            return torch.sort(codes, stable=True).indices
        p = torch.sort(ts, stable=True).indices
        return p[torch.sort(codes[p], stable=True).indices]

    def searchsorted(self, a: torch.Tensor, v: torch.Tensor, *, right: bool = False) -> Array:
        return torch.searchsorted(a, v, right=right)

    def arange(self, n: int) -> torch.Tensor:
        return torch.arange(n, dtype=torch.int64, device=self.device)

    def mask(self, n: int, value: bool) -> torch.Tensor:
        return torch.full((n,), value, dtype=torch.bool, device=self.device)

    def full(self, n: int, value: int) -> torch.Tensor:
        return torch.full((n,), value, dtype=torch.int64, device=self.device)

    def empty_rows(self, like: torch.Tensor, n: int) -> torch.Tensor:
        return torch.empty((n, *like.shape[1:]), dtype=like.dtype, device=like.device)

    def nonzero(self, mask: torch.Tensor) -> torch.Tensor:
        return torch.nonzero(mask).reshape(-1)

    def cat(self, arrays: Sequence[torch.Tensor]) -> torch.Tensor:
        return torch.cat(list(arrays))

    def repeat_rows(self, row: torch.Tensor, n: int) -> torch.Tensor:
        return row.expand(n, -1).clone()
