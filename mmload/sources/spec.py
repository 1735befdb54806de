"""Shard specs: a list, a brace pattern, a glob, a directory or any fsspec URL -> shard URLs."""

from __future__ import annotations

import glob as globlib
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from mmload.errors import ConfigError, ShardError

__all__ = ["ShardSpec", "expand", "is_local", "kind_of", "local_path"]

Kind = Literal["tar", "parquet", "arrow", "json"]

_KINDS: dict[str, Kind] = {
    ".tar": "tar",
    ".tar.gz": "tar",
    ".tgz": "tar",
    ".parquet": "parquet",
    ".pq": "parquet",
    ".arrow": "arrow",
    ".jsonl": "json",
    ".ndjson": "json",
    ".feather": "arrow",
    ".ipc": "arrow",
}
_BRACE_RANGE = re.compile(r"\{(\d+)\.\.(\d+)\}")
_GLOB_CHARS = re.compile(r"[*?\[]")


@dataclass(frozen=True)
class ShardSpec:
    """One shard: its URL as the user gave it (after expansion) and its format."""

    url: str
    kind: Kind

    @property
    def compressed(self) -> bool:
        return self.url.endswith((".tar.gz", ".tgz"))


def is_local(url: str) -> bool:
    return ("://" not in url and not url.startswith("pipe:")) or url.startswith("file://")


def local_path(url: str) -> str:
    return url[len("file://") :] if url.startswith("file://") else url


def kind_of(url: str, *, sniff: bool = True) -> Kind:
    """The shard format from the file name, else from the file's magic bytes (local files)."""
    name = url.split("?", 1)[0].lower()
    for suffix in sorted(_KINDS, key=len, reverse=True):
        if name.endswith(suffix):
            return _KINDS[suffix]
    if sniff and is_local(url) and os.path.isfile(local_path(url)):
        with open(local_path(url), "rb") as f:
            head = f.read(512)
        if head[:4] == b"PAR1":
            return "parquet"
        if head[:6] == b"ARROW1":
            return "arrow"
        if len(head) == 512 and head[257:262] == b"ustar":
            return "tar"
    raise ShardError(
        "unknown shard format: expected .tar, .tar.gz, .parquet, .arrow or .jsonl "
        "(or a file with their magic bytes)",
        shard=url,
    )


def _expand_braces(pattern: str) -> list[str]:
    """Expand ``{a,b}`` alternatives and zero-padded ``{000..127}`` ranges, left to right."""
    start = pattern.find("{")
    if start < 0:
        return [pattern]
    depth = 0
    for end in range(start, len(pattern)):
        depth += (pattern[end] == "{") - (pattern[end] == "}")
        if depth == 0:
            break
    else:
        raise ConfigError(f"shard pattern {pattern!r}: unbalanced braces")
    head, body, tail = pattern[:start], pattern[start + 1 : end], pattern[end + 1 :]
    m = _BRACE_RANGE.fullmatch("{" + body + "}")
    if m:
        lo, hi = m.group(1), m.group(2)
        width = len(lo) if lo.startswith("0") or len(lo) == len(hi) else 0
        a, b = int(lo), int(hi)
        step = 1 if b >= a else -1
        alts = [str(i).zfill(width) for i in range(a, b + step, step)]
    else:
        alts, level, last = [], 0, 0
        for i, c in enumerate(body):
            level += (c == "{") - (c == "}")
            if c == "," and level == 0:
                alts.append(body[last:i])
                last = i + 1
        alts.append(body[last:])
        if len(alts) == 1:  # "{x}" is literal, as in bash
            return [head + "{" + r for r in _expand_braces(body + "}" + tail)]
    out: list[str] = []
    for alt in alts:
        for rest in _expand_braces(alt + tail):
            out.append(head + rest)
    return out


def _expand_one(url: str, allow_pipe: bool) -> list[str]:
    if url.startswith("pipe:"):
        if not allow_pipe:
            raise ConfigError(
                f"shard {url!r}: 'pipe:' URLs run shell commands and are refused; "
                "pass allow_pipe=True to enable them"
            )
        return [url]
    out: list[str] = []
    expanded = _expand_braces(url)
    for u in expanded:
        if is_local(u):
            path = local_path(u)
            if _GLOB_CHARS.search(path):
                hits = sorted(globlib.glob(path))
                if not hits:
                    raise ShardError("glob matched no files", shard=u)
                out += hits
            elif len(expanded) == 1 and os.path.isdir(path):  # no stat per brace-expanded shard
                hits = sorted(
                    os.path.join(path, f)
                    for f in os.listdir(path)
                    if not f.startswith((".", "_")) and f.lower().endswith(tuple(_KINDS))
                )
                if not hits:
                    raise ShardError(
                        "directory holds no .tar/.parquet/.arrow/.jsonl shards", shard=u
                    )
                out += hits
            else:
                out.append(path)
        elif _GLOB_CHARS.search(u.split("://", 1)[1]):
            import fsspec

            _fs, _, paths = fsspec.get_fs_token_paths(u)
            if not paths:
                raise ShardError("glob matched no objects", shard=u)
            protocol = u.split("://", 1)[0]
            out += sorted(p if "://" in p else f"{protocol}://{p}" for p in paths)
        else:
            out.append(u)
    return out


def expand(
    spec: str | os.PathLike[str] | Sequence[str | os.PathLike[str]], *, allow_pipe: bool = False
) -> list[ShardSpec]:
    """Expand a shard spec into an ordered list of :class:`ShardSpec` (one per shard).

    ``spec`` is a path, URL, brace pattern (``train-{000..127}.tar``), glob (``*.tar``),
    directory, or a sequence of those. ``pipe:`` URLs are refused unless ``allow_pipe``.
    """
    items = [spec] if isinstance(spec, (str, os.PathLike)) else list(spec)
    if not items:
        raise ConfigError("the shard spec is empty")
    urls: list[str] = []
    for item in items:
        if not isinstance(item, (str, os.PathLike)):
            raise ConfigError(f"shard spec entry {item!r}: must be a str or path")
        urls += _expand_one(os.fspath(item), allow_pipe)
    seen: set[str] = set()
    for u in urls:
        if u in seen:
            raise ConfigError(f"shard {u!r} appears twice in the spec")
        seen.add(u)
    return [ShardSpec(u, "tar" if u.startswith("pipe:") else kind_of(u)) for u in urls]
