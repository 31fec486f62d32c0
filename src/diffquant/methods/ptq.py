"""Baseline post-training quantization: ``ptq_minmax`` (the floor) and ``ptq`` (Q-Diffusion).

Both quantize ``model.denoiser`` (every Conv2d/Linear and the attention matmuls; VAE and text encoder
stay FP), gather calibration data from the FP model's own sampler and set initial ranges:

* ``ptq_minmax`` — weights round-to-nearest on their initial per-channel ranges, activation
  ranges from calibration data; no reconstruction. ``range_init`` (default ``minmax``) overrides
  the quant config's ``weight_init``/``act_init``.
* ``ptq`` — then BRECQ block reconstruction (:mod:`diffquant.calib.reconstruct`): AdaRound for
  the weights, then LSQ for the activation step sizes, unit by unit.

The result (quantization parameters and rounding choices) is cached under
``<cache_dir>/ptq/<hash>/`` keyed by the FP model (name, weights fingerprint, scheduler, sampler),
the quant config and the method config, so a second job — or QuEST, through
:func:`load_or_run_ptq` — loads it instead of recalibrating. A stopped calibration resumes after
the last finished unit.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import shutil
import time
from dataclasses import dataclass, field
from typing import Any, Optional, Union

import torch

from diffquant.cache import CacheEntry
from diffquant.calib.collect import CalibSettings, CalibStream, collect_calibration, model_identity
from diffquant.calib.ranges import calibrate_act_ranges
from diffquant.calib.reconstruct import ReconReport, ReconSettings, reconstruct
from diffquant.quant.checkpoint import load_quantized, save_quantized
from diffquant.quant.config import QuantConfig
from diffquant.quant.state import iter_quantizers
from diffquant.quant.swap import QuantSummary, quantize_denoiser
from diffquant.quant.typed import as_dataclass, as_dict
from diffquant.registry import METHODS

log = logging.getLogger(__name__)

CHECKPOINT_FILE = "quantized_denoiser.pt"
# Bump when a code change alters PTQ results, so that cached results of older code are not reused.
ALGORITHM_VERSION = 3


@dataclass
class PTQMinMaxConfig:
    """``method=ptq_minmax``: quantize with initial ranges, no reconstruction.

    Attributes:
        name: ``ptq_minmax``.
        calib: calibration trajectories (samples, step stride, seed).
        range_init: ``minmax`` or ``lp`` for weights and activations; None keeps the quant
            config's ``weight_init`` / ``act_init``.
        act_init_rows: calibration rows the activation ranges are set from (None = all).
        act_init_batch_size: rows per forward while observing.
        save_checkpoint: also copy the quantized checkpoint into the run folder.
    """

    name: str = "ptq_minmax"
    calib: CalibSettings = field(default_factory=CalibSettings)
    range_init: Optional[str] = "minmax"
    act_init_rows: Optional[int] = 256
    act_init_batch_size: int = 64
    save_checkpoint: bool = False


@dataclass
class PTQConfig:
    """``method=ptq``: Q-Diffusion / BRECQ block reconstruction.

    Attributes:
        name: ``ptq``.
        calib: calibration trajectories (samples, step stride, seed).
        act_init_rows / act_init_batch_size: as in :class:`PTQMinMaxConfig` (initial activation
            ranges by the quant config's ``act_init``, before LSQ refines them).
        recon: reconstruction iterations, batch size, learning rates, p, AdaRound schedule.
        save_checkpoint: also copy the quantized checkpoint into the run folder.
    """

    name: str = "ptq"
    calib: CalibSettings = field(default_factory=CalibSettings)
    act_init_rows: Optional[int] = 256
    act_init_batch_size: int = 64
    recon: ReconSettings = field(default_factory=ReconSettings)
    save_checkpoint: bool = False


AnyPTQConfig = Union[PTQConfig, PTQMinMaxConfig]


def _typed_method_cfg(cfg: Any) -> AnyPTQConfig:
    name = cfg.name if not isinstance(cfg, dict) else cfg["name"]
    return as_dataclass(cfg, PTQMinMaxConfig if name == "ptq_minmax" else PTQConfig)


def ptq_cache_key(identity: dict[str, Any], quant_cfg: QuantConfig,
                  method_cfg: AnyPTQConfig) -> dict[str, Any]:
    """The settings a PTQ result depends on (names and output options left out)."""
    quant = as_dict(quant_cfg)
    quant.pop("name", None)
    method = as_dict(method_cfg)
    method.pop("save_checkpoint", None)
    return {"model": identity, "quant": quant, "method": method, "version": ALGORITHM_VERSION}


# ---------------------------------------------------------------------------- calibration
def _check_finite_quantizers(denoiser: torch.nn.Module, method_name: str) -> None:
    bad = [n for n, q in iter_quantizers(denoiser)
           if not (torch.isfinite(q.scale).all() and torch.isfinite(q.zero_point).all())]
    if bad:
        hint = ("lower method.recon.act_lr / method.recon.weight_lr" if method_name == "ptq"
                else "check the calibration data")
        raise FloatingPointError(f"{method_name}: non-finite quantization parameters in "
                                 f"{bad[:5]}: {hint}")


@torch.no_grad()
def _check_finite_output(denoiser: torch.nn.Module, stream: CalibStream, device, method_name: str
                         ) -> None:
    batch = next(stream.batches(8, stream.subset(8, 0), device=device))
    out = denoiser(**batch).sample
    if not torch.isfinite(out).all():
        hint = ("lower method.recon.act_lr (or method.recon.weight_lr)" if method_name == "ptq"
                else "use quant.act_init=lp or more calibration rows")
        raise FloatingPointError(f"{method_name}: the quantized UNet outputs NaN/inf on "
                                 f"calibration inputs: {hint}")


def calibrate_ptq(model: Any, quant_cfg: QuantConfig, method_cfg: AnyPTQConfig, ctx: Any, *,
                  identity: Optional[dict[str, Any]] = None,
                  progress_dir=None) -> tuple[QuantSummary, dict[str, Any], Optional[ReconReport]]:
    """Quantize ``model.denoiser`` in place and calibrate it (no caching of the result).

    Returns the swap summary, metadata for the checkpoint, and the reconstruction report
    (None for ``ptq_minmax``).
    """
    is_minmax = isinstance(method_cfg, PTQMinMaxConfig)
    stream = collect_calibration(model, method_cfg.calib, ctx.cache_dir, identity=identity)
    summary = quantize_denoiser(model.denoiser, quant_cfg, timesteps=model.timesteps)
    text = summary.format()
    log.info("\n%s", text)
    ctx.tracker.log_text("quant_summary", text)
    calibrate_act_ranges(model.denoiser, stream, method=quant_cfg.act_init,
                         n_rows=method_cfg.act_init_rows,
                         batch_size=method_cfg.act_init_batch_size, p=quant_cfg.lp_norm,
                         n_candidates=quant_cfg.lp_candidates, device=model.device,
                         minmax_layers=quant_cfg.minmax_act_layers)
    report = None
    if not is_minmax:
        report = reconstruct(model.denoiser, stream, method_cfg.recon, progress_dir=progress_dir)
    name = "ptq_minmax" if is_minmax else "ptq"
    _check_finite_quantizers(model.denoiser, name)
    _check_finite_output(model.denoiser, stream, model.device, name)
    meta: dict[str, Any] = {"method": name, "calib_rows": len(stream),
                            "summary": summary.metrics()}
    if report is not None:
        meta["recon"] = report.metrics()
        meta["recon_units"] = [dataclasses.asdict(u) for u in report.units]
    return summary, meta, report


def load_or_run_ptq(model: Any, quant_cfg: Any, ptq_cfg: Any, ctx: Any) -> Any:
    """Quantize ``model.denoiser`` by ``ptq``/``ptq_minmax``, from the cache when this model, quant
    config and method config were calibrated before; returns ``model``.

    Adds to ``ctx.extra_metrics``: ``n_quant_layers`` (and per-type counts), ``ptq_calib_s``
    (seconds the calibration took when it was made), ``ptq_cached`` and reconstruction losses.
    """
    qcfg = as_dataclass(quant_cfg, QuantConfig)
    mcfg = _typed_method_cfg(ptq_cfg)
    if isinstance(mcfg, PTQMinMaxConfig) and mcfg.range_init is not None:
        qcfg = dataclasses.replace(qcfg, weight_init=mcfg.range_init, act_init=mcfg.range_init)
    identity = model_identity(model)
    entry = CacheEntry(ctx.cache_dir, "ptq", ptq_cache_key(identity, qcfg, mcfg))
    with entry.lock():
        cached = entry.done()
        if cached:
            log.info("loading the cached %s result %s", mcfg.name, entry.path)
            summary, meta = load_quantized(model.denoiser, entry.path / CHECKPOINT_FILE)
            text = summary.format()
            log.info("\n%s", text)
            ctx.tracker.log_text("quant_summary", text)
        else:
            t0 = time.perf_counter()
            summary, meta, _ = calibrate_ptq(model, qcfg, mcfg, ctx, identity=identity,
                                             progress_dir=entry.partial_dir())
            meta["calib_time_s"] = round(time.perf_counter() - t0, 3)
            with entry.writing() as tmp:
                save_quantized(model.denoiser, tmp / CHECKPOINT_FILE, qcfg, meta=meta)
            entry.clear_partial()
    if mcfg.save_checkpoint:
        shutil.copyfile(entry.path / CHECKPOINT_FILE, ctx.run_dir / CHECKPOINT_FILE)
    _record(ctx, summary, meta, cached)
    return model


def _record(ctx: Any, summary: QuantSummary, meta: dict[str, Any], cached: bool) -> None:
    ctx.extra_metrics.update(summary.metrics())
    ctx.extra_metrics["ptq_calib_s"] = meta.get("calib_time_s")
    ctx.extra_metrics["ptq_cached"] = cached
    ctx.extra_metrics["calib_rows"] = meta.get("calib_rows")
    for k, v in (meta.get("recon") or {}).items():
        ctx.extra_metrics[k] = v if not isinstance(v, float) or math.isfinite(v) else None
    units = meta.get("recon_units") or []
    if units:
        ctx.tracker.log_table("recon_units", ["unit", "kind", "weight_loss", "act_loss", "seconds"],
                              [[u["name"], u["kind"], u["weight_loss"], u["act_loss"], u["seconds"]]
                               for u in units])


@METHODS.register("ptq_minmax", schema=PTQMinMaxConfig)
def apply_ptq_minmax(model: Any, quant_cfg: Any, method_cfg: Any, ctx: Any) -> Any:
    """``method=ptq_minmax``: initial ranges only (the floor every method must beat)."""
    return load_or_run_ptq(model, quant_cfg, method_cfg, ctx)


@METHODS.register("ptq", schema=PTQConfig)
def apply_ptq(model: Any, quant_cfg: Any, method_cfg: Any, ctx: Any) -> Any:
    """``method=ptq``: Q-Diffusion's BRECQ block reconstruction (AdaRound, then LSQ)."""
    return load_or_run_ptq(model, quant_cfg, method_cfg, ctx)
