"""Text fields: a tokenizer hook, then fixed-length ids and attention masks, or packed rows.

``Tokenizer`` wraps what ``TextConfig.tokenizer`` names: a Hugging Face ``tokenizers`` JSON file,
any callable ``str -> list[int]``, or (None) UTF-8 bytes shifted by one so that 0 stays padding.
``encode_batch`` gives ``int64 [B, L]`` ids and masks (truncate, right-pad). ``pack`` puts
variable-length token lists into ``[R, L]`` rows with ``mmload.kernels.pack_tokens`` (on the GPU
for CUDA tensors, else its NumPy reference).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from mmload.config import TextConfig
from mmload.errors import MissingDependencyError

__all__ = ["Tokenizer", "encode_batch", "pack"]


class Tokenizer:
    """``str -> list[int]`` from a tokenizers JSON path, a callable, or UTF-8 bytes (+1)."""

    def __init__(self, spec: str | Callable[[str], Sequence[int]] | None) -> None:
        self.spec = spec
        self._fn: Callable[[str], Sequence[int]] | None = None

    def _load(self) -> Callable[[str], Sequence[int]]:
        if self.spec is None:
            return lambda s: [b + 1 for b in s.encode("utf-8")]
        if callable(self.spec):
            return self.spec
        try:
            from tokenizers import Tokenizer as HFTokenizer
        except ImportError:
            raise MissingDependencyError(
                "tokenizers", "text", "a tokenizer.json tokenizer"
            ) from None
        tok = HFTokenizer.from_file(self.spec)
        return lambda s: tok.encode(s).ids

    def __call__(self, text: str) -> list[int]:
        if self._fn is None:
            self._fn = self._load()
        return [int(t) for t in self._fn(text)]

    def __getstate__(self) -> dict[str, Any]:
        return {"spec": self.spec, "_fn": None}  # a loaded HF tokenizer is rebuilt per process


def encode_batch(
    texts: Sequence[str], tokenizer: Tokenizer, cfg: TextConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ids, attention_mask)``, both ``int64 [B, max_length]`` on the CPU."""
    ids = np.full((len(texts), cfg.max_length), cfg.pad_id, dtype=np.int64)
    mask = np.zeros((len(texts), cfg.max_length), dtype=np.int64)
    for i, t in enumerate(texts):
        tok = tokenizer(t)[: cfg.max_length]
        ids[i, : len(tok)] = tok
        mask[i, : len(tok)] = 1
    return torch.from_numpy(ids), torch.from_numpy(mask)


def pack(
    token_lists: Sequence[Sequence[int]],
    seq_len: int,
    *,
    pad_id: int = 0,
    device: torch.device | None = None,
) -> dict[str, torch.Tensor]:
    """Pack sequences into rows: ``input_ids``, ``attention_mask``, ``position_ids``,
    ``segment_ids``, each ``int64 [R, seq_len]`` on ``device`` (sequences longer than ``seq_len``
    are truncated)."""
    from mmload.kernels.pack_tokens import pack_tokens_reference, plan_packing

    lengths = np.array([len(t) for t in token_lists], dtype=np.int64)
    flat = (
        np.concatenate([np.asarray(t, dtype=np.int64) for t in token_lists])
        if len(lengths)
        else np.zeros(0, np.int64)
    )
    offsets = (
        np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
        if len(lengths)
        else np.zeros(0, np.int64)
    )
    plan = plan_packing(lengths, seq_len)
    device = device or torch.device("cpu")
    if device.type == "cuda":
        from mmload.decode.gpu import numba_on
        from mmload.kernels.pack_tokens import pack_tokens

        outs = {
            k: torch.empty((plan.n_rows, seq_len), dtype=torch.int64, device=device)
            for k in ("input_ids", "attention_mask", "position_ids", "segment_ids")
        }
        with numba_on(device) as stream:
            pack_tokens(
                torch.from_numpy(flat).to(device),
                offsets,  # host offsets: the launcher plans the rows with them
                plan,
                pad_id=pad_id,
                stream=stream,
                **outs,
            )
        return outs
    ref = pack_tokens_reference(flat, offsets, plan, pad_id=pad_id)
    return {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in ref.items()}
