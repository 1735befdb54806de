"""Defect 4 of issue 9: repeated launches allocate no device memory (simulator or GPU).

numba's default allocator synchronises the device on every allocation, so parameters travel
through one pinned staging slot into one reused device buffer per stream, and scratch
(the image kernel's per-sample constants, the log-mel workspace) is a reused buffer too.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np
import pytest
from numba import cuda

from mmload.augment import CropParams
from mmload.kernels import _device
from mmload.kernels.crop_resize_normalize import (
    crop_resize_normalize,
    crop_resize_normalize_reference,
)
from mmload.kernels.logmel import LogMelSpec, logmel, logmel_reference, logmel_tables
from mmload.kernels.mixup import cutmix, cutmix_reference, mixup, mixup_reference
from mmload.kernels.pack_tokens import pack_tokens, pack_tokens_reference, plan_packing

ALLOCATORS = ("device_array", "to_device", "pinned_array", "device_array_like")


@pytest.fixture
def allocations(monkeypatch: pytest.MonkeyPatch) -> Counter[str]:
    counts: Counter[str] = Counter()
    for name in ALLOCATORS:
        real = getattr(cuda, name)

        def counting(*args: Any, _real: Any = real, _name: str = name, **kwargs: Any) -> Any:
            counts[_name] += 1
            return _real(*args, **kwargs)

        monkeypatch.setattr(cuda, name, counting)
    monkeypatch.setattr(_device, "_ARENAS", {})  # start from empty arenas
    return counts


def _image_call(rng: np.random.Generator, out: Any) -> tuple[np.ndarray, np.ndarray]:
    heights = np.array([7, 9, 6], np.int32)
    widths = np.array([8, 5, 10], np.int32)
    sizes = heights.astype(np.int64) * widths * 3
    offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
    buf = rng.integers(0, 256, int(sizes.sum()), dtype=np.uint8)
    crop = CropParams(
        np.array([1, 0, 2]),
        np.array([0, 1, 3]),
        np.array([5, 8, 4]),
        np.array([6, 4, 7]),
        rng.random(3) < 0.5,
    )
    crop_resize_normalize(
        buf, offsets, heights, widths, crop, out, dtype="float32", mean=(1, 2, 3), std=(4, 5, 6)
    )
    want = crop_resize_normalize_reference(
        buf,
        offsets,
        heights,
        widths,
        crop,
        (4, 5),
        dtype="float32",
        mean=(1, 2, 3),
        std=(4, 5, 6),
    )
    return np.asarray(out).copy(), want


def test_repeated_launches_allocate_nothing(allocations: Counter[str]) -> None:
    rng = np.random.default_rng(0)
    img_out = np.zeros((3, 3, 4, 5), np.float32)
    x = rng.standard_normal((4, 3, 6, 7)).astype(np.float32)
    mix_out = np.zeros_like(x)
    spec = LogMelSpec(sample_rate=8000, n_fft=16, hop_length=4, n_mels=4)
    tables = logmel_tables(spec)
    wav = rng.standard_normal((2, 40)).astype(np.float32)
    mel_out = np.zeros(spec.output_shape(2, 40), np.float32)
    lengths = np.array([3, 5, 0, 2])
    offsets = np.array([0, 3, 8, 8])
    tokens = rng.integers(1, 100, 10)
    plan = plan_packing(lengths, 6)
    packed = [np.zeros((plan.n_rows, 6), np.int64) for _ in range(4)]

    def one_round() -> None:
        got, want = _image_call(rng, img_out)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
        perm = rng.permutation(4)
        lam = rng.random(4).astype(np.float32)
        mixup(x, perm, lam, mix_out)
        np.testing.assert_allclose(mix_out, mixup_reference(x, perm, lam), rtol=1e-6)
        boxes = np.array([[0, 0, 3, 4], [1, 2, 6, 7], [2, 2, 2, 2], [0, 0, 6, 7]], np.int32)
        cutmix(x, perm, boxes, mix_out)
        np.testing.assert_array_equal(mix_out, cutmix_reference(x, perm, boxes))
        logmel(wav, mel_out, spec, tables=tables)
        np.testing.assert_allclose(mel_out, logmel_reference(wav, spec), rtol=1e-3, atol=1e-3)
        pack_tokens(tokens, offsets, plan, *packed, pad_id=7)
        want_p = pack_tokens_reference(tokens, offsets, plan, pad_id=7)
        np.testing.assert_array_equal(packed[0], want_p["input_ids"])

    one_round()  # grows the arena's buffers once
    allocations.clear()
    for _ in range(3):
        one_round()
    assert not allocations, f"per-call allocations: {dict(allocations)}"


def test_parameters_travel_in_one_copy_per_launch(
    allocations: Counter[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    uploads: list[int] = []
    real = _device.upload_params

    def counting(hosts: Any, *, stream: Any = 0) -> list[Any]:
        uploads.append(len(hosts))
        return real(hosts, stream=stream)

    import mmload.kernels.crop_resize_normalize as crn

    monkeypatch.setattr(_device, "upload_params", counting)
    monkeypatch.setattr(crn, "upload_params", counting)
    rng = np.random.default_rng(1)
    _image_call(rng, np.zeros((3, 3, 4, 5), np.float32))
    # Host metadata: the per-sample constants (base, ints, scales) computed on the host travel
    # in one staging copy (before: the seven metadata arrays, then a params kernel).
    assert uploads == [3]


def test_views_of_one_upload_are_disjoint_and_typed() -> None:
    a = np.arange(5, dtype=np.int64)
    b = np.array([1.5, 2.5], np.float32)
    c = np.array([1, 0, 1], np.uint8)
    da, db, dc = _device.upload_params([a, b, c])
    np.testing.assert_array_equal(np.asarray(da.copy_to_host()), a)
    np.testing.assert_array_equal(np.asarray(db.copy_to_host()), b)
    np.testing.assert_array_equal(np.asarray(dc.copy_to_host()), c)
    assert (da.dtype, db.dtype, dc.dtype) == (a.dtype, b.dtype, c.dtype)
    s1, s2 = _device.scratch([((3, 4), np.float32), ((7,), np.int32)])
    assert s1.shape == (3, 4) and s2.shape == (7,)


def test_each_thread_has_its_own_buffers() -> None:
    """Threads sharing a stream (torch's default stream is shared) never share a buffer, so
    one thread's upload cannot overwrite parameters another thread's kernel is about to read."""
    import threading

    (mine,) = _device.upload_params([np.arange(3)])
    seen: list[Any] = []
    worker = threading.Thread(target=lambda: seen.extend(_device.upload_params([np.arange(3)])))
    worker.start()
    worker.join()
    mine_buf = _device._arena(0).params
    others = [a.params for k, a in _device._ARENAS.items() if k[2] == worker.ident]
    assert len(others) == 1 and others[0] is not mine_buf
    np.testing.assert_array_equal(np.asarray(seen[0].copy_to_host()), np.arange(3))
    np.testing.assert_array_equal(np.asarray(mine.copy_to_host()), np.arange(3))
