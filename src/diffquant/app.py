"""The one pipeline every job runs, and the only place that knows the order of its steps:

    1. configure  the composed config as typed dataclasses (validated before any work), folders,
                  tracker
    2. build      the model wrapper (MODELS); its weights are checked finite
    3. reference  the evaluator, and the FP model's samples for the metrics that compare with
                  them: features (``fid_to_fp``), 8-bit images (``psnr``, ``ssim``, ``lpips``...);
                  cached, keyed by the model's identity: weights, sampler, numerics
    4. quantize   the method (METHODS), through the result cache: a :class:`MethodResult`
    5. sample     this job's samples, streamed into the metrics (resumable batch by batch)
    6. analyse    optional analyses of the final model (error accumulation)
    7. record     ``metrics.json`` (atomic, finite values only; with the calibration seed and
                  the ``environment``: :mod:`diffquant.numerics`), sample grid, tracker

``run(cfg) -> dict`` is plain Python (tests call it with a composed config); ``run.py`` wraps it
in ``@hydra.main`` and returns the primary metric for sweepers. The shard merge
(:mod:`diffquant.shards`) and the benchmarks reuse the steps' functions (:func:`score`,
:func:`write_metrics`, :func:`quantize`) instead of re-stating them.
"""

from __future__ import annotations

import logging
import math
import random
import resource
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from diffquant.cache import (
    atomic_torch_save,
    atomic_write_json,
    atomic_write_text,
    module_digest,
    stable_hash,
)
from diffquant.calib.collect import model_identity
from diffquant.context import RunContext
from diffquant.eval.evaluation import Evaluation
from diffquant.eval.fp_images import FPImages, ImageBlockWriter
from diffquant.eval.metrics import EvalBatch
from diffquant.eval.sampling import generate
from diffquant.methods.base import MethodResult
from diffquant.methods.result_cache import run_method
from diffquant.models.loading import build_model, resolve_device
from diffquant.numerics import environment
from diffquant.quant.config import FP_BITS
from diffquant.quant.size import model_size_mb
from diffquant.registry import METHODS
from diffquant.sample_sheets import save_samples
from diffquant.schema import RunConfig, calib_tag, typed_run_config
from diffquant.shards import is_sharded, save_shard, shard_indices
from diffquant.stopping import check_stop, graceful_stop
from diffquant.tracking import make_tracker, save_grid

log = logging.getLogger("diffquant")

METRIC_KEYS = (
    "model",
    "method",
    "weight_bits",
    "act_bits",
    "seed",
    "calib_seed",
    "n_samples",
    "fid",
    "inception_score",
    "fid_to_fp",
    "calibrate_s",
    "sample_s",
    "eval_s",
    "peak_rss_mb",
    "peak_cuda_mb",
    "config_hash",
    "environment",
)


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


def config_hash(cfg: DictConfig) -> str:
    """A digest of everything that determines the metrics (not logging or folders; not the shard
    a job evaluates, so all shards of one evaluation and their merge share it). ``calib_seed``
    enters only when it is not 0: ``calib_seed=0`` adds nothing to the hash."""
    c = job_config(cfg)
    c["evaluator"] = {k: v for k, v in c["evaluator"].items() if k not in ("num_shards", "shard_index")}
    if c["evaluator"].get("kernels") == "fake":  # the default since the key exists: hashes unchanged
        c["evaluator"].pop("kernels")
    digest = {k: c[k] for k in ("model", "quant", "method", "evaluator", "seed")}
    if c.get("calib_seed"):
        digest["calib_seed"] = c["calib_seed"]
    return stable_hash(digest)


def peak_memory() -> tuple[float, float | None]:
    """(peak resident memory of this process in MB, peak CUDA memory allocated in MB or None)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    cuda = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None
    return round(rss, 1), (round(cuda, 1) if cuda is not None else None)


def method_label(run: RunConfig) -> str:
    """The job's row name in tables: the method, with its ablation if it is one (``quest[tla_only]``)."""
    ablation = getattr(run.method, "ablation", None)
    return f"{run.method.name}[{ablation}]" if ablation else run.method.name


def is_fp(run: RunConfig) -> bool:
    """The FP reference job: ``method=fp`` evaluates the model as loaded, whatever ``quant`` says."""
    return run.method.name == "fp"


# ---------------------------------------------------------------------------- 1. configure
@dataclass
class Job:
    """One job's typed config, folders, samples and tracker (what step 1 sets up)."""

    run: RunConfig
    raw: DictConfig
    run_dir: Path
    indices: range
    ctx: RunContext
    config_hash: str

    @property
    def is_fp(self) -> bool:
        return is_fp(self.run)


def configure(cfg: DictConfig) -> Job:
    """Step 1: validate (every bad key or value fails here, naming the key and the fix), create
    the run folder, seed, open the tracker."""
    run = typed_run_config(cfg)
    ev = run.evaluator
    indices = shard_indices(ev.n_samples, ev.num_shards, ev.shard_index)
    run_dir = Path(run.paths.output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    seed_everything(run.seed)
    quant_name = "fp32" if is_fp(run) else run.quant.name
    tags = [run.model.name, quant_name, run.method.name, *run.tags, *run.logger.tags]
    if is_sharded(ev):
        tags.append(f"shard{ev.shard_index}of{ev.num_shards}")
    config = job_config(cfg)
    tracker = make_tracker(
        run.logger,
        config,
        run_dir,
        f"{run.model.name}-{quant_name}-{run.method.name}-s{run.seed}{calib_tag(run.calib_seed)}",
        tags,
        job_type="evaluate" if is_fp(run) else "quantize",
    )
    ctx = RunContext(
        run_dir=run_dir,
        cache_dir=Path(run.paths.cache_dir),
        device=resolve_device(run.device),
        seed=run.seed,
        tracker=tracker,
    )
    atomic_write_text(run_dir / "config.yaml", OmegaConf.to_yaml(config))
    return Job(run, cfg, run_dir, indices, ctx, config_hash(cfg))


# ---------------------------------------------------------------------------- 3. reference
def fp_reference_entry(evaluation: Evaluation, model: Any, job: Job):
    """The cache entry of the FP model's samples for this job's samples (all ``n_samples``, or
    one shard's slice), keyed by the model's identity (weights fingerprint, sampler, numerics):
    ``features.pt`` (``{"features": (n, d), "sample_s": seconds}``) and, when a metric of the
    evaluator compares images, the 8-bit images as blocks (:mod:`diffquant.eval.fp_images`)."""
    key = model_identity(model)
    if len(job.indices) != job.run.evaluator.n_samples:
        key = {**key, "indices": [job.indices.start, job.indices.stop]}
    return evaluation.fp_reference_entry(key, job.run.evaluator.n_samples, job.run.seed)


def check_finite_features(features: torch.Tensor, what: str) -> None:
    """Non-finite features are never cached nor scored: fail naming where they came from."""
    if not torch.isfinite(features).all():
        bad = int((~torch.isfinite(features)).any(dim=-1).sum())
        raise FloatingPointError(
            f"{what}: {bad} of {len(features)} samples have NaN/inf "
            "features: the model produced non-finite images"
        )


def _entry_complete(entry, job: Job, images: bool) -> bool:
    """Whether the FP reference ``entry`` is written, with the images when ``images``."""
    return entry.done() and (not images or FPImages.open(entry.path, job.indices) is not None)


def fp_reference(
    model: Any, evaluation: Evaluation, job: Job
) -> tuple[torch.Tensor, float, Optional[FPImages]]:
    """The FP model's samples for this job's indices and seed (cached; resumable): their features
    ``(n, d)``, the seconds that sampling them took when they were made, and their 8-bit images
    when a metric needs them (else None). An entry written without images (by an FP job of an
    evaluator without such metrics) is sampled again, with them."""
    ev = job.run.evaluator
    images = "fp_images" in evaluation.fp_needs
    entry = fp_reference_entry(evaluation, model, job)
    with entry.lock():
        if not _entry_complete(entry, job, images):
            feats, seconds, pos = [], 0.0, job.indices.start
            staged = ImageBlockWriter(entry.partial_dir() / "images") if images else None
            for batch, s in generate(
                model,
                evaluation,
                len(job.indices),
                job.run.seed,
                ev.batch_size,
                entry.partial_dir(),
                keep_images=len(job.indices) if images else 0,
                desc="FP reference",
                start=job.indices.start,
                progress_key="fp_images" if images else None,  # saved batches carry the images
            ):
                feats.append(batch.features)
                seconds += s
                if staged is not None:
                    staged.write(range(pos, pos + len(batch.features)), batch.images)
                pos += len(batch.features)
            features = torch.cat(feats)
            check_finite_features(features, "FP reference")
            with entry.writing() as tmp:
                atomic_torch_save({"features": features, "sample_s": seconds}, tmp / "features.pt")
                if staged is not None:
                    staged.move_into(tmp, job.indices)
            entry.clear_partial()
    rec = entry.load("features.pt")
    return rec["features"], rec["sample_s"], FPImages.open(entry.path, job.indices) if images else None


def store_fp_reference(
    evaluation: Evaluation,
    model: Any,
    job: Job,
    features: torch.Tensor,
    seconds: float,
    images: Optional[ImageBlockWriter] = None,
) -> None:
    """An FP job's own samples are the FP reference of every quantized job with its seeds: its
    features and, when the evaluator has paired metrics, its 8-bit images (staged in ``images``)."""
    check_finite_features(features, "FP samples")
    entry = fp_reference_entry(evaluation, model, job)
    with entry.lock():
        if not _entry_complete(entry, job, images is not None):
            with entry.writing() as tmp:
                atomic_torch_save({"features": features, "sample_s": seconds}, tmp / "features.pt")
                if images is not None:
                    images.move_into(tmp, job.indices)
    if images is not None:
        images.discard()  # moved into the entry, or another job's copy is there already


def reference(job: Job, model: Any) -> tuple[Evaluation, Optional[float]]:
    """Step 3: the evaluation, with the FP samples' features (and images) set when a metric
    compares with them; returns it and the seconds the FP samples took when they were made (None
    if not needed)."""
    evaluation = Evaluation(job.run.evaluator, job.ctx, fp_job=job.is_fp)
    if job.is_fp or not evaluation.fp_needs:
        return evaluation, None
    feats, seconds, images = fp_reference(model, evaluation, job)
    evaluation.set_fp_features(feats)
    if images is not None:
        evaluation.set_fp_images(images)
    return evaluation, seconds


# ---------------------------------------------------------------------------- 4. quantize
def quantize(model: Any, quant: Any, method_cfg: Any, ctx: RunContext) -> MethodResult:
    """Step 4: the method of ``method_cfg`` applied to ``model`` at ``quant`` (typed configs;
    cached); the tracker gets the result's tables and text files."""
    method = METHODS.get(method_cfg.name)()
    result = run_method(method, model, quant, method_cfg, ctx)
    for name, text in result.files.items():
        if name.endswith(".txt"):
            ctx.tracker.log_text(name.rsplit(".", 1)[0], text)
    for name, table in result.tables.items():
        ctx.tracker.log_table(name, table.columns, table.rows)
    return result


# ---------------------------------------------------------------------------- 5. sample
@dataclass
class Sampled:
    """What step 5 produced: per-sample features (on the CPU) and the images of the grid.

    ``start``: the index of the first sample; ``grid_size``: images kept for the grid;
    ``fp_images``: where an FP job stages its 8-bit images for the FP reference (None: nowhere).
    """

    start: int = 0
    grid_size: int = 64
    fp_images: Optional[ImageBlockWriter] = None
    features: list[torch.Tensor] = field(default_factory=list)
    logits: list[Optional[torch.Tensor]] = field(default_factory=list)
    spatial: list[Optional[torch.Tensor]] = field(default_factory=list)
    labels: list[Any] = field(default_factory=list)
    per_sample: list[dict] = field(default_factory=list)
    grid: list[torch.Tensor] = field(default_factory=list)
    seconds: float = 0.0

    def keep(self, batches: Iterable[tuple[EvalBatch, float]]) -> Iterable[EvalBatch]:
        """Pass ``batches`` through, keeping what recording and sharding need."""
        pos = self.start
        for batch, seconds in batches:
            idx = range(pos, pos + len(batch.features))
            pos = idx.stop
            self.seconds += seconds
            self.features.append(batch.features)
            self.logits.append(batch.logits)
            self.spatial.append(batch.spatial)
            self.labels.extend(batch.labels)
            self.per_sample.append(getattr(batch, "per_sample", None) or {})
            if batch.images is not None:
                room = self.grid_size - sum(len(g) for g in self.grid)
                if room > 0:
                    self.grid.append(batch.images[:room])
                if self.fp_images is not None:
                    self.fp_images.write(idx, batch.images)
            yield batch


def score(evaluation: Evaluation, batches: Iterable[EvalBatch]) -> dict[str, float]:
    """Stream ``batches`` into the evaluation's metrics and compute them (the app's and the shard
    merge's one scoring path)."""
    evaluation.start()
    for batch in batches:
        evaluation.update(batch)
    return evaluation.compute()


def sampling_key(job: Job, model: Any) -> str:
    """What saved sample batches may be replayed by: the job's configuration and the numbers of
    the denoiser it samples with (a restarted job whose quantized model came out differently, e.g.
    after a code change of its method, samples afresh instead of mixing in the old model's
    batches)."""
    return stable_hash([job.config_hash, module_digest(model.denoiser)])


def sample(job: Job, model: Any, evaluation: Evaluation) -> tuple[Sampled, dict[str, float]]:
    """Step 5: sample this job's indices and score them (unsharded), or save the shard's
    features for :mod:`diffquant.shards` to score with the others."""
    ev = job.run.evaluator
    seed_everything(job.run.seed)
    model.kernels = ev.kernels
    # an FP job keeps all its 8-bit images when the quantized jobs compare theirs with them
    fp_images = job.is_fp and "fp_images" in evaluation.fp_needs
    sampled = Sampled(
        start=job.indices.start,
        grid_size=ev.grid_size,
        fp_images=ImageBlockWriter(job.run_dir / "fp_images") if fp_images else None,
    )
    batches = sampled.keep(
        generate(
            model,
            evaluation,
            len(job.indices),
            job.run.seed,
            ev.batch_size,
            job.run_dir / "progress",
            keep_images=len(job.indices) if fp_images else ev.grid_size,
            start=job.indices.start,
            progress_key=sampling_key(job, model),
        )
    )
    if not is_sharded(ev):
        return sampled, score(evaluation, batches)
    evaluation.start()  # the per-sample metrics (CLIP score, PSNR...) are computed as chunks are made
    for _ in batches:
        pass
    logits = None if sampled.logits[0] is None else torch.cat(sampled.logits)
    spatial = None if sampled.spatial[0] is None else torch.cat(sampled.spatial)
    fp_feats = evaluation._fp_features if "fid_to_fp" in evaluation.metric_names else None
    save_shard(
        job.run_dir,
        job.indices,
        torch.cat(sampled.features),
        logits,
        sampled.labels,
        fp_feats,
        ev,
        job.config_hash,
        sampled.per_sample,
        spatial,
    )
    return sampled, {}


# ---------------------------------------------------------------------------- 7. record
def check_finite_metrics(metrics: dict[str, Any]) -> None:
    """A metric that is NaN/inf is never reported as a result: fail naming it."""
    bad = [k for k, v in metrics.items() if isinstance(v, float) and not math.isfinite(v)]
    if bad:
        raise FloatingPointError(f"non-finite metrics {bad}: not written as a result")


def write_metrics(run_dir: Path, metrics: dict[str, Any]) -> Path:
    """Write ``metrics.json`` atomically, after checking that every value is finite."""
    check_finite_metrics(metrics)
    return atomic_write_json(Path(run_dir) / "metrics.json", metrics)


def summary_line(m: dict[str, Any], run_dir: Path) -> str:
    fmt = lambda v: "n/a" if v is None else (f"{v:.3f}" if isinstance(v, float) else str(v))  # noqa: E731
    quality = " ".join(
        f"{k}={fmt(m.get(k))}"
        for k in (
            "fid",
            "sfid",
            "inception_score",
            "fid_to_fp",
            "psnr",
            "ssim",
            "lpips",
            "lpips_digits",
            "clip_score",
        )
        if k in m
    )
    return (
        f"[diffquant] {m['model']} {m['method']} W{m['weight_bits']}A{m['act_bits']} seed={m['seed']}"
        f"{' calib_seed=' + str(m['calib_seed']) if m.get('calib_seed') else ''} "
        f"n={m['n_samples']} | {quality} | calibrate {m['calibrate_s']:.1f}s sample {m['sample_s']:.1f}s "
        f"eval {m['eval_s']:.1f}s | {run_dir}"
    )


def job_metrics(
    job: Job, model: Any, result: MethodResult, quality: dict[str, float], timings: dict[str, Optional[float]]
) -> dict[str, Any]:
    """The record of a job: what ran, its quality metrics, timings and the method's metrics."""
    run = job.run
    rss, cuda = peak_memory()
    fp_job = job.is_fp
    return {
        "model": run.model.name,
        "method": run.method.name,
        "method_label": method_label(run),
        "weight_bits": FP_BITS if fp_job else run.quant.weight_bits,
        "act_bits": FP_BITS if fp_job else run.quant.act_bits,
        "quant": "fp32" if fp_job else run.quant.name,
        "seed": run.seed,
        "calib_seed": run.calib_seed,
        "n_samples": len(job.indices),
        "model_size_mb": round(model_size_mb(result.model.denoiser), 4),
        "kernels": run.evaluator.kernels,
        "int8_layers": None if model.int8_summary is None else len(model.int8_summary.converted),
        "fid": None,
        "inception_score": None,
        "fid_to_fp": None,
        **quality,
        **{k: None if v is None else round(v, 3) for k, v in timings.items()},
        "peak_rss_mb": rss,
        "peak_cuda_mb": cuda,
        "config_hash": job.config_hash,
        "device": str(model.device),
        "environment": environment(model.device),
        "experiment": run.experiment,
        "num_shards": run.evaluator.num_shards,
        "shard_index": run.evaluator.shard_index,
        **result.metrics,
    }


def record(job: Job, metrics: dict[str, Any], sampled: Sampled, result: MethodResult) -> None:
    """Step 7: ``metrics.json``, the result's files, the sample grid, the tracker."""
    for name, text in result.files.items():
        atomic_write_text(job.run_dir / name, text)
    write_metrics(job.run_dir, metrics)
    tracker, ev = job.ctx.tracker, job.run.evaluator
    if sampled.grid:
        grid = torch.cat(sampled.grid)[: ev.grid_size]
        save_samples(grid, job.run_dir)  # the row of this job in the sweep's sample sheets
        grid_path = save_grid(grid, job.run_dir / "samples.png")
        if job.run.logger.log_images:
            tracker.log_image("samples", grid_path, caption=f"{metrics['method']} {metrics['quant']}")
    tracker.log({k: v for k, v in metrics.items() if isinstance(v, (int, float)) and v is not None})
    tracker.summary(metrics)


# ---------------------------------------------------------------------------- the pipeline
def run(cfg: DictConfig) -> dict[str, Any]:
    """Run one job described by ``cfg``; returns the metrics written to ``metrics.json``."""
    job = configure(cfg)  # 1
    exit_code = 1
    with graceful_stop(job.run_dir):  # SIGTERM/SIGUSR2 stop at a check_stop (diffquant.stopping)
        try:
            run_cfg, ctx = job.run, job.ctx
            check_stop(step="build")
            model = build_model(run_cfg.model, ctx.device)  # 2
            log.info("model: %s", model.describe())
            check_stop(step="reference")
            evaluation, fp_sample_s = reference(job, model)  # 3

            check_stop(step="quantize")
            t0 = time.perf_counter()
            result = quantize(model, run_cfg.quant, run_cfg.method, ctx)  # 4
            calibrate_s = 0.0 if job.is_fp else time.perf_counter() - t0

            check_stop(step="sample")
            t_start = time.perf_counter()
            sampled, quality = sample(job, result.model, evaluation)  # 5
            eval_s = max(0.0, time.perf_counter() - t_start - sampled.seconds)
            if job.is_fp and evaluation.skipped:  # metrics against the FP samples
                if not is_sharded(run_cfg.evaluator):
                    quality.update(evaluation.fp_identity())  # e.g. fid_to_fp 0 by definition
                store_fp_reference(
                    evaluation, model, job, torch.cat(sampled.features), sampled.seconds, sampled.fp_images
                )
            check_stop(step="analyse")
            if run_cfg.analysis.error_accumulation and not METHODS.get(run_cfg.method.name).switches_to_fp:
                log.info(
                    "error accumulation not measured: method=%s's quantized denoiser has no FP switch",
                    run_cfg.method.name,
                )
            elif run_cfg.analysis.error_accumulation:  # 6
                from diffquant.analysis.error_accumulation import run_error_accumulation

                result.metrics.update(
                    run_error_accumulation(
                        model,
                        run_cfg.analysis,
                        ctx,
                        label=f"{run_cfg.method.name} {'fp32' if job.is_fp else run_cfg.quant.name}",
                    )
                )

            check_stop(step="record")
            timings = {
                "calibrate_s": calibrate_s,
                "sample_s": sampled.seconds,
                "fp_sample_s": fp_sample_s,
                "eval_s": eval_s,
            }
            metrics = job_metrics(job, model, result, quality, timings)  # 7
            record(job, metrics, sampled, result)
            print(summary_line(metrics, job.run_dir), flush=True)
            exit_code = 0
            return metrics
        finally:
            job.ctx.tracker.finish(exit_code)
