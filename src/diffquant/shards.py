"""Sharded evaluation: a 50k-sample FID split over the tasks of a job array, merged at the end.

A job with ``evaluator.num_shards=N evaluator.shard_index=k`` quantizes as usual (calibration data
and PTQ results come from the shared cache, so the N shards compute them once), then samples only
slice ``k`` of the ``n_samples`` indices (:func:`shard_indices`) and saves the slice's backbone
features in ``<job dir>/shard.pt`` (:func:`save_shard`); its ``metrics.json`` carries the
shard's timings but no FID. Sample ``i`` is the same image whichever shard draws it, so merging
the slices in index order gives the FID / IS that one unsharded job would report::

    python run.py -m hydra/launcher=slurm quant=w4a8 method=ptq \\
        evaluator.num_shards=10 'evaluator.shard_index=range(0,10)'
    python -m diffquant.shards <sweep dir>          # -> <sweep dir>/merged/<job>/metrics.json

:class:`MergeShardsCallback` does the merge at the end of a multirun (``hydra.callbacks``); the
table command (:mod:`diffquant.tables`) and the sweep configs' table callback also merge before
they read a sweep.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from diffquant.cache import atomic_torch_save, atomic_write_json

log = logging.getLogger("diffquant")

SHARD_FILE = "shard.pt"
MERGED_DIR = "merged"


# --------------------------------------------------------------------------------------------
# In the job
# --------------------------------------------------------------------------------------------


def is_sharded(eval_cfg: Any) -> bool:
    return int(eval_cfg.num_shards) > 1


def shard_indices(n_samples: int, num_shards: int = 1, shard_index: Optional[int] = None) -> range:
    """The sample indices a job draws: all of ``0..n_samples-1`` when unsharded, else contiguous
    slice ``shard_index`` of ``num_shards`` near-equal slices (the first ``n % N`` get one more).

    Raises ValueError naming the fix for impossible settings (before any work starts).
    """
    if num_shards < 1:
        raise ValueError(f"evaluator.num_shards={num_shards} must be >= 1 (1 = unsharded).")
    if num_shards == 1:
        if shard_index not in (None, 0):
            raise ValueError(f"evaluator.shard_index={shard_index} needs evaluator.num_shards > 1.")
        return range(0, n_samples)
    if shard_index is None or not 0 <= shard_index < num_shards:
        raise ValueError(
            f"evaluator.shard_index={shard_index} must lie in 0..{num_shards - 1} when "
            f"evaluator.num_shards={num_shards} (sweep it: "
            f"'evaluator.shard_index=range(0,{num_shards})')."
        )
    if num_shards > n_samples:
        raise ValueError(f"evaluator.num_shards={num_shards} exceeds evaluator.n_samples={n_samples}.")
    base, extra = divmod(n_samples, num_shards)
    start = shard_index * base + min(shard_index, extra)
    return range(start, start + base + (1 if shard_index < extra else 0))


def save_shard(
    run_dir: Path,
    indices: range,
    features: torch.Tensor,
    logits: Optional[torch.Tensor],
    labels: list[Any],
    fp_features: Optional[torch.Tensor],
    eval_cfg: Any,
    config_hash: str,
    per_sample: Sequence[dict[str, torch.Tensor]] = (),
    spatial: Optional[torch.Tensor] = None,
) -> Path:
    """Write ``<run_dir>/shard.pt`` atomically: the slice's features ``(n, d)``, logits ``(n, k)``
    or None, spatial features ``(n, s)`` (``sfid``) or None, labels, per-sample metric values
    ``{metric: (n,)}`` (e.g. CLIP scores, PSNR; one dict per sampled batch, concatenated here),
    and the FP model's features for the same slice (``fid_to_fp``) or None."""
    path = Path(run_dir) / SHARD_FILE
    keys = set().union(*per_sample) if per_sample else set()
    per_sample_cat = {k: torch.cat([p[k] for p in per_sample]) for k in sorted(keys)}
    atomic_torch_save(
        {
            "indices": [indices.start, indices.stop],
            "features": features,
            "logits": logits,
            "spatial": spatial,
            "labels": list(labels),
            "fp_features": fp_features,
            "per_sample": per_sample_cat,
            "num_shards": int(eval_cfg.num_shards),
            "shard_index": int(eval_cfg.shard_index),
            "n_samples_total": int(eval_cfg.n_samples),
            "config_hash": config_hash,
        },
        path,
    )
    return path


# --------------------------------------------------------------------------------------------
# Merging
# --------------------------------------------------------------------------------------------


@dataclass
class Shard:
    """A finished shard job: its folder and its ``metrics.json``."""

    run_dir: Path
    metrics: dict[str, Any]

    @property
    def index(self) -> int:
        return int(self.metrics["shard_index"])

    @property
    def num_shards(self) -> int:
        return int(self.metrics["num_shards"])


def find_shards(root: Path) -> dict[tuple[str, int], list[Shard]]:
    """Finished shard jobs under ``root``, grouped by (``config_hash``, ``num_shards``) (the hash is
    the same for all slices of one evaluation), each group sorted by shard index. When a slice was
    run twice, the newer ``metrics.json`` wins."""
    groups: dict[tuple[str, int], dict[int, Shard]] = {}
    for metrics_path in sorted(Path(root).rglob("metrics.json")):
        if MERGED_DIR in metrics_path.relative_to(root).parts[:-1]:
            continue
        try:
            m = json.loads(metrics_path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if int(m.get("num_shards") or 1) <= 1 or m.get("shard_index") is None:
            continue
        if not (metrics_path.parent / SHARD_FILE).is_file():
            continue
        shard = Shard(metrics_path.parent, m)
        slot = groups.setdefault((m["config_hash"], shard.num_shards), {})
        old = slot.get(shard.index)
        if old is None or metrics_path.stat().st_mtime >= (old.run_dir / "metrics.json").stat().st_mtime:
            slot[shard.index] = shard
    return {h: [s[i] for i in sorted(s)] for h, s in groups.items()}


def missing_shards(shards: Sequence[Shard]) -> list[int]:
    n = shards[0].num_shards
    have = {s.index for s in shards}
    return [i for i in range(n) if i not in have]


def merged_name(m: dict[str, Any]) -> str:
    calib = f"_c{m['calib_seed']}" if m.get("calib_seed") else ""
    return f"{m['model']}_{m.get('quant', 'q')}_{m['method']}_s{m['seed']}{calib}_{m['config_hash'][:8]}"


def _job_cfg(run_dir: Path):
    from omegaconf import OmegaConf

    return OmegaConf.load(run_dir / "config.yaml")


def merge_group(shards: Sequence[Shard], out_dir: Path, device: Optional[str] = None) -> dict[str, Any]:
    """Compute the metrics (FID, sFID, IS, FID to FP, and the means of the saved per-sample values:
    CLIP score, PSNR, SSIM...) of the concatenated slices of one evaluation and write
    ``out_dir/metrics.json`` (atomically), ``config.yaml`` and ``shards.json``. Returns the metrics.

    The backbone is built only for the real reference features, which the shard jobs have cached.
    """
    from diffquant.app import score, write_metrics
    from diffquant.context import RunContext
    from diffquant.eval.evaluation import Evaluation
    from diffquant.eval.metrics import EvalBatch
    from diffquant.models.loading import resolve_device

    if missing := missing_shards(shards):
        raise ValueError(
            f"cannot merge {shards[0].run_dir.parent}: shards {missing} of "
            f"{shards[0].num_shards} have not finished"
        )
    t0 = time.perf_counter()
    first = shards[0]
    cfg = _job_cfg(first.run_dir)
    is_fp = first.metrics["method"] == "fp"
    records = [torch.load(s.run_dir / SHARD_FILE) for s in shards]
    expected = 0
    for s, rec in zip(shards, records):  # the slices must tile 0..n-1 in order
        if rec["indices"][0] != expected:
            raise ValueError(f"{s.run_dir}: slice starts at {rec['indices'][0]}, expected {expected}")
        expected = rec["indices"][1]
    if expected != records[0]["n_samples_total"]:
        raise ValueError(
            f"slices cover {expected} samples, the jobs asked for {records[0]['n_samples_total']}"
        )

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ctx = RunContext(
        run_dir=out_dir,
        cache_dir=Path(cfg.paths.cache_dir),
        device=resolve_device(device or cfg.device),
        seed=int(cfg.seed),
    )
    evaluation = Evaluation(cfg.evaluator, ctx, fp_job=is_fp)
    if "fid_to_fp" in evaluation.metric_names:
        fp = [rec["fp_features"] for rec in records]
        if any(f is None for f in fp):
            raise ValueError("fid_to_fp: a shard saved no FP features")
        evaluation.set_fp_features(torch.cat(fp))
    quality = score(
        evaluation,
        (
            EvalBatch(
                None,
                rec["labels"],
                rec["features"],
                rec["logits"],
                rec.get("per_sample") or {},
                rec.get("spatial"),
            )
            for rec in records
        ),
    )
    if is_fp:
        quality.update(evaluation.fp_identity())

    ms = [s.metrics for s in shards]

    def total(key: str) -> Optional[float]:
        vals = [m.get(key) for m in ms]
        return None if any(v is None for v in vals) else round(sum(vals), 3)

    def peak(key: str) -> Optional[float]:
        vals = [m.get(key) for m in ms if m.get(key) is not None]
        return max(vals) if vals else None

    metrics = dict(first.metrics)
    metrics.update(quality)
    metrics.update(
        {
            "n_samples": expected,
            "num_shards": first.num_shards,
            "shard_index": None,
            # each shard calibrates, or loads the cached result: the longest one is the real cost
            "calibrate_s": peak("calibrate_s"),
            "sample_s": total("sample_s"),
            "fp_sample_s": total("fp_sample_s"),
            "eval_s": round((total("eval_s") or 0.0) + time.perf_counter() - t0, 3),
            "peak_rss_mb": peak("peak_rss_mb"),
            "peak_cuda_mb": peak("peak_cuda_mb"),
            "merged_from": [str(s.run_dir) for s in shards],
        }
    )
    shutil.copyfile(first.run_dir / "config.yaml", out_dir / "config.yaml")
    atomic_write_json(
        out_dir / "shards.json",
        [{"dir": str(s.run_dir), "indices": r["indices"]} for s, r in zip(shards, records)],
    )
    write_metrics(out_dir, metrics)
    return metrics


def merge_sweep(
    sweep_dir: Path | str,
    out_root: Path | str | None = None,
    device: Optional[str] = None,
    strict: bool = False,
) -> list[Path]:
    """Merge every complete group of shards under ``sweep_dir`` into
    ``<out_root or sweep_dir>/merged/<model>_<quant>_<method>_s<seed>[_c<calib seed>]_<hash>/metrics.json``.

    Incomplete groups are reported (and raise with ``strict``); returns the merged folders.
    """
    sweep_dir = Path(sweep_dir)
    out_root = Path(out_root) if out_root is not None else sweep_dir
    written = []
    for shards in find_shards(sweep_dir).values():
        if missing := missing_shards(shards):
            msg = (
                f"{merged_name(shards[0].metrics)}: shards {missing} of {shards[0].num_shards} "
                f"missing under {sweep_dir}"
            )
            if strict:
                raise ValueError(msg)
            log.warning("not merged: %s", msg)
            continue
        out = out_root / MERGED_DIR / merged_name(shards[0].metrics)
        m = merge_group(shards, out, device=device)
        log.info("merged %d shards -> %s (fid=%s)", len(shards), out, m.get("fid"))
        written.append(out)
    return written


try:
    from hydra.experimental.callback import Callback as _HydraCallback
except ImportError:  # pragma: no cover - hydra is a dependency
    _HydraCallback = object


class MergeShardsCallback(_HydraCallback):
    """Hydra callback: after a multirun, merge its finished shards (a no-op for unsharded sweeps).

    Enable with ``+hydra.callbacks.merge_shards._target_=diffquant.shards.MergeShardsCallback`` for
    a plain ``-m`` sweep; the sweep configs (``sweep=paper`` ...) need not: their table callback
    (:class:`diffquant.tables.TableCallback`) merges before it reads. With SLURM it runs in the
    launching process, after all tasks returned.
    """

    def on_multirun_end(self, config: Any, **kwargs: Any) -> None:
        try:
            merged = merge_sweep(Path(str(config.hydra.sweep.dir)), device="cpu")
        except Exception as err:  # never turn a finished sweep into a failure; say what to run
            log.error(
                "merging shards failed (%s); run `python -m diffquant.shards %s`", err, config.hydra.sweep.dir
            )
            return
        for path in merged:
            print(f"[diffquant] merged shards -> {path}/metrics.json", flush=True)


def main(argv: Optional[Iterable[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m diffquant.shards",
        description=(
            "Merge the shard jobs of a sweep (evaluator.num_shards > 1) into one metrics.json per "
            "evaluation, under <sweep dir>/merged/."
        ),
    )
    parser.add_argument("sweep_dir", type=Path)
    parser.add_argument("--out", type=Path, default=None, help="write merged/ here (default: the sweep dir)")
    parser.add_argument("--device", default="cpu", help="device of the backbone (default cpu)")
    parser.add_argument("--strict", action="store_true", help="fail when a group misses shards")
    args = parser.parse_args(list(argv) if argv is not None else None)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if not args.sweep_dir.is_dir():
        parser.error(f"{args.sweep_dir} is not a folder")
    try:
        merged = merge_sweep(args.sweep_dir, args.out, device=args.device, strict=args.strict)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    for path in merged:
        m = json.loads((path / "metrics.json").read_text())
        print(
            f"{path}: n={m['n_samples']} fid={m.get('fid')} inception_score={m.get('inception_score')} "
            f"fid_to_fp={m.get('fid_to_fp')}"
        )
    if not merged:
        print(f"no complete shard groups under {args.sweep_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
