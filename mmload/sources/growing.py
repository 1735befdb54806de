"""A growing source: a directory to which a stream processor commits part files, cut into
windows that every rank and every restart see alike.

Flink's FileSink (like Spark's and most others) writes a part file under a hidden in-progress
name (``.part-<uuid>-0.inprogress.<uuid>``) and commits it with a rename at a checkpoint; a
committed file never changes afterwards. Here a file is *committed* when it is a regular file
whose name, and every directory on its path below the root (Flink's bucket directories), starts
with neither ``.`` nor ``_``, does not end in ``.inprogress``/``.tmp``/``.pending``, and ends in
one of the accepted suffixes (``.parquet``, ``.tar`` and ``.jsonl`` by default).

**Windows.** One process, the sequencer (rank 0), lists the source, takes the committed files
that no window holds yet in ``(mtime, path)`` order, and appends them as the next window to the
ledger: a directory of JSON manifests ``window-000000123.json``, each written once (a temporary
file hard-linked into place, which fails if the name exists) and never changed. Every rank reads
the windows from the ledger, so all ranks agree on which files window ``w`` holds however their
polls interleave, and a restart reads the same windows back: the resume cursor is a window index
plus a position inside it, a few integers, and files committed during a restart go to later
windows. The ledger must be on a file system every rank sees (for one node: any local path).
"""

from __future__ import annotations

import json
import os
import stat
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from mmload.errors import ConfigError

__all__ = ["CommittedFile", "IdleMarkers", "Ledger", "Sequencer", "Window", "list_committed"]

DEFAULT_SUFFIXES = (".parquet", ".tar", ".jsonl")
_UNCOMMITTED = (".inprogress", ".tmp", ".pending")
_VERSION = 1


@dataclass(frozen=True)
class CommittedFile:
    """A committed file: its path below the root (``/``-separated), size and mtime."""

    path: str
    size: int
    mtime_ns: int


@dataclass(frozen=True)
class Window:
    """Window ``index``: the files it holds, in the order they are read, and when it was cut."""

    index: int
    files: tuple[CommittedFile, ...]
    cut_at: float
    meta: dict[str, Any] = field(default_factory=dict)  # e.g. the feature version joined against


def _hidden(name: str) -> bool:
    return name.startswith((".", "_"))


def _committed_name(rel: str, suffixes: Sequence[str]) -> bool:
    parts = rel.split("/")
    name = parts[-1]
    return (
        not any(_hidden(p) for p in parts)
        and not name.endswith(_UNCOMMITTED)
        and name.endswith(tuple(suffixes))
    )


def _list_remote(root: str, suffixes: Sequence[str]) -> list[CommittedFile]:
    """The committed objects below an object-store prefix (any fsspec URL that can list). An
    object store has no in-progress files: an object appears whole when its upload completes
    (Flink's S3 FileSink commits a multipart upload)."""
    import fsspec

    fs, base = fsspec.core.url_to_fs(root)
    base = base.rstrip("/")
    try:
        found = fs.find(base, detail=True, withdirs=False)
    except FileNotFoundError:
        return []
    out: list[CommittedFile] = []
    for name, info in found.items():
        rel = name[len(base) :].lstrip("/") if name.startswith(base) else name
        if not rel or not _committed_name(rel, suffixes):
            continue
        mod = info.get("LastModified", info.get("mtime", info.get("last_modified")))
        if hasattr(mod, "timestamp"):
            mtime_ns = int(mod.timestamp() * 1e9)
        elif isinstance(mod, (int, float)):
            mtime_ns = int(mod * 1e9)
        else:
            mtime_ns = 0
        out.append(CommittedFile(rel, int(info.get("size", 0)), mtime_ns))
    out.sort(key=lambda f: (f.mtime_ns, f.path))
    return out


def list_committed(root: str, suffixes: Sequence[str] = DEFAULT_SUFFIXES) -> list[CommittedFile]:
    """The committed files below ``root`` (see the module docstring), in ``(mtime, path)``
    order; ``root`` may be an object-store prefix (an fsspec URL). A file that vanishes while
    listed (renamed, expired) is left out."""
    if "://" in root:
        return _list_remote(root, suffixes)
    out: list[CommittedFile] = []
    root = os.path.abspath(root)
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not _hidden(d))
        rel = os.path.relpath(dirpath, root)
        for name in filenames:
            if _hidden(name) or name.endswith(_UNCOMMITTED) or not name.endswith(tuple(suffixes)):
                continue
            try:
                st = os.stat(os.path.join(dirpath, name), follow_symlinks=False)
            except FileNotFoundError:
                continue
            if not stat.S_ISREG(st.st_mode):
                continue
            path = name if rel == "." else f"{rel.replace(os.sep, '/')}/{name}"
            out.append(CommittedFile(path, st.st_size, st.st_mtime_ns))
    out.sort(key=lambda f: (f.mtime_ns, f.path))
    return out


class Ledger:
    """The append-only run of windows of one source (see the module docstring).

    ``directory`` holds ``ledger.json`` (the source it belongs to: a ledger is never used for
    another) and the window manifests. Reading is safe from any number of processes; only the
    sequencer appends."""

    def __init__(self, directory: str, source: str) -> None:
        self.directory = os.path.abspath(directory)
        self.source = source if "://" in source else os.path.abspath(source)
        os.makedirs(self.directory, exist_ok=True)
        meta = os.path.join(self.directory, "ledger.json")
        want = {"version": _VERSION, "source": self.source}
        if not os.path.exists(meta):
            _write_once(meta, want)  # another rank may win the race: then it is read below
        try:
            with open(meta, encoding="utf-8") as f:
                have = json.load(f)
        except (OSError, ValueError) as e:
            raise ConfigError(f"stream ledger {meta!r} cannot be read: {e}") from e
        if have != want:
            raise ConfigError(
                f"stream ledger {self.directory!r} belongs to source {have.get('source')!r} "
                f"(version {have.get('version')}), not {self.source!r}: pass another ledger="
            )
        self._windows: list[Window] = []  # windows 0..n-1, read so far
        self._assigned: set[str] = set()

    def _path(self, w: int) -> str:
        return os.path.join(self.directory, f"window-{w:09d}.json")

    def window(self, w: int) -> Window | None:
        """Window ``w``, or None while it is not cut yet."""
        while len(self._windows) <= w:
            if not self._read_next():
                return None
        return self._windows[w]

    def _read_next(self) -> bool:
        w = len(self._windows)
        try:
            with open(self._path(w), encoding="utf-8") as f:
                doc = json.load(f)
        except FileNotFoundError:
            return False
        except (OSError, ValueError) as e:
            raise ConfigError(f"stream ledger window {self._path(w)!r} is unreadable: {e}") from e
        if doc.get("index") != w:
            raise ConfigError(
                f"stream ledger window {self._path(w)!r} holds index {doc.get('index')}"
            )
        files = tuple(CommittedFile(p, int(s), int(t)) for p, s, t in doc["files"])
        self._windows.append(Window(w, files, float(doc["cut_at"]), dict(doc.get("meta", {}))))
        self._assigned.update(f.path for f in files)
        return True

    def count(self) -> int:
        """Windows cut so far."""
        while self._read_next():
            pass
        return len(self._windows)

    def assigned(self) -> set[str]:
        """Paths of every file some window holds."""
        self.count()
        return self._assigned

    def append(self, files: Iterable[CommittedFile], meta: dict[str, Any] | None = None) -> Window:
        """Cut the next window holding ``files`` (and ``meta``, JSON-safe, recorded with it)."""
        n = self.count()
        win = Window(n, tuple(files), time.time(), dict(meta or {}))
        doc = {
            "index": n,
            "cut_at": win.cut_at,
            "files": [[f.path, f.size, f.mtime_ns] for f in win.files],
            "meta": win.meta,
        }
        if not _write_once(self._path(n), doc):
            raise ConfigError(
                f"stream ledger {self.directory!r}: window {n} was cut by another process; "
                "only rank 0 cuts windows (two jobs share this ledger? pass ledger=)"
            )
        self._windows.append(win)
        self._assigned.update(f.path for f in win.files)
        return win


class IdleMarkers:
    """Rank 0's decision that a wait for a window ended without one, shared through the ledger
    directory so that every rank raises ``StreamIdle`` at the same step (a rank that went on
    alone would hang the others in the next collective).

    Attempt ``k`` of the wait for window ``w`` is the ``k``-th time the trainer asks for it
    (ranks ask in step). ``session`` tells a run's markers from an earlier run's on the same
    ledger: torchrun's run id and restart count when present; otherwise a marker counts only if
    written after ``since`` (the reader's start, less a margin for clocks and start-up)."""

    def __init__(self, ledger: Ledger, session: str | None, since: float) -> None:
        self.directory = ledger.directory
        self.session = session
        self.since = since

    def _path(self, w: int, k: int) -> str:
        tag = f"-{self.session}" if self.session else ""
        return os.path.join(self.directory, f"idle-{w:09d}-{k:06d}{tag}.json")

    def mark(self, w: int, k: int) -> None:
        _write_once(self._path(w, k), {"window": w, "attempt": k, "written_at": time.time()})

    def marked(self, w: int, k: int) -> bool:
        try:
            with open(self._path(w, k), encoding="utf-8") as f:
                doc = json.load(f)
        except FileNotFoundError:
            return False
        except (OSError, ValueError) as e:
            raise ConfigError(f"stream ledger idle marker {self._path(w, k)!r}: {e}") from e
        # Even with a session, a marker older than this reader is an earlier run's (a job
        # re-queued under the same run id starts its restart count at 0 again).
        return float(doc.get("written_at", 0)) >= self.since


def _write_once(path: str, doc: object) -> bool:
    """Write ``doc`` as JSON to ``path`` unless it exists (atomic: a complete file or none)."""
    tmp = f"{path}.{os.getpid()}.{time.monotonic_ns()}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(doc, f)
        f.flush()
        os.fsync(f.fileno())
    try:
        os.link(tmp, path)
        return True
    except FileExistsError:
        return False
    finally:
        os.unlink(tmp)


class Sequencer:
    """Cuts windows from the committed files of ``root`` no window holds yet (rank 0's job).

    ``window_files``: at most this many files per window (None: every new file). Files are taken
    oldest first, so a backlog is cut into windows in commit order."""

    def __init__(
        self,
        root: str,
        ledger: Ledger,
        suffixes: Sequence[str] = DEFAULT_SUFFIXES,
        window_files: int | None = None,
    ) -> None:
        if window_files is not None and window_files < 1:
            raise ConfigError(f"window_files={window_files!r}: must be >= 1 or None")
        self.root = root if "://" in root else os.path.abspath(root)
        self.ledger = ledger
        self.suffixes = tuple(suffixes)
        self.window_files = window_files

    def pending(self) -> list[CommittedFile]:
        """The files the next window would hold (committed since the last one, oldest first)."""
        assigned = self.ledger.assigned()
        new = [f for f in list_committed(self.root, self.suffixes) if f.path not in assigned]
        return new if self.window_files is None else new[: self.window_files]

    def cut(
        self, files: list[CommittedFile] | None = None, meta: dict[str, Any] | None = None
    ) -> Window | None:
        """The next window: ``files`` (by default ``pending()``); None if there are none."""
        new = self.pending() if files is None else files
        return self.ledger.append(new, meta) if new else None
