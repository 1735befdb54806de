"""The documentation site (guides + the API reference generated from docstrings) builds with
Sphinx with warnings as errors, and the reference covers the public API."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import mmload

ROOT = Path(__file__).resolve().parents[1]
pytest.importorskip("sphinx", reason="sphinx is a dev dependency (pip install -e '.[docs]')")
pytest.importorskip("myst_parser", reason="myst-parser is a dev dependency")


@pytest.mark.slow
def test_docs_build_without_warnings(tmp_path: Path) -> None:
    out = tmp_path / "html"
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "sphinx",
            "-W",
            "--keep-going",
            "-q",
            "-b",
            "html",
            "docs",
            str(out),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    api = (out / "api.html").read_text(encoding="utf-8")
    public = [n for n in mmload.__all__ if not n.startswith("_")]
    missing = [n for n in public if f'id="mmload.{n}"' not in api]
    assert not missing, f"public names without an API entry: {missing}"
    for page in ("getting-started", "concepts", "comparison"):
        assert (out / f"{page}.html").exists()
