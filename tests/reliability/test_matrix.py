"""The corrupt-data matrix: every variant, in both error modes, in its own process with a timeout.

The contract: a bad input gives an ``MmloadError`` naming the shard, or (``on_error="skip"``)
an epoch that completes with every intact sample yielded or listed in ``stats()["bad"]``.
Never a crash, a hang, a foreign exception, a silently lost sample or a batch field that
changes type; each outcome is one the variant allows (``matrix.py``).

The whole matrix is marked ``slow``; a representative subset (a few variants of every family)
runs unmarked. ``MMLOAD_MATRIX_REPORT=<path>`` writes the summary as JSON (for the docs);
``pytest -s`` shows the table.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import matrix
import runner

TIMEOUT = float(os.environ.get("MMLOAD_MATRIX_TIMEOUT", "60"))
# Bounds the whole run even if many variants hang (each hang costs TIMEOUT / concurrency).
TOTAL_TIMEOUT = float(os.environ.get("MMLOAD_MATRIX_TOTAL_TIMEOUT", "1500"))

#: Variants of the unmarked quick run: a few of every family, the known-hard cases first.
QUICK = (
    "tar_trunc_in_padding_s1_sample2",
    "tar_trunc_at_header_s0_sample0",
    "tar_trunc_after_last_member_s1",
    "tar_trunc_zero_bytes_s0",
    "tar_hdr_size_non_octal",
    "tar_hdr_size_negative_b256",
    "tar_hdr_size_huge_b256",
    "tar_hdr_checksum_wrong",
    "tar_hardlink_only_sample",
    "tar_jpg_is_symlink",
    "tar_gnu_longname",
    "tar_pax_malformed_record",
    "tar_non_utf8_member_names",
    "tar_non_contiguous_sample",
    "tar_bitflip_any_seed0",
    "targz_truncated_half",
    "targz_bitflip_seed0",
    "idx_header_v1_1",
    "idx_offset_past_end",
    "idx_key_with_space",
    "parquet_trunc_50pct",
    "parquet_bitflip_body_seed0",
    "parquet_footer_garbage",
    "parquet_cls_string_in_second",
    "parquet_null_binary_cell",
    "parquet_zero_rows_all",
    "parquet_invalid_utf8_txt",
    "parquet_list_ragged_in_second",
    "arrow_bitflip_body_seed1",
    "arrow_magic_head",
    "arrow_missing_key_column",
    "arrow_null_key_row0_first_file",
    "stream_trunc_50pct",
    "stream_bitflip_any_seed0",
    "stream_zero_rows_second",
    "jpg_truncated_half",
    "png_bomb_header",
    "jpg_default_backend_garbage",
    "wav_truncated_half",
    "flac_bitflip_seed0",
    "mp4_truncated_half",
    "field_json_deep_list",
    "field_cls_2_pow_70",
    "field_txt_invalid_utf8",
)


def _run(tmp_path: Path, vs: list[matrix.Variant]) -> dict[str, object]:
    t0 = time.monotonic()
    verdicts, _ = runner.run_matrix(
        tmp_path, vs, timeout=TIMEOUT, concurrency=2, total_timeout=TOTAL_TIMEOUT
    )
    summary = runner.summarize(verdicts)
    summary["seconds"] = round(time.monotonic() - t0, 1)
    print()  # noqa: T201 - the table is the point of `pytest -s`
    print(runner.format_table(summary), f"in {summary['seconds']}s")  # noqa: T201
    for row in summary["violations"]:  # type: ignore[attr-defined]
        print(f"  {row['variant']} [{row['mode']}] {row['categories']}: {row['message'][:160]}")  # noqa: T201
    report = os.environ.get("MMLOAD_MATRIX_REPORT")
    if report:
        Path(report).write_text(json.dumps(summary, indent=1, sort_keys=True))
    return summary


def _check(summary: dict[str, object]) -> None:
    total = summary["total"]
    assert isinstance(total, dict)
    bad = {c: total[c] for c in runner.VIOLATIONS if total[c]}
    lines = [
        f"{row['variant']} [{row['mode']}] {row['categories']}: {row['message'][:200]}"
        for row in summary["violations"]  # type: ignore[attr-defined]
    ]
    assert not bad, f"contract violations {bad}:\n" + "\n".join(lines)


def test_matrix_has_enough_variants() -> None:
    vs = matrix.variants()
    assert len(vs) >= 150
    families = {v.family for v in vs}
    assert {
        "tar",
        "targz",
        "dali_idx",
        "parquet",
        "arrow_file",
        "arrow_stream",
        "media",
        "fields",
    } <= families
    for v in vs:
        assert set(v.allowed) == {"raise", "skip"} and all(v.allowed.values()), v.name
    missing = [n for n in QUICK if n not in {v.name for v in vs}]
    assert not missing


@pytest.mark.timeout(600)
def test_quick_matrix(tmp_path: Path) -> None:
    _check(_run(tmp_path, [matrix.get_variant(n) for n in QUICK]))


@pytest.mark.slow
@pytest.mark.timeout(int(TOTAL_TIMEOUT) + 300)
def test_full_matrix(tmp_path: Path) -> None:
    summary = _run(tmp_path, matrix.variants())
    assert summary["variants"] >= 150
    _check(summary)


# -- the oracle itself can fail ------------------------------------------------------------------


def _fake(mode: str, outcome: str, **kw: object) -> dict[str, object]:
    res: dict[str, object] = {
        "variant": "v",
        "mode": mode,
        "outcome": outcome,
        "yielded_keys": [],
        "bad": [],
        "type_changes": [],
        "message": "",
    }
    res.update(kw)
    return res


def test_oracle_catches_planted_failures() -> None:
    v = matrix.Variant("v", "tar", lambda d: matrix.Built([], {}), matrix.CORRUPT)
    built = matrix.Built(["a.tar", "b.tar"], {"k1": "a.tar", "k2": "a.tar", "k3": "b.tar"})

    # A planted silent loss: k2 neither yielded nor listed.
    vd = runner.judge(
        v,
        built,
        _fake(
            "skip",
            "complete",
            yielded_keys=["k1", "k3"],
            bad=[{"shard": "b.tar", "key": "zz", "reason": "x"}],
        ),
    )
    assert "silent" in vd.violations and vd.missing == ["k2"]
    # Listed by key, or by a shard-level entry (key None) of its own shard: accounted.
    for bad in (
        {"shard": "a.tar", "key": "k2", "reason": "x"},
        {"shard": "a.tar", "key": None, "reason": "x"},
    ):
        vd = runner.judge(v, built, _fake("skip", "complete", yielded_keys=["k1", "k3"], bad=[bad]))
        assert vd.violations == [], vd
    # A shard-level entry of another shard does not account for k2.
    vd = runner.judge(
        v,
        built,
        _fake(
            "skip",
            "complete",
            yielded_keys=["k1", "k3"],
            bad=[{"shard": "b.tar", "key": None, "reason": "x"}],
        ),
    )
    assert "silent" in vd.violations
    # A key that is not in the data set.
    vd = runner.judge(
        v,
        built,
        _fake(
            "skip",
            "complete",
            yielded_keys=["k1", "k2", "k3", "zz"],
            bad=[{"shard": "a.tar", "key": "k9", "reason": "x"}],
        ),
    )
    assert "silent" in vd.violations and vd.unexpected == ["zz"]
    # A key changed by a bit flip (undetectable in Arrow IPC) is paired with its origin only
    # when the variant flips bits, and only within that many bits.
    flipped = _fake(
        "skip",
        "complete",
        yielded_keys=["k1", "k3", "k3"],
        bad=[{"shard": "b.tar", "key": "zz", "reason": "x"}],
    )
    flipped["yielded_keys"] = ["k1", "k3", "k0"]  # "k2" ^ 0x02 in its last byte
    assert "silent" in runner.judge(v, built, flipped).violations
    vf = matrix.Variant("vf", "tar", lambda d: matrix.Built([], {}), matrix.MAYBE, key_flips=1)
    assert runner.judge(vf, built, flipped).violations == []
    flipped["yielded_keys"] = ["k1", "k3", "k1x"]
    assert "silent" in runner.judge(vf, built, flipped).violations
    # Raise mode must fail on corrupt data; a complete run that lost nothing is still wrong.
    vd = runner.judge(v, built, _fake("raise", "complete", yielded_keys=["k1", "k2", "k3"]))
    assert vd.violations == ["not_allowed"]
    # Skip mode that completes without listing anything although raise mode must fail.
    vd = runner.judge(v, built, _fake("skip", "complete", yielded_keys=["k1", "k2", "k3"]))
    assert vd.violations == ["unlisted"]
    for outcome in ("crash", "hang", "foreign"):
        assert runner.judge(v, built, _fake("raise", outcome)).violations == [outcome]
    assert runner.judge(v, built, _fake("raise", "unattributed_error")).violations == [
        "unattributed"
    ]
    vd = runner.judge(v, built, _fake("raise", "mmload_error", type_changes=["batch 2: ..."]))
    assert vd.violations == ["type_change"]
    assert runner.judge(v, built, _fake("raise", "mmload_error")).violations == []


def test_type_change_detector() -> None:
    first = {"jpg": ["tensor", "torch.float16", [3, 32, 32]], "txt": ["list", ["str"]]}
    assert runner._changes(first, dict(first), 1) == []
    assert runner._changes(first, {**first, "jpg": ["list", ["bytes"]]}, 1)
    assert runner._changes(first, {**first, "jpg": ["tensor", "torch.float32", [3, 32, 32]]}, 1)
    assert runner._changes(first, {**first, "jpg": ["tensor", "torch.float16", [3, 16, 16]]}, 1)
    assert runner._changes(first, {**first, "txt": ["list", ["int", "str"]]}, 1)
    # A null in a string column keeps the field a list (nullable), not a type change.
    assert runner._changes(first, {**first, "txt": ["list", ["NoneType", "str"]]}, 1) == []
    assert runner._changes(first, {"jpg": first["jpg"]}, 1)


def test_harness_sees_crash_and_hang(tmp_path: Path) -> None:
    """A child killed by a signal is a crash, one that outlives its timeout a hang."""
    v = matrix.get_variant("tar_trunc_zero_bytes_s1")
    d = matrix.build_variant(v, tmp_path)
    jobs = [
        runner.Job("__crash__", "raise", str(d)),
        runner.Job("__hang__", "raise", str(d)),
        runner.Job(v.name, "raise", str(d)),
    ]
    res = runner.run_many(jobs, timeout=8, concurrency=2)
    assert [r["outcome"] for r in res] == ["crash", "hang", "mmload_error"], res
    assert "SIGSEGV" in res[0]["message"]
