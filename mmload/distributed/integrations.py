"""Trainer libraries that shard a data set themselves, and how mmload meets them.

mmload gives each rank its own batches (the plan, partitions and equal steps are its own), so a
library that shards or dispatches the batches a second time would lose or duplicate samples.
Hugging Face Accelerate does so for a ``DataLoader`` passed to ``Accelerator.prepare()``: with
``dispatch_batches`` (its default for iterable data sets) process 0 reads every batch and
broadcasts slices of it (the string keys fail in its broadcast), without it each process keeps
every ``num_processes``-th item (the rank's batches thinned again). The supported way is to pass
``mmload.Loader`` to ``prepare()`` (it returns objects that are not DataLoaders unchanged) or to
leave the DataLoader out of ``prepare()``; :func:`refuse_resharding` turns the wrapped case into
a clear error instead of a failure deep inside Accelerate, or lost samples.

Nothing here imports Accelerate: a wrapper is recognised only when its module is already loaded.
"""

from __future__ import annotations

import sys

from mmload.errors import ConfigError

__all__ = ["refuse_resharding"]

# Accelerate's wrappers around a DataLoader or its data set (accelerate.data_loader).
_ACCELERATE = ("DataLoaderDispatcher", "DataLoaderShard", "IterableDatasetShard")


def refuse_resharding(what: str) -> None:
    """Raise ConfigError if this iteration of ``what`` runs under an Accelerate wrapper.

    The call stack is searched for a frame whose ``self`` is one of Accelerate's data wrappers.
    A DataLoader worker started by ``fork`` inherits its parent's stack, so the dispatcher that
    started the workers is found from inside a worker too (under ``spawn`` it is not: Accelerate
    then fails on its own when it broadcasts the batch's string keys).
    """
    if "accelerate.data_loader" not in sys.modules:
        return
    frame = sys._getframe(1)
    while frame is not None:
        cls = type(frame.f_locals.get("self"))
        if any(
            c.__module__.startswith("accelerate.") and c.__name__ in _ACCELERATE
            for c in cls.__mro__
        ):
            raise ConfigError(
                f"{what} is wrapped by Accelerate's {cls.__name__} (Accelerator.prepare() on a "
                "DataLoader): mmload already gives each rank its own batches, and Accelerate "
                "would dispatch or shard them a second time. Pass mmload.Loader to prepare() "
                "(it is returned unchanged) or keep the DataLoader out of prepare(); see "
                "docs/integrations.md"
            )
        frame = frame.f_back  # type: ignore[assignment]
