"""Fused crop/resize/flip/normalize kernel vs its NumPy reference (simulator or GPU) and torch."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from numba import cuda

from mmload.augment import CropParams, draw_crops
from mmload.config import IMAGENET_MEAN, IMAGENET_STD, ImageConfig
from mmload.kernels.crop_resize_normalize import (
    bfloat16_bits,
    crop_resize_normalize,
    crop_resize_normalize_reference,
)

DTYPES = ("float32", "float16", "bfloat16", "uint8")
# float32: FMA contraction on a GPU; float16/bfloat16: one unit in the last place.
RTOL = {"float32": 1e-5, "float16": 2.0**-10, "bfloat16": 2.0**-7}


class Batch(SimpleNamespace):
    buf: np.ndarray
    offsets: np.ndarray
    heights: np.ndarray
    widths: np.ndarray


def make_batch(rng: np.random.Generator, sizes: list[tuple[int, int]]) -> Batch:
    """Images packed with random gaps between them, so offsets matter."""
    heights = np.array([h for h, _ in sizes], np.int32)
    widths = np.array([w for _, w in sizes], np.int32)
    offsets = np.zeros(len(sizes), np.int64)
    pos = 0
    for i, (h, w) in enumerate(sizes):
        pos += int(rng.integers(0, 7))
        offsets[i] = pos
        pos += h * w * 3
    buf = rng.integers(0, 256, pos + 5, dtype=np.uint8)
    return Batch(buf=buf, offsets=offsets, heights=heights, widths=widths)


def images_of(batch: Batch) -> list[np.ndarray]:
    return [
        batch.buf[o : o + h * w * 3].reshape(h, w, 3)
        for o, h, w in zip(batch.offsets, batch.heights, batch.widths, strict=True)
    ]


def crops(y0: list[int], x0: list[int], h: list[int], w: list[int], flip: list[bool]) -> CropParams:
    y, x, hh, ww = (np.array(v, np.int64) for v in (y0, x0, h, w))
    return CropParams(y, x, hh, ww, np.array(flip, bool))


def run(
    batch: Batch,
    crop: CropParams,
    out_hw: tuple[int, int],
    dtype: str,
    *,
    mean: tuple[float, ...] | None = None,
    std: tuple[float, ...] | None = None,
) -> np.ndarray:
    storage = np.uint16 if dtype == "bfloat16" else np.dtype(dtype)
    out = cuda.device_array((len(crop), 3, *out_hw), dtype=storage)
    crop_resize_normalize(
        cuda.to_device(batch.buf),
        batch.offsets,
        batch.heights,
        batch.widths,
        crop,
        out,
        dtype=dtype,
        mean=mean,
        std=std,
    )
    return out.copy_to_host()


def as_float(a: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "bfloat16":
        return (a.astype(np.uint32) << 16).view(np.float32)
    return a.astype(np.float32)


def assert_close(got: np.ndarray, want: np.ndarray, dtype: str) -> None:
    assert got.shape == want.shape
    if dtype == "uint8":  # rounding half up can flip by one where float arithmetic differs
        np.testing.assert_allclose(got.astype(np.int32), want.astype(np.int32), atol=1)
        assert np.mean(got == want) > 0.95
    else:
        np.testing.assert_allclose(
            as_float(got, dtype), as_float(want, dtype), rtol=RTOL[dtype], atol=1e-5
        )


def random_crops(rng: np.random.Generator, batch: Batch) -> CropParams:
    n = len(batch.heights)
    h = rng.integers(1, batch.heights + 1)
    w = rng.integers(1, batch.widths + 1)
    y0 = rng.integers(0, batch.heights - h + 1)
    x0 = rng.integers(0, batch.widths - w + 1)
    return CropParams(y0, x0, h, w, rng.random(n) < 0.5)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_batches_match_reference(dtype: str, seed: int) -> None:
    rng = np.random.default_rng(seed)
    sizes = [(int(rng.integers(5, 10)), int(rng.integers(6, 13))) for _ in range(3)]
    batch = make_batch(rng, sizes)
    crop = random_crops(rng, batch)
    out_hw = (int(rng.integers(3, 7)), int(rng.integers(3, 7)))
    norm = {} if dtype == "uint8" else {"mean": IMAGENET_MEAN, "std": IMAGENET_STD}
    got = run(batch, crop, out_hw, dtype, **norm)
    want = crop_resize_normalize_reference(
        batch.buf,
        batch.offsets,
        batch.heights,
        batch.widths,
        crop,
        out_hw,
        dtype=dtype,
        **norm,
    )
    assert_close(got, want, dtype)


def test_edge_windows_match_reference() -> None:
    """Crops at every border, 1-pixel crops, upscaling, 1x1 output, flip on and off."""
    rng = np.random.default_rng(7)
    batch = make_batch(rng, [(8, 12)] * 6)
    crop = crops(
        y0=[0, 7, 6, 0, 3, 0],
        x0=[0, 11, 9, 10, 0, 0],
        h=[8, 1, 2, 5, 2, 8],
        w=[12, 1, 3, 2, 3, 1],
        flip=[True, False, True, False, True, True],
    )
    for out_hw in [(4, 5), (7, 9), (1, 1)]:
        got = run(batch, crop, out_hw, "float32")
        want = crop_resize_normalize_reference(
            batch.buf, batch.offsets, batch.heights, batch.widths, crop, out_hw, dtype="float32"
        )
        assert_close(got, want, "float32")


def test_semantics_without_the_reference() -> None:
    """Identity size is a copy, flip mirrors, a 1-pixel crop fills the output, NCHW order."""
    rng = np.random.default_rng(3)
    batch = make_batch(rng, [(6, 9), (6, 9), (6, 9)])
    img = images_of(batch)
    crop = crops([0, 0, 4], [0, 0, 7], [6, 6, 1], [9, 9, 1], [False, True, False])
    got = run(batch, crop, (6, 9), "float32")
    np.testing.assert_allclose(got[0], img[0].transpose(2, 0, 1), atol=1e-4)
    np.testing.assert_allclose(got[1], img[1][:, ::-1].transpose(2, 0, 1), atol=1e-4)
    np.testing.assert_allclose(got[2], np.broadcast_to(img[2][4, 7][:, None, None], (3, 6, 9)))
    got_u8 = run(batch, crop, (6, 9), "uint8")
    np.testing.assert_array_equal(got_u8[0], img[0].transpose(2, 0, 1))
    mean, std = (10.0, 20.0, 30.0), (2.0, 4.0, 8.0)
    norm = run(batch, crop, (6, 9), "float32", mean=mean, std=std)
    expect = (img[0].transpose(2, 0, 1) - np.array(mean)[:, None, None]) / np.array(std)[
        :, None, None
    ]
    np.testing.assert_allclose(norm[0], expect, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("window", "out_hw", "flip"),
    [
        ((0, 0, 8, 12), (4, 5), False),  # downscale
        ((1, 2, 3, 4), (7, 9), True),  # upscale
        ((2, 0, 6, 5), (3, 10), False),  # anisotropic
        ((0, 3, 5, 9), (5, 9), True),  # same size, flipped
        ((4, 4, 1, 1), (2, 3), False),  # one pixel
    ],
)
def test_reference_matches_torch_interpolate(
    window: tuple[int, int, int, int], out_hw: tuple[int, int], flip: bool
) -> None:
    rng = np.random.default_rng(11)
    batch = make_batch(rng, [(8, 12)])
    y0, x0, h, w = window
    crop = crops([y0], [x0], [h], [w], [flip])
    ref = crop_resize_normalize_reference(
        batch.buf, batch.offsets, batch.heights, batch.widths, crop, out_hw, dtype="float32"
    )
    win = torch.from_numpy(images_of(batch)[0][y0 : y0 + h, x0 : x0 + w].copy())
    want = F.interpolate(
        win.permute(2, 0, 1)[None].float(),
        size=out_hw,
        mode="bilinear",
        align_corners=False,
        antialias=False,
    )
    if flip:
        want = want.flip(-1)
    np.testing.assert_allclose(ref, want.numpy(), rtol=0, atol=1e-3)


def test_bfloat16_bits_round_to_nearest_even_like_torch() -> None:
    rng = np.random.default_rng(5)
    x = (rng.standard_normal(2000) * 10.0 ** rng.integers(-3, 4, 2000)).astype(np.float32)
    # Exact ties (low half 0x8000) with even and odd kept bits, and values near the maximum.
    ties = np.array([0x3F808000, 0x3F818000, 0xBF808000, 0x7F7FFFFF, 0x00008000], np.uint32)
    x = np.concatenate([x, ties.view(np.float32), [0.0, -0.0, np.inf, -np.inf]]).astype(np.float32)
    want = torch.from_numpy(x).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    np.testing.assert_array_equal(bfloat16_bits(x), want)


def test_bfloat16_output_rounds_ties_to_even() -> None:
    """2x upscaling yields exact float32 values like k + 0.5, ties for bfloat16 above 128."""
    rng = np.random.default_rng(12)
    batch = make_batch(rng, [(4, 6), (4, 6)])
    batch.buf[:] = rng.integers(128, 256, batch.buf.size, dtype=np.uint8)
    crop = crops([0, 0], [0, 0], [4, 4], [6, 6], [False, True])
    exact = crop_resize_normalize_reference(
        batch.buf, batch.offsets, batch.heights, batch.widths, crop, (8, 12), dtype="float32"
    )
    ties = (exact.view(np.uint32) & 0xFFFF) == 0x8000
    assert ties.sum() > 10
    want = bfloat16_bits(exact)
    assert (want[ties] & 1 == 0).all()  # ties went to the even neighbour
    np.testing.assert_array_equal(run(batch, crop, (8, 12), "bfloat16"), want)


def test_accepts_draw_crops_and_device_metadata() -> None:
    """CropParams from mmload.augment (int64/bool), and metadata already on the device."""
    rng = np.random.default_rng(9)
    batch = make_batch(rng, [(9, 7), (6, 12), (10, 10)])
    cfg = ImageConfig(size=(4, 5), dtype="float16")
    crop = draw_crops(
        batch.heights, batch.widths, cfg, seed=1, epoch=0, ids=np.arange(3, dtype=np.int64)
    )
    want = crop_resize_normalize_reference(
        batch.buf,
        batch.offsets,
        batch.heights,
        batch.widths,
        crop,
        cfg.size,
        dtype="float16",
        mean=cfg.mean,
        std=cfg.std,
    )
    got = run(batch, crop, cfg.size, "float16", mean=cfg.mean, std=cfg.std)
    assert_close(got, want, "float16")
    dev = SimpleNamespace(
        **{f: cuda.to_device(getattr(crop, f).astype(np.int32)) for f in ("y0", "x0", "h", "w")},
        flip=cuda.to_device(crop.flip.astype(np.uint8)),
    )
    out = cuda.device_array((3, 3, 4, 5), np.float16)
    crop_resize_normalize(
        cuda.to_device(batch.buf),
        cuda.to_device(batch.offsets),
        cuda.to_device(batch.heights),
        cuda.to_device(batch.widths),
        dev,
        out,
        dtype="float16",
        mean=cfg.mean,
        std=cfg.std,
    )
    assert_close(out.copy_to_host(), want, "float16")


def test_empty_batch_is_a_no_op() -> None:
    out = cuda.device_array((0, 3, 4, 5), np.float32)
    empty = np.zeros(0, np.int64)
    crop_resize_normalize(
        cuda.to_device(np.zeros(3, np.uint8)),
        empty,
        empty,
        empty,
        CropParams(empty, empty, empty, empty, empty.astype(bool)),
        out,
        dtype="float32",
    )
    assert out.copy_to_host().shape == (0, 3, 4, 5)


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"dtype": "float64"}, "dtype"),
        ({"out": np.zeros((2, 3, 4, 5), np.float16)}, "out: dtype"),
        ({"out": np.zeros((2, 4, 4, 5), np.float32)}, "out: shape"),
        ({"out": np.zeros((2, 3, 5, 4), np.float32).transpose(0, 1, 3, 2)}, "out: must be C"),
        ({"images": np.zeros(400, np.int16)}, "images: dtype"),
        ({"mean": (1.0, 2.0, 3.0)}, "mean and std"),
        ({"mean": (1.0, 2.0), "std": (1.0, 1.0)}, "mean"),
        ({"mean": (1.0, 2.0, 3.0), "std": (1.0, 0.0, 1.0)}, "std"),
        ({"offsets": np.array([0, 390])}, "offsets"),
        ({"heights": np.array([4, 0])}, "heights"),
        ({"widths": np.array([5, 5, 5])}, "widths: shape"),
        ({"crop": crops([0, 2], [0, 0], [4, 3], [5, 5], [False, False])}, "crop.y0/crop.h"),
        ({"crop": crops([0, 0], [0, 1], [4, 4], [5, 5], [False, False])}, "crop.x0/crop.w"),
        ({"crop": crops([0, 0], [0, 0], [0, 4], [5, 5], [False, False])}, "crop.h"),
        ({"crop": crops([0, -1], [0, 0], [4, 4], [5, 5], [False, False])}, "crop.y0"),
        ({"crop": SimpleNamespace(y0=[0, 0], x0=[0, 0], h=[4, 4], w=[5, 5])}, "flip"),
        ({"heights": [4.0, 4.0]}, "heights: dtype"),
    ],
)
def test_launcher_rejects_bad_arguments(change: dict[str, object], match: str) -> None:
    # Wrong dtype/shape/layout is reported before a host array would be refused on a GPU.
    args: dict[str, object] = {
        "images": cuda.to_device(np.zeros(400, np.uint8)),
        "offsets": np.array([0, 60]),
        "heights": np.array([4, 4]),
        "widths": np.array([5, 5]),
        "crop": crops([0, 0], [0, 0], [4, 4], [5, 5], [False, True]),
        "out": cuda.device_array((2, 3, 4, 5), np.float32),
        "dtype": "float32",
        "mean": None,
        "std": None,
    }
    args.update(change)
    with pytest.raises(ValueError, match=match):
        crop_resize_normalize(**args)


def test_uint8_output_refuses_normalization() -> None:
    with pytest.raises(ValueError, match="uint8"):
        crop_resize_normalize(
            cuda.to_device(np.zeros(60, np.uint8)),
            np.array([0]),
            np.array([4]),
            np.array([5]),
            crops([0], [0], [4], [5], [False]),
            cuda.device_array((1, 3, 4, 5), np.uint8),
            dtype="uint8",
            mean=IMAGENET_MEAN,
            std=IMAGENET_STD,
        )


def test_tall_outputs_cover_every_row() -> None:
    """Each thread writes 4 rows a block height apart: outputs taller than one block's 32 rows,
    with a partial last block, match the reference on every row (a skipped or repeated row
    would keep the sentinel or differ)."""
    rng = np.random.default_rng(11)
    batch = make_batch(rng, [(50, 9), (17, 11)])
    crop = random_crops(rng, batch)
    out_hw = (45, 5)
    got = run(batch, crop, out_hw, "float32")
    want = crop_resize_normalize_reference(
        batch.buf, batch.offsets, batch.heights, batch.widths, crop, out_hw, dtype="float32"
    )
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-4)


def test_host_and_device_metadata_give_the_same_bits(monkeypatch: pytest.MonkeyPatch) -> None:
    """Host metadata takes the host-computed constants and one launch; device metadata the
    params kernel and two launches. Both must write identical outputs."""
    import mmload.kernels.crop_resize_normalize as crn

    launched: list[str] = []
    real = crn._compiled

    def counting(name: str) -> object:
        launched.append(name)
        return real(name)

    monkeypatch.setattr(crn, "_compiled", counting)
    rng = np.random.default_rng(5)
    batch = make_batch(rng, [(9, 13), (7, 7), (12, 5), (6, 11)])
    crop = random_crops(rng, batch)
    out_hw = (6, 7)
    host = run(batch, crop, out_hw, "float32", mean=IMAGENET_MEAN, std=IMAGENET_STD)
    assert launched == ["crop_resize_normalize[float32]"]
    launched.clear()
    dev = SimpleNamespace(
        **{f: cuda.to_device(getattr(crop, f).astype(np.int32)) for f in ("y0", "x0", "h", "w")},
        flip=cuda.to_device(crop.flip.astype(np.uint8)),
    )
    out = cuda.device_array((4, 3, *out_hw), np.float32)
    crop_resize_normalize(
        cuda.to_device(batch.buf),
        cuda.to_device(batch.offsets),
        batch.heights,
        cuda.to_device(batch.widths),
        dev,
        out,
        dtype="float32",
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
    )
    assert launched == ["crop_resize_normalize.params", "crop_resize_normalize[float32]"]
    np.testing.assert_array_equal(out.copy_to_host(), host)
