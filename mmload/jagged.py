"""Variable-length rows as two tensors: :class:`Jagged` ``(values, offsets)``.

A batch field whose values are variable-length lists of numbers (a Parquet/Arrow ``list<int64>``
column, a JSON-lines array, a list-valued feature column) is one ``Jagged``: ``values`` holds the
B rows back to back (int64, float32 or bool, as the field's scalars would be) and ``offsets``
(int64 ``[B + 1]``, ``offsets[0] == 0``) says where each row starts, so row ``i`` is
``values[offsets[i]:offsets[i + 1]]``. This is the layout of TorchRec's ``JaggedTensor`` and of
``torch.nested``'s jagged layout, so it reaches an ``EmbeddingBag``
(``nn.EmbeddingBag(...)(j.values, j.offsets[:-1])``) or a ``KeyedJaggedTensor`` (:func:`to_kjt`)
without a Python list in between. A null cell is an empty row.

This module is a foundation module: it imports nothing from mmload.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

__all__ = ["Jagged", "kjt_parts", "to_kjt"]


@dataclass(frozen=True, eq=False)
class Jagged:
    """B variable-length rows: ``values`` ``[N]`` and int64 ``offsets`` ``[B + 1]``."""

    values: torch.Tensor
    offsets: torch.Tensor

    def __post_init__(self) -> None:
        if self.offsets.dtype != torch.int64 or self.offsets.dim() != 1 or not len(self.offsets):
            raise ValueError("Jagged offsets must be a non-empty int64 vector [B + 1]")

    # -- building -----------------------------------------------------------------------------

    @staticmethod
    def from_rows(rows: Sequence[Any], dtype: torch.dtype) -> Jagged:
        """Rows (NumPy arrays, lists, or None for an empty row) as one Jagged of ``dtype``."""
        np_dtype = torch.empty(0, dtype=dtype).numpy().dtype
        parts = [np.asarray(() if r is None else r, dtype=np_dtype).reshape(-1) for r in rows]
        lengths = np.fromiter((len(p) for p in parts), dtype=np.int64, count=len(parts))
        values = np.concatenate(parts) if parts else np.empty(0, dtype=np_dtype)
        return Jagged.from_lengths(torch.from_numpy(values), torch.from_numpy(lengths))

    @staticmethod
    def from_lengths(values: torch.Tensor, lengths: torch.Tensor) -> Jagged:
        offsets = torch.zeros(len(lengths) + 1, dtype=torch.int64, device=lengths.device)
        torch.cumsum(lengths.to(torch.int64), 0, out=offsets[1:])
        return Jagged(values, offsets)

    @staticmethod
    def cat(parts: Sequence[Jagged]) -> Jagged:
        """The rows of ``parts`` (at least one), one after another."""
        return Jagged.from_lengths(
            torch.cat([p.values for p in parts]), torch.cat([p.lengths() for p in parts])
        )

    # -- reading ------------------------------------------------------------------------------

    def __len__(self) -> int:
        return int(self.offsets.shape[0]) - 1

    def lengths(self) -> torch.Tensor:
        """int64 ``[B]``: the length of each row."""
        return self.offsets[1:] - self.offsets[:-1]

    def __getitem__(self, i: int) -> torch.Tensor:
        if not -len(self) <= i < len(self):
            raise IndexError(f"row {i} of a Jagged of {len(self)} rows")
        i %= len(self)
        return self.values[int(self.offsets[i]) : int(self.offsets[i + 1])]

    def tolist(self) -> list[list[Any]]:
        v, o = self.values.tolist(), self.offsets.tolist()
        return [v[o[i] : o[i + 1]] for i in range(len(self))]

    @property
    def dtype(self) -> torch.dtype:
        return self.values.dtype

    @property
    def device(self) -> torch.device:
        return self.values.device

    def __repr__(self) -> str:
        return (
            f"Jagged(rows={len(self)}, values={self.values.numel()}, dtype={self.dtype}, "
            f"device={self.device})"
        )

    # -- rows ---------------------------------------------------------------------------------

    def take(self, rows: Sequence[int] | np.ndarray | torch.Tensor) -> Jagged:
        """The rows ``rows`` (any order, repeats allowed), as a new Jagged."""
        idx = torch.as_tensor(np.asarray(rows, dtype=np.int64)).to(self.offsets.device)
        starts, lengths = self.offsets[:-1][idx], self.lengths()[idx]
        out = Jagged.from_lengths(self.values[:0], lengths)
        total = int(out.offsets[-1])
        # Position p of the output is element (p - out_start[row]) of input row ``row``.
        row_of = torch.repeat_interleave(torch.arange(len(idx), device=idx.device), lengths)
        src = starts[row_of] + torch.arange(total, device=idx.device) - out.offsets[:-1][row_of]
        return Jagged(self.values[src.to(self.values.device)], out.offsets)

    def repeat(self, n: int) -> Jagged:
        """This (one-row or more) Jagged's rows ``n`` times over, in order."""
        return self.take(np.tile(np.arange(len(self)), n))

    def clone(self) -> Jagged:
        return Jagged(self.values.clone(), self.offsets.clone())

    # -- memory -------------------------------------------------------------------------------

    def to(self, device: torch.device | str, *, non_blocking: bool = False) -> Jagged:
        return Jagged(
            self.values.to(device, non_blocking=non_blocking),
            self.offsets.to(device, non_blocking=non_blocking),
        )

    def cpu(self) -> Jagged:
        return self.to("cpu")

    def pin_memory(self) -> Jagged:
        return Jagged(self.values.pin_memory(), self.offsets.pin_memory())

    def is_pinned(self) -> bool:
        return bool(self.values.is_pinned() and self.offsets.is_pinned())

    def map(self, fn: Any) -> Jagged:
        """``Jagged(fn(values), fn(offsets))``: for code that moves or shares tensors."""
        return Jagged(fn(self.values), fn(self.offsets))


def kjt_parts(
    batch: Mapping[str, Any], keys: Sequence[str]
) -> tuple[list[str], torch.Tensor, torch.Tensor]:
    """``(keys, values, lengths)`` of a ``KeyedJaggedTensor`` over the Jagged fields ``keys``
    of ``batch``: values key-major (all of key 0's rows, then key 1's), lengths ``[K * B]``."""
    if not keys:
        raise ValueError("kjt_parts: name at least one field")
    fields = []
    for k in keys:
        v = batch.get(k)
        if not isinstance(v, Jagged):
            raise ValueError(f"field {k!r} is {type(v).__name__}, not a Jagged field")
        fields.append(v)
    sizes = {len(f) for f in fields}
    if len(sizes) != 1:
        raise ValueError(f"fields {list(keys)} have different batch sizes {sorted(sizes)}")
    values = torch.cat([f.values.to(torch.int64) for f in fields])
    lengths = torch.cat([f.lengths() for f in fields])
    return list(keys), values, lengths


def to_kjt(batch: Mapping[str, Any], keys: Sequence[str]) -> Any:
    """A TorchRec ``KeyedJaggedTensor`` over the Jagged id fields ``keys`` of ``batch`` (needs
    ``torchrec``; see :func:`kjt_parts` for the layout)."""
    try:
        from torchrec.sparse.jagged_tensor import KeyedJaggedTensor
    except ImportError as e:
        raise ImportError(
            f"to_kjt needs torchrec ({e}); pip install torchrec fbgemm-gpu matching your torch, "
            "or use kjt_parts(batch, keys) for the (keys, values, lengths) tensors"
        ) from e
    names, values, lengths = kjt_parts(batch, keys)
    return KeyedJaggedTensor(keys=names, values=values, lengths=lengths)
