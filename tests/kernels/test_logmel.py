"""Log-mel kernels vs the NumPy reference (simulator or GPU); the reference vs torch.stft."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from numba import cuda

from mmload.kernels.logmel import (
    LogMelSpec,
    logmel,
    logmel_reference,
    logmel_tables,
    mel_filterbank,
)

# Tiny transforms: the simulator runs every GPU thread in Python.
SPECS = [
    LogMelSpec(sample_rate=8000, n_fft=32, hop_length=8, n_mels=6),
    LogMelSpec(sample_rate=16000, n_fft=40, hop_length=10, win_length=25, n_mels=8, f_min=100.0),
]


def signal(rng: np.random.Generator, batch: int, samples: int) -> np.ndarray:
    t = np.arange(samples) / 8000.0
    tone = np.sin(2 * np.pi * rng.uniform(200, 3000, (batch, 1)) * t)
    return (tone + rng.standard_normal((batch, samples))).astype(np.float32)


def run(x: np.ndarray, spec: LogMelSpec, **kwargs: object) -> np.ndarray:
    out = cuda.device_array(spec.output_shape(*x.shape), np.float32)
    logmel(cuda.to_device(x), out, spec, **kwargs)
    return out.copy_to_host()


@pytest.mark.parametrize("spec", SPECS, ids=["n_fft32", "win25_of_40"])
@pytest.mark.parametrize(
    "samples",
    [97, 35, 16, 7, 1],  # longer than n_fft, shorter, n_fft // 2, far shorter, one sample
)
def test_kernel_matches_reference(spec: LogMelSpec, samples: int) -> None:
    rng = np.random.default_rng(samples)
    x = signal(rng, 2, samples)
    got = run(x, spec)
    want = logmel_reference(x, spec)
    assert got.shape == want.shape == (2, spec.n_mels, 1 + samples // spec.hop_length)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-3)


@pytest.mark.parametrize("spec", SPECS, ids=["n_fft32", "win25_of_40"])
@pytest.mark.parametrize("samples", [400, 97, 25])  # 25 < n_fft: still legal for torch.stft
def test_reference_matches_torch_stft(spec: LogMelSpec, samples: int) -> None:
    x = signal(np.random.default_rng(1), 3, samples)
    window = torch.hann_window(spec.window_length, periodic=True, dtype=torch.float64)
    stft = torch.stft(
        torch.from_numpy(x).double(),
        n_fft=spec.n_fft,
        hop_length=spec.hop_length,
        win_length=spec.window_length,
        window=window,
        center=True,
        pad_mode="reflect",
        return_complex=True,
    )
    fb = mel_filterbank(spec.sample_rate, spec.n_fft, spec.n_mels, spec.f_min, spec.f_max_hz)
    mel = torch.from_numpy(fb).double() @ stft.abs() ** 2
    ref = logmel_reference(x, spec)
    np.testing.assert_allclose(np.exp(ref) - spec.eps, mel.numpy(), rtol=1e-3, atol=1e-5)


def test_reflect_padding_of_very_short_audio() -> None:
    """Shorter than n_fft // 2 + 1, which torch.stft rejects: repeated reflection."""
    spec = SPECS[0]
    x = np.array([[1.0, -2.0, 0.5]], np.float32)
    padded = np.pad(x, ((0, 0), (16, 16)), mode="reflect")
    assert padded[0, :6].tolist() == [1.0, -2.0, 0.5, -2.0, 1.0, -2.0]  # period 2 * (T - 1)
    with pytest.raises(RuntimeError):
        torch.stft(
            torch.from_numpy(x),
            n_fft=32,
            hop_length=8,
            window=torch.hann_window(32),
            center=True,
            return_complex=True,
        )
    np.testing.assert_allclose(run(x, spec), logmel_reference(x, spec), atol=1e-3)


def test_mel_filterbank_is_htk_triangles() -> None:
    sr, n_fft, n_mels, f_min, f_max = 16000, 64, 10, 50.0, 7000.0
    fb = mel_filterbank(sr, n_fft, n_mels, f_min, f_max)
    assert fb.shape == (n_mels, n_fft // 2 + 1)
    assert fb.dtype == np.float32
    hz = np.arange(n_fft // 2 + 1) * sr / n_fft

    def mel(f: float) -> float:
        return 2595.0 * np.log10(1.0 + f / 700.0)

    edges = [700.0 * (10 ** (m / 2595.0) - 1) for m in np.linspace(mel(f_min), mel(f_max), 12)]
    for m in range(n_mels):
        lo, mid, hi = edges[m], edges[m + 1], edges[m + 2]
        for k, f in enumerate(hz):
            want = (f - lo) / (mid - lo) if lo <= f <= mid else (hi - f) / (hi - mid)
            assert fb[m, k] == pytest.approx(max(0.0, want) if lo <= f <= hi else 0.0, abs=1e-6)
    assert mel(1000.0) == pytest.approx(1000.0, abs=0.1)  # the HTK scale's anchor


def test_tables_and_workspace_are_reusable() -> None:
    spec = SPECS[1]
    x = signal(np.random.default_rng(3), 2, 50)
    tables = logmel_tables(spec)
    work = cuda.device_array((2, spec.n_freqs, spec.frames(50)), np.float32)
    want = logmel_reference(x, spec)
    for _ in range(2):
        np.testing.assert_allclose(run(x, spec, tables=tables, workspace=work), want, atol=1e-3)


def test_empty_batch_is_a_no_op() -> None:
    spec = SPECS[0]
    assert run(np.zeros((0, 40), np.float32), spec).shape == (0, spec.n_mels, 6)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"n_fft": 1}, "n_fft"),
        ({"hop_length": 0}, "hop_length"),
        ({"n_mels": 2.5}, "n_mels"),
        ({"win_length": 33}, "win_length"),
        ({"f_max": 5000.0}, "f_max"),
        ({"f_min": 4000.0}, "f_max"),
        ({"f_min": -1.0}, "f_min"),
        ({"eps": 0.0}, "eps"),
    ],
)
def test_spec_validation(kwargs: dict[str, object], match: str) -> None:
    base: dict[str, object] = {"sample_rate": 8000, "n_fft": 32, "hop_length": 8, "n_mels": 4}
    with pytest.raises(ValueError, match=match):
        LogMelSpec(**(base | kwargs))


def test_launcher_validation() -> None:
    spec = SPECS[0]
    x = cuda.to_device(np.zeros((2, 40), np.float32))
    out = cuda.device_array(spec.output_shape(2, 40), np.float32)
    with pytest.raises(ValueError, match="out: shape"):
        logmel(x, cuda.device_array((2, spec.n_mels, 5), np.float32), spec)
    with pytest.raises(ValueError, match="waveforms: dtype"):
        logmel(cuda.to_device(np.zeros((2, 40), np.float64)), out, spec)
    with pytest.raises(ValueError, match="waveforms: shape"):
        logmel(cuda.to_device(np.zeros(40, np.float32)), out, spec)
    with pytest.raises(ValueError, match="waveforms: need at least 1"):
        logmel(cuda.to_device(np.zeros((2, 0), np.float32)), out, spec)
    with pytest.raises(ValueError, match="tables"):
        logmel(x, out, spec, tables=logmel_tables(SPECS[1]))
    with pytest.raises(ValueError, match="workspace: shape"):
        logmel(x, out, spec, workspace=cuda.device_array((2, 17, 4), np.float32))
    with pytest.raises(ValueError, match="spec"):
        logmel(x, out, {"n_fft": 32})


def power_of(x: np.ndarray, spec: LogMelSpec) -> np.ndarray:
    """|rfft|^2 of the reflect-padded, windowed frames: float32 [B, n_freqs, frames] (NumPy)."""
    from mmload.kernels.logmel import _window

    pad = spec.n_fft // 2
    padded = np.pad(x.astype(np.float64), ((0, 0), (pad, pad)), mode="reflect")
    starts = np.arange(spec.frames(x.shape[1])) * spec.hop_length
    frames = padded[:, starts[:, None] + np.arange(spec.n_fft)[None, :]] * _window(spec)
    power = np.abs(np.fft.rfft(frames, n=spec.n_fft, axis=-1)) ** 2
    return np.ascontiguousarray(power.transpose(0, 2, 1), dtype=np.float32)


@pytest.mark.parametrize("spec", SPECS, ids=["n_fft32", "win25_of_40"])
def test_mel_from_power_matches_reference(spec: LogMelSpec) -> None:
    from mmload.kernels.logmel import mel_from_power

    x = signal(np.random.default_rng(7), 3, 123)
    power = power_of(x, spec)
    out = cuda.device_array(spec.output_shape(3, 123), np.float32)
    mel_from_power(cuda.to_device(power), out, spec, tables=logmel_tables(spec))
    np.testing.assert_allclose(out.copy_to_host(), logmel_reference(x, spec), rtol=0, atol=1e-3)


def test_mel_from_power_validation() -> None:
    from mmload.kernels.logmel import mel_from_power

    spec = SPECS[0]
    tables = logmel_tables(spec)
    power = cuda.to_device(np.ones((2, spec.n_freqs, 5), np.float32))
    out = cuda.device_array((2, spec.n_mels, 5), np.float32)
    with pytest.raises(ValueError, match="power: shape"):
        mel_from_power(cuda.to_device(np.ones((2, 3, 5), np.float32)), out, spec, tables=tables)
    with pytest.raises(ValueError, match="out: shape"):
        mel_from_power(power, cuda.device_array((2, 3, 5), np.float32), spec, tables=tables)
    with pytest.raises(ValueError, match="tables"):
        mel_from_power(power, out, spec, tables=logmel_tables(SPECS[1]))
    buf = np.ones(2 * spec.n_freqs * 5 + 64, np.float32)  # simulator: NumPy is device memory
    shared = buf[: 2 * spec.n_freqs * 5].reshape(2, spec.n_freqs, 5)
    inside = buf[10 : 10 + 2 * spec.n_mels * 5].reshape(2, spec.n_mels, 5)
    with pytest.raises(ValueError, match="overlap"):
        mel_from_power(shared, inside, spec, tables=tables)


def test_tables_are_uploaded_once_per_spec(monkeypatch: pytest.MonkeyPatch) -> None:
    """``tables=None`` used to build and upload the tables on every call."""
    import mmload.kernels.logmel as lm

    spec = LogMelSpec(sample_rate=8000, n_fft=16, hop_length=8, n_mels=3)
    lm._TABLES.pop((spec, 0), None)
    built: list[LogMelSpec] = []
    real = lm.logmel_tables
    monkeypatch.setattr(lm, "logmel_tables", lambda s, **kw: built.append(s) or real(s, **kw))
    x = signal(np.random.default_rng(0), 1, 40)
    for _ in range(3):
        np.testing.assert_allclose(run(x, spec), logmel_reference(x, spec), atol=1e-3)
    assert built == [spec]
