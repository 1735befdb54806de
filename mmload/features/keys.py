"""Keys and timestamps as int64: the key dictionary of a table, and validation of join queries.

Integer keys are their own codes. String keys get dense codes 0, 1, 2, ... in order of first
arrival; the dictionary only grows, so the codes held by published runs stay valid while a later
update adds keys. Only the table's writer (under its lock) adds keys; readers look codes up
without a lock (a dict read is atomic), and a key added by an update that is not yet published
simply has no rows in the reader's snapshot.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from mmload.errors import JoinError

__all__ = ["MISSING", "KeyCodec", "query_timestamps"]

MISSING = -1  # the code of a string key that is not in the table (string codes are >= 0)


def _as_list(keys: Any) -> list[Any]:
    if isinstance(keys, (pa.Array, pa.ChunkedArray)):
        return list(keys.to_pylist())
    if isinstance(keys, np.ndarray):
        return list(keys.tolist())
    return list(keys)


class KeyCodec:
    """Maps keys to int64 codes: ``kind`` "int" (identity) or "string" (a growing dictionary)."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._codes: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self._codes)

    def encode_rows(self, keys: np.ndarray | pa.ChunkedArray) -> np.ndarray:
        """Codes (int64 [n]) of an update's validated keys, adding new strings. Writer only."""
        if isinstance(keys, np.ndarray):
            return keys
        uniq = pc.unique(keys)
        codes = self._codes
        # setdefault evaluates len(codes) before inserting: a new string gets the next code
        ucodes = np.fromiter(
            (codes.setdefault(s, len(codes)) for s in uniq.to_pylist()),
            dtype=np.int64,
            count=len(uniq),
        )
        idx = pc.index_in(keys, value_set=uniq)
        return ucodes[np.asarray(idx.to_numpy(), dtype=np.int64)]

    def encode_query(self, keys: Any) -> np.ndarray | torch.Tensor:
        """Codes (int64 [B]) of join keys: a list of str/int, an int64 NumPy array, a pyarrow
        array or an integer tensor (which stays a tensor on its device); unknown string keys get
        ``MISSING``."""
        if self.kind == "int":
            return _int_keys(keys)
        if isinstance(keys, torch.Tensor):
            raise JoinError("join: keys are a tensor, but this table has string keys")
        items = _as_list(keys)
        if items and not isinstance(items[0], str):
            raise JoinError(
                f"join: key {items[0]!r} ({type(items[0]).__name__}) given to a table with "
                "string keys"
            )
        get = self._codes.get
        return np.fromiter((get(k, MISSING) for k in items), dtype=np.int64, count=len(items))


_INT64_MIN, _INT64_MAX = int(np.iinfo(np.int64).min), int(np.iinfo(np.int64).max)


def _is_int(k: object) -> bool:
    return isinstance(k, (int, np.integer)) and not isinstance(k, bool)


def _int_keys(keys: Any) -> np.ndarray | torch.Tensor:
    if isinstance(keys, torch.Tensor):
        if keys.dtype.is_floating_point or keys.dtype.is_complex or keys.dtype == torch.bool:
            raise JoinError(f"join: keys have dtype {keys.dtype}; this table has integer keys")
        return keys.reshape(-1).to(torch.int64).contiguous()
    if isinstance(keys, (pa.Array, pa.ChunkedArray)):
        if keys.null_count:
            raise JoinError(f"join: {keys.null_count} of the keys are null")
        keys = keys.to_numpy(zero_copy_only=False)
    arr = np.asarray(keys) if not isinstance(keys, np.ndarray) else keys
    if arr.size == 0:
        return np.empty(0, dtype=np.int64)
    if arr.dtype.kind not in "iu":
        flat = arr.reshape(-1)
        bad = next((k for k in flat if not _is_int(k)), None)
        if bad is not None:
            raise JoinError(
                f"join: key {bad!r} ({type(bad).__name__}) given to a table with integer keys"
            )
        # an object array of ints (a pandas object column; ints beyond uint64)
        big = next((k for k in flat if not _INT64_MIN <= k <= _INT64_MAX), None)
        if big is not None:
            raise JoinError(f"join: key {big} does not fit int64")
        arr = flat.astype(np.int64)
    if arr.dtype == np.uint64 and arr.max() > _INT64_MAX:
        raise JoinError("join: a uint64 key does not fit int64")
    return np.ascontiguousarray(arr.reshape(-1), dtype=np.int64)


def query_timestamps(
    timestamps: Sequence[int] | np.ndarray | torch.Tensor, n: int, unit: str | None
) -> np.ndarray | torch.Tensor:
    """Join timestamps as int64 [n] (a tensor stays a tensor on its device). NumPy datetime64 is
    converted to the table's unit; anything not integer is a JoinError."""
    t: np.ndarray | torch.Tensor
    if isinstance(timestamps, torch.Tensor):
        t = timestamps.reshape(-1)
        if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
            raise JoinError(f"join: timestamps have dtype {t.dtype}; need integers")
        t = t.to(torch.int64).contiguous()
    else:
        arr = np.asarray(timestamps) if not isinstance(timestamps, np.ndarray) else timestamps
        if arr.dtype.kind == "M":
            if unit is None:
                raise JoinError("join: datetime64 timestamps given to a table with integer times")
            arr = arr.astype(f"datetime64[{unit}]").view(np.int64)
        elif arr.size and arr.dtype.kind not in "iu":
            raise JoinError(f"join: timestamps have dtype {arr.dtype}; need int64")
        t = np.ascontiguousarray(arr.reshape(-1), dtype=np.int64)
    if t.shape[0] != n:
        raise JoinError(f"join: {n} keys but {t.shape[0]} timestamps")
    return t
