"""CPU scaling of a multimodal pipeline: mmload workers=0 vs workers=N vs DataLoader + webdataset.

The pipeline (all on the CPU, the work a GPU host's CPU side does before the copy): per sample
a real-photo JPEG (PIL decode, RandomResizedCrop to ``--size``, flip, ImageNet normalisation to
float16 NCHW), a WAV clip of ``--seconds`` (decode, crop/pad, log-mel: 400-point STFT, hop 160,
80 mels) and a caption (UTF-8 byte tokens padded to 64), plus its label; batches of ``--batch``.

Rows, each pipeline in turn: built, one warm-up epoch (worker start-up excluded: mmload's pool
and DataLoader's workers are persistent), ``--rounds`` timed epochs back to back, closed:

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
from harness import Report

from mmload.bench import run_bench

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


def mmload_loader(paths: list[str], args: argparse.Namespace, workers: Any, cache: Path) -> Any:
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


def baseline_loader(paths: list[str], args: argparse.Namespace) -> Any:
    import soundfile as sf
    import torch

    from mmload.bench import pil_transform, webdataset_loader
    from mmload.kernels.logmel import mel_filterbank

    fb = torch.from_numpy(mel_filterbank(RATE, N_FFT, N_MELS, 0.0, RATE / 2))
    window = torch.hann_window(N_FFT, periodic=True)
    length = round(args.seconds * RATE)
    size = args.size

    def transform(sample: dict[str, Any]) -> tuple[Any, ...]:
        rng = random.Random()
        img = pil_transform(sample["jpg"], size)
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

    return webdataset_loader(paths, args.batch, args.workers, transform, shuffle=256)


def builders(paths: list[str], args: argparse.Namespace, cache: Path) -> dict[str, Any]:
    """name -> build(): (one epoch -> samples, close), as ``mmload.bench.run_bench`` takes."""

    def mm(workers: int) -> Any:
        def build() -> tuple[Any, Any]:
            ld = mmload_loader(paths, args, workers, cache)
            return (lambda: sum(len(b["__key__"]) for b in ld)), ld.close

        return build

    def base() -> tuple[Any, Any]:
        dl = baseline_loader(paths, args)
        return (lambda: sum(len(b[3]) for b in dl)), None

    return {
        "mmload workers=0": mm(0),
        f"mmload workers={args.workers}": mm(args.workers),
        f"baseline: DataLoader(num_workers={args.workers}) + webdataset": base,
    }


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
        # Each pipeline in turn: built, one warm-up epoch, ``rounds`` timed epochs back to
        # back, closed (interleaving would let mmload's workers run ahead while another
        # pipeline is timed).
        rows = run_bench(builders(paths, args, root / "c"), epochs=args.rounds + 1)
    rates = {r.name: r.rates for r in rows}
    cores = {r.name: r.cores for r in rows}
    for r in rows:
        print(f"{r.name}: " + ", ".join(f"{x:,.0f}" for x in r.rates) + " samples/s")
    med = {name: statistics.median(v) for name, v in rates.items()}
    names = list(rates)
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
