"""Distributed helpers: world detection (torchrun / torch.distributed) and, later, Ray."""

from __future__ import annotations

from mmload.distributed.world import resolve_world

__all__ = ["resolve_world"]
