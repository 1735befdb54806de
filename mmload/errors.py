"""The one error hierarchy of mmload.

Every data error names the shard and, where there is one, the sample key, so that a
failure in a long distributed run can be traced to the bytes that caused it.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "BadEntry",
    "ConfigError",
    "DecodeError",
    "DeviceError",
    "JoinError",
    "MissingDependencyError",
    "MmloadError",
    "ShardError",
    "StreamIdle",
    "WorkerError",
]


class MmloadError(Exception):
    """Base class of every error mmload raises on purpose."""


class ConfigError(MmloadError, ValueError):
    """An argument or configuration value is invalid; the message names field and value."""


class MissingDependencyError(MmloadError, ImportError):
    """An optional dependency is missing; the message names the extra that installs it."""

    def __init__(self, module: str, extra: str, purpose: str) -> None:
        super().__init__(
            f"{purpose} needs the Python module {module!r}, which is not installed; "
            f'install it with: pip install "mmload[{extra}]"'
        )
        self.module = module
        self.extra = extra


class _DataError(MmloadError):
    """An error about concrete data: carries the shard and (optionally) the sample key."""

    def __init__(self, message: str, *, shard: str, key: str | None = None) -> None:
        where = f"shard {shard!r}" + (f", key {key!r}" if key is not None else "")
        super().__init__(f"{message} ({where})")
        self.shard = shard
        self.key = key
        self.reason = message

    def __reduce__(self) -> tuple[object, tuple[object, ...]]:
        # Pickled across processes (worker results): rebuilt from its fields, since the default
        # (the class called with ``self.args``) lacks the keyword-only ``shard``.
        return _rebuild_data_error, (type(self), self.reason, self.shard, self.key)


def _rebuild_data_error(
    cls: type[_DataError], message: str, shard: str, key: str | None
) -> _DataError:
    return cls(message, shard=shard, key=key)


class ShardError(_DataError):
    """A shard is missing, unreadable, truncated or malformed."""


class DecodeError(_DataError):
    """A sample's bytes could not be decoded (corrupt media, bad JSON, ...)."""


class JoinError(MmloadError):
    """A feature update or feature join failed (wrong schema, bad timestamps, lost source)."""


class DeviceError(MmloadError):
    """A device is unavailable or a transfer to it failed."""


class StreamIdle(MmloadError):
    """A growing source produced no new data within the wait allowed (``max_wait_s``): the
    trainer decides (checkpoint, keep waiting by iterating again, stop). ``window`` is the
    window waited for, ``waited_s`` how long."""

    def __init__(self, message: str, *, window: int, waited_s: float) -> None:
        super().__init__(message)
        self.window = window
        self.waited_s = waited_s

    def __reduce__(self) -> tuple[object, tuple[object, ...]]:
        return _rebuild_idle, (str(self), self.window, self.waited_s)


def _rebuild_idle(message: str, window: int, waited_s: float) -> StreamIdle:
    return StreamIdle(message, window=window, waited_s=waited_s)


class WorkerError(MmloadError):
    """A loader worker process failed outside the data: it died (killed, out of memory) or
    raised an error that is not an mmload data error; the message names the worker."""


@dataclass(frozen=True)
class BadEntry:
    """A record of a bad sample or shard that was skipped: where, which key, and why."""

    shard: str
    key: str | None
    reason: str

    def as_dict(self) -> dict[str, str | None]:
        return {"shard": self.shard, "key": self.key, "reason": self.reason}
