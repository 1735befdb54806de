"""Mixup / cutmix / label-mix kernels vs their NumPy references (simulator or GPU)."""

from __future__ import annotations

import numpy as np
import pytest
from numba import cuda

from mmload.kernels.mixup import (
    cutmix,
    cutmix_lambda,
    cutmix_reference,
    mix_labels,
    mix_labels_reference,
    mixup,
    mixup_reference,
)

DTYPES = ("float16", "float32")


def run_mixup(x: np.ndarray, perm: np.ndarray, lam: np.ndarray) -> np.ndarray:
    out = cuda.device_array(x.shape, x.dtype)
    mixup(cuda.to_device(x), perm, lam, out)
    return out.copy_to_host()


def run_cutmix(x: np.ndarray, perm: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    out = cuda.device_array(x.shape, x.dtype)
    cutmix(cuda.to_device(x), perm, boxes, out)
    return out.copy_to_host()


def random_boxes(rng: np.random.Generator, n: int, height: int, width: int) -> np.ndarray:
    y = np.sort(rng.integers(0, height + 1, (n, 2)), axis=1)
    x = np.sort(rng.integers(0, width + 1, (n, 2)), axis=1)
    return np.stack([y[:, 0], x[:, 0], y[:, 1], x[:, 1]], axis=1)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("shape", [(4, 3, 5, 6), (3, 70)])
def test_mixup_matches_reference(dtype: str, seed: int, shape: tuple[int, ...]) -> None:
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal(shape) * 3).astype(dtype)
    perm = rng.permutation(shape[0])
    lam = rng.random(shape[0]).astype(np.float32)
    got = run_mixup(x, perm, lam)
    want = mixup_reference(x, perm, lam)
    tol = 2.0**-10 if dtype == "float16" else 1e-6  # one float16 ulp where a GPU fuses a FMA
    np.testing.assert_allclose(got.astype(np.float32), want.astype(np.float32), rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", DTYPES)
def test_mixup_extremes_without_the_reference(dtype: str) -> None:
    rng = np.random.default_rng(4)
    x = rng.standard_normal((4, 2, 3, 5)).astype(dtype)
    perm = np.array([2, 0, 3, 1])
    got = run_mixup(x, perm, np.array([1.0, 0.0, 1.0, 0.0], np.float32))
    np.testing.assert_array_equal(got[[0, 2]], x[[0, 2]])
    np.testing.assert_array_equal(got[[1, 3]], x[perm[[1, 3]]])
    half = run_mixup(x, perm, np.full(4, 0.5, np.float32)).astype(np.float32)
    np.testing.assert_allclose(half, (x + x[perm]).astype(np.float32) / 2, rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("shape", [(4, 3, 5, 6), (3, 2, 2, 4, 5)])
def test_cutmix_matches_reference(dtype: str, seed: int, shape: tuple[int, ...]) -> None:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape).astype(dtype)
    perm = rng.permutation(shape[0])
    boxes = random_boxes(rng, shape[0], shape[-2], shape[-1])
    np.testing.assert_array_equal(run_cutmix(x, perm, boxes), cutmix_reference(x, perm, boxes))


def test_cutmix_edge_boxes_without_the_reference() -> None:
    rng = np.random.default_rng(8)
    x = rng.standard_normal((4, 3, 5, 6)).astype(np.float32)
    perm = np.array([1, 2, 3, 0])
    boxes = np.array([[0, 0, 5, 6], [2, 3, 2, 6], [4, 5, 5, 6], [0, 0, 1, 1]])
    got = run_cutmix(x, perm, boxes)
    np.testing.assert_array_equal(got[0], x[1])  # full box
    np.testing.assert_array_equal(got[1], x[1])  # empty box
    assert np.array_equal(got[2, :, 4, 5], x[3, :, 4, 5])  # bottom-right pixel only
    got2 = got[2].copy()
    got2[:, 4, 5] = x[2, :, 4, 5]
    np.testing.assert_array_equal(got2, x[2])
    np.testing.assert_array_equal(got[3, :, 0, 0], x[0, :, 0, 0])
    np.testing.assert_array_equal(got[3, :, 1:, :], x[3, :, 1:, :])


def test_cutmix_lambda_and_label_mix() -> None:
    boxes = np.array([[0, 0, 5, 6], [2, 3, 2, 6], [1, 1, 3, 4], [0, 0, 0, 0]])
    lam = cutmix_lambda(boxes, 5, 6)
    np.testing.assert_allclose(lam, [0.0, 1.0, 1.0 - 6 / 30, 1.0], rtol=1e-6)
    assert lam.dtype == np.float32
    labels = np.eye(3, dtype=np.float32)[[0, 1, 2, 1]]
    perm = np.array([3, 2, 0, 1])
    out = cuda.device_array(labels.shape, labels.dtype)
    mix_labels(cuda.to_device(labels), perm, lam, out)
    got = out.copy_to_host()
    np.testing.assert_allclose(got, mix_labels_reference(labels, perm, lam), atol=1e-6)
    np.testing.assert_allclose(got.sum(axis=1), 1.0, atol=1e-6)
    # sample 2 is class 2 (weight 1 - 6/30), its partner perm[2] = 0 is class 0 (weight 6/30)
    np.testing.assert_allclose(got[2], [0.2, 0.0, 0.8], atol=1e-6)


def test_empty_batch_is_a_no_op() -> None:
    x = np.zeros((0, 3, 4, 4), np.float32)
    out = cuda.device_array(x.shape, x.dtype)
    mixup(cuda.to_device(x), np.zeros(0, np.int64), np.zeros(0, np.float32), out)
    cutmix(cuda.to_device(x), np.zeros(0, np.int64), np.zeros((0, 4), np.int32), out)
    assert out.copy_to_host().shape == x.shape


def test_rejects_aliasing_and_bad_arguments() -> None:
    x = cuda.to_device(np.zeros((2, 3, 4, 4), np.float32))
    out = cuda.device_array((2, 3, 4, 4), np.float32)
    perm, lam = np.array([1, 0]), np.array([0.5, 0.5], np.float32)
    with pytest.raises(ValueError, match="overlap"):
        mixup(x, perm, lam, x)
    with pytest.raises(ValueError, match="overlap"):
        cutmix(x, perm, np.zeros((2, 4), np.int32), x)
    with pytest.raises(ValueError, match="perm"):
        mixup(x, np.array([0, 2]), lam, out)
    with pytest.raises(ValueError, match="perm: shape"):
        mixup(x, np.array([0, 1, 1]), lam, out)
    with pytest.raises(ValueError, match="lam: shape"):
        mixup(x, perm, np.array([0.5]), out)
    with pytest.raises(ValueError, match="lam"):
        mixup(x, perm, np.array([0.5, np.nan]), out)
    with pytest.raises(ValueError, match="out: dtype"):
        mixup(x, perm, lam, cuda.device_array((2, 3, 4, 4), np.float16))
    with pytest.raises(ValueError, match="out: shape"):
        mixup(x, perm, lam, cuda.device_array((2, 3, 4, 5), np.float32))
    with pytest.raises(ValueError, match="x: dtype"):
        mixup(cuda.to_device(np.zeros((2, 3), np.float64)), perm, lam, out)
    with pytest.raises(ValueError, match="boxes"):
        cutmix(x, perm, np.array([[0, 0, 5, 4], [0, 0, 1, 1]]), out)
    with pytest.raises(ValueError, match="boxes"):
        cutmix(x, perm, np.array([[2, 0, 1, 4], [0, 0, 1, 1]]), out)
    with pytest.raises(ValueError, match="x: needs at least 3"):
        cutmix(cuda.to_device(np.zeros((2, 3), np.float32)), perm, np.zeros((2, 4)), out)
    with pytest.raises(ValueError, match="labels"):
        mix_labels(x, perm, lam, out)
    with pytest.raises(ValueError, match="boxes"):
        cutmix_lambda(np.array([[0, 0, 6, 1]]), 5, 6)
