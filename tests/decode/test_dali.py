"""The pipelined DALI decoder (CPU here): same pixels as synchronous decode, in order, and
failures pinned on the right batch while other batches are in flight."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mmload.augment import draw_crops
from mmload.config import ImageConfig
from mmload.decode.dali import DaliBatchError, DaliImageDecoder
from mmload.decode.headers import read_header

CFG = ImageConfig(size=24, dtype="float32")


def _batches(jpegs: list[bytes], n: int, size: int) -> list[tuple[list[bytes], object]]:
    out = []
    for b in range(n):
        data = [jpegs[(b * size + i) % len(jpegs)] for i in range(size)]
        hw = np.array(
            [
                (h.height, h.width)
                for h in (
                    read_header(d, shard="s", key="k", max_pixels=10**8, max_side=10**5)
                    for d in data
                )
            ]
        )
        crops = draw_crops(
            hw[:, 0], hw[:, 1], CFG, seed=0, epoch=0, ids=np.arange(b * size, (b + 1) * size)
        )
        out.append((data, crops))
    return out


def _bogus(jpeg: bytes) -> bytes:
    b = bytearray(jpeg)
    i = b.find(b"\xff\xc4")
    b[i + 5 : i + 21] = b"\xff" * 16  # passes header checks, fails in the decoder
    return bytes(b)


@pytest.mark.parametrize("depth", [1, 2, 3])
def test_pipelined_equals_synchronous(jpegs: list[bytes], depth: int) -> None:
    batches = _batches(jpegs, 5, 4)
    ref = DaliImageDecoder(CFG, 4, threads=1)
    want = [ref.decode(d, [], c) for d, c in batches]  # type: ignore[arg-type]
    dec = DaliImageDecoder(CFG, 4, threads=1, depth=depth)
    tickets = [dec.submit(d, c) for d, c in batches]  # type: ignore[arg-type]
    got = [dec.collect(t) for t in tickets]  # fewer batches left than depth at the end: padded
    for g, w in zip(got, want, strict=True):
        assert torch.equal(g, w)
    # The decoder carries on across "epochs" (dummy batches from the last tail are dropped).
    again = [dec.collect(dec.submit(d, c)) for d, c in batches[:2]]  # type: ignore[arg-type]
    assert torch.equal(again[1], want[1])


def test_failure_is_pinned_on_its_batch(jpegs: list[bytes]) -> None:
    batches = _batches(jpegs, 4, 3)
    data, crops = batches[1]
    batches[1] = ([data[0], _bogus(data[1]), data[2]], crops)
    ref = DaliImageDecoder(CFG, 3, threads=1)
    dec = DaliImageDecoder(CFG, 3, threads=1, depth=3)
    tickets = [dec.submit(d, c) for d, c in batches]  # type: ignore[arg-type]
    assert torch.equal(dec.collect(tickets[0]), ref.decode(*batches[0][:1], [], batches[0][1]))  # type: ignore[arg-type]
    with pytest.raises(DaliBatchError):
        dec.collect(tickets[1])
    for i in (2, 3):
        assert torch.equal(dec.collect(tickets[i]), ref.decode(batches[i][0], [], batches[i][1]))  # type: ignore[arg-type]
    # and the next submissions run pipelined again
    t = dec.submit(*batches[0])  # type: ignore[arg-type]
    assert torch.equal(dec.collect(t), ref.decode(batches[0][0], [], batches[0][1]))  # type: ignore[arg-type]


def test_reset_drops_batches_in_flight(jpegs: list[bytes]) -> None:
    batches = _batches(jpegs, 3, 2)
    dec = DaliImageDecoder(CFG, 2, threads=1, depth=2)
    dec.submit(*batches[0])  # type: ignore[arg-type]
    dec.submit(*batches[1])  # type: ignore[arg-type]
    dec.reset()  # an iteration was abandoned
    ref = DaliImageDecoder(CFG, 2, threads=1)
    got = dec.collect(dec.submit(*batches[2]))  # type: ignore[arg-type]
    assert torch.equal(got, ref.decode(batches[2][0], [], batches[2][1]))  # type: ignore[arg-type]
