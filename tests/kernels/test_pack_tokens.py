"""Token packing: the host plan, and the kernel vs its NumPy reference (simulator or GPU)."""

from __future__ import annotations

import numpy as np
import pytest
from numba import cuda

from mmload.kernels.pack_tokens import (
    PackingPlan,
    pack_tokens,
    pack_tokens_reference,
    plan_packing,
)

NAMES = ("input_ids", "attention_mask", "position_ids", "segment_ids")


def run(
    tokens: np.ndarray, offsets: np.ndarray, plan: PackingPlan, rows: int, pad_id: int = 0
) -> dict[str, np.ndarray]:
    outs = [cuda.device_array((rows, plan.seq_len), np.int64) for _ in NAMES]
    pack_tokens(cuda.to_device(tokens), offsets, plan, *outs, pad_id=pad_id)
    return {name: o.copy_to_host() for name, o in zip(NAMES, outs, strict=True)}


def test_plan_first_fit_by_hand() -> None:
    plan = plan_packing(np.array([5, 3, 4, 2, 8, 0, 10, 1]), 8)
    np.testing.assert_array_equal(plan.rows, [0, 0, 1, 1, 2, -1, 3, 1])
    np.testing.assert_array_equal(plan.starts, [0, 5, 0, 4, 0, 0, 0, 6])
    np.testing.assert_array_equal(plan.lengths, [5, 3, 4, 2, 8, 0, 8, 1])  # 10 truncated
    assert (plan.n_rows, plan.seq_len) == (4, 8)


@pytest.mark.parametrize("seed", range(5))
def test_plan_invariants(seed: int) -> None:
    rng = np.random.default_rng(seed)
    seq_len = int(rng.integers(4, 20))
    lengths = rng.integers(0, 2 * seq_len, int(rng.integers(1, 40)))
    plan = plan_packing(lengths, seq_len)
    np.testing.assert_array_equal(plan.lengths, np.minimum(lengths, seq_len))
    assert ((plan.rows == -1) == (lengths == 0)).all()
    used = np.zeros((max(plan.n_rows, 1), seq_len), np.int64)
    for i in np.flatnonzero(plan.rows >= 0):
        r, s, n = plan.rows[i], plan.starts[i], plan.lengths[i]
        assert 0 <= r < plan.n_rows and s >= 0 and s + n <= seq_len
        used[r, s : s + n] += 1
        # First fit: no earlier row had room when sequence i was placed.
        before = plan.rows[:i]
        for earlier in range(r):
            filled = plan.lengths[:i][before == earlier].sum()
            assert filled + n > seq_len
    assert used.max() <= 1  # no overlaps
    assert used.sum() == plan.lengths.sum()
    assert plan.n_rows == len(set(plan.rows[plan.rows >= 0].tolist()))
    again = plan_packing(lengths, seq_len)
    assert all(np.array_equal(a, b) for a, b in zip(plan[:3], again[:3], strict=True))


def test_kernel_by_hand() -> None:
    lengths = np.array([3, 0, 2, 6, 1])
    tokens = np.arange(100, 100 + lengths.sum() + 4)
    offsets = np.array([0, 3, 3, 5, 11])  # gaps are fine: sequence i is tokens[off : off + len]
    plan = plan_packing(lengths, 5)  # rows: [0, -, 0, 1 (truncated to 5), 2]
    got = run(tokens, offsets, plan, rows=4, pad_id=-7)
    np.testing.assert_array_equal(
        got["input_ids"],
        [
            [100, 101, 102, 103, 104],
            [105, 106, 107, 108, 109],
            [111, -7, -7, -7, -7],
            [-7, -7, -7, -7, -7],
        ],
    )
    np.testing.assert_array_equal(
        got["attention_mask"], [[1] * 5, [1] * 5, [1, 0, 0, 0, 0], [0] * 5]
    )
    np.testing.assert_array_equal(
        got["position_ids"], [[0, 1, 2, 0, 1], [0, 1, 2, 3, 4], [0] * 5, [0] * 5]
    )
    np.testing.assert_array_equal(
        got["segment_ids"], [[1, 1, 1, 2, 2], [1] * 5, [1, 0, 0, 0, 0], [0] * 5]
    )


@pytest.mark.parametrize("seed", range(4))
def test_kernel_matches_reference(seed: int) -> None:
    rng = np.random.default_rng(seed)
    seq_len = int(rng.integers(3, 12))
    lengths = rng.integers(0, seq_len + 4, int(rng.integers(1, 12)))
    gaps = rng.integers(0, 3, lengths.size)
    offsets = np.cumsum(gaps) + np.concatenate([[0], np.cumsum(lengths)[:-1]])
    tokens = rng.integers(1, 50_000, int(offsets[-1] + lengths[-1] + 2))
    plan = plan_packing(lengths, seq_len)
    rows = plan.n_rows + int(rng.integers(0, 2))
    got = run(tokens, offsets, plan, rows=rows, pad_id=3)
    want = pack_tokens_reference(tokens, offsets, plan, n_rows=rows, pad_id=3)
    for name in NAMES:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)


def test_only_empty_sequences_give_padding() -> None:
    plan = plan_packing(np.array([0, 0]), 4)
    assert plan.n_rows == 0
    got = run(np.zeros(0, np.int64), np.array([0, 0]), plan, rows=2, pad_id=9)
    assert (got["input_ids"] == 9).all()
    assert not any(got[n].any() for n in NAMES[1:])


def test_plan_validation() -> None:
    with pytest.raises(ValueError, match="seq_len"):
        plan_packing(np.array([1, 2]), 0)
    with pytest.raises(ValueError, match="lengths"):
        plan_packing(np.array([1, -2]), 4)
    with pytest.raises(ValueError, match="lengths"):
        plan_packing(np.array([1.5]), 4)


def test_launcher_validation() -> None:
    tokens = cuda.to_device(np.arange(10))
    plan = plan_packing(np.array([4, 3]), 5)
    offsets = np.array([0, 4])

    def outs(rows: int = 2, cols: int = 5, dtype: type = np.int64) -> list[object]:
        return [cuda.device_array((rows, cols), dtype) for _ in NAMES]

    with pytest.raises(ValueError, match="rows, the plan needs 2"):
        pack_tokens(tokens, offsets, plan, *outs(rows=1))
    with pytest.raises(ValueError, match="input_ids: shape"):
        pack_tokens(tokens, offsets, plan, *outs(cols=6))
    with pytest.raises(ValueError, match="input_ids: dtype"):
        pack_tokens(tokens, offsets, plan, *outs(dtype=np.int32))
    with pytest.raises(ValueError, match="offsets: sequence 1"):
        pack_tokens(tokens, np.array([0, 8]), plan, *outs())
    with pytest.raises(ValueError, match=r"plan\.rows"):
        pack_tokens(tokens, np.array([0, 4, 7]), plan, *outs())
    with pytest.raises(ValueError, match="tokens: dtype"):
        pack_tokens(cuda.to_device(np.arange(10, dtype=np.int32)), offsets, plan, *outs())
    same = cuda.device_array((2, 5), np.int64)
    with pytest.raises(ValueError, match="overlap"):
        pack_tokens(tokens, offsets, plan, same, same, *outs()[2:])
    bad = plan._replace(starts=np.array([0, 3]))
    with pytest.raises(ValueError, match="plan: a sequence lies outside"):
        pack_tokens(tokens, offsets, bad, *outs())


class FakeCudaTensor:
    """Stands in for a torch CUDA tensor under the simulator: exports
    ``__cuda_array_interface__`` (simulated device memory is host memory) and, like a CUDA
    tensor, refuses ``np.asarray``."""

    def __init__(self, host: np.ndarray) -> None:
        self._host = np.ascontiguousarray(host)
        self.__cuda_array_interface__ = {
            "shape": self._host.shape,
            "typestr": self._host.dtype.str,
            "data": (self._host.__array_interface__["data"][0], False),
            "strides": None,
            "version": 3,
        }

    def __array__(self, *args: object, **kwargs: object) -> np.ndarray:
        raise TypeError("can't convert cuda:0 device type tensor to numpy")


@pytest.mark.parametrize("where", ["numba", "cuda_array_interface"])
def test_device_offsets_are_read_on_the_device(where: str) -> None:
    """Defect 1: offsets on the device (torch CUDA tensor, Numba array) are never np.asarray'd."""
    rng = np.random.default_rng(21)
    lengths = rng.integers(0, 9, 10)
    offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64) + 2
    tokens = rng.integers(1, 1000, int(offsets[-1] + lengths[-1] + 3))
    plan = plan_packing(lengths, 8)
    dev = cuda.to_device(offsets) if where == "numba" else FakeCudaTensor(offsets)
    with pytest.raises(TypeError):
        np.asarray(FakeCudaTensor(offsets))
    outs = [cuda.device_array((plan.n_rows + 1, 8), np.int64) for _ in NAMES]
    pack_tokens(cuda.to_device(tokens), dev, plan, *outs, pad_id=5)
    want = pack_tokens_reference(tokens, offsets, plan, n_rows=plan.n_rows + 1, pad_id=5)
    for name, o in zip(NAMES, outs, strict=True):
        np.testing.assert_array_equal(o.copy_to_host(), want[name], err_msg=name)


def test_device_offsets_validation() -> None:
    tokens = cuda.to_device(np.arange(10))
    plan = plan_packing(np.array([4, 3]), 5)
    outs = [cuda.device_array((2, 5), np.int64) for _ in NAMES]
    with pytest.raises(ValueError, match="offsets: dtype"):
        pack_tokens(tokens, FakeCudaTensor(np.array([0, 4], np.int32)), plan, *outs)
    with pytest.raises(ValueError, match=r"plan\.rows"):
        pack_tokens(tokens, FakeCudaTensor(np.array([0, 4, 7])), plan, *outs)
    with pytest.raises(ValueError, match="offsets: shape"):
        pack_tokens(tokens, FakeCudaTensor(np.zeros((2, 1), np.int64)), plan, *outs)
