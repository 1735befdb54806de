"""``benchmarks/fuzz.py`` keeps working: a short run over every parser finds nothing, and a
planted crash is found, saved and reported (so a clean run means something)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "fuzz.py"


@pytest.mark.slow
def test_short_fuzz_run_finds_nothing(tmp_path: Path) -> None:
    r = subprocess.run(
        [sys.executable, str(SCRIPT), "--iterations", "300", "--seed", "3", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    assert "no findings" in r.stdout
    report = json.loads((tmp_path / "fuzz.json").read_text())
    assert report


_PLANTED = """
import os, sys, runpy
import mmload.decode.fields as fields
import mmload.decode.headers as headers

real_header, real_value = headers.read_header, fields.decode_value

def crashing_header(data, **kw):
    if len(data) % 5 == 0:
        os.abort()  # a planted crash
    return real_header(data, **kw)

def foreign_value(kind, raw):
    if len(raw) % 3 == 0:
        raise KeyError("planted")  # a planted foreign exception
    return real_value(kind, raw)

headers.read_header, fields.decode_value = crashing_header, foreign_value
sys.argv = [sys.argv[1], *sys.argv[2:]]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.mark.slow
def test_fuzz_finds_planted_crashes_and_foreign_exceptions(tmp_path: Path) -> None:
    wrapper = tmp_path / "planted.py"
    wrapper.write_text(_PLANTED)
    out = tmp_path / "findings"
    r = subprocess.run(
        [
            sys.executable,
            str(wrapper),
            str(SCRIPT),
            "--iterations",
            "120",
            "--seed",
            "0",
            "--parsers",
            "header,fields",
            "--out",
            str(out),
            "--chunk",
            "40",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 1, r.stdout[-4000:] + r.stderr[-4000:]
    rows = {row["parser"]: row for row in json.loads((out / "fuzz.json").read_text())["rows"]}
    assert rows["header"]["crashes"] > 0
    assert rows["fields"]["foreign"] > 0
    assert any(p.name.startswith("header-crash") for p in out.iterdir())
