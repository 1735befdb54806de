"""The rows of a table's variable-length list columns, kept beside its runs.

A list column takes one int64 slot in the runs' int matrix: a **row id**. The rows themselves
live here, in immutable chunks (one per update: ``(base, {column: Jagged})``, rows
``base .. base + n - 1``), shared by every snapshot that can reach them. So the as-of join
(NumPy or the GPU kernel) needs nothing new: it gathers the row id like any int column, and
:meth:`ListStore.gather` turns the ids into a :class:`~mmload.jagged.Jagged` (-1, the default of
a row not found, is an empty list). Chunks no row of the runs refers to any more (dropped by
``retention``) are released when a snapshot is published after rows were dropped.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch

from mmload.jagged import Jagged

__all__ = ["ListChunk", "ListStore"]


@dataclass(frozen=True, eq=False)
class ListChunk:
    """Rows ``base .. base + n - 1`` of every list column, each column one Jagged."""

    base: int
    n: int
    columns: Mapping[str, Jagged]


@dataclass(frozen=True, eq=False)
class ListStore:
    """The list rows a snapshot can reach, oldest chunk first; ``next_id``: the next row id."""

    chunks: tuple[ListChunk, ...] = ()
    next_id: int = 0

    def add(self, n: int, columns: Mapping[str, tuple[np.ndarray, np.ndarray]]) -> ListStore:
        """A store with ``n`` more rows (numbered from ``next_id``); ``columns``: per column
        (values, offsets [n + 1]), copied (Arrow's arrays may be read-only views)."""
        if n == 0:
            return self
        held = {
            name: Jagged(torch.from_numpy(np.array(v)), torch.from_numpy(np.array(o)))
            for name, (v, o) in columns.items()
        }
        return ListStore((*self.chunks, ListChunk(self.next_id, n, held)), self.next_id + n)

    def _bases(self) -> np.ndarray:
        return np.fromiter((c.base for c in self.chunks), np.int64, len(self.chunks))

    def keep(self, referenced: np.ndarray) -> ListStore:
        """The store without the chunks none of the row ids ``referenced`` falls in."""
        if not self.chunks:
            return self
        ids = referenced[referenced >= 0]
        used = np.zeros(len(self.chunks), bool)
        used[np.unique(np.searchsorted(self._bases(), ids, side="right") - 1)] = True
        if used.all():
            return self
        kept = tuple(c for c, u in zip(self.chunks, used, strict=True) if u)
        return ListStore(kept, self.next_id)

    @property
    def rows(self) -> int:
        return sum(c.n for c in self.chunks)

    def gather(self, name: str, ids: np.ndarray, dtype: torch.dtype) -> Jagged:
        """Column ``name``'s rows ``ids`` (int64 [B]; -1: an empty row) as a Jagged: the rows
        of each chunk taken together, then put back in the order of ``ids``."""
        ids = np.asarray(ids, dtype=np.int64)
        owner = np.full(len(ids), -1, np.int64)
        valid = ids >= 0
        if self.chunks:
            owner[valid] = np.searchsorted(self._bases(), ids[valid], side="right") - 1
        missing = np.flatnonzero(owner < 0)
        order = [missing]
        parts = [Jagged.from_rows([None] * len(missing), dtype)]
        for ci in np.unique(owner[owner >= 0]):
            chunk = self.chunks[ci]
            at = np.flatnonzero(owner == ci)
            local = ids[at] - chunk.base
            if (local >= chunk.n).any():
                raise IndexError(f"list row id beyond chunk {chunk.base}+{chunk.n}")
            order.append(at)
            parts.append(chunk.columns[name].take(local))
        grouped = Jagged.cat(parts)  # row j answers query np.concatenate(order)[j]
        inverse = np.empty(len(ids), np.int64)
        inverse[np.concatenate(order)] = np.arange(len(ids))
        out = grouped.take(inverse)
        return Jagged(out.values.to(dtype), out.offsets)
