"""Log-mel spectrograms of a waveform batch on the batch's device.

``float32 [B, T]`` waveforms -> ``float32 [B, n_mels, 1 + T // hop_length]``, the semantics of
:mod:`mmload.kernels.logmel` (``torch.stft`` with ``center=True`` and reflect padding, periodic
Hann window of ``win_length`` centred in ``n_fft``, power 2, HTK mel filterbank, ``log(mel +
eps)``). The power spectrum is ``torch.stft`` on either device (cuFFT on the GPU: an FFT, not the
kernel module's direct DFT, which costs ``O(n_fft)`` per bin); the mel stage is the
``logmel.mel`` Numba kernel on the GPU (each filter sums only its non-zero bins and takes the log
in the same pass) and a filterbank matmul on the CPU. Every intermediate comes from torch's
caching allocator, so nothing here synchronises the device.
"""

from __future__ import annotations

import threading
from typing import Any

import numpy as np
import torch

__all__ = ["MelSpectrogram", "power_spectrum"]


def _reflect_index(samples: int, pad: int) -> np.ndarray:
    """Indices of ``numpy.pad(mode="reflect")`` of ``samples`` values by ``pad`` on each side
    (repeated reflection when ``pad >= samples``, which ``torch.stft`` refuses)."""
    return np.pad(np.arange(samples, dtype=np.int64), pad, mode="reflect")


def power_spectrum(x: torch.Tensor, spec: Any, window: torch.Tensor) -> torch.Tensor:
    """``|STFT(x)|^2``: float32 ``[B, n_fft // 2 + 1, frames]`` on ``x``'s device.

    ``x``: float32 ``[B, T]``, ``T >= 1``; ``spec``: a ``LogMelSpec``; ``window``: the periodic
    Hann window of ``spec.window_length`` samples on ``x``'s device.
    """
    pad = spec.n_fft // 2
    samples = int(x.shape[1])
    center = samples > pad
    if not center:  # too short for torch's reflect padding: pad by repeated reflection
        if samples == 1:
            x = x.expand(-1, 2 * pad + 1)
        else:
            x = x[:, torch.from_numpy(_reflect_index(samples, pad)).to(x.device)]
    z = torch.stft(
        x,
        n_fft=spec.n_fft,
        hop_length=spec.hop_length,
        win_length=spec.window_length,
        window=window,
        center=center,
        pad_mode="reflect",
        return_complex=True,
    )
    # re^2 + im^2 over the strided halves: 3x faster on the CPU than |z|^2 or a sum over
    # view_as_real (both walk the complex layout element by element)
    return z.real.square() + z.imag.square()


class MelSpectrogram:
    """The log-mel transform of one ``LogMelSpec`` on one device, its constants built once.

    ``__call__(x)``: float32 ``[B, T]`` on ``device`` -> float32 ``[B, n_mels, frames]`` on
    ``device``. On CUDA the mel kernel runs on torch's current stream of ``device`` (selected
    for Numba too: :func:`mmload.decode.gpu.numba_on`); its tables are torch tensors on that
    device. Each thread that calls it launches on its own arena of the kernel's buffers.
    """

    def __init__(self, spec: Any, device: torch.device) -> None:
        from mmload.kernels.logmel import mel_filterbank

        self.spec = spec
        self.device = device
        self.window = torch.hann_window(spec.window_length, periodic=True, device=device)
        fb = mel_filterbank(spec.sample_rate, spec.n_fft, spec.n_mels, spec.f_min, spec.f_max_hz)
        self._filterbank = torch.from_numpy(fb).to(device)
        self._tables: Any = None
        self._lock = threading.Lock()

    def _gpu_tables(self) -> Any:
        from mmload.kernels.logmel import logmel_tables

        with self._lock:
            if self._tables is None:
                self._tables = logmel_tables(
                    self.spec, to_device=lambda a: torch.from_numpy(a).to(self.device)
                )
            return self._tables

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 2 or x.dtype != torch.float32 or x.shape[1] < 1:
            raise ValueError(f"waveforms: need float32 [B, T >= 1], got {x.dtype} {list(x.shape)}")
        power = power_spectrum(x, self.spec, self.window)
        if self.device.type != "cuda":
            return torch.matmul(self._filterbank, power).add_(self.spec.eps).log_()
        from mmload.decode.gpu import numba_on
        from mmload.kernels.logmel import mel_from_power

        out = torch.empty(
            (power.shape[0], self.spec.n_mels, power.shape[2]),
            dtype=torch.float32,
            device=self.device,
        )
        with numba_on(self.device) as stream:
            mel_from_power(
                power.contiguous(), out, self.spec, tables=self._gpu_tables(), stream=stream
            )
        return out
