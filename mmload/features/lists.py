"""The rows of a table's variable-length list columns, kept beside its runs.

A list column takes one int64 slot in the runs' int matrix: a **row id**. The rows themselves
live here, in immutable chunks (one per update: ``(base, {column: (values, offsets)})``, rows
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
    """Rows ``base .. base + n - 1`` of every list column."""

    base: int
    n: int
    columns: Mapping[str, tuple[np.ndarray, np.ndarray]]  # name -> (values, offsets [n + 1])


@dataclass(frozen=True, eq=False)
class ListStore:
    """The list rows a snapshot can reach, oldest chunk first; ``next_id``: the next row id."""

    chunks: tuple[ListChunk, ...] = ()
    next_id: int = 0

    def add(self, n: int, columns: Mapping[str, tuple[np.ndarray, np.ndarray]]) -> ListStore:
        """A store with ``n`` more rows (numbered from ``next_id``)."""
        if n == 0:
            return self
        chunk = ListChunk(self.next_id, n, dict(columns))
        return ListStore((*self.chunks, chunk), self.next_id + n)

    def keep(self, referenced: np.ndarray) -> ListStore:
        """The store without the chunks none of the row ids ``referenced`` falls in."""
        if not self.chunks:
            return self
        bases = np.fromiter((c.base for c in self.chunks), np.int64, len(self.chunks))
        ids = referenced[referenced >= 0]
        used = np.zeros(len(self.chunks), bool)
        used[np.unique(np.searchsorted(bases, ids, side="right") - 1)] = True
        if used.all():
            return self
        kept = tuple(c for c, u in zip(self.chunks, used, strict=True) if u)
        return ListStore(kept, self.next_id)

    @property
    def rows(self) -> int:
        return sum(c.n for c in self.chunks)

    def gather(self, name: str, ids: np.ndarray, dtype: torch.dtype) -> Jagged:
        """Column ``name``'s rows ``ids`` (int64 [B]; -1: an empty row) as a Jagged."""
        ids = np.asarray(ids, dtype=np.int64)
        b = len(ids)
        lengths = np.zeros(b, np.int64)
        starts = np.zeros(b, np.int64)
        owner = np.full(b, -1, np.int64)
        if self.chunks and b:
            bases = np.fromiter((c.base for c in self.chunks), np.int64, len(self.chunks))
            valid = ids >= 0
            owner[valid] = np.searchsorted(bases, ids[valid], side="right") - 1
            for ci in np.unique(owner[valid]):
                chunk = self.chunks[ci]
                at = np.nonzero(owner == ci)[0]
                local = ids[at] - chunk.base
                if (local >= chunk.n).any():
                    raise IndexError(f"list row id beyond chunk {chunk.base}+{chunk.n}")
                offs = chunk.columns[name][1]
                starts[at] = offs[local]
                lengths[at] = offs[local + 1] - offs[local]
        offsets = np.zeros(b + 1, np.int64)
        np.cumsum(lengths, out=offsets[1:])
        np_dtype = torch.empty(0, dtype=dtype).numpy().dtype
        values = np.empty(int(offsets[-1]), np_dtype)
        for ci in np.unique(owner[owner >= 0]):
            at = np.nonzero(owner == ci)[0]
            n_at = lengths[at]
            total = int(n_at.sum())
            if not total:
                continue
            # element k of the group's output: row r = row_of[k], at position k - first[r]
            row_of = np.repeat(np.arange(len(at)), n_at)
            first = np.zeros(len(at), np.int64)
            np.cumsum(n_at[:-1], out=first[1:])
            within = np.arange(total) - first[row_of]
            src = starts[at][row_of] + within
            dst = offsets[at][row_of] + within
            values[dst] = self.chunks[ci].columns[name][0][src]
        return Jagged(torch.from_numpy(values), torch.from_numpy(offsets))
