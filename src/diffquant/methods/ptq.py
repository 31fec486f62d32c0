"""Baseline post-training quantization: ``ptq_minmax`` (the floor) and ``ptq`` (Q-Diffusion).

Both quantize ``model.denoiser`` (every Conv2d/Linear and the attention matmuls; VAE and text
encoder stay FP), gather calibration data from the FP model's own sampler and set initial ranges:

* ``ptq_minmax`` — weights round-to-nearest on their initial per-channel ranges, activation
  ranges from calibration data; no reconstruction. ``range_init`` (default ``minmax``) overrides
  the quant config's ``weight_init``/``act_init``.
* ``ptq`` — then BRECQ block reconstruction (:mod:`diffquant.calib.reconstruct`): AdaRound for
  the weights, then LSQ for the activation step sizes, unit by unit.

The result (quantization parameters and rounding choices) is cached by
:func:`~diffquant.methods.result_cache.run_method` under ``<cache_dir>/ptq/<hash>/``, so a second
job — or QuEST and AccuQuant, through :func:`load_or_run_ptq` — loads it instead of
recalibrating. A stopped calibration resumes after the last finished unit.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import torch

from diffquant.calib.collect import CalibSettings, CalibStream, collect_calibration
from diffquant.calib.ranges import calibrate_act_ranges, minmax_patterns
from diffquant.calib.reconstruct import ReconSettings, reconstruct
from diffquant.methods.base import Method, MethodResult, Table
from diffquant.methods.result_cache import run_method
from diffquant.quant.config import QuantConfig
from diffquant.quant.state import iter_quantizers
from diffquant.quant.swap import quantize_denoiser
from diffquant.registry import METHODS
from diffquant.validation import one_of, positive

log = logging.getLogger(__name__)


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

    def __post_init__(self) -> None:
        one_of(self, "range_init", (None, "minmax", "lp"))
        positive(self, "act_init_rows", "act_init_batch_size")


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

    def __post_init__(self) -> None:
        positive(self, "act_init_rows", "act_init_batch_size")


AnyPTQConfig = Union[PTQConfig, PTQMinMaxConfig]


# ---------------------------------------------------------------------------- checks
def _check_finite_quantizers(denoiser: torch.nn.Module, method_name: str) -> None:
    bad = [
        n
        for n, q in iter_quantizers(denoiser)
        if not (torch.isfinite(q.scale).all() and torch.isfinite(q.zero_point).all())
    ]
    if bad:
        hint = (
            "lower method.recon.act_lr / method.recon.weight_lr"
            if method_name == "ptq"
            else "check the calibration data"
        )
        raise FloatingPointError(f"{method_name}: non-finite quantization parameters in {bad[:5]}: {hint}")


@torch.no_grad()
def _check_finite_output(model: Any, stream: CalibStream, method_name: str) -> None:
    batch = next(stream.batches(8, stream.subset(8, 0), device=model.device))
    out = model.spec.forward(model.denoiser, batch)
    if not torch.isfinite(out).all():
        hint = (
            "lower method.recon.act_lr (or method.recon.weight_lr)"
            if method_name == "ptq"
            else "use quant.act_init=lp or more calibration rows"
        )
        raise FloatingPointError(
            f"{method_name}: the quantized denoiser outputs NaN/inf on calibration inputs: {hint}"
        )


# ---------------------------------------------------------------------------- calibration
def calibrate_ptq(
    model: Any, quant: QuantConfig, cfg: AnyPTQConfig, ctx: Any, progress: Optional[Path]
) -> MethodResult:
    """Quantize ``model.denoiser`` in place and calibrate it: initial ranges, then (``ptq``)
    block reconstruction, resumable through ``progress``."""
    is_minmax = isinstance(cfg, PTQMinMaxConfig)
    if is_minmax and cfg.range_init is not None:
        quant = dataclasses.replace(quant, weight_init=cfg.range_init, act_init=cfg.range_init)
    stream = collect_calibration(model, cfg.calib, ctx.cache_dir)
    summary = quantize_denoiser(model.denoiser, model.spec, quant, timesteps=model.timesteps)
    text = summary.format()
    log.info("\n%s", text)
    calibrate_act_ranges(
        model.denoiser,
        stream,
        method=quant.act_init,
        n_rows=cfg.act_init_rows,
        batch_size=cfg.act_init_batch_size,
        p=quant.lp_norm,
        n_candidates=quant.lp_candidates,
        device=model.device,
        minmax_layers=minmax_patterns(model.denoiser, model.spec, quant),
    )
    report = None
    if not is_minmax:
        report = reconstruct(model.denoiser, model.spec, stream, cfg.recon, progress_dir=progress)
    _check_finite_quantizers(model.denoiser, cfg.name)
    _check_finite_output(model, stream, cfg.name)
    metrics: dict[str, Any] = {**summary.metrics(), "calib_rows": len(stream)}
    tables: dict[str, Table] = {}
    if report is not None:
        metrics.update(
            {
                k: v if not isinstance(v, float) or math.isfinite(v) else None
                for k, v in report.metrics().items()
            }
        )
        tables["recon_units"] = Table(
            ["unit", "kind", "weight_loss", "act_loss", "seconds"],
            [[u.name, u.kind, u.weight_loss, u.act_loss, u.seconds] for u in report.units],
        )
    return MethodResult(model, quant, metrics, tables, {"quant_summary.txt": text})


@METHODS.register("ptq_minmax", schema=PTQMinMaxConfig)
class PTQMinMax(Method):
    """``method=ptq_minmax``: initial ranges only (the floor every method must beat)."""

    version = 4

    def calibrate(
        self, model: Any, quant: QuantConfig, cfg: PTQMinMaxConfig, ctx: Any, progress: Path
    ) -> MethodResult:
        return calibrate_ptq(model, quant, cfg, ctx, progress)


@METHODS.register("ptq", schema=PTQConfig)
class PTQ(Method):
    """``method=ptq``: Q-Diffusion's BRECQ block reconstruction (AdaRound, then LSQ)."""

    version = 4

    def calibrate(
        self, model: Any, quant: QuantConfig, cfg: PTQConfig, ctx: Any, progress: Path
    ) -> MethodResult:
        return calibrate_ptq(model, quant, cfg, ctx, progress)


def load_or_run_ptq(model: Any, quant: QuantConfig, cfg: PTQConfig, ctx: Any) -> MethodResult:
    """The PTQ base of a method built on it (QuEST, AccuQuant): exactly ``method=ptq`` with
    ``cfg``, so its cached result is shared with ``method=ptq`` jobs."""
    return run_method(METHODS.get("ptq")(), model, quant, cfg, ctx)
