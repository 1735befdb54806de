"""Test mutmut's mutants with a narrow, per-function test selection (issue 15).

``mutmut run`` tests each mutant with every selected test that reaches the mutated function.
For the remote-shard modules that means the loader, CLI and multi-process tests too (one
survivor costs minutes), so a module of 900 mutants takes hours on 2 cores. This runs the
mutants of ``mutants/`` (made by ``mutmut run`` or ``mutmut generate``; its stats phase gives
the test-to-function map) with: the ``--always`` test files first, then the tests that reach
the mutant's function and whose node id starts with a ``--scope`` prefix, fastest first, ``-x``.
A narrower selection can only turn a kill into a survivor, so its score is a lower bound.

    python benchmarks/mutants.py "mmload.sources.fetch.*" results.txt \\
        --always tests/remote/test_fetch_errors.py --scope tests/remote/test_fetch.py

With ``--two-phase`` the ``--always`` files run alone first (about a mutant a second when they
kill it), then only the survivors run again with the ``--scope`` tests.

One line per mutant is appended to the results file (``name exit-code tests seconds``; exit
code 0: survived, 1: killed, -24: timed out; a rerun skips the names already there). New test
files must be copied into ``mutants/tests`` first. Then ``mutmut show <name>`` shows a survivor.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

PYTEST = ["-p", "no:cacheprovider", "-q", "--timeout=60", "-m", "not slow and not dist and not gpu"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("pattern", help="a glob over mutant names, e.g. 'mmload.sources.fetch.*'")
    ap.add_argument("out", type=Path, help="results file (appended to)")
    ap.add_argument("--always", nargs="*", default=[], help="test files run for every mutant")
    ap.add_argument("--scope", nargs="*", default=[], help="node-id prefixes of reaching tests")
    ap.add_argument("--mutants", type=Path, default=Path("mutants"))
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--timeout", type=int, default=240, help="seconds per mutant")
    ap.add_argument(
        "--two-phase",
        action="store_true",
        help="first the --always tests alone (a kill then needs no collection of the --scope "
        "files), then the survivors again with the --scope tests",
    )
    a = ap.parse_args()

    root = a.mutants.resolve()
    stats = json.loads((root / "mutmut-stats.json").read_text())
    by_function, duration = stats["tests_by_mangled_function_name"], stats["duration_by_test"]
    names: list[str] = []
    for meta in sorted((root / "mmload").rglob("*.py.meta")):
        names += [k for k in json.loads(meta.read_text())["exit_code_by_key"]]
    names = [n for n in names if fnmatch.fnmatch(n, a.pattern)]
    done = set()
    if a.out.exists():
        done = {line.split()[0] for line in a.out.read_text().splitlines() if line.strip()}
    todo = [n for n in names if n not in done]
    print(f"{len(names)} mutants match, {len(todo)} to run", flush=True)

    # The selection must pass on the code as it is, or every mutant would count as killed.
    clean = subprocess.run(
        [sys.executable, "-m", "pytest", *PYTEST, *a.always],
        cwd=root,
        env=dict(os.environ, MUTANT_UNDER_TEST="none"),
        capture_output=True,
        text=True,
    )
    if clean.returncode != 0:
        sys.exit("the --always tests fail without a mutant:\n" + clean.stdout[-3000:])

    # Each mutant runs in a child forked from this process once it has imported mmload (from
    # mutants/) and pytest: no interpreter start or torch import per mutant. The trampolines
    # mutmut put in every function read MUTANT_UNDER_TEST at each call.
    os.chdir(root)
    sys.path.insert(0, str(root))
    import pytest

    import mmload.sources  # noqa: F401

    running: dict[int, tuple[str, int, float]] = {}  # pid -> (name, tests, start)

    def start(name: str, scope: list[str]) -> None:
        function = name.rsplit("__mutmut_", 1)[0]
        reach = {t for t in by_function.get(function, []) if t.startswith(tuple(scope))}
        tests = sorted(reach, key=lambda t: duration.get(t, 9.0))
        pid = os.fork()
        if pid == 0:  # the child: run the tests on this mutant, exit with pytest's code
            code = 3
            try:
                os.environ["MUTANT_UNDER_TEST"] = name
                devnull = os.open(os.devnull, os.O_WRONLY)
                os.dup2(devnull, 1)
                os.dup2(devnull, 2)
                code = int(pytest.main([*PYTEST, "-x", *a.always, *tests]))
            finally:
                os._exit(code)
        running[pid] = (name, len(tests), time.monotonic())

    def reap(block: bool) -> None:
        while running:
            pid, status = os.waitpid(-1, 0 if block else os.WNOHANG)
            if pid == 0:
                break
            name, n, t0 = running.pop(pid)
            rc = os.waitstatus_to_exitcode(status)
            rc = -24 if rc == -signal.SIGKILL else rc
            with a.out.open("a") as f:
                f.write(f"{name} {rc} {n} {time.monotonic() - t0:.1f}\n")
            block = False

    def wait_until(at_most: int) -> None:
        """Reap children (killing those past the timeout) until ``at_most`` still run."""
        while len(running) > at_most:
            for pid, (_, _, t0) in list(running.items()):
                if time.monotonic() - t0 > a.timeout:
                    os.kill(pid, signal.SIGKILL)
            reap(block=False)
            time.sleep(0.05)

    def run(names: list[str], scope: list[str]) -> None:
        for name in names:
            wait_until(a.jobs - 1)
            start(name, scope)
        wait_until(0)

    if a.two_phase:
        run(todo, [])
        again = set(todo)
        kept: list[str] = []
        rerun: list[str] = []
        for line in a.out.read_text().splitlines():
            x = line.split()
            (rerun if x and x[0] in again and x[1] == "0" else kept).append(line)
        a.out.write_text("".join(f"{line}\n" for line in kept))
        print(f"first phase: {len(todo) - len(rerun)} detected; {len(rerun)} again", flush=True)
        run([line.split()[0] for line in rerun], a.scope)
    else:
        run(todo, a.scope)
    lines = [line.split() for line in a.out.read_text().splitlines() if line.strip()]
    mine = [x for x in lines if fnmatch.fnmatch(x[0], a.pattern)]
    survived = [x[0] for x in mine if x[1] == "0"]
    print(f"{len(mine)} run: {len(mine) - len(survived)} detected, {len(survived)} survived")
    for s in survived:
        print("  survived:", s)


if __name__ == "__main__":
    main()
