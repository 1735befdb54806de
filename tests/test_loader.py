"""Loader end to end: batches, determinism, exact and elastic resume, epochs, stats, bad data."""

from __future__ import annotations

import itertools
import json
import logging
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import mmload
from mmload import ConfigError, DecodeError, ImageConfig, Loader, ShardError

SMALL = ImageConfig(size=32)


def _keys(loader: Loader, limit: int | None = None) -> list[list[str]]:
    """Keys of the next ``limit`` batches (all if None), without pulling one more."""
    return [list(b["__key__"]) for b in itertools.islice(loader, limit)]


def _loader(paths: list[str], tmp_path: Path, **kw: Any) -> Loader:
    kw.setdefault("batch_size", 4)
    kw.setdefault("image", SMALL)
    kw.setdefault("cache_dir", tmp_path / "cache")
    return Loader(paths, **kw)


def test_batch_contract(make_shards, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    paths, keys = make_shards([5, 6])
    with _loader(paths, tmp_path, batch_size=4) as L:
        batches = list(L)
    assert len(batches) == 3  # 11 samples -> 3 batches; one rank: the last one short, no repeat
    b = batches[0]
    assert list(b) == ["__key__", "cls", "jpg", "txt"]
    assert b["jpg"].shape == (4, 3, 32, 32)
    assert b["jpg"].dtype == torch.float16
    assert b["cls"].dtype == torch.int64
    assert b["cls"].tolist() == [0, 1, 2, 3]
    assert b["txt"] == ["caption 0", "caption 1", "caption 2", "caption 3"]
    flat = [k for b in batches for k in b["__key__"]]
    assert flat == keys
    last = batches[-1]
    assert len(last["__key__"]) == 3
    assert last["jpg"].shape == (3, 3, 32, 32) and last["cls"].shape == (3,)
    stats = L.stats()
    assert stats["samples_padded"] == 0 and stats["samples"] == 11


def test_several_ranks_pad_and_log_it_once(make_shards, tmp_path: Path, caplog) -> None:  # type: ignore[no-untyped-def]
    """With two ranks the last global batch is filled up (equal steps), logged once per epoch
    with its count, and throughput counts unique samples only."""
    paths, keys = make_shards([5, 6])
    seen: list[str] = []
    with caplog.at_level(logging.INFO, logger="mmload.pipeline"):
        for rank in range(2):
            with _loader(paths, tmp_path, batch_size=4, rank=rank, world_size=2) as L:
                batches = list(L)
                assert [len(b["__key__"]) for b in batches] == [4, 4]
                seen += [k for b in batches for k in b["__key__"]]
                uniques = L.stats()["samples"]
                assert uniques == (6 if rank == 0 else 5)  # ranks take every other position
    assert sorted(set(seen)) == sorted(keys) and len(seen) == 16
    logged = [r.getMessage() for r in caplog.records if "padded with" in r.getMessage()]
    assert len(logged) == 2 and all("padded with 5 repeated samples" in m for m in logged)


def test_uint8_images_without_normalize(make_shards, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    paths, _ = make_shards([4])
    cfg = ImageConfig(size=(24, 40), normalize=False, dtype="uint8", crop="resize", flip=False)
    for backend in ("dali", "pil"):
        with _loader(
            paths, tmp_path, image=ImageConfig(**{**cfg.__dict__, "backend": backend})
        ) as L:
            b = next(iter(L))
        assert b["jpg"].shape == (4, 3, 24, 40)
        assert b["jpg"].dtype == torch.uint8
        assert 20 < b["jpg"].float().mean() < 235


def test_dali_and_pil_agree(make_shards, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    paths, _ = make_shards([8])
    out = {}
    for backend in ("dali", "pil"):
        cfg = ImageConfig(size=32, backend=backend, dtype="float32")
        with _loader(paths, tmp_path, image=cfg, batch_size=8, shuffle=True, seed=5) as L:
            out[backend] = next(iter(L))["jpg"]
    diff = (out["dali"] - out["pil"]).abs()
    # Same crops and flips; resize kernels differ slightly: measured 0.006 on these images.
    assert diff.mean() < 0.03, diff.mean()


def test_dali_flips_and_crops_as_pil_does_on_real_photos(tmp_path: Path) -> None:
    """Per image, DALI's output is PIL's (same crop window, same flip) within the resize
    kernels' difference (measured: per-image mean |diff| <= 0.038 in normalised units), and
    far from PIL's mirror image (>= 0.24): a flip DALI skipped or added is caught."""
    import io

    import webdataset as wds
    from PIL import Image
    from skimage import data

    photos = [data.astronaut(), data.chelsea(), data.coffee(), data.rocket()]
    shard = tmp_path / "photos.tar"
    with wds.TarWriter(str(shard)) as w:
        for i in range(16):
            buf = io.BytesIO()
            Image.fromarray(photos[i % 4]).save(buf, "JPEG", quality=95)
            w.write({"__key__": f"k{i:02d}", "jpg": buf.getvalue(), "cls": b"1"})
    out = {}
    for backend, flip in (("dali", True), ("pil", True), ("pil", False)):
        cfg = ImageConfig(size=(48, 64), backend=backend, dtype="float32", flip=flip)
        with _loader([str(shard)], tmp_path, image=cfg, batch_size=16, shuffle=True, seed=5) as L:
            out[backend, flip] = next(iter(L))["jpg"]
    dali, pil, unflipped = out["dali", True], out["pil", True], out["pil", False]
    flipped = (pil - unflipped).abs().mean(dim=(1, 2, 3)) > 0.1
    assert 0 < int(flipped.sum()) < 16  # the draws flip some images, not all
    same = (dali - pil).abs().mean(dim=(1, 2, 3))
    mirrored = (dali - pil.flip(-1)).abs().mean(dim=(1, 2, 3))
    assert same.max() < 0.08, same
    assert (mirrored > 3 * same).all(), (mirrored, same)


def test_shuffle_is_deterministic_and_changes_per_epoch(make_shards, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    paths, keys = make_shards([6, 7, 5])
    with _loader(paths, tmp_path, shuffle=True, seed=3, drop_last=True) as a:
        e0, e1 = _keys(a), _keys(a)
    with _loader(paths, tmp_path, shuffle=True, seed=3, drop_last=True) as b:
        assert _keys(b) == e0
        assert b.state_dict()["epoch"] == 1
    assert e0 != e1
    assert sorted(k for b in e0 for k in b) == sorted(set(k for b in e0 for k in b))
    assert e0 != [keys[i : i + 4] for i in range(0, 16, 4)]


def test_exact_resume_at_every_batch(make_shards, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    paths, _ = make_shards([9, 4, 11, 6])
    with _loader(paths, tmp_path, shuffle=True, seed=11, fields=["cls"]) as L:
        full = _keys(L)
    assert len(full) >= 8
    rng = np.random.default_rng(0)
    points = sorted(set(rng.integers(0, len(full), size=25).tolist()) | {0, len(full) - 1})
    for k in points:
        with _loader(paths, tmp_path, shuffle=True, seed=11, fields=["cls"]) as L:
            _keys(L, limit=k)
            state = json.loads(json.dumps(L.state_dict()))
        with _loader(paths, tmp_path, shuffle=True, seed=11, fields=["cls"]) as R:
            R.load_state_dict(state)
            assert _keys(R) == full[k:], f"resume after {k} batches"


@pytest.mark.parametrize(("before", "after"), [(2, 3), (3, 2)])
def test_elastic_resume(make_shards, tmp_path: Path, before: int, after: int) -> None:  # type: ignore[no-untyped-def]
    paths, keys = make_shards([13, 7, 17, 5, 12])  # 54 samples
    gbs = 6
    for k in (1, 3, 5):
        consumed: list[str] = []
        state: dict[str, int] = {}
        for r in range(before):
            with _loader(
                paths,
                tmp_path,
                shuffle=True,
                seed=2,
                rank=r,
                world_size=before,
                batch_size=gbs // before,
                fields=["cls"],
                partitions=6,
            ) as L:
                for b in _keys(L, limit=k):
                    consumed += b
                s = L.state_dict()
                assert not state or s == state, "every rank reports the same cursor"
                state = s
        rest: list[str] = []
        counts = []
        for r in range(after):
            with _loader(
                paths,
                tmp_path,
                shuffle=True,
                seed=2,
                rank=r,
                world_size=after,
                batch_size=gbs // after,
                fields=["cls"],
                partitions=6,
            ) as L:
                L.load_state_dict(state)
                got = _keys(L)
                counts.append(len(got))
                rest += [x for b in got for x in b]
                padded = L.stats()["samples_padded"]
        assert len(set(counts)) == 1, "every new rank takes the same number of steps"
        seen = Counter(consumed + rest)
        assert set(seen) == set(keys), "nothing missing"
        assert sum(seen.values()) - len(keys) == padded, "only the reported padding repeats"
        assert len(set(consumed) & set(rest)) <= padded


def test_partitions_bound_elastic_resume(make_shards, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """The order is over a fixed number of partitions: a world size that does not divide it is
    refused at construction and at resume, with the world sizes that work; the state carries
    the partition count, so a resume without partitions= adopts the saved one."""
    paths, _ = make_shards([13, 7, 17, 5, 12])
    with pytest.raises(
        ConfigError, match=r"world_size=3 does not divide partitions=4.*\[1, 2, 4\]"
    ):
        _loader(paths, tmp_path, rank=0, world_size=3, batch_size=2, partitions=4)
    with _loader(paths, tmp_path, rank=0, world_size=2, batch_size=3, fields=["cls"]) as L:
        _keys(L, limit=2)
        state = L.state_dict()
    assert state["partitions"] == 2  # the default for two ranks over five shards
    with (
        _loader(paths, tmp_path, rank=0, world_size=3, batch_size=2, fields=["cls"]) as L,
        pytest.raises(ConfigError, match="world_size=3 does not divide partitions=2"),
    ):
        L.load_state_dict(state)
    with _loader(paths, tmp_path, rank=0, world_size=1, batch_size=6, fields=["cls"]) as L:
        assert L.stats()["partitions"] == 1
        L.load_state_dict(state)  # adopts partitions=2 from the state: 1 divides it
        assert L.stats()["partitions"] == 2
        assert len(_keys(L)) == 9 - 2  # 54 samples, global batch 6: two steps were consumed
    with (
        _loader(paths, tmp_path, rank=0, world_size=1, batch_size=6, partitions=3) as L,
        pytest.raises(ConfigError, match="given partitions=3"),
    ):
        L.load_state_dict(state)


def test_epoch_advance_and_set_epoch(make_shards, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    paths, _ = make_shards([8])
    with _loader(paths, tmp_path, shuffle=True, seed=1, fields=["cls"]) as L:
        e0 = _keys(L)
        assert L.epoch == 1
        L.set_epoch(0)
        assert _keys(L) == e0
        _keys(L, limit=1)
        st = L.state_dict()
        L.set_epoch(1)  # the current epoch: keeps the resume cursor
        assert L.state_dict() == st
        assert len(L) == 2


def test_break_and_continue_resumes(make_shards, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    paths, _ = make_shards([12])
    with _loader(paths, tmp_path, fields=["cls"]) as L:
        first = _keys(L, limit=1)
        rest = _keys(L)
    assert first + rest == [[f"s000_{i:06d}" for i in range(j, j + 4)] for j in (0, 4, 8)]


def test_load_state_validation(make_shards, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    paths, _ = make_shards([8])
    with _loader(paths, tmp_path, seed=1) as L:
        st = L.state_dict()
        with pytest.raises(ConfigError, match="seed"):
            L.load_state_dict({**st, "seed": 2})
        with pytest.raises(ConfigError, match="shards changed"):
            L.load_state_dict({**st, "num_samples": 9})
        with pytest.raises(ConfigError, match="shuffle"):
            L.load_state_dict({**st, "shuffle": 32})


def test_padding_is_counted_after_a_resume(make_shards, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    paths, _ = make_shards([10])  # 10 samples, 2 ranks of batch 2: 2 padded
    two = {"fields": ["cls"], "batch_size": 2, "rank": 0, "world_size": 2}
    with _loader(paths, tmp_path, **two) as L:
        _keys(L, limit=1)
        st = L.state_dict()
    with _loader(paths, tmp_path, **two) as R:
        R.load_state_dict(st)
        rest = _keys(R)
        assert len(rest) == 2 and R.stats()["samples_padded"] == 2


def test_config_errors(make_shards, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    paths, _ = make_shards([2])
    for bad in (
        {"batch_size": 0},
        {"on_error": "ignore"},
        {"on_error": "skip"},  # a budget is required
        {"max_bad_samples": 1.5, "on_error": "skip"},
        {"rank": 0},
        {"shuffle": "yes"},
        {"device": "tpu"},
    ):
        with pytest.raises((ConfigError, mmload.DeviceError)):
            _loader(paths, tmp_path, **bad)


def test_fields_selection(make_shards, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    paths, _ = make_shards([4])
    with _loader(paths, tmp_path, fields=["txt", "cls"]) as L:
        b = next(iter(L))
    assert list(b) == ["__key__", "txt", "cls"]


def _corrupt_one_jpeg(paths: list[str], which: int, how: str) -> None:
    import tarfile

    with tarfile.open(paths[0]) as t:
        jpgs = [m for m in t.getmembers() if m.name.endswith(".jpg")]
    m = jpgs[which]
    with open(paths[0], "r+b") as f:
        if how == "garbage":
            f.seek(m.offset_data)
            f.write(b"NOTAJPEG" * 4)
        else:  # damage the end-of-image marker: a truncated stream
            f.seek(m.offset_data + m.size - 2)
            f.write(b"\0\0")


@pytest.mark.parametrize("how", ["garbage", "truncated"])
def test_corrupt_jpeg_raises_by_default(make_shards, tmp_path: Path, how: str) -> None:  # type: ignore[no-untyped-def]
    paths, keys = make_shards([8])
    _corrupt_one_jpeg(paths, 5, how)
    with _loader(paths, tmp_path) as L, pytest.raises(DecodeError) as e:
        list(L)
    assert e.value.key == keys[5]
    assert e.value.shard == paths[0]


def test_corrupt_jpeg_skip_replaces_and_reports(make_shards, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    paths, keys = make_shards([8])
    _corrupt_one_jpeg(paths, 5, "garbage")
    with _loader(paths, tmp_path, on_error="skip", max_bad_samples=2) as L:
        batches = list(L)
        stats = L.stats()
    assert [b["jpg"].shape[0] for b in batches] == [4, 4]
    flat = [k for b in batches for k in b["__key__"]]
    assert keys[5] not in flat
    assert flat.count(keys[6]) == 2
    assert stats["bad_samples"] == 1
    assert stats["bad"] == [
        {"shard": paths[0], "key": keys[5], "reason": stats["bad"][0]["reason"]}
    ]
    assert "image" in stats["bad"][0]["reason"]


def test_decoder_failure_is_isolated(make_shards, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """A JPEG whose header checks pass but that the decoder rejects (a bogus Huffman table):
    the batch fails as a whole, is retried per sample, and only that sample is replaced."""
    import tarfile

    paths, keys = make_shards([8])
    with tarfile.open(paths[0]) as t:
        m = [m for m in t.getmembers() if m.name.endswith(".jpg")][2]
    data = bytearray(Path(paths[0]).read_bytes())
    dht = data.find(b"\xff\xc4", m.offset_data)
    data[dht + 5 : dht + 21] = b"\xff" * 16  # code counts summing past 256
    Path(paths[0]).write_bytes(bytes(data))
    with _loader(paths, tmp_path, on_error="skip", max_bad_samples=1) as L:
        batches = list(L)
        stats = L.stats()
    assert stats["bad_samples"] == 1
    assert stats["bad"][0]["key"] == keys[2]
    assert all(b["jpg"].shape == (4, 3, 32, 32) for b in batches)


def test_budget_exceeded(make_shards, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    paths, _ = make_shards([8])
    _corrupt_one_jpeg(paths, 1, "garbage")
    _corrupt_one_jpeg(paths, 6, "garbage")
    with (
        _loader(paths, tmp_path, on_error="skip", max_bad_samples=1) as L,
        pytest.raises(DecodeError, match="budget exceeded"),
    ):
        list(L)
    with _loader(paths, tmp_path, on_error="skip", max_bad_samples=0.3) as L:
        assert len(list(L)) == 2
        assert L.stats()["bad_samples"] == 2


def test_bad_shards_skipped_within_budget(make_shards, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    paths, keys = make_shards([4, 4])
    missing = str(tmp_path / "gone.tar")
    notatar = tmp_path / "junk.tar"
    notatar.write_bytes(b"junk" * 300)
    spec = [paths[0], missing, str(notatar), paths[1]]
    with pytest.raises(ShardError, match=r"gone\.tar"):
        _loader(spec, tmp_path)
    with _loader(spec, tmp_path, on_error="skip", max_bad_samples=2) as L:
        flat = [k for b in L for k in b["__key__"]]
        stats = L.stats()
    assert flat == keys
    assert {b["shard"] for b in stats["bad"]} == {missing, str(notatar)}
    with pytest.raises(ShardError, match="exceed"):
        _loader(spec, tmp_path, on_error="skip", max_bad_samples=1)


def test_missing_field_is_a_bad_sample(tmp_path: Path, jpegs: list[bytes]) -> None:
    import webdataset as wds

    p = str(tmp_path / "m.tar")
    with wds.TarWriter(p) as w:
        for i in range(4):
            s = {"__key__": f"k{i}", "jpg": jpegs[i], "cls": b"1"}
            if i == 2:
                del s["jpg"]
            w.write(s)
    with _loader([p], tmp_path) as L, pytest.raises(DecodeError, match="lacks field 'jpg'") as e:
        list(L)
    assert e.value.key == "k2"


def test_pickles_are_never_unpickled(tmp_path: Path) -> None:
    import pickle

    import webdataset as wds

    class Boom:
        def __reduce__(self):  # type: ignore[no-untyped-def]
            return (exec, ("raise SystemExit('unpickled!')",))

    p = str(tmp_path / "p.tar")
    payload = pickle.dumps(Boom())
    with wds.TarWriter(p) as w:
        for i in range(2):
            w.write({"__key__": f"k{i}", "pyd": payload, "cls": b"0"})
    with _loader([p], tmp_path, batch_size=2) as L:
        b = next(iter(L))
    assert b["pyd"] == [payload, payload]


def test_parquet_source(tmp_path: Path, jpegs: list[bytes]) -> None:
    from mmload.sources.write import write_parquet

    rows = [
        {
            "__key__": f"r{i}",
            "jpg": jpegs[i],
            "label": i,
            "score": i / 10,
            "caption": f"c{i}",
            "emb": np.full(3, i, np.float32),
        }
        for i in range(10)
    ]
    p = write_parquet(rows, str(tmp_path / "t.parquet"), row_group_size=4)
    with _loader([p], tmp_path, batch_size=5, shuffle=True, seed=0) as L:
        batches = list(L)
    b = batches[0]
    assert list(b) == ["__key__", "caption", "emb", "jpg", "label", "score"]
    assert b["jpg"].shape == (5, 3, 32, 32)
    assert b["label"].dtype == torch.int64
    assert b["score"].dtype == torch.float32
    assert b["emb"].shape == (5, 3)
    labels = sorted(int(x) for bb in batches for x in bb["label"])
    assert labels == list(range(10))


def test_closed_loader_refuses(make_shards, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    paths, _ = make_shards([4])
    L = _loader(paths, tmp_path)
    L.close()
    L.close()  # idempotent
    with pytest.raises(ConfigError, match="closed"):
        iter(L)


def test_an_all_bad_batch_takes_a_sample_of_the_last_batch(make_shards, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """A batch whose every sample is bad repeats a good sample of the batch before (same
    shapes); the epoch's first batch repeats the first good sample of the rank's epoch; with no
    good sample at all: counted, then an error."""
    paths, keys = make_shards([4])
    _corrupt_one_jpeg(paths, 1, "garbage")
    with _loader(paths, tmp_path, batch_size=1, on_error="skip", max_bad_samples=3) as L:
        batches = list(L)
        assert [b["__key__"] for b in batches] == [[keys[0]], [keys[0]], [keys[2]], [keys[3]]]
        assert torch.equal(batches[1]["jpg"], batches[0]["jpg"])
        assert batches[1]["cls"].tolist() == batches[0]["cls"].tolist()
        assert [b["key"] for b in L.stats()["bad"]] == [keys[1]]
    _corrupt_one_jpeg(paths, 0, "garbage")
    with _loader(paths, tmp_path, batch_size=1, on_error="skip", max_bad_samples=3) as L:
        batches = list(L)
        assert [b["__key__"] for b in batches] == [[keys[2]], [keys[2]], [keys[2]], [keys[3]]]
        assert [b["key"] for b in L.stats()["bad"]] == [keys[0], keys[1]]  # each counted once
    for i in (2, 3):
        _corrupt_one_jpeg(paths, i, "garbage")
    with _loader(paths, tmp_path, batch_size=1, on_error="skip", max_bad_samples=4) as L:
        with pytest.raises(DecodeError, match="no good sample was found"):
            list(L)
        assert L.stats()["bad"][0]["key"] == keys[0]
