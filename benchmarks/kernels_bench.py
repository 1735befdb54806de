"""GPU benchmark of the fused crop + resize + flip + normalize kernel (mmload.kernels).

Workload (the DESIGN.md anchor): ``--batch`` uint8 RGB images of ``--height x --width`` packed
in one device buffer -> ``--size x --size`` float16 NCHW, whole image resized ("resize" crop),
every other image flipped, ImageNet normalization. Measured with CUDA events on torch's current
stream after a warm-up, averaged over ``--iters`` back-to-back launches:

* the fused Numba kernel: img/s and effective GB/s = (input bytes + output bytes) / time;
* the baseline: a device-to-device ``torch.Tensor.copy_`` moving the same number of bytes
  (read + written), its GB/s, and the ratio fused / copy (target >= 0.5);
* the usual fallback: torch ``F.interpolate`` + flip + normalize, one image at a time.

It also checks a few images against the NumPy reference. Log-mel (``--mel-batch`` clips of
``--mel-seconds`` at 16 kHz, n_fft 400, hop 160, 80 mels), same stream and timing:

* mmload's decode path (``mmload.decode.spectrogram``): ``torch.stft`` (cuFFT) + the
  ``logmel.mel`` kernel (sparse filterbank bands, log fused);
* the direct-DFT ``logmel`` kernel (``O(n_fft)`` per bin, what the decode path used before);
* the baseline: ``torch.stft`` + dense filterbank ``matmul`` + ``log`` (torchaudio's recipe);

with the largest difference between the three outputs. Without a GPU, or with ``--dry-run``, it
prints what it would run and exits 0.

    python benchmarks/kernels_bench.py [--batch 256] [--iters 50] [--json out.json]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import Report

TARGET_RATIO = 0.5


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--height", type=int, default=375)
    p.add_argument("--width", type=int, default=500)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--iters", type=int, default=50, help="timed launches of the fused kernel")
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--fallback-iters", type=int, default=3, help="timed F.interpolate batches")
    p.add_argument("--mel-batch", type=int, default=256)
    p.add_argument("--mel-seconds", type=float, default=10.0)
    p.add_argument("--mel-iters", type=int, default=5)
    p.add_argument("--json", default=None, help="also save the report as JSON here")
    p.add_argument("--dry-run", action="store_true", help="print the plan, measure nothing")
    return p.parse_args(argv)


def config_of(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "batch": args.batch,
        "input": f"{args.height}x{args.width}x3 uint8 HWC, packed",
        "output": f"[{args.batch}, 3, {args.size}, {args.size}] float16 NCHW",
        "crop": "whole image, every other image flipped, ImageNet mean/std",
        "iters": args.iters,
        "warmup": args.warmup,
        "log-mel": f"{args.mel_batch} x {args.mel_seconds:g} s at 16 kHz, n_fft 400, hop 160, "
        f"80 mels, {args.mel_iters} iters",
    }


def gpu_unavailable_reason() -> str | None:
    if os.environ.get("NUMBA_ENABLE_CUDASIM") == "1":
        return "NUMBA_ENABLE_CUDASIM=1 (the simulator runs threads in Python)"
    import torch

    if not torch.cuda.is_available():
        return "torch sees no CUDA GPU"
    return None


def event_ms(fn: Any, iters: int, warmup: int) -> tuple[float, float]:
    """(GPU ms per call from CUDA events, host ms per call to enqueue) after ``warmup`` calls."""
    import torch

    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    start = torch.cuda.Event(enable_timing=True)
    end = torch.cuda.Event(enable_timing=True)
    start.record()
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    host = (time.perf_counter() - t0) * 1e3 / iters
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / iters, host


def run(args: argparse.Namespace) -> Report:
    import numba
    import torch
    import torch.nn.functional as F
    from numba import cuda

    from mmload.augment import CropParams
    from mmload.config import IMAGENET_MEAN, IMAGENET_STD
    from mmload.kernels.crop_resize_normalize import (
        crop_resize_normalize,
        crop_resize_normalize_reference,
    )

    b, h, w, s = args.batch, args.height, args.width, args.size
    dev = torch.device("cuda")
    gen = torch.Generator(device=dev).manual_seed(0)
    in_bytes = b * h * w * 3
    out_bytes = b * 3 * s * s * 2
    images = torch.randint(0, 256, (in_bytes,), dtype=torch.uint8, device=dev, generator=gen)
    out = torch.empty((b, 3, s, s), dtype=torch.float16, device=dev)
    offsets = np.arange(b, dtype=np.int64) * (h * w * 3)
    heights, widths = np.full(b, h, np.int32), np.full(b, w, np.int32)
    flip = (np.arange(b) % 2).astype(bool)
    crop = CropParams(np.zeros(b, np.int64), np.zeros(b, np.int64), heights, widths, flip)

    stream = cuda.external_stream(torch.cuda.current_stream().cuda_stream)
    # Everything on the device once, as a loader would hold it; the launcher then only checks.
    d_images, d_out = cuda.as_cuda_array(images), cuda.as_cuda_array(out)
    d_meta = [cuda.to_device(a) for a in (offsets, heights, widths)]
    y0, x0, ch, cw = (
        cuda.to_device(a.astype(np.int32)) for a in (crop.y0, crop.x0, crop.h, crop.w)
    )
    d_crop = CropParams(y0, x0, ch, cw, cuda.to_device(flip.astype(np.uint8)))

    def fused() -> None:
        crop_resize_normalize(
            d_images, *d_meta, d_crop, d_out, dtype="float16",
            mean=IMAGENET_MEAN, std=IMAGENET_STD, stream=stream,
        )  # fmt: skip

    t_compile = time.perf_counter()
    fused()
    torch.cuda.synchronize()
    t_compile = time.perf_counter() - t_compile

    check = min(b, 4)
    host_imgs = images[: check * h * w * 3].cpu().numpy()
    want = crop_resize_normalize_reference(
        host_imgs, offsets[:check], heights[:check], widths[:check], crop.take(np.arange(check)),
        (s, s), dtype="float32", mean=IMAGENET_MEAN, std=IMAGENET_STD,
    )  # fmt: skip
    max_err = float(np.abs(out[:check].float().cpu().numpy() - want).max())

    fused_ms, fused_host_ms = event_ms(fused, args.iters, args.warmup)

    n_copy = (in_bytes + out_bytes) // 2  # read n + write n = the fused kernel's traffic
    src = torch.empty(n_copy, dtype=torch.uint8, device=dev)
    dst = torch.empty_like(src)
    copy_ms, _ = event_ms(lambda: dst.copy_(src), args.iters, args.warmup)

    mean = torch.tensor(IMAGENET_MEAN, device=dev).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=dev).view(1, 3, 1, 1)
    views = [images[i * h * w * 3 : (i + 1) * h * w * 3].view(h, w, 3) for i in range(b)]

    def fallback() -> None:
        for i, img in enumerate(views):
            x = img.permute(2, 0, 1)[None].float()
            y = F.interpolate(x, size=(s, s), mode="bilinear", align_corners=False, antialias=False)
            if flip[i]:
                y = y.flip(-1)
            out[i] = ((y - mean) / std)[0].half()

    interp_ms, _ = event_ms(fallback, args.fallback_iters, 1)

    fused_gbs = (in_bytes + out_bytes) / fused_ms / 1e6
    copy_gbs = 2 * n_copy / copy_ms / 1e6
    ratio = fused_gbs / copy_gbs
    cfg = config_of(args) | {
        "gpu": torch.cuda.get_device_name(),
        "capability": ".".join(map(str, torch.cuda.get_device_capability())),
        "cuda (torch)": torch.version.cuda,
        "torch": torch.__version__,
        "numba": numba.__version__,
        "numba-cuda": _version("numba_cuda"),
    }
    rep = Report("fused crop/resize/flip/normalize kernel", cfg)
    rep.add(op="fused Numba kernel", img_s=b / fused_ms * 1e3, GB_s=fused_gbs, ms=fused_ms,
            vs_copy=ratio)  # fmt: skip
    rep.add(op="D2D copy_ (same bytes)", img_s=None, GB_s=copy_gbs, ms=copy_ms, vs_copy=1.0)
    rep.add(op="F.interpolate per image", img_s=b / interp_ms * 1e3, GB_s=None, ms=interp_ms,
            vs_copy=None)  # fmt: skip
    verdict = "met" if ratio >= TARGET_RATIO else "NOT met"
    rep.notes += [
        f"fused / copy bandwidth = {ratio:.2f} (target >= {TARGET_RATIO}: {verdict})",
        f"fused vs F.interpolate per image: {interp_ms / fused_ms:.1f}x",
        f"host enqueue per fused launch: {fused_host_ms * 1e3:.0f} us "
        f"(GPU time {fused_ms * 1e3:.0f} us; launch-bound if close)",
        f"first launch incl. JIT compile: {t_compile:.2f} s",
        f"max |fused - NumPy reference| over {check} images (fp16 output): {max_err:.4f}",
        f"bytes per batch: read {in_bytes / 1e6:.1f} MB + written {out_bytes / 1e6:.1f} MB",
    ]
    logmel_rows(args, rep, stream)
    return rep


def logmel_rows(args: argparse.Namespace, rep: Report, stream: Any) -> None:
    """Add the three log-mel rows (ms per batch, clips/s, speed-up over the baseline)."""
    import torch

    from mmload.decode.spectrogram import MelSpectrogram
    from mmload.kernels.logmel import LogMelSpec, logmel, logmel_tables, mel_filterbank

    dev = torch.device("cuda")
    spec = LogMelSpec()
    b, t = args.mel_batch, round(args.mel_seconds * spec.sample_rate)
    gen = torch.Generator(device=dev).manual_seed(1)
    x = torch.randn((b, t), device=dev, generator=gen)
    mel = MelSpectrogram(spec, dev)
    tables = logmel_tables(spec)
    out_dft = torch.empty(spec.output_shape(b, t), device=dev)
    window = torch.hann_window(spec.n_fft, periodic=True, device=dev)
    fb = torch.from_numpy(
        mel_filterbank(spec.sample_rate, spec.n_fft, spec.n_mels, spec.f_min, spec.f_max_hz)
    ).to(dev)

    def baseline() -> torch.Tensor:
        z = torch.stft(x, spec.n_fft, spec.hop_length, window=window, return_complex=True)
        return torch.log(fb @ z.abs().square() + spec.eps)

    def dft() -> None:
        logmel(x, out_dft, spec, tables=tables, stream=stream)

    got = mel(x)
    dft()
    want = baseline()
    torch.cuda.synchronize()
    err_fft = float((got - want).abs().max())
    err_dft = float((out_dft - want).abs().max())
    base_ms, _ = event_ms(baseline, args.mel_iters, 2)
    ours_ms, ours_host = event_ms(lambda: mel(x), args.mel_iters, 2)
    dft_ms, _ = event_ms(dft, max(1, args.mel_iters // 2), 1)
    for op, ms in (
        ("log-mel: stft + mel kernel (mmload)", ours_ms),
        ("log-mel: direct-DFT kernel", dft_ms),
        ("log-mel: stft + matmul (baseline)", base_ms),
    ):
        rep.add(op=op, img_s=b / ms * 1e3, GB_s=None, ms=ms, vs_copy=None, vs_base=base_ms / ms)
    rep.notes += [
        f"log-mel: mmload {ours_ms:.2f} ms vs baseline {base_ms:.2f} ms per batch "
        f"({base_ms / ours_ms:.2f}x); direct DFT {dft_ms:.2f} ms ({dft_ms / ours_ms:.0f}x slower "
        f"than mmload); host enqueue {ours_host * 1e3:.0f} us",
        f"log-mel max |diff| vs baseline (log scale): stft + mel kernel {err_fft:.2e}, "
        f"direct DFT {err_dft:.2e}",
    ]


def _version(module: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(module.replace("_", "-"))
    except PackageNotFoundError:
        return None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.dry_run:
        print("kernels_bench: dry run, nothing measured. Would run:", config_of(args))
        return 0
    reason = gpu_unavailable_reason()
    if reason is not None:
        print(f"kernels_bench: no GPU to measure on ({reason}); nothing measured, exiting 0.")
        return 0
    rep = run(args)
    rep.print(["op", "img_s", "GB_s", "ms", "vs_copy", "vs_base"])
    rep.save(args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
