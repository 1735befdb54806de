"""The growing source's parts on their own: which names count as committed, local and
object-store listings (and their order), the ledger's files and errors, idle markers, the
write-once primitive and the sequencer. The StreamLoader tests in ``tests/test_stream.py`` run
them together."""

from __future__ import annotations

import datetime as dt
import json
import os
from pathlib import Path
from typing import Any, ClassVar

import fsspec
import pytest
from fsspec.spec import AbstractFileSystem

from mmload.errors import ConfigError
from mmload.sources import growing
from mmload.sources.growing import (
    DEFAULT_SUFFIXES,
    CommittedFile,
    IdleMarkers,
    Ledger,
    Sequencer,
    Window,
    list_committed,
)


def touch(path: Path, data: bytes = b"x", mtime_s: int | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    if mtime_s is not None:
        os.utime(path, ns=(mtime_s * 10**9, mtime_s * 10**9))
    return path


# ---------------------------------------------------------------- which names are committed


@pytest.mark.parametrize(
    ("rel", "committed"),
    [
        ("part-1.parquet", True),
        ("part-1.tar", True),
        ("part-1.jsonl", True),
        ("bucket/part-1.parquet", True),
        ("a/b/part-1.parquet", True),
        (".part-1.parquet", False),  # hidden file
        ("_part-1.parquet", False),
        ("_SUCCESS", False),
        (".staging/part-1.parquet", False),  # hidden directory
        ("a/_tmp/part-1.parquet", False),
        ("part-1.parquet.inprogress", False),
        ("part-1.parquet.tmp", False),
        ("part-1.parquet.pending", False),
        ("part-1.csv", False),
        ("part-1.parquetx", False),
    ],
)
def test_committed_names(rel: str, committed: bool) -> None:
    assert growing._committed_name(rel, DEFAULT_SUFFIXES) is committed


def test_an_uncommitted_ending_wins_over_an_accepted_suffix() -> None:
    # a producer that keeps its temporary files under an accepted suffix's name
    assert growing._committed_name("x.tmp", (".tmp",)) is False
    assert growing._committed_name("x.pending", (".pending", ".parquet")) is False
    assert growing._committed_name("x.csv", [".csv"]) is True  # a list of suffixes works too


def test_default_suffixes() -> None:
    assert DEFAULT_SUFFIXES == (".parquet", ".tar", ".jsonl")


# ---------------------------------------------------------------- local listing


def test_local_listing_is_in_mtime_then_path_order_with_sizes(tmp_path: Path) -> None:
    touch(tmp_path / "b.parquet", b"12345", mtime_s=2_000)
    touch(tmp_path / "a.parquet", b"1", mtime_s=2_000)  # same mtime: path order
    touch(tmp_path / "z" / "c.tar", b"123", mtime_s=1_000)  # oldest first, below a directory
    touch(tmp_path / "y" / "x" / "d.jsonl", b"", mtime_s=3_000)
    got = list_committed(str(tmp_path))
    assert got == [
        CommittedFile("z/c.tar", 3, 1_000 * 10**9),
        CommittedFile("a.parquet", 1, 2_000 * 10**9),
        CommittedFile("b.parquet", 5, 2_000 * 10**9),
        CommittedFile("y/x/d.jsonl", 0, 3_000 * 10**9),
    ]


def test_local_listing_skips_hidden_uncommitted_and_other_files(tmp_path: Path) -> None:
    touch(tmp_path / "ok.parquet", mtime_s=1)
    for rel in [
        ".hidden.parquet",
        "_hidden.parquet",
        "_SUCCESS",
        "part.parquet.inprogress",
        "part.parquet.tmp",
        "part.parquet.pending",
        "notes.txt",
        ".staging/in.parquet",
        "_temporary/0/in.parquet",
        "ok/.deeper/in.parquet",
    ]:
        touch(tmp_path / rel)
    os.symlink(tmp_path / "ok.parquet", tmp_path / "link.parquet")  # not a regular file
    os.mkdir(tmp_path / "dir.parquet")  # a directory named like a part file
    assert [f.path for f in list_committed(str(tmp_path))] == ["ok.parquet"]


def test_local_listing_with_own_suffixes_and_a_relative_root(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    touch(tmp_path / "d" / "a.csv", mtime_s=1)
    touch(tmp_path / "d" / "b.parquet", mtime_s=2)
    monkeypatch.chdir(tmp_path)
    assert [f.path for f in list_committed("d", (".csv",))] == ["a.csv"]
    assert [f.path for f in list_committed("d")] == ["b.parquet"]
    assert list_committed(str(tmp_path / "missing")) == []


def test_a_file_that_vanishes_while_listed_is_left_out(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    touch(tmp_path / "stays.parquet", mtime_s=5)
    real_walk = os.walk

    def walk(top: str, *a: Any, **k: Any) -> Any:
        for dirpath, dirnames, filenames in real_walk(top, *a, **k):
            yield dirpath, dirnames, ["gone.parquet", *filenames]  # renamed before the stat

    monkeypatch.setattr(growing.os, "walk", walk)
    assert [f.path for f in list_committed(str(tmp_path))] == ["stays.parquet"]


def test_the_local_walk_prunes_hidden_directories_before_descending(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    touch(tmp_path / "b" / "p.parquet", mtime_s=1)
    touch(tmp_path / "a" / "p.parquet", mtime_s=1)
    touch(tmp_path / "_skip" / "deep" / "p.parquet")
    visited: list[str] = []
    real_walk = os.walk

    def walk(top: str, *a: Any, **k: Any) -> Any:
        for dirpath, dirnames, filenames in real_walk(top, *a, **k):
            visited.append(os.path.relpath(dirpath, top))
            yield dirpath, dirnames, filenames

    monkeypatch.setattr(growing.os, "walk", walk)
    got = list_committed(str(tmp_path))
    assert [f.path for f in got] == ["a/p.parquet", "b/p.parquet"]
    assert visited == [".", "a", "b"]  # sorted, and nothing below _skip is read


# ---------------------------------------------------------------- object-store listing


class _Listing(AbstractFileSystem):
    """An fsspec file system whose ``find`` answers a scripted listing. Unlike fsspec's default
    it keeps a path's trailing slash (as some stores' file systems do)."""

    protocol = "mmtestlist"
    found: ClassVar[dict[str, dict[str, Any]]] = {}
    missing = False
    asked: ClassVar[list[tuple[str, dict[str, Any]]]] = []

    @classmethod
    def _strip_protocol(cls, path: Any) -> Any:
        return path[len("mmtestlist://") :] if path.startswith("mmtestlist://") else path

    def find(self, path: str, **kw: Any) -> Any:
        _Listing.asked.append((path, kw))
        if _Listing.missing:
            raise FileNotFoundError(path)
        return dict(_Listing.found)


fsspec.register_implementation("mmtestlist", _Listing, clobber=True)


@pytest.fixture
def listing() -> Any:
    _Listing.found, _Listing.missing, _Listing.asked = {}, False, []
    AbstractFileSystem.clear_instance_cache()
    yield _Listing
    _Listing.found, _Listing.missing, _Listing.asked = {}, False, []


def test_object_store_listing_reads_every_modified_time_field(listing: Any) -> None:
    t = dt.datetime(2026, 12, 7, 1, 2, 3, tzinfo=dt.timezone.utc)
    listing.found = {
        "bkt/events/_SUCCESS": {"size": 0, "mtime": 5},  # skipped; the rest still listed
        "bkt/events/a.parquet": {"size": 7, "LastModified": t},  # S3: a datetime
        "bkt/events/b.parquet": {"size": 8, "mtime": 1_700_000_000.5},  # a float, seconds
        "bkt/events/c.parquet": {"size": 9, "last_modified": 1_600_000_000},  # an int
        "bkt/events/d.parquet": {"size": 3},  # no time: first
        "bkt/events/e.parquet": {},  # no size either
        "bkt/events/sub/f.tar": {"size": 1, "mtime": 5},
        "bkt/events/g.csv": {"size": 1, "mtime": 5},  # not an accepted suffix
        "bkt/events/XX.tar": {"size": 2, "mtime": 6},  # only the separating slash is cut
        "bkt/events/.x.parquet": {"size": 0, "mtime": 5},
        "bkt/events": {"size": 0, "mtime": 5},  # the prefix itself
    }
    got = list_committed("mmtestlist://bkt/events/")
    # files only, with their details; the trailing slash is dropped
    assert listing.asked == [("bkt/events", {"detail": True, "withdirs": False})]
    assert got == [
        CommittedFile("d.parquet", 3, 0),
        CommittedFile("e.parquet", 0, 0),
        CommittedFile("sub/f.tar", 1, 5 * 10**9),
        CommittedFile("XX.tar", 2, 6 * 10**9),
        CommittedFile("c.parquet", 9, 1_600_000_000 * 10**9),
        CommittedFile("b.parquet", 8, 1_700_000_000_500_000_000),
        CommittedFile("a.parquet", 7, int(t.timestamp() * 1e9)),
    ]
    # the first field present wins
    listing.found = {"bkt/p/x.tar": {"LastModified": 1, "mtime": 2, "last_modified": 3}}
    assert list_committed("mmtestlist://bkt/p") == [CommittedFile("x.tar", 0, 10**9)]
    listing.found = {"bkt/p/x.tar": {"mtime": 2, "last_modified": 3}}
    assert list_committed("mmtestlist://bkt/p") == [CommittedFile("x.tar", 0, 2 * 10**9)]


def test_object_store_listing_suffixes_missing_prefix_and_foreign_names(listing: Any) -> None:
    listing.found = {"bkt/e/a.csv": {"size": 1}, "bkt/e/b.parquet": {"size": 1}}
    assert [f.path for f in list_committed("mmtestlist://bkt/e", (".csv",))] == ["a.csv"]
    # only trailing slashes go: a prefix may end in any other character
    listing.found = {"bkt/BOX/a.tar": {"size": 1}}
    assert [f.path for f in list_committed("mmtestlist://bkt/BOX//")] == ["a.tar"]
    assert listing.asked[-1][0] == "bkt/BOX"
    # a name the store reports outside the prefix is kept as it is
    listing.found = {"other/x.parquet": {"size": 2, "mtime": 1}}
    assert list_committed("mmtestlist://bkt/e") == [CommittedFile("other/x.parquet", 2, 10**9)]
    listing.missing = True
    assert list_committed("mmtestlist://bkt/e") == []


# ---------------------------------------------------------------- the ledger


def test_a_new_ledger_records_its_source(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    led = Ledger("led", "src")
    assert led.directory == str(tmp_path / "led") and led.source == str(tmp_path / "src")
    meta = json.loads((tmp_path / "led" / "ledger.json").read_text())
    assert meta == {"version": 1, "source": str(tmp_path / "src")}
    assert sorted(os.listdir(tmp_path / "led")) == ["ledger.json"]  # no temporary file left
    assert led.count() == 0 and led.window(0) is None and led.assigned() == set()
    # a URL source is kept as written; the same ledger opens again for the same source only
    remote = Ledger(str(tmp_path / "r"), "s3://bkt/events")
    assert remote.source == "s3://bkt/events"
    assert Ledger(str(tmp_path / "r"), "s3://bkt/events").source == "s3://bkt/events"


def test_a_ledger_of_another_source_or_version_is_refused(tmp_path: Path) -> None:
    Ledger(str(tmp_path / "led"), str(tmp_path / "a"))
    with pytest.raises(ConfigError) as e:
        Ledger(str(tmp_path / "led"), str(tmp_path / "b"))
    assert str(e.value) == (
        f"stream ledger {str(tmp_path / 'led')!r} belongs to source {str(tmp_path / 'a')!r} "
        f"(version 1), not {str(tmp_path / 'b')!r}: pass another ledger="
    )
    (tmp_path / "led" / "ledger.json").write_text(
        json.dumps({"version": 2, "source": str(tmp_path / "a")})
    )
    with pytest.raises(ConfigError, match=r"\(version 2\), not"):
        Ledger(str(tmp_path / "led"), str(tmp_path / "a"))
    (tmp_path / "led" / "ledger.json").write_text("{}")
    with pytest.raises(ConfigError, match=r"belongs to source None \(version None\)"):
        Ledger(str(tmp_path / "led"), str(tmp_path / "a"))


def test_an_unreadable_ledger_file_is_a_config_error(tmp_path: Path) -> None:
    (tmp_path / "led").mkdir()
    meta = tmp_path / "led" / "ledger.json"
    meta.write_text("{not json")
    with pytest.raises(ConfigError) as e:
        Ledger(str(tmp_path / "led"), "s3://b/e")
    assert str(e.value).startswith(f"stream ledger {str(meta)!r} cannot be read: ")
    meta.unlink()
    meta.mkdir()  # exists, cannot be opened as a file
    with pytest.raises(ConfigError, match="cannot be read"):
        Ledger(str(tmp_path / "led"), "s3://b/e")


def test_windows_are_appended_written_once_and_read_back(tmp_path: Path) -> None:
    led = Ledger(str(tmp_path / "led"), "s3://b/e")
    a, b, c = CommittedFile("a", 1, 10), CommittedFile("d/b", 2, 20), CommittedFile("c", 3, 30)
    w0 = led.append([a, b], {"version": 4})
    w1 = led.append(iter([c]))  # any iterable; no meta
    assert (w0.index, w0.files, w0.meta) == (0, (a, b), {"version": 4})
    assert (w1.index, w1.files, w1.meta) == (1, (c,), {})
    assert isinstance(w0.cut_at, float) and w0.cut_at <= w1.cut_at
    doc = json.loads((tmp_path / "led" / "window-000000000.json").read_text())
    assert doc == {
        "index": 0,
        "cut_at": w0.cut_at,
        "files": [["a", 1, 10], ["d/b", 2, 20]],
        "meta": {"version": 4},
    }
    assert sorted(os.listdir(tmp_path / "led")) == [
        "ledger.json",
        "window-000000000.json",
        "window-000000001.json",
    ]
    assert led.count() == 2 and led.assigned() == {"a", "d/b", "c"}
    other = Ledger(str(tmp_path / "led"), "s3://b/e")  # another rank, or a restart
    assert other.window(1) == w1 and other.window(0) == w0 and other.window(2) is None
    assert other.assigned() == {"a", "d/b", "c"} and other.count() == 2
    got = other.window(0)
    assert got is not None and type(got.files) is tuple and type(got.meta) is dict
    # a third window written by the sequencer after `other` read two is seen on the next ask
    led.append([CommittedFile("e", 5, 50)])
    assert other.count() == 3 and "e" in other.assigned()


def test_meta_given_to_append_is_copied(tmp_path: Path) -> None:
    led = Ledger(str(tmp_path / "led"), "s3://b/e")
    meta = {"v": 1}
    win = led.append([], meta)
    meta["v"] = 2
    assert win.meta == {"v": 1}


def test_a_window_cut_by_another_process_is_refused(tmp_path: Path) -> None:
    led = Ledger(str(tmp_path / "led"), "s3://b/e")
    stale = Ledger(str(tmp_path / "led"), "s3://b/e")
    stale.count()  # it has read zero windows
    led.append([CommittedFile("a", 1, 1)])
    stale.count = lambda: 0  # type: ignore[method-assign]  # has not seen window 0 yet
    with pytest.raises(ConfigError) as e:
        stale.append([CommittedFile("b", 1, 1)])
    assert str(e.value) == (
        f"stream ledger {str(tmp_path / 'led')!r}: window 0 was cut by another process; "
        "only rank 0 cuts windows (two jobs share this ledger? pass ledger=)"
    )
    assert stale._windows == [] and stale._assigned == set()  # nothing recorded
    assert json.loads((tmp_path / "led" / "window-000000000.json").read_text())["files"] == [
        ["a", 1, 1]
    ]


def test_unreadable_or_misnumbered_windows_are_config_errors(tmp_path: Path) -> None:
    led = Ledger(str(tmp_path / "led"), "s3://b/e")
    path = tmp_path / "led" / "window-000000000.json"
    path.write_text('{"index": 0, "cut_at": 1')
    with pytest.raises(ConfigError) as e:
        led.window(0)
    assert str(e.value).startswith(f"stream ledger window {str(path)!r} is unreadable: ")
    path.write_text(json.dumps({"index": 3, "cut_at": 1.0, "files": []}))
    with pytest.raises(ConfigError) as e:
        led.count()
    assert str(e.value) == f"stream ledger window {str(path)!r} holds index 3"
    path.unlink()
    path.mkdir()  # cannot be opened as a file
    with pytest.raises(ConfigError, match="is unreadable"):
        led.window(0)


def test_a_window_without_meta_reads_as_empty_meta(tmp_path: Path) -> None:
    led = Ledger(str(tmp_path / "led"), "s3://b/e")
    (tmp_path / "led" / "window-000000000.json").write_text(
        json.dumps({"index": 0, "cut_at": 7, "files": [["p", "3", "4"]]})
    )
    assert led.window(0) == Window(0, (CommittedFile("p", 3, 4),), 7.0, {})


def test_window_numbers_have_nine_digits(tmp_path: Path) -> None:
    led = Ledger(str(tmp_path / "led"), "s3://b/e")
    assert led._path(123) == str(tmp_path / "led" / "window-000000123.json")


# ---------------------------------------------------------------- idle markers


def test_idle_marker_files_and_sessions(tmp_path: Path) -> None:
    led = Ledger(str(tmp_path / "led"), "s3://b/e")
    plain = IdleMarkers(led, None, since=0.0)
    tagged = IdleMarkers(led, "run7-0", since=0.0)
    assert plain.directory == led.directory
    assert plain._path(12, 3) == str(tmp_path / "led" / "idle-000000012-000003.json")
    assert tagged._path(12, 3) == str(tmp_path / "led" / "idle-000000012-000003-run7-0.json")
    assert IdleMarkers(led, "", since=0.0)._path(1, 1).endswith("idle-000000001-000001.json")
    assert not plain.marked(12, 3) and not tagged.marked(12, 3)
    tagged.mark(12, 3)
    assert tagged.marked(12, 3) and not plain.marked(12, 3) and not tagged.marked(12, 4)
    doc = json.loads(Path(tagged._path(12, 3)).read_text())
    assert doc["window"] == 12 and doc["attempt"] == 3 and isinstance(doc["written_at"], float)
    first = doc["written_at"]
    tagged.mark(12, 3)  # written once: a second mark keeps the first
    assert json.loads(Path(tagged._path(12, 3)).read_text())["written_at"] == first


def test_a_marker_older_than_the_reader_is_an_earlier_runs(tmp_path: Path) -> None:
    led = Ledger(str(tmp_path / "led"), "s3://b/e")
    path = Path(IdleMarkers(led, None, 0.0)._path(0, 0))
    path.write_text(json.dumps({"window": 0, "attempt": 0, "written_at": 100.0}))
    assert IdleMarkers(led, None, since=100.0).marked(0, 0)  # written at the reader's start
    assert IdleMarkers(led, None, since=99.5).marked(0, 0)
    assert not IdleMarkers(led, None, since=100.5).marked(0, 0)
    path.write_text(json.dumps({"window": 0, "attempt": 0}))  # no time: the oldest
    assert IdleMarkers(led, None, since=0.0).marked(0, 0)
    assert not IdleMarkers(led, None, since=0.5).marked(0, 0)


def test_an_unreadable_idle_marker_is_a_config_error(tmp_path: Path) -> None:
    led = Ledger(str(tmp_path / "led"), "s3://b/e")
    markers = IdleMarkers(led, "s", since=0.0)
    path = Path(markers._path(2, 1))
    path.write_text("{")
    with pytest.raises(ConfigError) as e:
        markers.marked(2, 1)
    assert str(e.value).startswith(f"stream ledger idle marker {str(path)!r}: ")
    path.unlink()
    path.mkdir()
    with pytest.raises(ConfigError, match="idle marker"):
        markers.marked(2, 1)


# ---------------------------------------------------------------- write once


def test_write_once_writes_a_whole_file_once_and_leaves_no_temporary(tmp_path: Path) -> None:
    path = str(tmp_path / "doc.json")
    assert growing._write_once(path, {"a": [1, 2]}) is True
    assert growing._write_once(path, {"a": 3}) is False
    assert json.loads(Path(path).read_text()) == {"a": [1, 2]}
    assert os.listdir(tmp_path) == ["doc.json"]


def test_write_once_syncs_before_linking(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    events: list[str] = []
    real_fsync, real_link = os.fsync, os.link

    def fsync(fd: int) -> None:
        events.append("fsync")
        real_fsync(fd)

    def link(src: str, dst: str) -> None:
        events.append(f"link {Path(src).read_text()} -> {Path(dst).name}")
        real_link(src, dst)

    monkeypatch.setattr(growing.os, "fsync", fsync)
    monkeypatch.setattr(growing.os, "link", link)
    growing._write_once(str(tmp_path / "d.json"), [1])
    assert events == ["fsync", "link [1] -> d.json"]


# ---------------------------------------------------------------- the sequencer


def test_sequencer_settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    led = Ledger(str(tmp_path / "led"), str(tmp_path))
    for bad in (0, -1):
        with pytest.raises(ConfigError) as e:
            Sequencer(str(tmp_path), led, window_files=bad)
        assert str(e.value) == f"window_files={bad!r}: must be >= 1 or None"
    seq = Sequencer(str(tmp_path), led, window_files=1)
    assert seq.window_files == 1 and seq.ledger is led and seq.suffixes == DEFAULT_SUFFIXES
    default = Sequencer(str(tmp_path), led)
    assert default.window_files is None
    monkeypatch.chdir(tmp_path)
    assert Sequencer("sub", led, suffixes=[".csv"]).root == str(tmp_path / "sub")
    assert Sequencer("sub", led, suffixes=[".csv"]).suffixes == (".csv",)
    assert Sequencer("s3://b/e", led).root == "s3://b/e"


def test_sequencer_cuts_new_files_oldest_first(tmp_path: Path) -> None:
    src = tmp_path / "src"
    touch(src / "c.parquet", mtime_s=3)
    touch(src / "a.parquet", mtime_s=1)
    touch(src / "b.csv", mtime_s=2)
    touch(src / "b.parquet", mtime_s=2)
    led = Ledger(str(tmp_path / "led"), str(src))
    seq = Sequencer(str(src), led, window_files=2)
    assert [f.path for f in seq.pending()] == ["a.parquet", "b.parquet"]
    w0 = seq.cut(meta={"v": 1})
    assert w0 is not None and [f.path for f in w0.files] == ["a.parquet", "b.parquet"]
    assert w0.meta == {"v": 1}
    assert [f.path for f in seq.pending()] == ["c.parquet"]
    touch(src / "d.parquet", mtime_s=4)
    touch(src / "e.parquet", mtime_s=5)
    touch(src / "f.parquet", mtime_s=6)
    w1 = seq.cut()
    assert w1 is not None and [f.path for f in w1.files] == ["c.parquet", "d.parquet"]
    everything = Sequencer(str(src), led, suffixes=(".parquet", ".csv"))
    w2 = everything.cut()
    assert w2 is not None and [f.path for f in w2.files] == ["b.csv", "e.parquet", "f.parquet"]
    assert everything.pending() == [] and everything.cut() is None and seq.cut() is None
    assert led.count() == 3


def test_sequencer_cuts_given_files_and_nothing_for_an_empty_list(tmp_path: Path) -> None:
    src = tmp_path / "src"
    touch(src / "a.parquet", mtime_s=1)
    led = Ledger(str(tmp_path / "led"), str(src))
    seq = Sequencer(str(src), led)
    given = [CommittedFile("chosen.parquet", 1, 1)]
    w0 = seq.cut(given, {"m": 2})
    assert w0 is not None and w0.files == tuple(given) and w0.meta == {"m": 2}
    assert seq.cut([]) is None and led.count() == 1  # an empty list cuts nothing
    w1 = seq.cut()
    assert w1 is not None and [f.path for f in w1.files] == ["a.parquet"]
