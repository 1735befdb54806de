"""The corrupt-data matrix (``corrupt.py``): every variant, in both modes, in its own process.

Each (variant, mode) runs one epoch through ``mmload.Loader`` in a child forked from this
process (torch and mmload already imported, so a child costs milliseconds), with a timeout. The
parent classifies what happened:

* ``crash``: the child died of a signal or exited without a result;
* ``hang``: no result within the timeout;
* ``foreign``: an exception that is not an ``MmloadError``;
* ``unattributed``: an mmload error whose message names no shard;
* ``silent``: the epoch completed but an intact key was neither yielded nor listed in
  ``stats()["bad"]`` (by key, or by a shard-level entry of its shard), or a key appeared that
  the data set does not hold;
* ``type_change``: a batch whose fields, tensor dtypes or per-sample shapes differ from the first
  batch's, or a batch of the wrong size;
* otherwise ``complete`` or ``error``, which must be among the variant's allowed outcomes.

The counts per family and outcome are printed (``pytest -s``) and, with
``MMLOAD_MATRIX_REPORT=<path>``, written as JSON.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import sys
import traceback
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from corrupt import Variant, variants

from mmload import Loader
from mmload.errors import MmloadError

TIMEOUT_S = 60.0
BAD = ("crash", "hang", "foreign", "unattributed", "silent", "type_change", "unexpected")


def _signature(batch: dict[str, Any]) -> dict[str, Any]:
    sig: dict[str, Any] = {}
    for k, v in batch.items():
        if isinstance(v, torch.Tensor):
            sig[k] = ("tensor", str(v.dtype), tuple(v.shape[1:]))
        else:
            sig[k] = ("list",)
    return sig


def run_one(v: Variant, mode: str, root: Path) -> dict[str, Any]:
    """In the child: one epoch of the variant; a plain dict describing what happened."""
    d = root / f"{v.name}-{mode}"
    d.mkdir(parents=True)
    source = v.build(d)
    keys: list[str] = []
    sizes: list[int] = []
    sigs: list[dict[str, Any]] = []
    loader = None
    try:
        loader = Loader(
            source,
            batch_size=v.batch_size,
            on_error=mode,
            max_bad_samples=10**6 if mode == "skip" else 0,
            cache_dir=d / "cache",
            index_cache=False,
            **v.kwargs,
        )
        with loader:
            for batch in loader:
                keys += batch["__key__"]
                sizes.append(len(batch["__key__"]))
                sigs.append(_signature(batch))
        out: dict[str, Any] = {"outcome": "complete"}
    except MmloadError as e:
        out = {"outcome": "error", "type": type(e).__name__, "message": str(e)[:500]}
    except Exception as e:  # noqa: BLE001 - a foreign exception is what the matrix looks for
        out = {"outcome": "foreign", "type": type(e).__name__, "message": traceback.format_exc()}
    bad = loader.stats()["bad"] if loader is not None else []
    return {**out, "keys": keys, "sizes": sizes, "sigs": sigs, "bad": bad, "dir": str(d)}


def classify(
    v: Variant, mode: str, res: dict[str, Any] | None, exitcode: int | None
) -> tuple[str, str]:
    """(class, detail) of one run's result, as the module docstring defines them."""
    if res is None:
        return ("hang", "no result in time") if exitcode is None else ("crash", f"exit {exitcode}")
    if exitcode not in (0, None):
        return "crash", f"exit {exitcode} after a result"
    if res["outcome"] == "foreign":
        return "foreign", res["message"][-600:]
    if res["outcome"] == "error":
        if "shard '" not in res["message"]:
            return "unattributed", res["message"]
        return ("error" if "error" in v.allowed[mode] else "unexpected"), res["message"][:200]
    # Complete: every intact key accounted for, types stable, sizes right.
    yielded = set(res["keys"])
    listed = {b["key"] for b in res["bad"]}
    shard_level = {Path(b["shard"]).name for b in res["bad"] if b["key"] is None}
    missing = [
        k
        for k, s in v.intact.items()
        if k not in yielded and k not in listed and s not in shard_level
    ]
    if missing:
        return "silent", f"lost without a trace: {sorted(missing)[:5]} ({len(missing)})"
    extra = yielded - set(v.intact)
    if extra and not v.extra_keys_ok:
        return "silent", f"keys not in the data set: {sorted(extra)[:5]}"
    if mode == "raise" and (res["bad"] or yielded != set(v.intact)):
        return "silent", "raise mode completed without every key"
    sigs, sizes = res["sigs"], res["sizes"]
    if any(s != sigs[0] for s in sigs):
        return "type_change", f"{sigs[0]} vs {next(s for s in sigs if s != sigs[0])}"
    if any(n != v.batch_size for n in sizes[:-1]) or (sizes and not 0 < sizes[-1] <= v.batch_size):
        return "type_change", f"batch sizes {sizes}"
    return ("complete" if "complete" in v.allowed[mode] else "unexpected"), ""


def _child(v: Variant, mode: str, root: Path, conn: Any) -> None:
    try:
        conn.send(run_one(v, mode, root))
    finally:
        conn.close()


def run_matrix(vs: list[Variant], root: Path) -> list[dict[str, Any]]:
    """Every (variant, mode) in a forked child, two at a time."""
    ctx = mp.get_context("fork")
    jobs = [(v, m) for v in vs for m in ("raise", "skip")]
    results: list[dict[str, Any]] = []
    running: list[tuple[Variant, str, Any, Any]] = []
    width = max(1, min(2, len(os.sched_getaffinity(0))))

    def finish(item: tuple[Variant, str, Any, Any]) -> None:
        v, mode, proc, conn = item
        res = None
        if conn.poll(TIMEOUT_S):
            try:
                res = conn.recv()
            except EOFError:  # the child died before it sent anything
                res = None
        proc.join(5 if res is not None else 0.1)
        if proc.is_alive() and res is None:
            proc.join(2)
        if proc.is_alive():
            proc.kill()
            proc.join()
            exitcode = None if res is None else 0
        else:
            exitcode = proc.exitcode
        cls, detail = classify(v, mode, res, exitcode)
        results.append(
            {"variant": v.name, "family": v.family, "mode": mode, "class": cls, "detail": detail}
        )

    for v, mode in jobs:
        if len(running) >= width:
            finish(running.pop(0))
        parent, child = ctx.Pipe(duplex=False)
        proc = ctx.Process(target=_child, args=(v, mode, root, child))
        proc.start()
        child.close()
        running.append((v, mode, proc, parent))
    for item in running:
        finish(item)
    return results


def _table(results: list[dict[str, Any]]) -> str:
    classes = ["complete", "error", *BAD]
    per: dict[str, Counter[str]] = defaultdict(Counter)
    for r in results:
        per[r["family"]][r["class"]] += 1
        per["TOTAL"][r["class"]] += 1
    lines = ["family".ljust(16) + "".join(c.rjust(13) for c in classes)]
    for fam in sorted(per, key=lambda f: (f == "TOTAL", f)):
        lines.append(fam.ljust(16) + "".join(str(per[fam][c]).rjust(13) for c in classes))
    return "\n".join(lines)


@pytest.mark.slow
def test_corrupt_data_matrix(tmp_path: Path) -> None:
    vs = variants()
    assert len(vs) >= 150
    assert len({v.name for v in vs}) == len(vs), "variant names are unique"
    results = run_matrix(vs, tmp_path)
    table = _table(results)
    print(f"\ncorrupt-data matrix: {len(vs)} variants x 2 modes\n{table}")  # noqa: T201
    report = os.environ.get("MMLOAD_MATRIX_REPORT")
    if report:
        Path(report).write_text(json.dumps({"variants": len(vs), "results": results}, indent=1))
    violations = [r for r in results if r["class"] in BAD]
    assert not violations, "\n".join(
        f"{r['variant']} [{r['mode']}]: {r['class']}: {r['detail'][:300]}" for r in violations
    )


def test_the_oracle_catches_what_it_must() -> None:
    """The classifier flags a planted silent loss, type change, foreign error and crash."""
    from corrupt import BENIGN, RAISE_ERR

    v = Variant("planted", "x", lambda d: [], {"k1": "a.tar", "k2": "a.tar"}, RAISE_ERR)
    ok = {
        "outcome": "complete",
        "keys": ["k1", "k2"],
        "sizes": [2],
        "sigs": [{}],
        "bad": [],
        "dir": "/",
    }
    assert classify(v, "skip", ok, 0)[0] == "complete"
    lost = {**ok, "keys": ["k1"], "sizes": [1]}
    assert classify(v, "skip", lost, 0)[0] == "silent"
    listed = {**lost, "bad": [{"shard": "/x/a.tar", "key": "k2", "reason": "r"}]}
    assert classify(v, "skip", listed, 0)[0] == "complete"
    shard_level = {**lost, "bad": [{"shard": "/x/a.tar", "key": None, "reason": "r"}]}
    assert classify(v, "skip", shard_level, 0)[0] == "complete"
    other_shard = {**lost, "bad": [{"shard": "/x/b.tar", "key": None, "reason": "r"}]}
    assert classify(v, "skip", other_shard, 0)[0] == "silent"
    changed = {
        **ok,
        "keys": ["k1", "k2"],
        "sizes": [1, 1],
        "sigs": [{"a": ("list",)}, {"a": ("tensor",)}],
    }
    v4 = Variant("planted", "x", lambda d: [], {"k1": "a.tar", "k2": "a.tar"}, BENIGN, batch_size=1)
    assert classify(v4, "raise", changed, 0)[0] == "type_change"
    assert classify(v, "raise", {"outcome": "foreign", "message": "KeyError"}, 0)[0] == "foreign"
    assert (
        classify(v, "raise", {"outcome": "error", "message": "no shard named"}, 0)[0]
        == "unattributed"
    )
    assert classify(v, "raise", ok, 0)[0] == "unexpected"  # raise mode must fail for RAISE_ERR
    assert classify(v, "raise", None, -11)[0] == "crash"
    assert classify(v, "raise", None, None)[0] == "hang"
