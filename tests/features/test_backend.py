"""The array primitives of joins against their documented contract, on NumPy and on torch (CPU
here; the GPU runs the same tests in tests/features/test_gpu.py): ``sort_perm`` against Python's
stable ``sorted`` by (code, ts), ``asarray`` never sharing memory it may not write."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mmload.features.backend import NumpyOps, Ops, TorchOps

OPS = [NumpyOps(), TorchOps(torch.device("cpu"))]


def _np(a: object) -> np.ndarray:
    return a.numpy() if isinstance(a, torch.Tensor) else np.asarray(a)


def _oracle(codes: np.ndarray, ts: np.ndarray) -> list[int]:
    # Python's sort is stable: rows with equal (code, ts) keep their arrival order
    return sorted(range(len(codes)), key=lambda i: (int(codes[i]), int(ts[i])))


@pytest.mark.parametrize("ops", OPS, ids=["numpy", "torch"])
@pytest.mark.parametrize("case", ["time_ordered", "shuffled", "ties", "tiny"])
def test_sort_perm_sorts_by_code_then_time_keeping_arrival_order(ops: Ops, case: str) -> None:
    rng = np.random.default_rng(7)
    n = 20_000
    codes = rng.integers(0, 12, n)
    if case == "time_ordered":  # a log in time order: the one-sort fast path
        ts = np.sort(rng.integers(0, 500, n))
    elif case == "shuffled":
        ts = rng.integers(0, 500, n)
    elif case == "ties":  # many rows with equal (code, ts): their order is arrival order
        ts = np.repeat(np.arange(n // 100), 100)
    else:
        codes, ts = np.array([2, 1]), np.array([5, 5])
    for m in (0, 1, 2, len(codes)):
        c, t = codes[:m], ts[:m]
        got = _np(ops.sort_perm(ops.asarray(c.astype(np.int64)), ops.asarray(t.astype(np.int64))))
        assert got.tolist() == _oracle(c, t)


def test_a_replaced_sort_is_used() -> None:
    seen: list[tuple[list[int], list[int]]] = []

    def by_time(codes: torch.Tensor, ts: torch.Tensor) -> torch.Tensor:
        seen.append((codes.tolist(), ts.tolist()))
        return torch.argsort(ts)

    ops = TorchOps(torch.device("cpu"), sort_perm=by_time)
    perm = ops.sort_perm(torch.tensor([0, 0, 1]), torch.tensor([9, 3, 5]))
    assert perm.tolist() == [1, 2, 0] and seen == [([0, 0, 1], [9, 3, 5])]


@pytest.mark.parametrize(
    "make",
    [
        lambda: np.arange(6, dtype=np.int64)[::2],  # not contiguous
        lambda: np.asfortranarray(np.arange(6, dtype=np.int64).reshape(2, 3)),
        lambda: np.frombuffer(np.arange(3, dtype=np.int64).tobytes(), dtype=np.int64),  # read-only
    ],
)
def test_torch_asarray_copies_what_it_may_not_share(make: object) -> None:
    a = make()  # type: ignore[operator]
    before = a.copy()
    t = TorchOps(torch.device("cpu")).asarray(a)
    assert t.tolist() == a.tolist() and t.is_contiguous()
    t.view(-1)[0] = 99  # writing the tensor leaves the caller's array alone
    assert (a == before).all()


def test_torch_asarray_shares_a_writable_contiguous_array_on_the_cpu() -> None:
    a = np.arange(3, dtype=np.int64)
    t = TorchOps(torch.device("cpu")).asarray(a)
    t[0] = 7  # no copy where none is needed (the GPU copies once, to the device)
    assert a[0] == 7


@pytest.mark.parametrize("ops", OPS, ids=["numpy", "torch"])
def test_primitives_dtypes_and_values(ops: Ops) -> None:
    assert _np(ops.arange(3)).tolist() == [0, 1, 2] and _np(ops.arange(3)).dtype == np.int64
    assert _np(ops.mask(2, True)).tolist() == [True, True] and _np(ops.mask(2, False)).dtype == bool
    assert _np(ops.full(2, -1)).tolist() == [-1, -1] and _np(ops.full(2, 0)).dtype == np.int64
    like = ops.asarray(np.zeros((1, 3), dtype=np.float32))
    e = ops.empty_rows(like, 4)
    assert tuple(e.shape) == (4, 3) and _np(e).dtype == np.float32
    assert _np(ops.nonzero(ops.asarray(np.array([False, True, True])))).tolist() == [1, 2]
    rows = ops.repeat_rows(ops.asarray(np.array([1.0, 2.0], dtype=np.float32)), 2)
    rows[0, 0] = 5  # a fresh, writable array
    assert _np(rows).tolist() == [[5.0, 2.0], [1.0, 2.0]]
    assert _np(ops.cat([ops.arange(2), ops.arange(1)])).tolist() == [0, 1, 0]
    a = ops.asarray(np.array([1, 3, 3, 5], dtype=np.int64))
    v = ops.asarray(np.array([3, 4], dtype=np.int64))
    assert _np(ops.searchsorted(a, v)).tolist() == [1, 3]
    assert _np(ops.searchsorted(a, v, right=True)).tolist() == [3, 3]
    assert isinstance(ops.to_torch(ops.arange(2)), torch.Tensor)
