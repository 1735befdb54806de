"""The decode path's log-mel: torch.stft power spectrum, then the mel stage (matmul on the CPU,
the ``logmel.mel`` kernel on CUDA, run here under the simulator), against the float64 NumPy
reference ``logmel_reference`` (an independent rfft of explicitly padded frames)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mmload.decode.spectrogram import MelSpectrogram, power_spectrum
from mmload.kernels.logmel import LogMelSpec, logmel_reference, logmel_tables, mel_from_power

SPECS = [
    LogMelSpec(sample_rate=8000, n_fft=32, hop_length=8, n_mels=6),
    LogMelSpec(sample_rate=16000, n_fft=40, hop_length=10, win_length=25, n_mels=8, f_min=100.0),
    LogMelSpec(),  # the AudioConfig default: 400-point FFT, hop 160, 80 mels
]
IDS = ["n_fft32", "win25_of_40", "default"]


def signal(seed: int, batch: int, samples: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(samples) / 8000.0
    tone = np.sin(2 * np.pi * rng.uniform(200, 3000, (batch, 1)) * t)
    return (tone + 0.1 * rng.standard_normal((batch, samples))).astype(np.float32)


def lengths(spec: LogMelSpec) -> list[int]:
    half = spec.n_fft // 2
    # Longer than n_fft, between n_fft // 2 and n_fft, exactly n_fft // 2 (torch.stft refuses
    # reflect padding there), far shorter, one sample.
    return [3 * spec.n_fft + 7, half + 3, half, 5, 1]


@pytest.mark.parametrize("spec", SPECS, ids=IDS)
def test_cpu_transform_matches_reference(spec: LogMelSpec) -> None:
    mel = MelSpectrogram(spec, torch.device("cpu"))
    for n in lengths(spec):
        x = signal(n, 3, n)
        got = mel(torch.from_numpy(x))
        want = logmel_reference(x, spec)
        assert got.dtype == torch.float32 and tuple(got.shape) == want.shape, n
        # float32 FFT vs float64: measured max |diff| 1.2e-4 (log scale) for these inputs
        np.testing.assert_allclose(got.numpy(), want, rtol=0, atol=2e-3, err_msg=f"T={n}")


@pytest.mark.parametrize("spec", SPECS[:2], ids=IDS[:2])
def test_gpu_composition_matches_reference(spec: LogMelSpec) -> None:
    """What ``MelSpectrogram`` does on CUDA, with the kernel under the simulator: the torch
    power spectrum handed to ``mel_from_power``."""
    window = torch.hann_window(spec.window_length, periodic=True)
    tables = logmel_tables(spec)
    for n in lengths(spec):
        x = signal(n + 1, 2, n)
        power = power_spectrum(torch.from_numpy(x), spec, window).contiguous()
        out = np.empty(spec.output_shape(2, n), np.float32)
        mel_from_power(power.numpy(), out, spec, tables=tables)
        np.testing.assert_allclose(out, logmel_reference(x, spec), rtol=0, atol=2e-3)


def test_power_spectrum_of_a_pure_tone_peaks_at_its_bin() -> None:
    """An oracle without the reference: a bin-centred cosine puts its power in that bin."""
    spec = LogMelSpec(sample_rate=8000, n_fft=64, hop_length=16, n_mels=4)
    k = 5
    t = np.arange(640)
    x = torch.from_numpy(np.cos(2 * np.pi * k * t / spec.n_fft).astype(np.float32))[None]
    power = power_spectrum(x, spec, torch.hann_window(64, periodic=True))
    assert tuple(power.shape) == (1, 33, 1 + 640 // 16)
    inner = power[0, :, 4:-4]  # frames away from the reflected edges
    assert (inner.argmax(dim=0) == k).all()
    # Hann window: the tone's amplitude sum(w)/2 = 16 in bin k, (16/2)^2 in each neighbour
    np.testing.assert_allclose(inner[k].numpy(), 16.0**2, rtol=1e-4)
    np.testing.assert_allclose(inner[k + 1].numpy(), 8.0**2, rtol=1e-3)


def test_rejects_bad_input() -> None:
    mel = MelSpectrogram(SPECS[0], torch.device("cpu"))
    with pytest.raises(ValueError, match="float32"):
        mel(torch.zeros(2, 40, dtype=torch.float64))
    with pytest.raises(ValueError, match="T >= 1"):
        mel(torch.zeros(2, 0))
