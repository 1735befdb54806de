"""Join keys and timestamps as int64, checked directly against the documented contract: integer
keys are their own codes in any integer dtype or container, string keys get dense codes in order
of first arrival, everything else is a JoinError with its exact message."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import torch

from mmload.errors import JoinError
from mmload.features.keys import MISSING, KeyCodec, query_timestamps


def _eq(got: np.ndarray | torch.Tensor, want: list[int]) -> None:
    if isinstance(got, torch.Tensor):
        assert got.dtype == torch.int64 and got.is_contiguous()
        assert got.tolist() == want
    else:
        assert got.dtype == np.int64 and got.flags.c_contiguous
        assert got.tolist() == want


@pytest.mark.parametrize(
    "keys",
    [
        [3, 1, 2],
        (3, 1, 2),
        np.array([3, 1, 2], dtype=np.int32),
        np.array([3, 1, 2], dtype=np.uint32),
        np.array([3, 1, 2], dtype=np.uint64),
        np.array([[3, 1, 2]], dtype=np.int16),  # flattened
        np.array([3, 9, 1, 9, 2], dtype=np.int64)[::2],  # strided: made contiguous
        np.array([3, 1, 2], dtype=object),  # a pandas object column of ints
        np.array([3, np.int8(1), 2], dtype=object),
        pa.array([3, 1, 2], type=pa.int32()),
        pa.chunked_array([[3], [1, 2]], type=pa.uint16()),
        torch.tensor([3, 1, 2], dtype=torch.int32),
        torch.tensor([[3, 1], [2, 4]], dtype=torch.int64)[:, 0].reshape(1, 2).expand(1, 2),
    ],
)
def test_integer_keys_are_their_own_codes_in_any_integer_type(keys: object) -> None:
    want = [3, 2] if isinstance(keys, torch.Tensor) and keys.shape == (1, 2) else [3, 1, 2]
    _eq(KeyCodec("int").encode_query(keys), want)


def test_empty_integer_keys() -> None:
    for keys in ([], np.zeros(0, dtype=np.float64), pa.array([], type=pa.int64())):
        _eq(KeyCodec("int").encode_query(keys), [])  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("keys", "message"),
    [
        (
            np.array([1.5, 2.0]),
            f"join: key {np.float64(1.5)!r} (float64) given to a table with integer keys",
        ),
        (
            np.array([[1.5, 2.0]]),
            f"join: key {np.float64(1.5)!r} (float64) given to a table with integer keys",
        ),
        (
            np.array([1, "a"], dtype=object),
            "join: key 'a' (str) given to a table with integer keys",
        ),
        (["x", "y"], f"join: key {np.str_('x')!r} (str_) given to a table with integer keys"),
        (
            pa.chunked_array([[1, None], [None]]),
            "join: 2 of the keys are null",
        ),
        (np.array([2**63], dtype=np.uint64), "join: a uint64 key does not fit int64"),
        ([1, 2**64], f"join: key {2**64} does not fit int64"),  # an object array
        ([-(2**63) - 1], f"join: key {-(2**63) - 1} does not fit int64"),
        (
            np.array([1, True], dtype=object),
            "join: key True (bool) given to a table with integer keys",
        ),
        (
            np.array([True, False]),
            f"join: key {np.True_!r} (bool) given to a table with integer keys",
        ),
        (torch.tensor([1.0]), "join: keys have dtype torch.float32; this table has integer keys"),
        (torch.tensor([True]), "join: keys have dtype torch.bool; this table has integer keys"),
        (torch.tensor([1j]), "join: keys have dtype torch.complex64; this table has integer keys"),
    ],
)
def test_keys_an_integer_table_refuses(keys: object, message: str) -> None:
    with pytest.raises(JoinError) as info:
        KeyCodec("int").encode_query(keys)
    assert str(info.value) == message


def test_string_keys_get_dense_codes_in_order_of_first_arrival() -> None:
    codec = KeyCodec("string")
    _eq(codec.encode_rows(pa.chunked_array([["b", "a"], ["b", "c", "a"]])), [0, 1, 0, 2, 1])
    _eq(codec.encode_rows(pa.chunked_array([["d", "a"]])), [3, 1])  # the dictionary only grows
    assert len(codec) == 4
    for keys in (
        ["c", "zz", "b"],
        np.array(["c", "zz", "b"]),
        pa.array(["c", "zz", "b"]),
        pa.chunked_array([["c"], ["zz", "b"]]),
    ):
        _eq(codec.encode_query(keys), [2, MISSING, 0])
    _eq(codec.encode_query([]), [])
    ints = np.array([5, 6], dtype=np.int64)  # validated integer rows pass through
    assert KeyCodec("int").encode_rows(ints) is ints


def test_keys_a_string_table_refuses() -> None:
    codec = KeyCodec("string")
    with pytest.raises(JoinError) as info:
        codec.encode_query(torch.tensor([1]))
    assert str(info.value) == "join: keys are a tensor, but this table has string keys"
    with pytest.raises(JoinError) as info:
        codec.encode_query([7, "a"])
    assert str(info.value) == "join: key 7 (int) given to a table with string keys"
    with pytest.raises(JoinError) as info:
        codec.encode_query(np.array([2.5, 1.0]))
    assert str(info.value) == "join: key 2.5 (float) given to a table with string keys"


@pytest.mark.parametrize(
    "ts",
    [
        [10, 20],
        np.array([10, 20], dtype=np.int32),
        np.array([[10, 20]], dtype=np.uint16),
        np.array([10, 0, 20], dtype=np.int64)[::2],
        torch.tensor([10, 20], dtype=torch.int32),
        torch.tensor([[10], [20]], dtype=torch.int64),
    ],
)
def test_integer_timestamps(ts: object) -> None:
    _eq(query_timestamps(ts, 2, None), [10, 20])  # type: ignore[arg-type]


def test_datetime_timestamps_in_the_tables_unit() -> None:
    t = np.array(["2026-01-01T00:00:01", "2026-01-01T00:00:02"], dtype="datetime64[s]")
    base = int(np.datetime64("2026-01-01T00:00:00", "ms").astype(np.int64))
    _eq(query_timestamps(t, 2, "ms"), [base + 1000, base + 2000])
    _eq(query_timestamps(np.zeros(0, dtype=np.float32), 0, None), [])  # empty: any dtype


@pytest.mark.parametrize(
    ("ts", "unit", "message"),
    [
        (
            np.array(["2026-01-01"], dtype="datetime64[D]"),
            None,
            "join: datetime64 timestamps given to a table with integer times",
        ),
        (np.array([1.5]), None, "join: timestamps have dtype float64; need int64"),
        (torch.tensor([1.5]), None, "join: timestamps have dtype torch.float32; need integers"),
        (torch.tensor([True]), None, "join: timestamps have dtype torch.bool; need integers"),
        (torch.tensor([1j]), None, "join: timestamps have dtype torch.complex64; need integers"),
        ([1, 2], None, "join: 1 keys but 2 timestamps"),
    ],
)
def test_timestamps_refused(ts: object, unit: str | None, message: str) -> None:
    with pytest.raises(JoinError) as info:
        query_timestamps(ts, 1, unit)  # type: ignore[arg-type]
    assert str(info.value) == message
