"""``DirectorySource``: tails a directory of Parquet / Arrow IPC part files into a FeatureTable."""

from __future__ import annotations

import logging
import os
from typing import Any

import pyarrow as pa
import pyarrow.ipc as ipc
import pyarrow.json as pajson
import pyarrow.parquet as pq

from mmload.errors import ConfigError
from mmload.features.sources import Source, first_line
from mmload.features.table import FeatureTable

__all__ = ["DirectorySource", "read_part_file"]

log = logging.getLogger(__name__)


def read_part_file(path: str) -> pa.Table:
    """A whole part file, by its magic bytes: Parquet ("PAR1"), Arrow IPC file ("ARROW1"),
    JSON lines (``.jsonl``/``.ndjson``, as Flink's row-format FileSink writes) or Arrow IPC
    stream. Raises pyarrow.ArrowInvalid (or OSError) when it is none of them."""
    with open(path, "rb") as f:
        magic = f.read(6)
    if magic[:4] == b"PAR1":
        return pq.read_table(path)
    if path.endswith((".jsonl", ".ndjson")):
        return pajson.read_json(path)
    with pa.OSFile(path, "rb") as src:
        if magic == b"ARROW1":
            return ipc.open_file(src).read_all()
        return ipc.open_stream(src).read_all()


class DirectorySource(Source):
    """Feeds ``table`` from the part files that streaming jobs commit into ``path``.

    Follows Flink's FileSink convention: a file whose name starts with "." or "_" is in progress
    (or a marker such as ``_SUCCESS``) and is never opened; a job commits a part file by renaming
    it to a visible name. Each committed file is read once, whole, within one ``poll_interval``
    (oldest mtime first, at most ``max_files_per_poll`` per poll; a backlog is polled again at
    once) and applied as one atomic update. A corrupt or mismatching file is skipped, counted and
    listed in ``stats()``, and not retried. Names are remembered while they exist in the
    directory; a new process reads the directory again (re-applying a file changes nothing: its
    rows have the same (key, ts) and values).
    """

    kind = "directory"

    def __init__(
        self,
        path: str | os.PathLike[str],
        table: FeatureTable,
        *,
        poll_interval: float = 1.0,
        max_files_per_poll: int = 64,
        name: str | None = None,
        start: bool = True,
    ) -> None:
        self.path = os.fspath(path)
        if not os.path.isdir(self.path):
            raise ConfigError(f"path={self.path!r}: not a directory")
        if (
            isinstance(max_files_per_poll, bool)
            or not isinstance(max_files_per_poll, int)
            or max_files_per_poll < 1
        ):
            raise ConfigError(f"max_files_per_poll={max_files_per_poll!r}: must be an int >= 1")
        self.max_files_per_poll = max_files_per_poll
        self._seen: set[str] = set()
        self._files_read = 0
        super().__init__(table, name=name or self.path, poll_interval=poll_interval, start=start)

    def _listing(self) -> dict[str, int] | None:
        """Visible regular files -> mtime (ns); None (and a failed poll) if unreadable."""
        try:
            entries = list(os.scandir(self.path))
        except OSError as e:
            self._failure(first_line(e))
            log.warning("feature source %r cannot list its directory: %s", self.name, e)
            return None
        visible: dict[str, int] = {}
        for entry in entries:
            if entry.name.startswith((".", "_")):
                continue
            try:
                if entry.is_file():
                    visible[entry.name] = entry.stat().st_mtime_ns
            except FileNotFoundError:  # removed while listing
                continue
        return visible

    def _poll(self) -> bool:
        visible = self._listing()
        if visible is None:
            return False
        self._seen &= visible.keys()
        new = sorted((mtime, name) for name, mtime in visible.items() if name not in self._seen)
        for _, name in new[: self.max_files_per_poll]:
            if self._stop.is_set():
                return False
            self._read(name)
        return len(new) > self.max_files_per_poll

    def _read(self, name: str) -> None:
        try:
            data = read_part_file(os.path.join(self.path, name))
        except FileNotFoundError:
            return  # removed before we read it: nothing to apply
        except (pa.ArrowException, OSError) as e:
            self._seen.add(name)
            self._skip(name, f"unreadable part file: {first_line(e)}")
            return
        self._seen.add(name)
        self._files_read += 1
        self._apply(data, name)

    def _extra_stats(self) -> dict[str, Any]:
        return {"path": self.path, "files_read": self._files_read, "files_seen": len(self._seen)}
