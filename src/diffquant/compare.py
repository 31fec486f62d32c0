"""Compare the metrics of two finished sweeps job by job (a refactor must not move a number).

    python -m diffquant.compare <sweep A> <sweep B> [--metrics fid,inception_score,fid_to_fp]

Jobs are matched by their folder name (``<num>_<model>_<quant>_<method>_s<seed>``, and
``_c<calib seed>`` when it is not 0). Prints a markdown table of the chosen metrics side by side,
then every other key whose value differs (the ``environment`` of two machines, say), ignoring
timings (``*_s``), memory (``*_mb``) and ``config_hash``. Exit status 1 when a chosen metric
differs or a job is missing on either side.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Optional

IGNORED_SUFFIXES = ("_s", "_mb")
IGNORED_KEYS = ("config_hash",)


def jobs(sweep: Path) -> dict[str, dict]:
    """``{job folder name: metrics}`` of the finished jobs of ``sweep``; a folder of saved results
    (``experiments/results/<table>/jobs/<job>.json``, no ``*/metrics.json``) by file name."""
    found = {p.parent.name: json.loads(p.read_text()) for p in sorted(sweep.glob("*/metrics.json"))}
    return found or {p.stem: json.loads(p.read_text()) for p in sorted(sweep.glob("*.json"))}


def main(argv: Optional[Iterable[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("a", type=Path)
    parser.add_argument("b", type=Path)
    parser.add_argument("--metrics", default="fid,inception_score,fid_to_fp")
    args = parser.parse_args(list(argv) if argv is not None else None)
    names = args.metrics.split(",")
    a, b = jobs(args.a), jobs(args.b)
    status = 0
    print("| job | " + " | ".join(f"{m} A | {m} B" for m in names) + " |")
    print("|---|" + "---|---|" * len(names))
    notes = []
    for job in sorted(set(a) | set(b)):
        if job not in a or job not in b:
            notes.append(f"{job}: only in {'B' if job not in a else 'A'}")
            status = 1
            continue
        ma, mb = a[job], b[job]
        cells = []
        for m in names:
            cells += [repr(ma.get(m)), repr(mb.get(m))]
            status |= int(ma.get(m) != mb.get(m))
        print(f"| {job} | " + " | ".join(cells) + " |")
        other = {
            k: (ma.get(k), mb.get(k))
            for k in sorted(set(ma) | set(mb))
            if k not in names
            and k not in IGNORED_KEYS
            and not k.endswith(IGNORED_SUFFIXES)
            and ma.get(k) != mb.get(k)
        }
        if other:
            notes.append(f"{job}: other keys differ: {other}")
    for line in notes:
        print(line)
    return status


if __name__ == "__main__":
    raise SystemExit(main())
