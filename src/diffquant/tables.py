"""Turn a finished sweep into a paper's table, with the published numbers beside ours.

    python -m diffquant.tables <sweep dir> [--experiment NAME] [--out DIR] [--format md,tex,csv]
                               [--metrics fid,fid_to_fp] [--all-published] [--published FILE]

Reads every ``metrics.json`` under the sweep folder (merging sharded evaluations first, see
:mod:`diffquant.shards`), groups the jobs by (model, method label, W/A bits), reports the mean ±
std when there are several jobs, joins the numbers of ``experiments/published.yaml`` for the
experiment (read from the jobs' ``experiment`` field, or ``--experiment``), and writes
``table.md``, ``table.tex`` and ``table.csv`` into ``--out`` (default: the sweep folder). The
markdown is also printed.

**Two sources of spread.** A job has an evaluation seed (``seed``: which samples are drawn) and
a calibration seed (``calib_seed``: which calibration data, rows and batches; 0 in jobs written
before it existed). The mean is over all jobs of a row. The spreads are kept apart
(:func:`summarize_seeds`): the std over calibration seeds at a fixed evaluation seed, and the std
over evaluation seeds at a fixed calibration seed, each pooled (dof-weighted variance) over the
other seed when there are several.

* When every row has one calibration seed the table looks as it always did: a ``seeds`` column
  (evaluation seeds) and ``mean ± std`` over evaluation seeds.
* When some row has several calibration seeds: columns ``calib seeds`` and ``eval seeds``;
  ``mean ± std`` where the std is over **calibration** seeds; and, when some row also has
  several evaluation seeds, a ``± eval`` column per metric with the std over evaluation seeds.
  A gap between two methods is then read against the calibration spread, the noise a different
  calibration draw alone would cause.

**The guards' decisions.** Methods that refine a base keep it where their held-out guard says the
refinement is worse (:mod:`diffquant.methods.guard`): every ``<prefix>_guard_kept`` of a row's
jobs is counted (``base`` k of n) in ``guards.md`` beside the table (:func:`render_guards`),
written whenever some job has one.

Columns per metric: ours, the paper's, and Δ = ours − paper. Rows follow the paper's order; rows
we ran that the paper lacks come after. Published rows of methods we did not run (other papers'
baselines) are left out unless ``--all-published``.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import math
import os
import statistics
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

DEFAULT_METRICS = (
    "fid",
    "sfid",
    "inception_score",
    "fid_to_fp",
    "lpips",
    "lpips_digits",
    "psnr",
    "ssim",
    "clip_score",
)
METRIC_LABELS = {
    "fid": "FID",
    "sfid": "sFID",
    "inception_score": "IS",
    "fid_to_fp": "FID→FP",
    "clip_score": "CLIP",
    "lpips": "LPIPS",
    "lpips_digits": "LPIPS (digits)",
    "psnr": "PSNR",
    "ssim": "SSIM",
    "calibrate_s": "calib. s",
    "peak_rss_mb": "peak RSS MB",
    "sample_s": "sample s",
    "ptq_calib_s": "PTQ s",
    "finetune_s": "finetune s",
    "accuquant_s": "traj. calib. s",
    "erracc_accumulated_error_final": "final traj. err",
    "erracc_step_error_mean": "step err",
}
METRIC_LABELS_TEX = {**METRIC_LABELS, "fid_to_fp": r"FID$\to$FP"}
DECIMALS = {
    "lpips": 4,
    "lpips_digits": 4,
    "ssim": 4,
    "psnr": 2,
    "calibrate_s": 1,
    "peak_rss_mb": 0,
    "sample_s": 1,
    "ptq_calib_s": 1,
    "finetune_s": 1,
    "accuquant_s": 1,
}
FIXED_DECIMALS = ("_s", "_mb")  # seconds and megabytes: always the decimals above
METHOD_ORDER = (
    "fp",
    "ptq_minmax",
    "ptq",
    "ptq4dm",
    "ptqd",
    "tfmq",
    "efficientdm",
    "quest",
    "accuquant",
    "vidit_q",
    "svdquant",
)
FORMATS = ("md", "tex", "csv")

log = logging.getLogger("diffquant")


# --------------------------------------------------------------------------------------------
# Published numbers
# --------------------------------------------------------------------------------------------


def default_published_path() -> Path:
    """``experiments/published.yaml`` of the working tree: under ``$DIFFQUANT_ROOT``, the current
    folder, or the repository this module was installed from (editable install)."""
    candidates = [Path(os.environ["DIFFQUANT_ROOT"])] if os.environ.get("DIFFQUANT_ROOT") else []
    candidates += [Path.cwd(), Path(__file__).resolve().parents[2]]
    for root in candidates:
        path = root / "experiments" / "published.yaml"
        if path.is_file():
            return path
    return candidates[-1] / "experiments" / "published.yaml"


def load_published(path: Optional[Path] = None) -> dict[str, dict[str, Any]]:
    """All published tables, keyed by experiment name (see the header of the YAML file)."""
    path = Path(path) if path is not None else default_published_path()
    if not path.is_file():
        raise FileNotFoundError(f"published numbers not found at {path}; pass --published FILE")
    data = yaml.safe_load(path.read_text()) or {}
    for name, table in data.items():
        for key in ("paper", "source", "metrics", "rows"):
            if key not in table:
                raise ValueError(f"{path}: table {name!r} lacks {key!r}")
        for row in table["rows"]:
            for key in ("model", "method", "bits"):
                if key not in row:
                    raise ValueError(f"{path}: a row of {name!r} lacks {key!r}: {row}")
    return data


# --------------------------------------------------------------------------------------------
# Our results
# --------------------------------------------------------------------------------------------


def bits_label(weight_bits: Any, act_bits: Any) -> str:
    return f"W{weight_bits}A{act_bits}"


def read_results(sweep_dir: Path) -> list[dict[str, Any]]:
    """Every finished job's metrics under ``sweep_dir`` (shard jobs excluded: their merge counts).
    A folder with no ``metrics.json`` below it is read as saved results: its ``*.json`` files,
    one job each (``experiments/results/<table>/jobs/``)."""
    results = []
    paths = sorted(Path(sweep_dir).rglob("metrics.json")) or sorted(Path(sweep_dir).glob("*.json"))
    for path in paths:
        try:
            m = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as err:
            print(f"warning: skipping unreadable {path}: {err}", file=sys.stderr)
            continue
        if not isinstance(m, dict) or "model" not in m or "method" not in m:
            continue
        if int(m.get("num_shards") or 1) > 1 and m.get("shard_index") is not None:
            continue
        m["_dir"] = str(path.parent)
        results.append(m)
    return results


@dataclass
class Stat:
    """A metric over the jobs of one row: the mean of all jobs, the sample std over calibration
    seeds at a fixed evaluation seed (``calib_std``) and over evaluation seeds at a fixed
    calibration seed (``eval_std``), each pooled over the other seed (None without two jobs that
    differ in that seed only), the number of jobs."""

    mean: Optional[float]
    calib_std: Optional[float]
    eval_std: Optional[float]
    n: int


def _number(value: Any) -> Optional[float]:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(float(value))
    return float(value) if ok else None


def pooled_std(groups: Iterable[Sequence[float]]) -> Optional[float]:
    """The pooled sample std of ``groups``: √(Σ (n_g − 1) s_g² / Σ (n_g − 1)), the std of one
    group when there is one; None when no group has two values."""
    dof = squares = 0.0
    for values in groups:
        if len(values) > 1:
            dof += len(values) - 1
            squares += (len(values) - 1) * statistics.variance(values)
    return math.sqrt(squares / dof) if dof else None


def summarize_seeds(points: Sequence[tuple[int, int, Any]]) -> Stat:
    """A metric's :class:`Stat` from ``(calib_seed, seed, value)`` of a row's jobs (values that
    are not finite numbers are left out)."""
    kept = [(c, e, x) for c, e, x in ((c, e, _number(v)) for c, e, v in points) if x is not None]
    if not kept:
        return Stat(None, None, None, 0)
    at_eval: dict[int, list[float]] = {}
    at_calib: dict[int, list[float]] = {}
    for c, e, x in kept:
        at_eval.setdefault(e, []).append(x)
        at_calib.setdefault(c, []).append(x)
    mean = statistics.fmean(x for _, _, x in kept)
    return Stat(mean, pooled_std(at_eval.values()), pooled_std(at_calib.values()), len(kept))


def method_label_of(m: dict[str, Any]) -> str:
    """A job's row name: its ``method_label`` (``quest[tla_only]``), else its method."""
    return m.get("method_label") or m["method"]


def group_jobs(results: list[dict[str, Any]]) -> dict[tuple[str, str, str], list[dict[str, Any]]]:
    """The jobs of each table row, keyed ``(model, method label, W/A bits)`` (:attr:`Row.key`)."""
    groups: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for m in results:
        key = (m["model"], method_label_of(m), bits_label(m.get("weight_bits"), m.get("act_bits")))
        groups.setdefault(key, []).append(m)
    return groups


def calib_seed_of(m: dict[str, Any]) -> int:
    """A job's calibration seed (0 for jobs written before ``calib_seed`` was recorded)."""
    return int(m.get("calib_seed") or 0)


@dataclass
class Row:
    """One line of the table: (model, method, bits), our statistics and the paper's numbers."""

    model: str
    method: str
    bits: str
    paper_method: str = ""
    ours: dict[str, Stat] = field(default_factory=dict)
    paper: dict[str, Any] = field(default_factory=dict)
    seeds: list[int] = field(default_factory=list)
    calib_seeds: list[int] = field(default_factory=list)
    n_samples: Optional[int] = None

    @property
    def key(self) -> tuple[str, str, str]:
        return (self.model, self.method, self.bits)

    def diff(self, metric: str) -> Optional[float]:
        stat, pub = self.ours.get(metric), self.paper.get(metric)
        if stat is None or stat.mean is None or not isinstance(pub, (int, float)):
            return None
        return stat.mean - float(pub)


def build_rows(
    results: list[dict[str, Any]],
    metrics: Sequence[str],
    table: Optional[dict[str, Any]],
    all_published: bool = False,
) -> list[Row]:
    """Join our results (grouped, averaged over seeds) with the published rows."""
    groups = group_jobs(results)

    ours: dict[tuple[str, str, str], Row] = {}
    for key, ms in groups.items():
        row = Row(*key)
        row.ours = {
            k: summarize_seeds([(calib_seed_of(m), m.get("seed"), m.get(k)) for m in ms]) for k in metrics
        }
        row.seeds = sorted({m.get("seed") for m in ms if m.get("seed") is not None})
        row.calib_seeds = sorted({calib_seed_of(m) for m in ms})
        sizes = {m.get("n_samples") for m in ms}
        row.n_samples = sizes.pop() if len(sizes) == 1 else None
        ours[key] = row

    rows: list[Row] = []
    ran_methods = {k[1] for k in ours}
    for pub in (table or {}).get("rows", []):
        key = (pub["model"], pub["method"], pub["bits"])
        if key not in ours and not all_published and pub["method"] not in ran_methods:
            continue
        row = ours.pop(key, None) or Row(*key)
        row.paper_method = pub.get("paper_method", "")
        row.paper = {k: pub[k] for k in metrics if k in pub}
        rows.append(row)

    def order(r: Row) -> tuple:
        w = _bits_number(r.bits)
        base = r.method.split("[")[0]  # ablations (quest[tla_only]) follow their method
        method = METHOD_ORDER.index(base) if base in METHOD_ORDER else len(METHOD_ORDER)
        return (r.model, -w[0], -w[1], method, r.method)

    rows.extend(sorted(ours.values(), key=order))
    return rows


def _bits_number(bits: str) -> tuple[float, float]:
    try:
        w, a = bits[1:].split("A", 1)
        return float(w), float(a)
    except ValueError:
        return (0.0, 0.0)


def choose_metrics(
    results: list[dict[str, Any]], table: Optional[dict[str, Any]], requested: Optional[Sequence[str]] = None
) -> list[str]:
    """``requested``, else the published table's metrics, else those of DEFAULT_METRICS we have."""
    if requested:
        return list(requested)
    if table and table.get("metrics"):
        return list(table["metrics"])
    have = {k for m in results for k, v in m.items() if v is not None}
    return [k for k in DEFAULT_METRICS if k in have] or ["fid"]


def infer_experiment(results: list[dict[str, Any]]) -> Optional[str]:
    names = sorted({m.get("experiment") for m in results if m.get("experiment")})
    if len(names) > 1:
        raise ValueError(f"the sweep mixes experiments {names}: pick one with --experiment")
    return names[0] if names else None


# --------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------


def decimals(value: Optional[float], metric: str) -> int:
    """Decimals to print: the metric's usual ones (2; 4 for LPIPS / SSIM), more for small values
    so that at least 3 significant digits show (an FID of 0.0012 is not 0.00)."""
    base = DECIMALS.get(metric, 2)
    if value is None or value == 0 or not math.isfinite(value) or metric.endswith(FIXED_DECIMALS):
        return base
    return min(6, max(base, 2 - math.floor(math.log10(abs(value)))))


def paper_decimals(value: Any, metric: str) -> int:
    """The published number's own decimals (as printed in the paper, up to 4), at least the usual."""
    if not isinstance(value, (int, float)):
        return DECIMALS.get(metric, 2)
    text = repr(float(value))
    places = len(text.split(".")[1]) if "." in text and "e" not in text else 0
    return max(DECIMALS.get(metric, 2), min(places, 4))


def fmt_num(value: Optional[float], metric: str, signed: bool = False, places: Optional[int] = None) -> str:
    if value is None:
        return ""
    d = decimals(value, metric) if places is None else places
    return f"{value:+.{d}f}" if signed else f"{value:.{d}f}"


def fmt_ours(stat: Optional[Stat], metric: str, pm: str = "±", std: str = "eval_std") -> str:
    """``mean ± std`` (``std``: the :class:`Stat` field shown), or the mean alone."""
    if stat is None or stat.mean is None:
        return "—"
    d = decimals(stat.mean, metric)
    text = fmt_num(stat.mean, metric, places=d)
    spread = getattr(stat, std)
    return f"{text} {pm} {fmt_num(spread, metric, places=d)}" if spread is not None else text


def fmt_spread(stat: Optional[Stat], metric: str) -> str:
    """The std over evaluation seeds alone (the ``± eval`` column), at the mean's decimals."""
    if stat is None or stat.mean is None or stat.eval_std is None:
        return ""
    return fmt_num(stat.eval_std, metric, places=decimals(stat.mean, metric))


def fmt_paper(value: Any, metric: str) -> str:
    if value is None:
        return "—"
    if isinstance(value, (int, float)):
        return fmt_num(float(value), metric, places=paper_decimals(value, metric))
    return str(value)


def fmt_diff(row: Row, metric: str) -> str:
    d = row.diff(metric)
    if d is None:
        return "—"
    places = max(decimals(row.ours[metric].mean, metric), paper_decimals(row.paper.get(metric), metric))
    return fmt_num(d, metric, signed=True, places=places)


@dataclass
class Table:
    """Everything the renderers need."""

    rows: list[Row]
    metrics: list[str]
    experiment: Optional[str]
    published: Optional[dict[str, Any]]
    sweep_dir: Path
    results: list[dict[str, Any]]  # the jobs' metrics (read_results), for the sample sheets

    @property
    def n_jobs(self) -> int:
        return len(self.results)

    @property
    def has_paper(self) -> bool:
        return bool(self.published and self.published.get("rows"))

    @property
    def by_calib_seed(self) -> bool:
        """Whether some row has several calibration seeds: then the std beside the mean is over
        calibration seeds (module doc), else over evaluation seeds, as before."""
        return any(len(r.calib_seeds) > 1 for r in self.rows)

    @property
    def eval_column(self) -> bool:
        """Whether the evaluation-seed std gets a column of its own (``± eval``)."""
        return self.by_calib_seed and any(len(r.seeds) > 1 for r in self.rows)

    @property
    def shown_std(self) -> str:
        """The :class:`Stat` field shown beside the mean."""
        return "calib_std" if self.by_calib_seed else "eval_std"

    def spread_note(self) -> str:
        """What the stds of the table are, for its footer or caption."""
        if not self.by_calib_seed:
            return "mean ± std over seeds"
        note = (
            "mean of all jobs ± std over calibration seeds (calib_seed) at a fixed evaluation seed, "
            "pooled over evaluation seeds"
        )
        if self.eval_column:
            note += "; ± eval: std over evaluation seeds (seed) at a fixed calibration seed, pooled"
        return note

    def title(self) -> str:
        if not self.published:
            return f"Results of {self.sweep_dir}"
        return f"{self.published['paper']} — {self.published['source']}"


def header_cells(t: Table, labels: dict[str, str]) -> list[str]:
    seeds = ["calib seeds", "eval seeds"] if t.by_calib_seed else ["seeds"]
    cells = ["Model", "Method", "W/A", *seeds, "n"]
    if t.has_paper:
        cells.insert(2, "Paper's name")
    for k in t.metrics:
        lab = labels.get(k, k)
        cells.append(f"{lab} ours" if t.has_paper else lab)
        if t.eval_column:
            cells.append(f"{lab} ± eval")
        if t.has_paper:
            cells += [f"{lab} paper", f"{lab} Δ"]
    return cells


def body_cells(t: Table, row: Row, pm: str = "±", dash: str = "—") -> list[str]:
    count = lambda seeds: str(len(seeds)) if seeds else ""  # noqa: E731
    seeds = [count(row.calib_seeds), count(row.seeds)] if t.by_calib_seed else [count(row.seeds)]
    cells = [row.model, row.method, row.bits, *seeds, "" if row.n_samples is None else str(row.n_samples)]
    if t.has_paper:
        cells.insert(2, row.paper_method)
    for k in t.metrics:
        cells.append(fmt_ours(row.ours.get(k), k, pm, t.shown_std))
        if t.eval_column:
            cells.append(fmt_spread(row.ours.get(k), k))
        if t.has_paper:
            cells += [fmt_paper(row.paper.get(k), k), fmt_diff(row, k)]
    return [dash if c == "—" else c for c in cells]


def render_markdown(t: Table) -> str:
    lines = [f"**{t.title()}**", ""]
    if t.published and t.published.get("setting"):
        lines += [f"{'Paper setting' if t.has_paper else 'Setting'}: {t.published['setting']}.", ""]
    head = header_cells(t, METRIC_LABELS)
    lines.append("| " + " | ".join(head) + " |")
    n_text = 4 if t.has_paper else 3
    lines.append("|" + "|".join("---" if i < n_text else "---:" for i in range(len(head))) + "|")
    for row in t.rows:
        lines.append("| " + " | ".join(body_cells(t, row)) + " |")
    lines.append("")
    foot = f"Ours: {t.n_jobs} jobs from `{t.sweep_dir}`; {t.spread_note()}; n = samples per job."
    if t.has_paper:
        foot += " Δ = ours − paper."
        if t.published.get("notes"):
            foot += f" Paper: {t.published['notes']}"
    lines.append(foot)
    return "\n".join(lines) + "\n"


def tex_escape(text: str) -> str:
    for a, b in (
        ("\\", r"\textbackslash{}"),
        ("&", r"\&"),
        ("%", r"\%"),
        ("$", r"\$"),
        ("#", r"\#"),
        ("_", r"\_"),
        ("{", r"\{"),
        ("}", r"\}"),
        ("~", r"\textasciitilde{}"),
        ("^", r"\^{}"),
    ):
        if a == "\\":
            text = text.replace(a, "\x00")
        else:
            text = text.replace(a, b)
    return text.replace("\x00", r"\textbackslash{}")


def render_latex(t: Table) -> str:
    head = header_cells(t, METRIC_LABELS_TEX)
    n_text = 4 if t.has_paper else 3
    spec = "l" * n_text + "r" * (len(head) - n_text)
    esc_head = [h if "$" in h else tex_escape(h) for h in head]
    esc_head = [h.replace("Δ", r"$\Delta$").replace("±", r"$\pm$") for h in esc_head]
    note = tex_escape(t.spread_note()).replace("±", r"$\pm$")
    lines = [
        "% Generated by `python -m diffquant.tables`; needs \\usepackage{booktabs}.",
        r"\begin{table}[t]",
        r"\centering",
        r"\small",
        rf"\caption{{{tex_escape(t.title())}. Ours: {note}"
        + (r"; $\Delta$ = ours $-$ paper" if t.has_paper else "")
        + ".}",
        rf"\begin{{tabular}}{{{spec}}}",
        r"\toprule",
        " & ".join(esc_head) + r" \\",
        r"\midrule",
    ]
    for row in t.rows:
        cells = body_cells(t, row, pm="$\\pm$", dash="--")
        lines.append(" & ".join(c if "$" in c else tex_escape(c) for c in cells) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}", r"\end{table}"]
    return "\n".join(lines) + "\n"


def render_csv(t: Table) -> str:
    """One line per row. With several calibration seeds in a row (:attr:`Table.by_calib_seed`):
    ``calib_seeds`` / ``eval_seeds`` instead of ``seeds``, ``<metric>_ours_std`` over calibration
    seeds and ``<metric>_eval_std`` over evaluation seeds; else the columns as they always were."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    split = t.by_calib_seed
    joined = lambda seeds: " ".join(str(s) for s in seeds)  # noqa: E731
    head = ["model", "method", "paper_method", "bits"]
    head += ["calib_seeds", "eval_seeds"] if split else ["seeds"]
    head.append("n_samples")
    for k in t.metrics:
        head += [
            f"{k}_ours",
            f"{k}_ours_std",
            *([f"{k}_eval_std"] if split else []),
            f"{k}_paper",
            f"{k}_diff",
        ]
    writer.writerow(head)
    for row in t.rows:
        cells: list[Any] = [row.model, row.method, row.paper_method, row.bits]
        cells += [joined(row.calib_seeds), joined(row.seeds)] if split else [joined(row.seeds)]
        cells.append(row.n_samples)
        for k in t.metrics:
            stat = row.ours.get(k)
            cells += [
                None if stat is None else stat.mean,
                None if stat is None else getattr(stat, t.shown_std),
            ]
            if split:
                cells.append(None if stat is None else stat.eval_std)
            cells += [row.paper.get(k), row.diff(k)]
        writer.writerow(["" if c is None else c for c in cells])
    return buf.getvalue()


RENDERERS = {
    "md": ("table.md", render_markdown),
    "tex": ("table.tex", render_latex),
    "csv": ("table.csv", render_csv),
}


# --------------------------------------------------------------------------------------------
# The command
# --------------------------------------------------------------------------------------------


def merges_pending(sweep_dir: Path | str) -> bool:
    """Whether a complete group of shards under ``sweep_dir`` has no merged result yet, or one older
    than a shard's ``metrics.json`` (then :func:`diffquant.shards.merge_sweep` is due)."""
    from diffquant.shards import MERGED_DIR, find_shards, merged_name, missing_shards

    for shards in find_shards(Path(sweep_dir)).values():
        if missing_shards(shards):
            log.warning(
                "%s: shards %s of %d missing: not merged",
                merged_name(shards[0].metrics),
                missing_shards(shards),
                shards[0].num_shards,
            )
            continue
        merged = Path(sweep_dir) / MERGED_DIR / merged_name(shards[0].metrics) / "metrics.json"
        newest = max((s.run_dir / "metrics.json").stat().st_mtime for s in shards)
        if not merged.is_file() or merged.stat().st_mtime < newest:
            return True
    return False


def build_table(
    sweep_dir: Path | str,
    experiment: Optional[str] = None,
    published_path: Optional[Path] = None,
    metrics: Optional[Sequence[str]] = None,
    all_published: bool = False,
    merge: bool = True,
) -> Table:
    """Read ``sweep_dir`` (merging its shards first, where a merge is due) and join the published
    numbers."""
    sweep_dir = Path(sweep_dir)
    if not sweep_dir.is_dir():
        raise FileNotFoundError(f"{sweep_dir} is not a folder")
    if merge and merges_pending(sweep_dir):
        from diffquant.shards import merge_sweep

        merge_sweep(sweep_dir, device="cpu")
    results = read_results(sweep_dir)
    if not results:
        raise ValueError(f"no finished jobs (metrics.json) under {sweep_dir}")
    experiment = experiment or infer_experiment(results)
    published = load_published(published_path) if (experiment or published_path) else {}
    if experiment and experiment not in published:
        raise KeyError(f"experiment {experiment!r} has no published table; known: {sorted(published)}")
    table = published.get(experiment) if experiment else None
    cols = choose_metrics(results, table, metrics)
    rows = build_rows(results, cols, table, all_published=all_published)
    return Table(rows, cols, experiment, table, sweep_dir, results)


GUARD_SUFFIX = "_guard_kept"


def guard_decisions(t: Table) -> list[tuple[Row, str, int, int]]:
    """``(row, guard, jobs that kept the base, jobs with that guard)`` for every
    ``<guard>_guard_kept`` key of every row's jobs, rows in table order, guards sorted."""
    jobs = group_jobs(t.results)
    out = []
    for row in t.rows:
        ms = jobs.get(row.key, [])
        for k in sorted({k for m in ms for k in m if k.endswith(GUARD_SUFFIX)}):
            kept = [m[k] for m in ms if k in m]
            out.append((row, k[: -len(GUARD_SUFFIX)], sum(v == "base" for v in kept), len(kept)))
    return out


def render_guards(t: Table) -> str:
    """The guards' decisions as markdown: one line per (row, guard) with the jobs that kept the
    base."""
    lines = [
        f"**Guard decisions of {t.sweep_dir}**",
        "",
        "| Model | Method | W/A | guard | kept the base | jobs |",
        "|---|---|---|---|---:|---:|",
    ]
    for row, guard, base, n in guard_decisions(t):
        lines.append(f"| {row.model} | {row.method} | {row.bits} | {guard} | {base} | {n} |")
    lines += [
        "",
        "`<guard>_guard_kept` of each job's metrics.json: `base` where the held-out guard judged the "
        "refinement worse and put the base back (methods/guard.py).",
    ]
    return "\n".join(lines) + "\n"


def write_table(
    t: Table, out_dir: Path | str, formats: Iterable[str] = FORMATS, sheets: bool = True
) -> dict[str, Path]:
    """Write the chosen formats into ``out_dir``, ``guards.md`` where some job has a guard
    (:func:`render_guards`), and (``sheets``) the sweep's sample sheets
    (:mod:`diffquant.sample_sheets`) beside them; returns {format, ``guards`` or sheet name:
    path}."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    from diffquant.cache import atomic_write_text
    from diffquant.sample_sheets import write_sample_sheets

    written = {}
    for fmt in formats:
        name, render = RENDERERS[fmt]
        atomic_write_text(out_dir / name, render(t))
        written[fmt] = out_dir / name
    if guard_decisions(t):
        atomic_write_text(out_dir / "guards.md", render_guards(t))
        written["guards"] = out_dir / "guards.md"
    if sheets:
        order = list(dict.fromkeys(r.method for r in t.rows))
        for path in write_sample_sheets(t.results, out_dir, order):
            written[path.stem] = path
    return written


try:
    from hydra.experimental.callback import Callback as _HydraCallback
except ImportError:  # pragma: no cover - hydra is a dependency
    _HydraCallback = object


class TableCallback(_HydraCallback):
    """Hydra callback: when a multirun has finished, write its table into the sweep folder (what
    ``python -m diffquant.tables <sweep dir>`` writes), so one ``run.py`` command gives a table.

    The sweep configs register it (``conf/sweep/*.yaml``: ``hydra.callbacks.table``). It runs in
    the launching process after every job returned, with the basic launcher as with the submitit
    (local or SLURM) one. It first merges sharded evaluations (:mod:`diffquant.shards`) that have
    no merged result yet, so several table callbacks of one sweep merge once (Hydra calls
    ``on_multirun_end`` callbacks in reverse order, so ordering them would not do). Hydra calls it
    only when every job succeeded; after a failure, build the table from the finished jobs with
    ``python -m diffquant.tables <sweep dir>``.

    Args:
        out: folder of the table, relative to the sweep folder (None: the sweep folder itself).
        metrics: columns (None: the published table's, else those of DEFAULT_METRICS we have).
        experiment: published table to join (None: the jobs' ``experiment``).
        formats: any of md, tex, csv.
        all_published: also list published rows of methods we did not run.
        merge: merge sharded evaluations first (where a merge is due).
        sheets: also write the sample sheets (:mod:`diffquant.sample_sheets`) beside the table.
    """

    def __init__(
        self,
        out: Optional[str] = None,
        metrics: Optional[Sequence[str]] = None,
        experiment: Optional[str] = None,
        formats: Sequence[str] = FORMATS,
        all_published: bool = False,
        merge: bool = True,
        sheets: bool = True,
    ) -> None:
        self.out = out
        self.sheets = sheets
        self.metrics = list(metrics) if metrics else None
        self.experiment = experiment
        self.formats = list(formats)
        if bad := [f for f in self.formats if f not in RENDERERS]:
            raise ValueError(f"TableCallback formats {bad}: choose from {', '.join(FORMATS)}")
        self.all_published = all_published
        self.merge = merge

    def write(self, sweep_dir: Path | str) -> dict[str, Path]:
        """Merge the sweep's shards (where due), build and write the table of ``sweep_dir``;
        returns {format: path}."""
        sweep_dir = Path(sweep_dir)
        if self.merge and merges_pending(sweep_dir):
            from diffquant.shards import merge_sweep

            for path in merge_sweep(sweep_dir, device="cpu"):
                print(f"[diffquant] merged shards -> {path}/metrics.json", flush=True)
        table = build_table(
            sweep_dir, self.experiment, metrics=self.metrics, all_published=self.all_published, merge=False
        )
        out_dir = sweep_dir / self.out if self.out else sweep_dir
        written = write_table(table, out_dir, self.formats, sheets=self.sheets)
        print(render_markdown(table), flush=True)
        return written

    def on_multirun_end(self, config: Any, **kwargs: Any) -> None:
        sweep_dir = Path(str(config.hydra.sweep.dir))
        try:
            written = self.write(sweep_dir)
        except Exception as err:  # never turn a finished sweep into a failure; say what to run
            cmd = f"python -m diffquant.tables {sweep_dir}"
            if self.out:
                cmd += f" --out {sweep_dir / self.out}"
            if self.metrics:
                cmd += f" --metrics {','.join(self.metrics)}"
            print(
                f"[diffquant] table not written ({type(err).__name__}: {err}); run `{cmd}`",
                file=sys.stderr,
                flush=True,
            )
            return
        for path in written.values():
            print(f"[diffquant] table -> {path}", flush=True)


def main(argv: Optional[Iterable[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m diffquant.tables",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("sweep_dir", type=Path, help="a multirun folder (its */metrics.json)")
    parser.add_argument("--experiment", help="published table to join (default: the jobs' `experiment`)")
    parser.add_argument("--out", type=Path, help="where table.{md,tex,csv} go (default: the sweep folder)")
    parser.add_argument("--format", default=",".join(FORMATS), help="comma-separated: md,tex,csv")
    parser.add_argument("--metrics", help="comma-separated metric keys (default: the paper's)")
    parser.add_argument(
        "--all-published", action="store_true", help="also list published rows of methods we did not run"
    )
    parser.add_argument(
        "--published", type=Path, help="published numbers (default experiments/published.yaml)"
    )
    parser.add_argument("--no-merge", action="store_true", help="do not merge sharded evaluations first")
    parser.add_argument(
        "--no-sheets", action="store_true", help="do not write the sample sheets (samples_<model>_<bits>.png)"
    )
    args = parser.parse_args(list(argv) if argv is not None else None)

    formats = [f.strip() for f in args.format.split(",") if f.strip()]
    if bad := [f for f in formats if f not in RENDERERS]:
        parser.error(f"--format {','.join(bad)}: choose from {','.join(FORMATS)}")
    try:
        table = build_table(
            args.sweep_dir,
            args.experiment,
            args.published,
            args.metrics.split(",") if args.metrics else None,
            all_published=args.all_published,
            merge=not args.no_merge,
        )
    except (FileNotFoundError, KeyError, ValueError) as err:
        print(f"error: {err.args[0] if err.args else err}", file=sys.stderr)
        return 1
    written = write_table(table, args.out or args.sweep_dir, formats, sheets=not args.no_sheets)
    print(render_markdown(table))
    for path in written.values():
        print(f"wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
