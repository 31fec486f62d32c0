"""The one pipeline every job runs, and the only place that knows the order of its steps:

    cfg ─► build model ─► (FP reference) ─► apply method ─► sample ─► evaluate ─► record
            MODELS                            METHODS                 EVALUATORS   metrics.json, W&B

``run(cfg) -> dict`` is plain Python (tests call it with a composed config); ``run.py`` wraps it in
``@hydra.main`` and returns the primary metric for sweepers.
"""

from __future__ import annotations

import logging
import random
import resource
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from diffquant.cache import atomic_torch_save, atomic_write_json, atomic_write_text, stable_hash
from diffquant.calib.collect import numerics_identity
from diffquant.context import RunContext
from diffquant.eval.evaluation import Evaluation
from diffquant.eval.sampling import generate
from diffquant.models.loading import build_model, resolve_device
from diffquant.quant.config import FP_BITS
from diffquant.registry import METHODS
from diffquant.schema import validate
from diffquant.shards import is_sharded, save_shard, shard_indices
from diffquant.tracking import make_tracker, save_grid

log = logging.getLogger("diffquant")

METRIC_KEYS = ("model", "method", "weight_bits", "act_bits", "seed", "n_samples", "fid",
               "inception_score", "fid_to_fp", "calibrate_s", "sample_s", "eval_s", "peak_rss_mb",
               "peak_cuda_mb", "config_hash")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def job_config(cfg: DictConfig) -> dict[str, Any]:
    """The resolved config without Hydra's own node (what W&B and config.yaml record)."""
    cfg = cfg.copy()  # without the hydra node: in compose mode (tests) parts of it are missing
    with open_dict(cfg):
        cfg.pop("hydra", None)
    return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)


def model_key(cfg: DictConfig) -> dict[str, Any]:
    """What identifies the FP model's samples: weights and sampler, not where results go."""
    model = OmegaConf.to_container(cfg.model, resolve=True)
    for k in ("get_weights", "local_files_only"):
        model.pop(k, None)
    return model


def config_hash(cfg: DictConfig) -> str:
    """A digest of everything that determines the metrics (not logging or folders; not the shard
    a job evaluates, so all shards of one evaluation and their merge share it)."""
    c = job_config(cfg)
    c["evaluator"] = {k: v for k, v in c["evaluator"].items() if k not in ("num_shards", "shard_index")}
    return stable_hash({k: c[k] for k in ("model", "quant", "method", "evaluator", "seed")})


def peak_memory() -> tuple[float, float | None]:
    """(peak resident memory of this process in MB, peak CUDA memory allocated in MB or None)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    cuda = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None
    return round(rss, 1), (round(cuda, 1) if cuda is not None else None)


def fp_reference_entry(evaluation: Evaluation, cfg: DictConfig, indices: range):
    """The cache entry of the FP model's features for samples ``indices`` of the job's seed
    (all ``n_samples``, or one shard's slice of them)."""
    key = {**model_key(cfg), "numerics": numerics_identity(resolve_device(cfg.device))}
    if len(indices) != cfg.evaluator.n_samples:
        key["indices"] = [indices.start, indices.stop]
    return evaluation.fp_reference_entry(key, cfg.evaluator.n_samples, cfg.seed)


def fp_reference_features(model, evaluation: Evaluation, cfg: DictConfig,
                          indices: range) -> tuple[torch.Tensor, float]:
    """Features of the FP model's samples ``indices`` for the job's seed (cached; resumable), and
    the seconds that sampling them took when they were made."""
    ev = cfg.evaluator
    entry = fp_reference_entry(evaluation, cfg, indices)
    with entry.lock():
        if not entry.done():
            feats, seconds = [], 0.0
            for batch, s in generate(model, evaluation, len(indices), cfg.seed, ev.batch_size,
                                     entry.partial_dir(), keep_images=0, desc="FP reference",
                                     start=indices.start):
                feats.append(batch.features)
                seconds += s
            with entry.writing() as tmp:
                atomic_torch_save({"features": torch.cat(feats), "sample_s": seconds}, tmp / "features.pt")
            entry.clear_partial()
    rec = torch.load(entry.path / "features.pt")
    return rec["features"], rec["sample_s"]


def store_fp_reference(evaluation: Evaluation, cfg: DictConfig, features: torch.Tensor, seconds: float,
                       indices: range) -> None:
    """An FP job's own features are the FP reference of every quantized job with its seeds."""
    entry = fp_reference_entry(evaluation, cfg, indices)
    with entry.lock():
        if not entry.done():
            with entry.writing() as tmp:
                atomic_torch_save({"features": features, "sample_s": seconds}, tmp / "features.pt")


def summary_line(m: dict[str, Any], run_dir: Path) -> str:
    fmt = lambda v: "n/a" if v is None else (f"{v:.3f}" if isinstance(v, float) else str(v))  # noqa: E731
    quality = " ".join(f"{k}={fmt(m.get(k))}" for k in ("fid", "inception_score", "fid_to_fp", "clip_score")
                       if k in m)
    return (f"[diffquant] {m['model']} {m['method']} W{m['weight_bits']}A{m['act_bits']} seed={m['seed']} "
            f"n={m['n_samples']} | {quality} | calibrate {m['calibrate_s']:.1f}s sample {m['sample_s']:.1f}s "
            f"eval {m['eval_s']:.1f}s | {run_dir}")


def method_label(cfg: DictConfig) -> str:
    """The job's row name in tables: the method, with its ablation if it is one (``quest[tla_only]``)."""
    ablation = cfg.method.get("ablation")
    return f"{cfg.method.name}[{ablation}]" if ablation else cfg.method.name


def run(cfg: DictConfig) -> dict[str, Any]:
    """Run one job described by ``cfg``; returns the metrics written to ``metrics.json``."""
    validate(cfg)
    ev = cfg.evaluator
    indices = shard_indices(ev.n_samples, ev.num_shards, ev.shard_index)  # this job's samples
    run_dir = Path(cfg.paths.output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    seed_everything(cfg.seed)
    device = resolve_device(cfg.device)
    is_fp = cfg.method.name == "fp"
    tags = [cfg.model.name, cfg.quant.name, cfg.method.name, *cfg.tags, *cfg.logger.tags]
    if is_sharded(ev):
        tags.append(f"shard{ev.shard_index}of{ev.num_shards}")
    tracker = make_tracker(cfg.logger, job_config(cfg), run_dir,
                           f"{cfg.model.name}-{cfg.quant.name}-{cfg.method.name}-s{cfg.seed}", tags,
                           job_type="evaluate" if is_fp else "quantize")
    exit_code = 1
    try:
        ctx = RunContext(run_dir=run_dir, cache_dir=Path(cfg.paths.cache_dir), device=device,
                         seed=cfg.seed, tracker=tracker)
        atomic_write_text(run_dir / "config.yaml", OmegaConf.to_yaml(job_config(cfg)))
        model = build_model(cfg.model, device)
        log.info("model: %s", model.describe())
        evaluation = Evaluation(cfg.evaluator, ctx, skip=("fid_to_fp",) if is_fp else ())
        fp_sample_s, fp_feats = None, None
        if "fid_to_fp" in evaluation.metric_names:
            fp_feats, fp_sample_s = fp_reference_features(model, evaluation, cfg, indices)
            evaluation.set_fp_features(fp_feats)

        t0 = time.perf_counter()
        model = METHODS.get(cfg.method.name)(model, cfg.quant, cfg.method, ctx)
        calibrate_s = 0.0 if is_fp else time.perf_counter() - t0
        seed_everything(cfg.seed)

        evaluation.start()
        t_start, sample_s, grid, feats = time.perf_counter(), 0.0, [], []
        logits, labels, per_sample = [], [], []
        new_sample_s = 0.0
        for batch, seconds in generate(model, evaluation, len(indices), cfg.seed, ev.batch_size,
                                       run_dir / "progress", keep_images=ev.grid_size,
                                       start=indices.start, progress_key=config_hash(cfg)):
            sample_s += seconds
            evaluation.update(batch)
            feats.append(batch.features)
            logits.append(batch.logits)
            labels.extend(batch.labels)
            per_sample.append(getattr(batch, "per_sample", None) or {})
            if batch.images is not None:
                grid.append(batch.images)
        new_sample_s = time.perf_counter() - t_start
        t_eval = time.perf_counter()
        if is_sharded(ev):  # FID / IS come from all shards: `python -m diffquant.shards <sweep>`
            save_shard(run_dir, indices, torch.cat(feats), None if logits[0] is None else torch.cat(logits),
                       labels, fp_feats, ev, config_hash(cfg), per_sample)
            metrics_vals = {}
        else:
            metrics_vals = evaluation.compute()
        eval_s = time.perf_counter() - t_eval + max(0.0, new_sample_s - sample_s)
        if is_fp and "fid_to_fp" in ev.metrics:
            if not is_sharded(ev):
                metrics_vals["fid_to_fp"] = 0.0  # FID of the FP model to itself: 0 by definition
            store_fp_reference(evaluation, cfg, torch.cat(feats), sample_s, indices)
        if cfg.analysis.error_accumulation:
            from diffquant.analysis.error_accumulation import run_error_accumulation

            ctx.extra_metrics.update(run_error_accumulation(
                model, cfg.analysis, ctx, label=f"{cfg.method.name} {cfg.quant.name}"))

        rss, cuda = peak_memory()
        metrics: dict[str, Any] = {
            "model": cfg.model.name, "method": cfg.method.name, "method_label": method_label(cfg),
            "weight_bits": FP_BITS if is_fp else cfg.quant.weight_bits,
            "act_bits": FP_BITS if is_fp else cfg.quant.act_bits,
            "quant": cfg.quant.name, "seed": cfg.seed, "n_samples": len(indices),
            "fid": None, "inception_score": None, "fid_to_fp": None,
            **metrics_vals,
            "calibrate_s": round(calibrate_s, 3), "sample_s": round(sample_s, 3),
            "fp_sample_s": None if fp_sample_s is None else round(fp_sample_s, 3),
            "eval_s": round(eval_s, 3), "peak_rss_mb": rss, "peak_cuda_mb": cuda,
            "config_hash": config_hash(cfg), "device": str(device), "experiment": cfg.experiment,
            "num_shards": ev.num_shards, "shard_index": ev.shard_index,
            **ctx.extra_metrics,
        }
        atomic_write_json(run_dir / "metrics.json", metrics)
        if grid:
            grid_path = save_grid(torch.cat(grid)[: ev.grid_size], run_dir / "samples.png")
            if cfg.logger.log_images:
                tracker.log_image("samples", grid_path, caption=f"{cfg.method.name} {cfg.quant.name}")
        tracker.log({k: v for k, v in metrics.items() if isinstance(v, (int, float)) and v is not None})
        tracker.summary(metrics)
        print(summary_line(metrics, run_dir), flush=True)
        exit_code = 0
        return metrics
    finally:
        tracker.finish(exit_code)
