"""The launchers on torch CUDA tensors (``__cuda_array_interface__``, bfloat16, torch's stream).

GPU only: these skip themselves without a GPU (the simulator has no torch CUDA tensors).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from mmload.augment import CropParams
from mmload.config import IMAGENET_MEAN, IMAGENET_STD
from mmload.kernels.crop_resize_normalize import (
    crop_resize_normalize,
    crop_resize_normalize_reference,
)
from mmload.kernels.logmel import LogMelSpec, logmel, logmel_reference, logmel_tables
from mmload.kernels.mixup import cutmix, cutmix_reference, mixup, mixup_reference
from mmload.kernels.pack_tokens import pack_tokens, pack_tokens_reference, plan_packing

pytestmark = pytest.mark.gpu


def torch_stream() -> Any:
    from numba import cuda

    return cuda.external_stream(torch.cuda.current_stream().cuda_stream)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_crop_resize_normalize_on_torch_tensors(dtype: torch.dtype) -> None:
    rng = np.random.default_rng(0)
    heights, widths = np.array([37, 50], np.int32), np.array([41, 29], np.int32)
    offsets = np.array([0, 37 * 41 * 3 + 10], np.int64)
    buf = rng.integers(0, 256, int(offsets[1]) + 50 * 29 * 3, dtype=np.uint8)
    crop = CropParams(
        np.array([3, 0]), np.array([0, 5]), np.array([30, 50]), np.array([41, 20]),
        np.array([True, False]),
    )  # fmt: skip
    name = str(dtype).removeprefix("torch.")
    out = torch.empty((2, 3, 24, 24), dtype=dtype, device="cuda")
    crop_resize_normalize(
        torch.from_numpy(buf).cuda(),
        offsets,
        heights,
        widths,
        crop,
        out,
        dtype=name,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        stream=torch_stream(),
    )
    torch.cuda.synchronize()
    want = crop_resize_normalize_reference(
        buf, offsets, heights, widths, crop, (24, 24), dtype="float32",
        mean=IMAGENET_MEAN, std=IMAGENET_STD,
    )  # fmt: skip
    tol = {torch.float16: 2e-3, torch.bfloat16: 1e-2, torch.float32: 1e-5}[dtype]
    np.testing.assert_allclose(out.float().cpu().numpy(), want, rtol=tol, atol=tol)


def test_mixup_cutmix_logmel_pack_on_torch_tensors() -> None:
    rng = np.random.default_rng(1)
    x = rng.standard_normal((4, 3, 8, 8)).astype(np.float32)
    perm, lam = np.array([1, 2, 3, 0]), rng.random(4).astype(np.float32)
    boxes = np.array([[0, 0, 4, 4], [2, 2, 8, 8], [0, 0, 0, 0], [1, 3, 5, 6]])
    xt, out = torch.from_numpy(x).cuda(), torch.empty((4, 3, 8, 8), device="cuda")
    mixup(xt, perm, lam, out, stream=torch_stream())
    np.testing.assert_allclose(out.cpu().numpy(), mixup_reference(x, perm, lam), atol=1e-5)
    cutmix(xt, perm, boxes, out, stream=torch_stream())
    np.testing.assert_array_equal(out.cpu().numpy(), cutmix_reference(x, perm, boxes))

    spec = LogMelSpec(n_fft=400, hop_length=160, n_mels=80)
    wave = rng.standard_normal((2, 16000)).astype(np.float32)
    mel = torch.empty(spec.output_shape(2, 16000), device="cuda")
    logmel(torch.from_numpy(wave).cuda(), mel, spec, tables=logmel_tables(spec))
    np.testing.assert_allclose(mel.cpu().numpy(), logmel_reference(wave, spec), atol=1e-3)

    lengths = rng.integers(0, 40, 30)
    offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    tokens = rng.integers(1, 1000, int(lengths.sum()) + 1)
    plan = plan_packing(lengths, 32)
    outs = [torch.empty((plan.n_rows, 32), dtype=torch.int64, device="cuda") for _ in range(4)]
    pack_tokens(torch.from_numpy(tokens).cuda(), offsets, plan, *outs, stream=torch_stream())
    want = pack_tokens_reference(tokens, offsets, plan)
    for got, name in zip(outs, want, strict=True):
        np.testing.assert_array_equal(got.cpu().numpy(), want[name], err_msg=name)
    # Offsets as a torch CUDA tensor (issue 9, defect 1): read on the device, never np.asarray'd.
    for o in outs:
        o.fill_(-1)
    offsets_t = torch.from_numpy(offsets.astype(np.int64)).cuda()
    pack_tokens(torch.from_numpy(tokens).cuda(), offsets_t, plan, *outs, stream=torch_stream())
    for got, name in zip(outs, want, strict=True):
        np.testing.assert_array_equal(got.cpu().numpy(), want[name], err_msg=f"{name} (device)")


def test_repeated_launches_reuse_device_buffers() -> None:
    """Issue 9, defect 4 on a GPU: after a first launch, numba allocates nothing per call."""
    from numba import cuda

    from mmload.kernels import _device

    rng = np.random.default_rng(2)
    x = torch.from_numpy(rng.standard_normal((4, 3, 8, 8)).astype(np.float32)).cuda()
    out = torch.empty_like(x)
    perm, lam = np.array([1, 2, 3, 0]), rng.random(4).astype(np.float32)
    for _ in range(_device._SLOTS):
        mixup(x, perm, lam, out, stream=torch_stream())
    allocated = cuda.current_context().get_memory_info()
    arenas = {k: (id(a.params), id(a.scratch)) for k, a in _device._ARENAS.items()}
    for _ in range(10):
        mixup(x, perm, lam, out, stream=torch_stream())
    torch.cuda.synchronize()
    assert {k: (id(a.params), id(a.scratch)) for k, a in _device._ARENAS.items()} == arenas
    assert cuda.current_context().get_memory_info().free >= allocated.free - (1 << 20)
    want = mixup_reference(x.cpu().numpy(), perm, lam)
    np.testing.assert_allclose(out.cpu().numpy(), want, atol=1e-5)
