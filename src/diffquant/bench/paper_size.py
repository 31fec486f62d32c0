"""A run at paper size on one machine: ``run.py`` on a full-size random-weight folder, its peak
memory and disk use traced per reconstruction unit.

    python -m diffquant.bench.paper_size [--model ldm_bedroom] [--folder DIR] [--out DIR]
                                         [--every 1.0] [OVERRIDES ...]

1. **folder**: ``python -m diffquant.models.convert MODEL --random 0 --out DIR`` when ``DIR``
   (default ``outputs/paper_size/MODEL``) has no ``diffquant.json``.
2. **run**: ``run.py model=MODEL model.pretrained=DIR logger=none paths.cache_dir=<empty>
   hydra.run.dir=<empty> OVERRIDES`` in a child process (default overrides: :data:`DEFAULT`, the
   issue's cut of ``method=ptq_paper``: 2 iterations per stage, no metric). Every ``--every``
   seconds: the resident memory of the child's process tree, and the bytes under its cache and
   output folders.
3. **per unit**: the reconstruction logs one line per finished unit (``[k/N] name kind …``); each
   unit's window runs from the previous line to its own (:func:`per_unit`). Per unit: peak RSS
   and peak disk in its window; per pass over the units: the least-squares slope of both against
   the unit index (MB per unit), which is what grows with the number of units if anything does.

Writes ``OUT/paper_size_<model>.json`` (``--out``, default ``outputs/bench``; with the raw unit
lines and samples: ``--summarize JSON`` recomputes its summary) and prints it.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

from diffquant.bench.memory import status_kb
from diffquant.cache import atomic_write_json

#: the issue's cut of the paper run: the paper's method and calibration, 2 iterations per stage,
#: one sample and no metric in the evaluation (no downloaded evaluator weights)
DEFAULT = [
    "method=ptq_paper",
    "quant=w4a8",
    "method.recon.weight_iters=2",
    "method.recon.act_iters=2",
    "evaluator=digits",
    "evaluator.metrics=[]",
    "evaluator.n_samples=1",
    "evaluator.batch_size=1",
    "evaluator.chunk_size=1",
    "evaluator.grid_size=1",
]
#: the reconstruction's line per finished unit: ``[k/N] name kind … (seconds s, capture …)``
UNIT_LINE = re.compile(r"\[(\d+)/(\d+)\] (\S+).*\((\d+(?:\.\d*)?)s, capture")
MB = 2**20


def tree_rss_bytes(pid: int) -> int:
    """Resident bytes of process ``pid`` and all its descendants (0 once it has exited)."""
    total, stack = 0, [pid]
    while stack:
        p = stack.pop()
        total += (status_kb("VmRSS", p) or 0) * 1024
        try:
            for task in Path(f"/proc/{p}/task").iterdir():
                stack += [int(c) for c in (task / "children").read_text().split()]
        except OSError:  # exited meanwhile
            continue
    return total


def folder_bytes(*folders: Path) -> int:
    """Bytes of the regular files under ``folders`` (files vanishing meanwhile are skipped)."""
    total = 0
    for folder in folders:
        for root, _, files in os.walk(folder):
            for name in files:
                try:
                    total += os.stat(os.path.join(root, name), follow_symlinks=False).st_size
                except OSError:
                    pass
    return total


def slope(ys: list[float]) -> Optional[float]:
    """Least-squares slope of ``ys`` against 0, 1, 2, … (None below two points)."""
    if len(ys) < 2:
        return None
    return statistics.linear_regression(range(len(ys)), ys).slope


def ensure_folder(model: str, folder: Path) -> Path:
    if not (folder / "diffquant.json").is_file():
        from diffquant.models.convert import main as convert

        convert([model, "--random", "0", "--out", str(folder)])
    return folder


def traced_run(cmd: list[str], folders: list[Path], every: float, log_file: Path) -> dict[str, Any]:
    """Run ``cmd``; samples ``(t, rss, disk)`` every ``every`` s and the unit lines ``(t, k, n,
    name, unit seconds)`` of its output (kept in ``log_file``)."""
    samples: list[tuple[float, int, int]] = []
    units: list[tuple[float, int, int, str, float]] = []
    t0 = time.perf_counter()
    with open(log_file, "w") as log:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

        def read() -> None:
            for line in proc.stdout:
                log.write(line)
                log.flush()
                m = UNIT_LINE.search(line)
                if m:
                    units.append((time.perf_counter() - t0, int(m[1]), int(m[2]), m[3], float(m[4])))

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        while proc.poll() is None:
            samples.append((time.perf_counter() - t0, tree_rss_bytes(proc.pid), folder_bytes(*folders)))
            time.sleep(every)
        reader.join()
    return {"rc": proc.returncode, "seconds": time.perf_counter() - t0, "samples": samples, "units": units}


def per_unit(
    samples: list[tuple[float, int, int]], units: list[tuple[float, int, int, str, float]]
) -> list[dict]:
    """Peak RSS and disk (MB) in each unit's window: from the previous unit's line to its own;
    the first unit of a pass (``k`` = 1: the weight stage's pass, then the activation stage's
    when it runs after the weights) from its line less the seconds it logs. Samples are
    ``(t, rss bytes, disk bytes)``."""
    rows, start, pass_index = [], None, 0
    for t, k, n, name, seconds in units:
        if k == 1:
            start, pass_index = None, pass_index + 1
        lo = start if start is not None else t - seconds
        window = [s for s in samples if lo <= s[0] <= t] or [min(samples, key=lambda s: abs(s[0] - t))]
        rows.append(
            {
                "pass": pass_index,
                "unit": k,
                "of": n,
                "name": name,
                "end_s": round(t, 1),
                "peak_rss_mb": round(max(s[1] for s in window) / MB, 1),
                "peak_disk_mb": round(max(s[2] for s in window) / MB, 1),
            }
        )
        start = t
    return rows


def summarize(samples: list[tuple[float, int, int]], units: list[tuple[float, int, int, str, float]]) -> dict:
    """Per unit peaks (:func:`per_unit`), the run's peaks, and per pass the slopes (MB per unit)
    of the peaks against the unit index."""
    rows = per_unit(samples, units)
    passes = {}
    for p in sorted({r["pass"] for r in rows}):
        mine = [r for r in rows if r["pass"] == p]
        passes[str(p)] = {
            "units": len(mine),
            "peak_rss_mb": max(r["peak_rss_mb"] for r in mine),
            "peak_disk_mb": max(r["peak_disk_mb"] for r in mine),
            "rss_slope_mb_per_unit": _round(slope([r["peak_rss_mb"] for r in mine])),
            "disk_slope_mb_per_unit": _round(slope([r["peak_disk_mb"] for r in mine])),
        }
    return {
        "peak_rss_mb": round(max((s[1] for s in samples), default=0) / MB, 1),
        "peak_disk_mb": round(max((s[2] for s in samples), default=0) / MB, 1),
        "passes": passes,
        "units": rows,
    }


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(
        prog="python -m diffquant.bench.paper_size", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--model", default="ldm_bedroom")
    parser.add_argument("--folder", type=Path, default=None, help="default outputs/paper_size/MODEL")
    parser.add_argument("--out", type=Path, default=Path("outputs/bench"))
    parser.add_argument("--every", type=float, default=1.0, help="seconds between samples")
    parser.add_argument(
        "--summarize", type=Path, metavar="JSON", help="recompute the summary of a stored result (no run)"
    )
    parser.add_argument("overrides", nargs="*", help=f"run.py overrides (default: {' '.join(DEFAULT)})")
    args = parser.parse_args(list(argv) if argv is not None else None)
    if args.summarize:
        result = json.loads(args.summarize.read_text())
        samples = [(t, r * MB, d * MB) for t, r, d in result["samples_s_rss_mb_disk_mb"]]
        result.update(summarize(samples, [tuple(u) for u in result["unit_lines"]]))
        atomic_write_json(args.summarize, result)
        return result
    folder = ensure_folder(args.model, args.folder or Path("outputs/paper_size") / args.model)
    overrides = args.overrides or DEFAULT
    root = Path(__file__).resolve().parents[3]
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="diffquant_paper_size_", dir=args.out) as tmp:
        cache, run_dir = Path(tmp) / "cache", Path(tmp) / "run"
        cmd = [
            sys.executable, str(root / "run.py"), f"model={args.model}", f"model.pretrained={folder.resolve()}",
            "logger=none", f"paths.cache_dir={cache}", f"hydra.run.dir={run_dir}", *overrides,
        ]  # fmt: skip
        traced = traced_run(cmd, [cache, run_dir], args.every, args.out / f"paper_size_{args.model}.log")
        metrics_file = run_dir / "metrics.json"
        metrics = json.loads(metrics_file.read_text()) if metrics_file.is_file() else None
    samples = traced["samples"]
    result: dict[str, Any] = {
        "model": args.model,
        "folder": str(folder),
        "overrides": overrides,
        "completed": traced["rc"] == 0 and metrics is not None,
        "returncode": traced["rc"],
        "wall_s": round(traced["seconds"], 1),
        **summarize(samples, traced["units"]),
        "metrics": metrics,
        "threads": os.environ.get("OMP_NUM_THREADS"),
        "unit_lines": [[round(t, 2), k, n, name, sec] for t, k, n, name, sec in traced["units"]],
        "samples_s_rss_mb_disk_mb": [
            [round(t, 1), round(r / MB, 1), round(d / MB, 1)] for t, r, d in samples
        ],
    }
    atomic_write_json(args.out / f"paper_size_{args.model}.json", result)
    brief = {k: v for k, v in result.items() if k not in ("units", "unit_lines", "samples_s_rss_mb_disk_mb")}
    print(json.dumps(brief, indent=2), flush=True)
    return result


def _round(x: Optional[float]) -> Optional[float]:
    return None if x is None else round(x, 2)


if __name__ == "__main__":
    main()
