"""Live, timestamped features joined into every batch as of each sample's time.

``FeatureTable`` holds keyed, timestamped feature columns on the CPU or a GPU and answers
``join(keys, timestamps)``; ``DirectorySource`` and ``FlightSource`` feed it from background
threads. Names load lazily; nothing here imports cuDF or ``numba.cuda`` until a GPU table is used.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__all__ = ["FOUND", "DirectorySource", "FeatureTable", "FlightSource", "Snapshot", "Source"]

_WHERE = {
    "FOUND": "mmload.features.schema",
    "DirectorySource": "mmload.features.directory",
    "FeatureTable": "mmload.features.table",
    "FlightSource": "mmload.features.flight",
    "Snapshot": "mmload.features.snapshot",
    "Source": "mmload.features.sources",
}

if TYPE_CHECKING:
    from mmload.features.directory import DirectorySource
    from mmload.features.flight import FlightSource
    from mmload.features.schema import FOUND
    from mmload.features.snapshot import Snapshot
    from mmload.features.sources import Source
    from mmload.features.table import FeatureTable


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'mmload.features' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
