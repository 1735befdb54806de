"""The list-column store directly: rows numbered across updates, chunks released only when no
referenced row id falls in them, and ``gather`` returning each query's row (an empty list for
-1) in the queries' order, against plain Python lists."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mmload.features.lists import ListStore


def _col(rows: list[list[float]]) -> tuple[np.ndarray, np.ndarray]:
    values = np.array([v for r in rows for v in r], dtype=np.float32)
    offsets = np.cumsum([0] + [len(r) for r in rows]).astype(np.int64)
    return values, offsets


UPDATES = [[[1.0]], [[2.0, 2.5], []], [[3.0], [4.0, 4.5, 4.75], [5.0]]]  # 1, 2 and 3 rows


def _store() -> tuple[ListStore, list[list[float]]]:
    store, every = ListStore(), []
    for rows in UPDATES:
        store = store.add(len(rows), {"emb": _col(rows)})
        every += rows
    return store, every


def test_rows_are_numbered_across_updates_and_gathered_in_query_order() -> None:
    store, every = _store()
    assert store.next_id == store.rows == len(every) == 6
    assert [c.base for c in store.chunks] == [0, 1, 3]
    assert store.add(0, {"emb": _col([])}) is store
    ids = np.array([5, -1, 0, 3, 1, 1, 2, 4, -1], dtype=np.int64)
    got = store.gather("emb", ids, torch.float32)
    assert got.values.dtype == torch.float32
    assert got.tolist() == [every[i] if i >= 0 else [] for i in ids]
    assert ListStore().gather("emb", np.array([-1, -1]), torch.float64).tolist() == [[], []]
    wide = store.gather("emb", np.array([3, -1]), torch.float16)  # in the dtype asked for
    assert wide.values.dtype == torch.float16 and wide.tolist() == [[3.0], []]


def test_a_chunk_is_released_only_when_no_referenced_row_falls_in_it() -> None:
    store, every = _store()
    assert store.keep(np.array([0, 1, 3, -1])) is store  # every chunk still referenced
    only_first = store.keep(np.array([0, -1]))  # row 0 is a row like any other
    assert [c.base for c in only_first.chunks] == [0] and only_first.next_id == 6
    at_bases = store.keep(np.array([1, 3]))  # ids equal to chunk bases
    assert [c.base for c in at_bases.chunks] == [1, 3]
    last_row = store.keep(np.array([2]))  # the last row of the middle chunk
    assert [c.base for c in last_row.chunks] == [1]
    assert store.keep(np.array([-1], dtype=np.int64)).chunks == ()
    assert ListStore().keep(np.array([0])).chunks == ()
    # rows of released chunks are gone; the others keep their ids
    got = at_bases.gather("emb", np.array([4, 1, 0]), torch.float32)
    assert got.tolist() == [every[4], every[1], []]


def test_a_row_id_past_a_chunk_is_an_error() -> None:
    store = ListStore().add(2, {"emb": _col([[1.0], [2.0]])})
    with pytest.raises(IndexError, match=r"^list row id beyond chunk 0\+2$"):
        store.gather("emb", np.array([2]), torch.float32)
