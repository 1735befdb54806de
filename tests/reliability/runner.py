"""Runs corrupt-data variants, each in its own process with a timeout, and judges the results.

Child side (:func:`run_variant`): one full epoch of ``mmload.Loader`` over a prepared variant
folder, summarised as one JSON-able dict: ``outcome`` (``complete`` / ``mmload_error`` /
``unattributed_error`` / ``foreign``), error type and message, the keys yielded, the bad
entries listed, and the batch field types that changed mid-epoch.

Parent side (:func:`run_many`): a forkserver that imported torch, mmload, pyarrow, PIL, PyAV and
soundfile once forks one child per (variant, mode), at most ``concurrency`` at a time; a child
that dies by a signal is a ``crash``, one that outlives its timeout a ``hang`` (killed, its stack
dumped by faulthandler first). :func:`judge` then applies the contract.

As a script::

    python tests/reliability/runner.py --root DIR VARIANT MODE   # one JSON line
    python tests/reliability/runner.py --root DIR --all           # the whole matrix, a table
"""

from __future__ import annotations

import argparse
import contextlib
import faulthandler
import json
import multiprocessing as mp
import multiprocessing.connection as mpc
import os
import signal
import sys
import time
import traceback
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)

import matrix  # noqa: E402

MODES = ("raise", "skip")
BATCH_SIZE = 4
SKIP_BUDGET = 10**9
PRELOAD = [
    "torch",
    "numpy",
    "pyarrow",
    "pyarrow.parquet",
    "pyarrow.ipc",
    "PIL.Image",
    "av",
    "soundfile",
    "PIL.JpegImagePlugin",
    "PIL.PngImagePlugin",
    "PIL.WebPImagePlugin",
    "pandas",
    "mmload",
    "mmload.loader",
    "mmload.pipeline",
    "mmload.decode.audio",
    "mmload.decode.image",
    "mmload.decode.video",
    "mmload.demo",
    "matrix",
    "runner",
]


# -- child ---------------------------------------------------------------------------------------


def _describe(value: Any) -> list[Any]:
    import torch

    if isinstance(value, torch.Tensor):
        return ["tensor", str(value.dtype), list(value.shape[1:])]
    if isinstance(value, list):
        return ["list", sorted({type(x).__name__ for x in value})]
    return [type(value).__name__]


def _changes(first: dict[str, list[Any]], now: dict[str, list[Any]], k: int) -> list[str]:
    out: list[str] = []
    if set(first) != set(now):
        out.append(f"batch {k}: fields {sorted(now)} != first batch's {sorted(first)}")
    for name in sorted(set(first) & set(now)):
        a, b = first[name], now[name]
        if a[0] != b[0] or (a[0] == "tensor" and a != b):
            out.append(f"batch {k}: field {name!r} is {b}, was {a}")
        elif (
            a[0] == "list"
            and not name.endswith("json")
            and not set(b[1])
            <= set(a[1])
            | {
                "NoneType"  # a null in a nullable (string, bytes) column: the field stays a list
            }
        ):
            out.append(f"batch {k}: field {name!r} holds {b[1]}, first batch {a[1]}")
    return out


def run_variant(name: str, mode: str, vdir: str | os.PathLike[str]) -> dict[str, Any]:
    """One full epoch of variant ``name`` (built in ``vdir``) in error mode ``mode``."""
    import mmload
    from mmload.errors import MmloadError

    v = matrix.get_variant(name)
    built = matrix.load_built(vdir)
    res: dict[str, Any] = {
        "variant": name,
        "mode": mode,
        "outcome": None,
        "error_type": None,
        "message": None,
        "yielded_keys": [],
        "bad": [],
        "type_changes": [],
        "batches": 0,
    }
    loader = None
    first: dict[str, list[Any]] | None = None
    try:
        loader = mmload.Loader(
            built.source,
            batch_size=BATCH_SIZE,
            on_error=mode,
            max_bad_samples=0 if mode == "raise" else SKIP_BUDGET,
            index_cache=False,
            cache_dir=os.path.join(vdir, f"cache-{mode}"),
            **v.kwargs(),
        )
        for k, batch in enumerate(loader):
            desc = {f: _describe(x) for f, x in batch.items()}
            if first is None:
                first = desc
            else:
                res["type_changes"] += _changes(first, desc, k)
            res["yielded_keys"] += list(batch["__key__"])
            res["batches"] = k + 1
        res["outcome"] = "complete"
    except MmloadError as e:
        res["error_type"] = type(e).__name__
        res["message"] = str(e)
        shard = getattr(e, "shard", None)
        named = isinstance(shard, str) and shard and f"shard {shard!r}" in str(e)
        res["outcome"] = "mmload_error" if named else "unattributed_error"
    except Exception as e:  # noqa: BLE001 - a foreign exception is what this looks for
        res["outcome"] = "foreign"
        res["error_type"] = type(e).__name__
        res["message"] = f"{type(e).__name__}: {e}"[:2000]
        res["traceback"] = traceback.format_exc()[-4000:]
    finally:
        if loader is not None:
            try:
                res["bad"] = loader.stats()["bad"]
                loader.close()
            except Exception as e:  # noqa: BLE001
                res["outcome"] = "foreign"
                res["error_type"] = type(e).__name__
                res["message"] = f"in stats()/close(): {type(e).__name__}: {e}"[:2000]
                res["traceback"] = traceback.format_exc()[-4000:]
    return res


def _child(name: str, mode: str, vdir: str, conn: mpc.Connection, timeout: float) -> None:
    fault = open(os.path.join(vdir, f"fault-{mode}.txt"), "w")  # noqa: SIM115 - kept to the end
    faulthandler.enable(file=fault)
    faulthandler.dump_traceback_later(max(1.0, timeout - 1.5), exit=False, file=fault)
    if name == "__crash__":  # self-tests of the harness (test_matrix.py)
        os.kill(os.getpid(), signal.SIGSEGV)
    if name == "__hang__":
        time.sleep(3600)
    res = run_variant(name, mode, vdir)
    conn.send_bytes(json.dumps(res).encode())
    conn.close()
    faulthandler.cancel_dump_traceback_later()


# -- parent --------------------------------------------------------------------------------------


@dataclass
class Job:
    name: str
    mode: str
    vdir: str


@dataclass
class _Running:
    job: Job
    proc: Any
    conn: mpc.Connection
    deadline: float
    t0: float
    result: dict[str, Any] | None = None
    conn_open: bool = True


def _context() -> Any:
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)
    return ctx


@contextlib.contextmanager
def _without_main_path() -> Iterator[None]:
    """Children need nothing from ``__main__`` (the target is ``runner._child``): hide its file
    while a child starts, so multiprocessing does not re-run the main script (pytest's, or one
    without a ``__main__`` guard) in every child."""
    main = sys.modules.get("__main__")
    saved = main.__dict__.pop("__file__", None) if main is not None else None
    spec = main.__dict__.get("__spec__") if main is not None else None
    if main is not None:
        main.__spec__ = None
    try:
        yield
    finally:
        if main is not None:
            main.__spec__ = spec
            if saved is not None:
                main.__file__ = saved


def _finish(r: _Running, *, hung: bool) -> dict[str, Any]:
    code = r.proc.exitcode
    fault_file = Path(r.job.vdir) / f"fault-{r.job.mode}.txt"
    fault = fault_file.read_text(errors="replace")[-3000:] if fault_file.exists() else ""
    res = r.result or {
        "variant": r.job.name,
        "mode": r.job.mode,
        "yielded_keys": [],
        "bad": [],
        "type_changes": [],
        "error_type": None,
    }
    res["returncode"] = code
    res["seconds"] = round(time.monotonic() - r.t0, 3)
    if hung:
        res["outcome"] = "hang"
        res["message"] = (
            "timed out" + (" after its result (on exit)" if r.result else "") + "; stack: " + fault
        )
    elif r.result is None:
        res["outcome"] = "crash"
        sig = -code if code is not None and code < 0 else None
        what = signal.Signals(sig).name if sig else f"exit code {code}"
        res["message"] = f"child died ({what}) without a result; {fault}"
    elif code not in (0, None):
        res["outcome"] = "crash"
        res["message"] = f"child exited with {code} after its result ({res.get('message')})"
    return res


def _receive(r: _Running) -> None:
    if r.conn_open and r.conn.poll():
        with contextlib.suppress(EOFError, OSError):
            r.result = json.loads(r.conn.recv_bytes())
        r.conn_open = False
        r.conn.close()


def run_many(
    jobs: Sequence[Job],
    *,
    timeout: float = 60.0,
    concurrency: int = 2,
    total_timeout: float | None = None,
) -> list[dict[str, Any]]:
    """Run every job in its own forked process, ``concurrency`` at a time; results in order.

    A job still queued when ``total_timeout`` has passed is not run (outcome ``not_run``)."""
    ctx = _context()
    queue = list(enumerate(jobs))[::-1]
    running: list[_Running] = []
    results: dict[int, dict[str, Any]] = {}
    index: dict[int, int] = {}
    t_start = time.monotonic()
    while queue or running:
        while queue and len(running) < concurrency:
            i, job = queue.pop()
            if total_timeout is not None and time.monotonic() - t_start > total_timeout:
                results[i] = {
                    "variant": job.name,
                    "mode": job.mode,
                    "outcome": "not_run",
                    "message": "the matrix ran out of its total time",
                    "yielded_keys": [],
                    "bad": [],
                    "type_changes": [],
                }
                continue
            recv, send = ctx.Pipe(duplex=False)
            p = ctx.Process(
                target=_child, args=(job.name, job.mode, job.vdir, send, timeout), daemon=True
            )
            now = time.monotonic()
            with _without_main_path():
                p.start()
            send.close()
            r = _Running(job, p, recv, now + timeout, now)
            running.append(r)
            index[id(r)] = i
        if not running:
            continue
        waitables: list[Any] = [r.proc.sentinel for r in running]
        waitables += [r.conn for r in running if r.conn_open]
        left = max(0.0, min(r.deadline for r in running) - time.monotonic())
        mpc.wait(waitables, timeout=left)
        now = time.monotonic()
        still: list[_Running] = []
        for r in running:
            _receive(r)
            if r.proc.exitcode is not None:
                _receive(r)  # a result sent just before the exit
                if r.conn_open:
                    r.conn.close()
                    r.conn_open = False
                r.proc.join()
                results[index[id(r)]] = _finish(r, hung=False)
            elif now >= r.deadline:
                r.proc.kill()
                r.proc.join()
                if r.conn_open:
                    r.conn.close()
                results[index[id(r)]] = _finish(r, hung=True)
            else:
                still.append(r)
        running = still
    return [results[i] for i in range(len(jobs))]


# -- judging -------------------------------------------------------------------------------------

CATEGORIES = (
    "complete",
    "mmload_error",
    "skip_listed",
    "crash",
    "hang",
    "foreign",
    "silent",
    "type_change",
    "unattributed",
    "not_allowed",
    "unlisted",
    "not_run",
)
#: Categories any of which makes a run violate the contract.
VIOLATIONS = (
    "crash",
    "hang",
    "foreign",
    "silent",
    "type_change",
    "unattributed",
    "not_allowed",
    "unlisted",
    "not_run",
)


@dataclass
class Verdict:
    variant: str
    family: str
    mode: str
    outcome: str
    categories: list[str]
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    message: str = ""

    @property
    def violations(self) -> list[str]:
        return [c for c in self.categories if c in VIOLATIONS]


def lost_keys(
    intact: dict[str, str],
    extra_ok: Iterable[str],
    yielded: Iterable[str],
    bad: Iterable[dict[str, Any]],
    key_flips: int = 0,
) -> tuple[list[str], list[str]]:
    """(intact keys neither yielded nor listed, yielded keys that are not in the data set).

    A bad entry with ``key`` None accounts for every key of its shard (a shard-level entry).
    With ``key_flips`` > 0 a yielded unknown key that differs from a lost intact key in at most
    that many bits is that key, changed by an undetectable bit flip: neither lost nor foreign."""
    got = set(yielded)
    listed: set[str] = set()
    shard_level: set[str] = set()
    for b in bad:
        if b.get("key") is None:
            shard_level.add(b.get("shard") or "")
        else:
            listed.add(b["key"])
    missing = sorted(
        k
        for k, shard in intact.items()
        if k not in got and k not in listed and shard not in shard_level
    )
    unexpected = sorted(got - set(intact) - set(extra_ok))
    if key_flips:
        for u in list(unexpected):
            twin = next((k for k in missing if _bit_distance(k, u) <= key_flips), None)
            if twin is not None:
                missing.remove(twin)
                unexpected.remove(u)
    return missing, unexpected


def _bit_distance(a: str, b: str) -> int:
    x = a.encode("utf-8", "surrogatepass")
    y = b.encode("utf-8", "surrogatepass")
    if len(x) != len(y):
        return 1 << 30
    return sum(bin(p ^ q).count("1") for p, q in zip(x, y, strict=True))


def judge(v: matrix.Variant, built: matrix.Built, res: dict[str, Any]) -> Verdict:
    """Classify one run against the contract and the variant's allowed outcomes."""
    mode, outcome = res["mode"], res["outcome"]
    cats: list[str] = []
    missing: list[str] = []
    unexpected: list[str] = []
    if outcome == "complete":
        cats.append("complete")
        missing, unexpected = lost_keys(
            built.intact, built.extra_ok, res["yielded_keys"], res["bad"], v.key_flips
        )
        if missing or unexpected:
            cats.append("silent")
        if mode == "skip" and res["bad"]:
            cats.append("skip_listed")
        if mode == "skip" and v.must_list and not res["bad"]:
            cats.append("unlisted")
    elif outcome == "mmload_error":
        cats.append("mmload_error")
    elif outcome == "unattributed_error":
        cats.append("unattributed")
    elif outcome in ("crash", "hang", "foreign", "not_run"):
        cats.append(outcome)
    else:
        cats.append("foreign")
    if res.get("type_changes"):
        cats.append("type_change")
    simple = "mmload_error" if outcome == "mmload_error" else outcome
    if simple not in v.allowed[mode] and not set(cats) & set(VIOLATIONS):
        cats.append("not_allowed")
    msg = res.get("message") or ""
    if "silent" in cats:
        msg = f"lost {missing[:6]} unexpected {unexpected[:6]}; " + msg
    if "type_change" in cats:
        msg = "; ".join(res["type_changes"][:3]) + "; " + msg
    if "unlisted" in cats:
        msg = "skip mode listed nothing although raise mode must fail; " + msg
    if "not_allowed" in cats:
        msg = f"outcome {outcome!r} not in {sorted(v.allowed[mode])}; " + msg
    return Verdict(v.name, v.family, mode, outcome, cats, missing, unexpected, msg)


def summarize(verdicts: Sequence[Verdict]) -> dict[str, Any]:
    """Counts per category, per family and in total, and the list of violations."""
    fams: dict[str, dict[str, int]] = {}
    for vd in verdicts:
        row = fams.setdefault(vd.family, dict.fromkeys(CATEGORIES, 0) | {"runs": 0})
        row["runs"] += 1
        for c in vd.categories:
            row[c] += 1
    total = dict.fromkeys(CATEGORIES, 0) | {"runs": 0}
    for row in fams.values():
        for k, n in row.items():
            total[k] += n
    return {
        "variants": len({vd.variant for vd in verdicts}),
        "runs": len(verdicts),
        "families": fams,
        "total": total,
        "violations": [
            {
                "variant": vd.variant,
                "mode": vd.mode,
                "outcome": vd.outcome,
                "categories": vd.violations,
                "message": vd.message[:300],
            }
            for vd in verdicts
            if vd.violations
        ],
    }


def format_table(summary: dict[str, Any]) -> str:
    cols = ["runs", *CATEGORIES]
    head = f"{'family':14s}" + "".join(f"{c[:12]:>13s}" for c in cols)
    lines = [head, "-" * len(head)]
    rows = [*sorted(summary["families"].items()), ("TOTAL", summary["total"])]
    for fam, row in rows:
        lines.append(f"{fam:14s}" + "".join(f"{row[c]:13d}" for c in cols))
    lines.append(f"{summary['variants']} variants, {summary['runs']} runs")
    return "\n".join(lines)


def build_all(root: Path, vs: Sequence[matrix.Variant]) -> dict[str, Path]:
    return {v.name: matrix.build_variant(v, root) for v in vs}


def run_matrix(
    root: Path,
    vs: Sequence[matrix.Variant] | None = None,
    *,
    modes: Sequence[str] = MODES,
    timeout: float = 60.0,
    concurrency: int = 2,
    total_timeout: float | None = None,
) -> tuple[list[Verdict], list[dict[str, Any]]]:
    """Build, run and judge ``vs`` (default: every variant) in every mode."""
    vs = list(vs) if vs is not None else matrix.variants()
    dirs = build_all(root, vs)
    jobs = [Job(v.name, mode, str(dirs[v.name])) for v in vs for mode in modes]
    results = run_many(jobs, timeout=timeout, concurrency=concurrency, total_timeout=total_timeout)
    by_name = {v.name: v for v in vs}
    verdicts = [
        judge(by_name[r["variant"]], matrix.load_built(dirs[r["variant"]]), r) for r in results
    ]
    return verdicts, results


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--root", required=True, type=Path, help="folder of the built variants")
    ap.add_argument("--all", action="store_true", help="run the whole matrix")
    ap.add_argument("--timeout", type=float, default=60.0)
    ap.add_argument("--json", type=Path, help="write the summary here (with --all)")
    ap.add_argument("variant", nargs="?")
    ap.add_argument("mode", nargs="?", choices=MODES)
    a = ap.parse_args(argv)
    if a.all:
        import runner  # the forkserver's children import this name, not __main__

        verdicts, _ = runner.run_matrix(a.root, timeout=a.timeout)
        summary = summarize(verdicts)
        sys.stdout.write(format_table(summary) + "\n")
        for row in summary["violations"]:
            sys.stdout.write(
                f"{row['variant']} [{row['mode']}] {row['categories']}: {row['message'][:200]}\n"
            )
        if a.json:
            a.json.write_text(json.dumps(summary, indent=1))
        return 1 if summary["violations"] else 0
    if not a.variant or not a.mode:
        ap.error("give VARIANT MODE, or --all")
    d = a.root / a.variant
    if not (d / "spec.json").exists():
        matrix.build_variant(matrix.get_variant(a.variant), a.root)
    sys.stdout.write(json.dumps(run_variant(a.variant, a.mode, d)) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
