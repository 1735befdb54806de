"""Print one table from a GPU check's output folder: host, test counts, benchmark headlines.

python benchmarks/summarize.py bench-out/gpu
"""

from __future__ import annotations

import json
import sys
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any


def _rows(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return list(json.loads(path.read_text()).get("rows", []))


def main() -> None:
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "bench-out/gpu")
    lines: list[tuple[str, str]] = []
    host = out / "host.txt"
    lines.append(("host", host.read_text().strip().replace("\n", "; ") if host.exists() else "?"))
    junit = out / "junit.xml"
    if junit.exists():
        suite = ET.parse(junit).getroot()
        s = suite if suite.tag == "testsuite" else suite[0]
        lines.append(
            (
                "tests",
                f"{s.get('tests')} run, {s.get('failures')} failed, {s.get('errors')} errors, "
                f"{s.get('skipped')} skipped ({float(s.get('time', 0)):.0f}s)",
            )
        )
        for case in s.iter("testcase"):
            for bad in list(case.findall("failure")) + list(case.findall("error")):
                lines.append(
                    (
                        "  FAIL",
                        f"{case.get('classname')}::{case.get('name')}: "
                        f"{(bad.get('message') or '')[:150]}",
                    )
                )
    else:
        lines.append(("tests", "no junit.xml (tests did not run)"))
    for name in ("kernels", "gpu_image", "join"):
        rows = _rows(out / f"{name}.json")
        if not rows:
            txt = out / f"{name}.txt"
            tail = txt.read_text().strip().splitlines()[-1:] if txt.exists() else ["not run"]
            lines.append((name, tail[0][:160] if tail else "no output"))
        for r in rows:
            lines.append(
                (
                    name,
                    ", ".join(
                        f"{k}={v:,.2f}" if isinstance(v, float) else f"{k}={v}"
                        for k, v in r.items()
                    ),
                )
            )
    width = max(len(k) for k, _ in lines)
    print("\n== mmload GPU check ==")
    for k, v in lines:
        print(f"{k.ljust(width)}  {v}")


if __name__ == "__main__":
    main()
