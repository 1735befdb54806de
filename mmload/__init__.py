"""mmload: a GPU-accelerated multimodal dataloader for PyTorch.

The public API is small and lazy: ``import mmload`` imports neither DALI, cuDF, numba.cuda nor
ray (nor the loader's own modules) until a name is used.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

__all__ = [
    "AudioConfig",
    "ConfigError",
    "DecodeError",
    "DeviceError",
    "ErrorPolicy",
    "FeatureJoin",
    "FeatureTable",
    "ImageConfig",
    "IterableDataset",
    "Jagged",
    "JoinError",
    "Loader",
    "MmloadError",
    "RemoteConfig",
    "ShardError",
    "ShuffleConfig",
    "StreamIdle",
    "StreamLoader",
    "TextConfig",
    "VideoConfig",
    "WorkerError",
    "World",
    "__version__",
    "kjt_parts",
    "to_kjt",
]

_WHERE = {
    "ConfigError": "mmload.errors",
    "DecodeError": "mmload.errors",
    "DeviceError": "mmload.errors",
    "JoinError": "mmload.errors",
    "MmloadError": "mmload.errors",
    "ShardError": "mmload.errors",
    "WorkerError": "mmload.errors",
    "StreamIdle": "mmload.errors",
    "StreamLoader": "mmload.stream",
    "AudioConfig": "mmload.config",
    "ErrorPolicy": "mmload.config",
    "RemoteConfig": "mmload.config",
    "FeatureJoin": "mmload.config",
    "FeatureTable": "mmload.features",
    "ImageConfig": "mmload.config",
    "ShuffleConfig": "mmload.config",
    "TextConfig": "mmload.config",
    "VideoConfig": "mmload.config",
    "IterableDataset": "mmload.loader",
    "Loader": "mmload.loader",
    "World": "mmload.plan",
    "Jagged": "mmload.jagged",
    "kjt_parts": "mmload.jagged",
    "to_kjt": "mmload.jagged",
}

if TYPE_CHECKING:
    from mmload.config import (
        AudioConfig,
        ErrorPolicy,
        FeatureJoin,
        ImageConfig,
        ShuffleConfig,
        TextConfig,
        VideoConfig,
    )
    from mmload.errors import (
        ConfigError,
        DecodeError,
        DeviceError,
        JoinError,
        MmloadError,
        ShardError,
        StreamIdle,
        WorkerError,
    )
    from mmload.features import FeatureTable
    from mmload.jagged import Jagged, kjt_parts, to_kjt
    from mmload.loader import IterableDataset, Loader
    from mmload.plan import World
    from mmload.stream import StreamLoader


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'mmload' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
