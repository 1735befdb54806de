"""The public API: small, sorted, lazy; heavy dependencies stay unimported."""

from __future__ import annotations

import subprocess
import sys

import mmload


def test_all_is_sorted_and_resolves() -> None:
    assert mmload.__all__ == sorted(mmload.__all__)
    for name in mmload.__all__:
        assert getattr(mmload, name) is not None
    assert dir(mmload) == sorted(mmload.__all__)


def test_import_is_light() -> None:
    code = (
        "import sys, mmload; "
        "heavy = [m for m in ('nvidia.dali', 'cudf', 'numba', 'numba.cuda', 'ray', 'torch', "
        "'pyarrow', 'mmload.loader') if m in sys.modules]; print(heavy)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_using_the_loader_does_not_pull_gpu_libraries(make_shards, tmp_path) -> None:  # type: ignore[no-untyped-def]
    paths, _ = make_shards([2], image=False)
    code = (
        "import sys, mmload; "
        f"L = mmload.Loader({paths!r}, batch_size=2, cache_dir={str(tmp_path)!r}); next(iter(L)); L.close(); "
        "print([m for m in ('cudf', 'numba.cuda', 'ray') if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == "[]"


def test_errors_carry_shard_and_key() -> None:
    e = mmload.DecodeError("bad image", shard="a.tar", key="k1")
    assert (e.shard, e.key, e.reason) == ("a.tar", "k1", "bad image")
    assert "a.tar" in str(e) and "k1" in str(e)
    assert isinstance(mmload.ConfigError("x"), ValueError)
