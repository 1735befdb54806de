"""Packing of variable-length token sequences into fixed-length rows.

:func:`plan_packing` assigns each sequence a (row, start column) on the host by greedy
first-fit in input order; :func:`pack_tokens` then writes, on the device, ``[R, L]`` int64
``input_ids`` (``pad_id`` where no token), ``attention_mask`` (1 on tokens), ``position_ids``
(0, 1, ... within each packed sequence, 0 on padding) and ``segment_ids`` (1-based index of the
sequence within its row in column order, 0 on padding). One thread per output cell finds its
sequence by binary search over its row's sequences, so every cell is written exactly once.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np
from numba import cuda, int32, int64, uint32, uint64

from ._device import (
    MAX_GRID_YZ,
    Variants,
    check_disjoint,
    device_array,
    device_params,
    is_device_array,
    num_blocks,
)

__all__ = [
    "PackingPlan",
    "kernel_signatures",
    "pack_tokens",
    "pack_tokens_reference",
    "plan_packing",
]

# Kernels reach threadIdx & co. through this alias: numba's stubs mistype them for mypy.
_cu: Any = cuda

_THREADS = 128
_OUTPUTS = ("input_ids", "attention_mask", "position_ids", "segment_ids")


class PackingPlan(NamedTuple):
    """Where each of ``N`` sequences goes; host int64 arrays.

    ``rows[i]``/``starts[i]``: row and first column of sequence ``i`` (``-1``/``0`` for an
    empty sequence, which is not placed); ``lengths[i]``: tokens kept
    (``min(length, seq_len)``); ``n_rows``: rows used; ``seq_len``: row length ``L``.
    """

    rows: np.ndarray
    starts: np.ndarray
    lengths: np.ndarray
    n_rows: int
    seq_len: int


def plan_packing(lengths: np.ndarray, seq_len: int) -> PackingPlan:
    """Greedy first-fit: each sequence, in input order, goes to the lowest-numbered row with
    room for it, after that row's previous sequences; a new row is opened when none has room.

    A sequence longer than ``seq_len`` is **truncated** to its first ``seq_len`` tokens (and
    fills a row of its own); empty sequences are not placed (row ``-1``). Deterministic.
    """
    if isinstance(seq_len, bool) or not isinstance(seq_len, (int, np.integer)) or seq_len < 1:
        raise ValueError(f"seq_len={seq_len!r}: must be an int >= 1")
    lens = np.asarray(lengths)
    if lens.ndim != 1 or (lens.size and lens.dtype.kind not in "iu"):
        raise ValueError(f"lengths: must be a 1-D integer array, got {lens.dtype} {lens.shape}")
    if lens.size and lens.min() < 0:
        raise ValueError("lengths: must be >= 0")
    kept = np.minimum(lens.astype(np.int64), seq_len)
    rows = np.full(kept.size, -1, np.int64)
    starts = np.zeros(kept.size, np.int64)
    used = np.zeros(max(1, kept.size), np.int64)  # tokens already placed in each row
    n_rows = 0
    for i, n in enumerate(kept.tolist()):
        if n == 0:
            continue
        fits = np.flatnonzero(used[:n_rows] + n <= seq_len)
        r = int(fits[0]) if fits.size else n_rows
        n_rows = max(n_rows, r + 1)
        rows[i], starts[i] = r, used[r]
        used[r] += n
    return PackingPlan(rows, starts, kept, n_rows, int(seq_len))


def _pack_kernel(
    tokens: Any,
    offsets: Any,
    row_ptr: Any,
    table: Any,
    pad_id: Any,
    n_rows: Any,
    seq_len: Any,
    input_ids: Any,
    attention_mask: Any,
    position_ids: Any,
    segment_ids: Any,
) -> None:
    # Outputs are flat [R * L] views; ``table`` is flat [3 * K] int32 (sequence index, start,
    # length). 32-bit index math (the launcher checks R * L fits), unsigned indices so Numba
    # adds no negative-index wraparound; only the token address is 64-bit.
    c = int32(_cu.blockIdx.x * _cu.blockDim.x + _cu.threadIdx.x)
    if c >= seq_len:
        return
    r = uint32(_cu.blockIdx.y)
    while r < uint32(n_rows):
        first = row_ptr[r]
        lo = first
        hi = row_ptr[uint32(r + uint32(1))]
        while lo < hi:  # lo = first entry of the row starting after column c
            mid = int32((lo + hi) >> int32(1))
            if table[uint32(mid * int32(3) + int32(1))] <= c:
                lo = int32(mid + int32(1))
            else:
                hi = mid
        j = int32(lo - int32(1))
        token = pad_id
        mask = int64(0)
        pos = int64(0)
        seg = int64(0)
        if j >= first:
            t = uint32(j * int32(3))
            p = int32(c - table[uint32(t + uint32(1))])
            if p < table[uint32(t + uint32(2))]:
                token = tokens[uint64(offsets[uint32(table[t])] + int64(p))]
                mask = int64(1)
                pos = int64(p)
                seg = int64(j - first + int32(1))
        i = uint32(r * uint32(seq_len) + uint32(c))
        input_ids[i] = token
        attention_mask[i] = mask
        position_ids[i] = pos
        segment_ids[i] = seg
        r = uint32(r + uint32(_cu.gridDim.y))


_SIG = (
    "void(int64[::1], int64[::1], int32[::1], int32[::1], int64, int32, int32, "
    + ", ".join(["int64[::1]"] * 4)
    + ")"
)


_VARIANTS = Variants({"pack_tokens": (_pack_kernel, _SIG)})


def kernel_signatures() -> list[tuple[str, Callable[..., None], str]]:
    """``(name, Python kernel, Numba signature)`` of every variant the launcher compiles."""
    return _VARIANTS.signatures()


def _compiled(name: str) -> Any:
    return _VARIANTS.compile(name)


def _check_plan(plan: PackingPlan, n_seqs: int) -> None:
    if not isinstance(plan, PackingPlan):
        raise ValueError(f"plan: must be a PackingPlan, got {type(plan).__name__}")
    for name in ("rows", "starts", "lengths"):
        if np.shape(getattr(plan, name)) != (n_seqs,):
            raise ValueError(f"plan.{name}: must have one entry per sequence ({n_seqs})")
    placed = plan.rows >= 0
    if not np.array_equal(placed, plan.lengths > 0):
        raise ValueError("plan: exactly the sequences with lengths > 0 must have a row >= 0")
    end = plan.starts + plan.lengths
    if placed.any() and (
        plan.rows.max() >= plan.n_rows
        or plan.starts[placed].min() < 0
        or end[placed].max() > plan.seq_len
    ):
        raise ValueError(f"plan: a sequence lies outside {plan.n_rows} rows of {plan.seq_len}")


def _row_table(plan: PackingPlan, n_out_rows: int) -> tuple[np.ndarray, np.ndarray]:
    """CSR over rows: ``row_ptr[R + 1]`` and ``(sequence index, start, length)`` rows sorted by
    (row, start); at least one (dummy) table row so no device buffer is empty. Depends on the
    plan only: the kernel reads ``offsets[sequence index]`` itself, so offsets may stay on the
    device."""
    placed = np.flatnonzero(plan.rows >= 0)
    order = placed[np.lexsort((plan.starts[placed], plan.rows[placed]))]
    counts = np.bincount(plan.rows[order], minlength=n_out_rows)[:n_out_rows]
    row_ptr = np.zeros(n_out_rows + 1, np.int32)
    np.cumsum(counts, out=row_ptr[1:])
    table = np.zeros((max(1, order.size), 3), np.int32)
    table[: order.size] = np.stack([order, plan.starts[order], plan.lengths[order]], axis=1)
    return row_ptr, table


def pack_tokens(
    tokens: Any,
    offsets: Any,
    plan: PackingPlan,
    input_ids: Any,
    attention_mask: Any,
    position_ids: Any,
    segment_ids: Any,
    *,
    pad_id: int = 0,
    stream: Any = 0,
) -> None:
    """Pack sequences ``tokens[offsets[i] : offsets[i] + plan.lengths[i]]`` as ``plan`` says.

    ``tokens``: int64 device array ``[T]``; ``offsets``: int ``[N]``, on the host (validated
    against ``tokens``) or an int64 device array such as a torch CUDA tensor (read by the kernel,
    values trusted, never copied to the host); ``plan``: from
    :func:`plan_packing`. The four outputs: preallocated, distinct int64 device arrays
    ``[R, plan.seq_len]`` with ``R >= plan.n_rows`` (rows past ``n_rows`` are all padding).
    """
    toks = device_array(tokens, "tokens", dtype="int64", shape=(None,))
    offs: np.ndarray | None = None
    if is_device_array(offsets):  # e.g. a torch CUDA tensor: values trusted, never copied back
        offs_dev = device_array(offsets, "offsets", dtype="int64", shape=(None,))
        n_seqs = int(offs_dev.shape[0])
    else:
        offs = np.asarray(offsets)
        if offs.ndim != 1 or (offs.size and offs.dtype.kind not in "iu"):
            raise ValueError(f"offsets: must be a 1-D integer array, got {offs.dtype}")
        offs = offs.astype(np.int64)
        n_seqs = offs.size
    _check_plan(plan, n_seqs)
    outs = {}
    for name, arr in zip(
        _OUTPUTS, (input_ids, attention_mask, position_ids, segment_ids), strict=True
    ):
        outs[name] = device_array(arr, name, dtype="int64", shape=(None, plan.seq_len))
    n_out_rows = int(outs["input_ids"].shape[0])
    for name, arr in outs.items():
        if int(arr.shape[0]) != n_out_rows:
            raise ValueError(f"{name}: must have {n_out_rows} rows like input_ids")
    if n_out_rows < plan.n_rows:
        raise ValueError(f"input_ids: has {n_out_rows} rows, the plan needs {plan.n_rows}")
    check_disjoint(**outs)
    if offs is not None:
        end = offs + plan.lengths
        bad = np.flatnonzero((offs < 0) | (end > int(toks.shape[0])))
        if bad.size:
            i = int(bad[0])
            raise ValueError(
                f"offsets: sequence {i} spans [{int(offs[i])}, {int(end[i])}) outside the "
                f"{int(toks.shape[0])} tokens"
            )
    if n_out_rows == 0:
        return
    if n_out_rows * plan.seq_len >= 2**31:
        raise ValueError(f"input_ids: {n_out_rows} x {plan.seq_len} cells; at most 2**31 - 1")
    row_ptr, table = _row_table(plan, n_out_rows)
    one = np.zeros(1, np.int64)  # stands in for an empty buffer: none may be empty
    offs_pair: tuple[np.ndarray | None, Any] = (one, None)
    if offs is not None and offs.size:
        offs_pair = (offs, None)
    elif offs is None and n_seqs:
        offs_pair = (None, offs_dev)
    params: list[tuple[np.ndarray | None, Any]] = [
        (row_ptr, None),
        (table, None),
        offs_pair,
        (one, None) if toks.shape[0] == 0 else (None, toks),
    ]
    # One non-blocking copy from a pinned slot into a reused device buffer: no allocation.
    row_ptr_d, table_d, offs_d, toks = device_params(params, stream=stream)
    threads = min(_THREADS, plan.seq_len)
    grid = (num_blocks(plan.seq_len, threads), min(n_out_rows, MAX_GRID_YZ))
    cells = n_out_rows * plan.seq_len
    _compiled("pack_tokens")[grid, threads, stream](
        toks,
        offs_d,
        row_ptr_d,
        table_d.reshape(table.size),
        np.int64(pad_id),
        np.int32(n_out_rows),
        np.int32(plan.seq_len),
        *(outs[n].reshape(cells) for n in _OUTPUTS),
    )


def pack_tokens_reference(
    tokens: np.ndarray,
    offsets: np.ndarray,
    plan: PackingPlan,
    *,
    n_rows: int | None = None,
    pad_id: int = 0,
) -> dict[str, np.ndarray]:
    """NumPy reference of :func:`pack_tokens`: host int64 ``[R, L]`` arrays by output name
    (``R = n_rows`` or ``plan.n_rows``)."""
    rows_out = plan.n_rows if n_rows is None else n_rows
    shape = (rows_out, plan.seq_len)
    res = {name: np.zeros(shape, np.int64) for name in _OUTPUTS}
    res["input_ids"][:] = pad_id
    seen = np.zeros(rows_out, np.int64)
    for i in np.lexsort((plan.starts, plan.rows)):
        r, s, n = int(plan.rows[i]), int(plan.starts[i]), int(plan.lengths[i])
        if r < 0:
            continue
        seen[r] += 1
        o = int(offsets[i])
        res["input_ids"][r, s : s + n] = tokens[o : o + n]
        res["attention_mask"][r, s : s + n] = 1
        res["position_ids"][r, s : s + n] = np.arange(n)
        res["segment_ids"][r, s : s + n] = seen[r]
    return res
