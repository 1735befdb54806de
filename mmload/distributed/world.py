"""Where this process sits in a distributed job: from arguments, torch.distributed or torchrun env.

This module sits beside ``plan`` in the dependency order (the loader needs it); the rest of
``mmload.distributed`` (helpers that use the loader, Ray) sits above the loader.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from mmload.errors import ConfigError
from mmload.plan import World

__all__ = ["resolve_world"]


def _env_int(env: Mapping[str, str], name: str) -> int:
    try:
        return int(env[name])
    except ValueError:
        raise ConfigError(f"environment variable {name}={env[name]!r} is not an int") from None


def resolve_world(
    rank: int | None = None, world_size: int | None = None, env: Mapping[str, str] | None = None
) -> World:
    """``World`` from explicit arguments, else an initialised ``torch.distributed`` process
    group, else torchrun's ``RANK``/``WORLD_SIZE``, else a single process."""
    if (rank is None) != (world_size is None):
        raise ConfigError(
            f"rank={rank!r}, world_size={world_size!r}: give both or neither (neither = detect)"
        )
    if rank is not None and world_size is not None:
        return World(rank=rank, world_size=world_size)
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return World(rank=dist.get_rank(), world_size=dist.get_world_size())
    env = os.environ if env is None else env
    if "RANK" in env and "WORLD_SIZE" in env:
        return World(rank=_env_int(env, "RANK"), world_size=_env_int(env, "WORLD_SIZE"))
    return World()
