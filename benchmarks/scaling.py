"""CPU scaling of a multimodal pipeline: mmload workers=0 vs workers=N vs DataLoader + webdataset.

The pipeline (all on the CPU, the work a GPU host's CPU side does before the copy): per sample
a real-photo JPEG (PIL decode, RandomResizedCrop to ``--size``, flip, ImageNet normalisation to
float16 NCHW), a WAV clip of ``--seconds`` (decode, crop/pad, log-mel: 400-point STFT, hop 160,
80 mels) and a caption (UTF-8 byte tokens padded to 64), plus its label; batches of ``--batch``.

Rows, each one epoch per round, in turn, after a warm-up round (worker start-up excluded: mmload's
pool and DataLoader's workers are persistent):

* mmload ``Loader(workers=0)``: read and decode threads in this process;
* mmload ``Loader(workers=N)``: N spawned processes read and decode;
* baseline: ``torch.utils.data.DataLoader(num_workers=N)`` over a ``webdataset`` pipeline doing the
  same decode work (PIL, soundfile, torch.stft + filterbank matmul, the same tokens).

Prints median samples/s per row and the ratios workers=N / workers=0 and mmload / baseline.

    python benchmarks/scaling.py [--samples 1024] [--workers 2] [--rounds 3]
"""

from __future__ import annotations

import argparse
import io
import math
import random
import statistics
import sys
import tempfile
import time
import wave
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import Report, tree_cpu_seconds

MEAN = np.array([0.485, 0.456, 0.406], np.float32) * 255
STD = np.array([0.229, 0.224, 0.225], np.float32) * 255
RATE, N_FFT, HOP, N_MELS, TOKENS = 16000, 400, 160, 80, 64


def make_wav(rng: np.random.Generator, seconds: float) -> bytes:
    t = np.arange(round(seconds * RATE)) / RATE
    x = 0.3 * np.sin(2 * np.pi * rng.uniform(100, 2000) * t) + 0.05 * rng.standard_normal(t.size)
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(RATE)
        w.writeframes((x * 32767).astype("<i2").tobytes())
    return buf.getvalue()


def make_data(root: Path, n: int, seconds: float) -> list[str]:
    from mmload.demo import load_photos, make_jpeg
    from mmload.sources.write import write_tar_shards

    photos = load_photos()
    rng = np.random.default_rng(0)

    def samples() -> Iterator[dict[str, Any]]:
        for i in range(n):
            label = i % len(photos)
            name, photo = photos[label]
            yield {
                "__key__": f"s{i:06d}",
                "jpg": make_jpeg(photo, rng, (320, 240)),
                # clips of 0.5 .. 1.5 x the target length: crops and pads both happen
                "wav": make_wav(rng, seconds * rng.uniform(0.5, 1.5)),
                "txt": f"a photo of a {name}, sample number {i}, with a short caption",
                "cls": label,
            }

    return write_tar_shards(samples(), str(root / "scale-%04d.tar"), maxcount=64)


def mmload_loader(paths: list[str], args: argparse.Namespace, workers: int, cache: Path) -> Any:
    import mmload

    return mmload.Loader(
        paths,
        batch_size=args.batch,
        shuffle=True,
        seed=0,
        workers=workers,
        image=mmload.ImageConfig(size=args.size, backend=args.image_backend),
        audio=mmload.AudioConfig(seconds=args.seconds, mel=True, n_mels=N_MELS),
        text=mmload.TextConfig(fields=("txt",), max_length=TOKENS),
        cache_dir=cache,
    )


def _rrc(width: int, height: int, rng: random.Random) -> tuple[int, int, int, int]:
    area = width * height
    for _ in range(10):
        target = area * rng.uniform(0.08, 1.0)
        ar = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
        w = round(math.sqrt(target * ar))
        h = round(math.sqrt(target / ar))
        if 0 < w <= width and 0 < h <= height:
            return rng.randint(0, height - h), rng.randint(0, width - w), h, w
    return 0, 0, height, width


def baseline_loader(paths: list[str], args: argparse.Namespace) -> Any:
    import soundfile as sf
    import torch
    import webdataset as wds
    from PIL import Image

    from mmload.kernels.logmel import mel_filterbank

    mean = torch.from_numpy(MEAN).view(3, 1, 1)
    std = torch.from_numpy(STD).view(3, 1, 1)
    fb = torch.from_numpy(mel_filterbank(RATE, N_FFT, N_MELS, 0.0, RATE / 2))
    window = torch.hann_window(N_FFT, periodic=True)
    length = round(args.seconds * RATE)
    size = args.size

    def transform(sample: dict[str, Any]) -> tuple[Any, ...]:
        rng = random.Random()
        im = Image.open(io.BytesIO(sample["jpg"])).convert("RGB")
        i, j, h, w = _rrc(im.width, im.height, rng)
        im = im.resize((size, size), Image.Resampling.BILINEAR, box=(j, i, j + w, i + h))
        if rng.random() < 0.5:
            im = im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        img = ((torch.from_numpy(np.array(im)).permute(2, 0, 1).float() - mean) / std).half()
        x, _ = sf.read(io.BytesIO(sample["wav"]), dtype="float32", always_2d=True)
        x = x.mean(axis=1)
        if len(x) > length:
            s = rng.randint(0, len(x) - length)
            x = x[s : s + length]
        wav = torch.from_numpy(np.pad(x, (0, length - len(x))))
        z = torch.stft(wav, N_FFT, HOP, window=window, return_complex=True)
        mel = torch.log(fb @ z.abs().square() + 1e-6)
        ids = list(sample["txt"])[:TOKENS]  # undecoded: the UTF-8 bytes
        tok = torch.tensor(ids + [0] * (TOKENS - len(ids)), dtype=torch.int64)
        return img, mel, tok, int(sample["cls"])

    ds = (
        wds.WebDataset(
            paths,
            shardshuffle=len(paths),
            nodesplitter=wds.split_by_node,
            workersplitter=wds.split_by_worker,
            empty_check=False,
        )
        .shuffle(256)
        .map(transform)
        .batched(args.batch, partial=True)
    )
    return torch.utils.data.DataLoader(
        ds, batch_size=None, num_workers=args.workers, persistent_workers=True
    )


def epoch_rate(loader: Any) -> tuple[float, int, float]:
    """(samples/s, samples, CPU cores busy on average: this process and its workers)."""
    c0, t0 = tree_cpu_seconds(), time.perf_counter()
    n = 0
    for b in loader:
        n += len(b["__key__"]) if isinstance(b, dict) else len(b[3])
    wall = time.perf_counter() - t0
    return n / wall, n, (tree_cpu_seconds() - c0) / wall


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--samples", type=int, default=1024)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--size", type=int, default=160)
    p.add_argument("--seconds", type=float, default=2.0)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument(
        "--image-backend", default="pil", choices=["pil", "dali"], help="mmload's image decoder"
    )
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    import torch

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        t0 = time.perf_counter()
        paths = make_data(root, args.samples, args.seconds)
        print(
            f"data: {args.samples} samples in {len(paths)} shards ({time.perf_counter() - t0:.0f} s)"
        )
        loaders = {
            "mmload workers=0": mmload_loader(paths, args, 0, root / "c"),
            f"mmload workers={args.workers}": mmload_loader(paths, args, args.workers, root / "c"),
            f"baseline: DataLoader(num_workers={args.workers}) + webdataset": baseline_loader(
                paths, args
            ),
        }
        rates: dict[str, list[float]] = {name: [] for name in loaders}
        cores: dict[str, list[float]] = {name: [] for name in loaders}
        for r in range(args.rounds + 1):  # round 0 warms up (starts workers, fills caches)
            for name, ld in loaders.items():
                rate, n, busy = epoch_rate(ld)
                print(
                    f"round {r}: {name}: {rate:,.0f} samples/s ({n} samples), "
                    f"{busy:.2f} cores busy",
                    flush=True,
                )
                if r:
                    rates[name].append(rate)
                    cores[name].append(busy)
        for ld in loaders.values():
            close = getattr(ld, "close", None)
            if close is not None:
                close()
    med = {name: statistics.median(v) for name, v in rates.items()}
    names = list(loaders)
    w0, wn, base = (med[n] for n in names)
    rep = Report(
        "CPU scaling: PIL image + WAV log-mel + tokens",
        {
            "samples": args.samples,
            "batch": args.batch,
            "image": f"320x240 JPEG -> RandomResizedCrop {args.size} + flip + normalize, f16 "
            f"(mmload: {args.image_backend}; baseline: PIL)",
            "audio": f"WAV 16 kHz, {args.seconds:g} s crop/pad, log-mel 400/160/80",
            "text": f"UTF-8 byte tokens, {TOKENS}",
            "rounds": args.rounds,
            "torch threads (main)": torch.get_num_threads(),
        },
    )
    for name in names:
        rep.add(pipeline=name, samples_s=med[name], cpu_cores=statistics.median(cores[name]),
                vs_workers0=med[name] / w0, vs_baseline=med[name] / base)  # fmt: skip
    rep.notes += [
        f"workers={args.workers} / workers=0: {wn / w0:.2f}x (target >= 1.7x)",
        f"mmload workers={args.workers} / baseline: {wn / base:.2f}x (target >= 1.5x)",
    ]
    rep.print(["pipeline", "samples_s", "cpu_cores", "vs_workers0", "vs_baseline"])
    rep.save(args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
