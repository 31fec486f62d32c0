"""Baseline post-training quantization: ``ptq_minmax`` (the floor) and ``ptq`` (Q-Diffusion).

Both quantize ``model.denoiser`` (every Conv2d/Linear and the attention matmuls; VAE and text
encoder stay FP), gather calibration data from the FP model's own sampler and set initial ranges:

* ``ptq_minmax`` — weights round-to-nearest on their initial per-channel ranges, activation
  ranges from calibration data; no reconstruction. ``range_init`` (default ``minmax``) overrides
  the quant config's ``weight_init``/``act_init``.
* ``ptq`` — then BRECQ block reconstruction (:mod:`diffquant.calib.reconstruct`): AdaRound for
  the weights, then LSQ for the activation step sizes, unit by unit.

**LSQ guard** (``lsq_guard``: off by default and in the paper configs). The LSQ stage refines the
initial activation ranges by each unit's output MSE; on ``ldm_digits`` W4A4 with min-max ranges
it raised FID→FP from 0.169 (no LSQ) to 0.289. With the guard, every unit's AdaRound stage runs
first and every unit's LSQ stage after (the same result as the unit-by-unit order, module doc of
:mod:`diffquant.calib.reconstruct`); between the two passes a
:class:`~diffquant.methods.guard.RefinementGuard` measures the held-out final-image error
(``guard_samples`` FP chains of seed ``guard_seed``) and keeps that state; after the LSQ pass the
better of the two is kept (by ``guard_criterion``, :func:`~diffquant.methods.guard.improves`).
``ptq_lsq_guard_{mse,log_mse}_{base,final}``, ``_criterion`` and ``_kept`` go to ``metrics.json``.

Initial activation ranges, two orders (``act_init_stage``):

* ``before_recon`` (ours, the embedded default): before reconstruction, on the FP network, from
  ``act_init_rows`` random rows spread over all recorded steps;
* ``after_weights`` (Q-Diffusion's, ``method=ptq_paper``): every unit's AdaRound stage first,
  then the ranges on the weight-quantized network, each activation quantizer set on its first
  input and quantizing at once (``scripts/sample_diffusion_ldm.py`` lines 525-546 of
  q-diffusion), from the first ``act_init_rows`` rows in the reference's time-step order
  (``act_init_select=first``: ``cali_xs[:64]``, all of the noisiest recorded step) or random rows
  (``random``: the SD script's 16), then every unit's LSQ stage.

Either is followed by Q-Diffusion's running statistics when ``quant.act_running_stat`` is set:
all calibration rows in time-step order (``act_running_order=steps``, the LDM script) or
shuffled (``shuffled``, the SD script), ``act_running_batch_size`` per batch.

``quant_overrides`` (a method's own code settings): QuantConfig fields this method quantizes with
instead of the job's, e.g. ``ptq_paper`` quantizes activations per tensor at every bit-width and
keeps no 8-bit first/last-layer exception, as Q-Diffusion's scripts do, while QuEST's rows of the
same table keep QuEST's settings. The result's quant config is the overridden one.

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
from diffquant.calib.ranges import RunningStat, calibrate_act_ranges, minmax_patterns
from diffquant.calib.reconstruct import ReconReport, ReconSettings, reconstruct
from diffquant.methods.base import Method, MethodResult, Table
from diffquant.methods.guard import CRITERIA as GUARD_CRITERIA
from diffquant.methods.guard import RefinementGuard
from diffquant.methods.result_cache import run_method
from diffquant.quant.config import QuantConfig
from diffquant.quant.state import iter_quantizers
from diffquant.quant.swap import quantize_denoiser
from diffquant.registry import METHODS
from diffquant.validation import InvalidSetting, one_of, positive

log = logging.getLogger(__name__)


ACT_INIT_STAGES = ("before_recon", "after_weights")
ACT_INIT_SELECTS = ("random", "first")
ACT_RUNNING_ORDERS = ("steps", "shuffled")
#: QuantConfig fields a method may not override: they name the row (its bit-widths).
FIXED_QUANT_FIELDS = ("name", "weight_bits", "act_bits")


def check_quant_overrides(cfg: Any) -> None:
    """``cfg.quant_overrides`` must name QuantConfig fields other than the bit-widths."""
    fields = {f.name for f in dataclasses.fields(QuantConfig)}
    for key in cfg.quant_overrides or {}:
        if key not in fields or key in FIXED_QUANT_FIELDS:
            raise InvalidSetting(
                "quant_overrides",
                f"has {key!r}, which is not a QuantConfig "
                "setting a method may override (bit-widths name the row: set "
                f"them with quant=...); settings: {sorted(fields - set(FIXED_QUANT_FIELDS))}",
            )


def _check_act_init(cfg: Any) -> None:
    one_of(cfg, "act_init_stage", ACT_INIT_STAGES)
    one_of(cfg, "act_init_select", ACT_INIT_SELECTS)
    one_of(cfg, "act_running_order", ACT_RUNNING_ORDERS)
    positive(cfg, "act_init_rows", "act_init_batch_size", "act_running_batch_size")
    positive(cfg, "act_init_seed", allow_zero=True)
    check_quant_overrides(cfg)


@dataclass
class PTQMinMaxConfig:
    """``method=ptq_minmax``: quantize with initial ranges, no reconstruction.

    Attributes:
        name: ``ptq_minmax``.
        calib: calibration trajectories (samples, recorded steps, seed).
        range_init: ``minmax`` or ``lp`` for weights and activations; None keeps the quant
            config's ``weight_init`` / ``act_init``.
        act_init_rows: calibration rows the activation ranges are set from (None = all).
        act_init_seed: base seed of the random ``act_init_rows`` subset and of the L_p search's
            element sampling (re-seeded by the run's ``calib_seed``, :mod:`diffquant.seeds`).
        act_init_batch_size: rows per forward while observing (``before_recon``).
        act_init_stage / act_init_select / act_running_order / act_running_batch_size: as in
            :class:`PTQConfig` (``after_weights``: after round-to-nearest weight quantization).
        quant_overrides: QuantConfig fields quantized with instead of the job's (module doc).
        save_checkpoint: also copy the quantized checkpoint into the run folder.
    """

    name: str = "ptq_minmax"
    calib: CalibSettings = field(default_factory=CalibSettings)
    range_init: Optional[str] = "minmax"
    act_init_rows: Optional[int] = 256
    act_init_seed: int = 0
    act_init_batch_size: int = 64
    act_init_stage: str = "before_recon"
    act_init_select: str = "random"
    act_running_order: str = "steps"
    act_running_batch_size: int = 64
    quant_overrides: dict[str, Any] = field(default_factory=dict)
    save_checkpoint: bool = False

    def __post_init__(self) -> None:
        one_of(self, "range_init", (None, "minmax", "lp"))
        _check_act_init(self)


@dataclass
class PTQConfig:
    """``method=ptq``: Q-Diffusion / BRECQ block reconstruction.

    Attributes:
        name: ``ptq``.
        calib: calibration trajectories (samples, recorded steps, seed).
        act_init_rows: calibration rows the initial activation ranges are set from (by the quant
            config's ``act_init``, before LSQ refines them; None = all).
        act_init_seed: base seed of the random ``act_init_rows`` subset and of the L_p search's
            element sampling (re-seeded by the run's ``calib_seed``, :mod:`diffquant.seeds`).
        act_init_batch_size: rows per forward while observing them (``before_recon``; with
            ``after_weights`` the rows pass in one forward, as Q-Diffusion's ``qnn(cali_xs[:64])``).
        act_init_stage: ``before_recon`` (FP network, before reconstruction) or ``after_weights``
            (Q-Diffusion's: after every unit's AdaRound stage, on the weight-quantized network,
            each quantizer quantizing as soon as it is set; then every unit's LSQ stage).
        act_init_select: ``random`` (a fixed random subset over all recorded steps) or ``first``
            (the first rows in the reference's time-step order: Q-Diffusion's ``cali_xs[:64]``).
        act_running_order: with ``quant.act_running_stat``, all rows in time-step order
            (``steps``, Q-Diffusion's LDM script) or shuffled (``shuffled``, its SD script).
        act_running_batch_size: rows per running-statistics batch (64 LDM, 16 SD).
        recon: reconstruction iterations, batch size, learning rates, p, loss axis, AdaRound
            schedule.
        quant_overrides: QuantConfig fields this method quantizes with instead of the job's
            (module doc); not applied when PTQ is the base of another method
            (:func:`load_or_run_ptq`).
        save_checkpoint: also copy the quantized checkpoint into the run folder.
        lsq_guard: keep the LSQ stage's activation step sizes only if the held-out final-image
            error is not worse than with the initial ranges (module doc); costs a second capture
            pass and ``guard_samples`` FP chains.
        guard_samples / guard_seed / guard_batch_size: the held-out trajectories (seed other
            than ``calib.seed``) and the batch they are sampled in.
        guard_criterion: ``mse`` (the mean per-image error), ``log_mse`` (the mean of its
            log10) or ``both`` (neither may get worse): :data:`diffquant.methods.guard.CRITERIA`.
    """

    name: str = "ptq"
    calib: CalibSettings = field(default_factory=CalibSettings)
    act_init_rows: Optional[int] = 256
    act_init_seed: int = 0
    act_init_batch_size: int = 64
    act_init_stage: str = "before_recon"
    act_init_select: str = "random"
    act_running_order: str = "steps"
    act_running_batch_size: int = 64
    recon: ReconSettings = field(default_factory=ReconSettings)
    quant_overrides: dict[str, Any] = field(default_factory=dict)
    save_checkpoint: bool = False
    lsq_guard: bool = False
    guard_samples: int = 256
    guard_seed: int = 30_000
    guard_batch_size: int = 64
    guard_criterion: str = "mse"

    def __post_init__(self) -> None:
        _check_act_init(self)
        positive(self, "guard_samples", "guard_batch_size")
        one_of(self, "guard_criterion", GUARD_CRITERIA)
        if self.lsq_guard and self.guard_seed == self.calib.seed:
            raise InvalidSetting(
                "guard_seed",
                f"equals calib.seed ({self.calib.seed}): the guard's trajectories would be the "
                "calibration ones; choose another seed (default 30000).",
            )


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
def method_quant(quant: QuantConfig, cfg: AnyPTQConfig) -> QuantConfig:
    """The quant config ``cfg`` quantizes with: the job's, with ``cfg.quant_overrides`` (and
    ``ptq_minmax``'s ``range_init``) applied."""
    overrides = dict(cfg.quant_overrides or {})
    if isinstance(cfg, PTQMinMaxConfig) and cfg.range_init is not None:
        overrides.update(weight_init=cfg.range_init, act_init=cfg.range_init)
    return dataclasses.replace(quant, **overrides) if overrides else quant


def init_rows(stream: CalibStream, cfg: AnyPTQConfig) -> Optional[torch.Tensor]:
    """The initial rows in feeding order for ``act_init_select=first`` (None: the random subset
    :func:`~diffquant.calib.ranges.calibrate_act_ranges` draws itself)."""
    if cfg.act_init_select == "random":
        return None
    order = stream.reference_order()
    return order if cfg.act_init_rows is None else order[: cfg.act_init_rows]


def running_stat(stream: CalibStream, quant: QuantConfig, cfg: AnyPTQConfig) -> Optional[RunningStat]:
    """Q-Diffusion's running statistics over all rows (``quant.act_running_stat``), or None."""
    if not quant.act_running_stat:
        return None
    if cfg.act_running_order == "steps":
        rows = stream.reference_order()
    else:
        g = torch.Generator().manual_seed(cfg.calib.seed + 1)
        rows = torch.randperm(len(stream), generator=g)
    return RunningStat(rows, cfg.act_running_batch_size, quant.act_momentum)


def init_act_ranges(model: Any, stream: CalibStream, quant: QuantConfig, cfg: AnyPTQConfig) -> None:
    """Initial activation ranges of ``model.denoiser`` as ``cfg.act_init_stage`` says (module
    doc): FP network in batches, or Q-Diffusion's one forward through the quantized network."""
    after = cfg.act_init_stage == "after_weights"
    rows = init_rows(stream, cfg)
    n_rows = cfg.act_init_rows if rows is None else len(rows)
    batch = cfg.act_init_batch_size if not after else (n_rows or len(stream))
    calibrate_act_ranges(
        model.denoiser,
        stream,
        method=quant.act_init,
        n_rows=cfg.act_init_rows,
        batch_size=batch,
        seed=cfg.act_init_seed,
        p=quant.lp_norm,
        n_candidates=quant.lp_candidates,
        device=model.device,
        rows=rows,
        running=running_stat(stream, quant, cfg),
        quantized=after,
        minmax_layers=minmax_patterns(model.denoiser, model.spec, quant),
    )


def merge_reports(weights: ReconReport, acts: ReconReport) -> ReconReport:
    """One report of the two passes of ``after_weights`` (weight losses of the first, activation
    losses of the second, seconds summed)."""
    by_name = {u.name: u for u in weights.units}
    for u in acts.units:
        w = by_name.get(u.name)
        if w is None:
            by_name[u.name] = u
            continue
        w.act_loss = u.act_loss
        w.capture_s = round(w.capture_s + u.capture_s, 3)
        w.seconds = round(w.seconds + u.seconds, 3)
    return ReconReport(list(by_name.values()), weights.resumed_from)


def calibrate_ptq(
    model: Any, quant: QuantConfig, cfg: AnyPTQConfig, ctx: Any, progress: Optional[Path]
) -> MethodResult:
    """Quantize ``model.denoiser`` in place and calibrate it: initial ranges, then (``ptq``)
    block reconstruction, resumable through ``progress``."""
    is_minmax = isinstance(cfg, PTQMinMaxConfig)
    quant = method_quant(quant, cfg)
    stream = collect_calibration(model, cfg.calib, ctx.cache_dir)
    summary = quantize_denoiser(model.denoiser, model.spec, quant, timesteps=model.timesteps)
    text = summary.format()
    log.info("\n%s", text)
    report, verdict = None, None
    sub = lambda name: None if progress is None else Path(progress) / name
    recon = lambda settings, folder: reconstruct(
        model.denoiser, model.spec, stream, settings, progress_dir=folder
    )
    if is_minmax:
        init_act_ranges(model, stream, quant, cfg)
    elif cfg.act_init_stage == "before_recon" and not cfg.lsq_guard:
        init_act_ranges(model, stream, quant, cfg)
        report = recon(cfg.recon, progress)
    else:  # two passes: every unit's AdaRound stage, then every unit's LSQ stage
        if cfg.act_init_stage == "before_recon":
            init_act_ranges(model, stream, quant, cfg)
        w_report = recon(dataclasses.replace(cfg.recon, act_iters=0), sub("weights"))
        if cfg.act_init_stage == "after_weights":  # Q-Diffusion's order
            init_act_ranges(model, stream, quant, cfg)
        guard = (
            RefinementGuard(
                model, cfg.guard_samples, cfg.guard_seed, cfg.guard_batch_size, cfg.guard_criterion
            )
            if cfg.lsq_guard and cfg.recon.act_iters > 0
            else None
        )
        a_report = recon(dataclasses.replace(cfg.recon, weight_iters=0), sub("acts"))
        verdict = guard.judge("ptq_lsq") if guard is not None else None
        report = merge_reports(w_report, a_report)
    _check_finite_quantizers(model.denoiser, cfg.name)
    _check_finite_output(model, stream, cfg.name)
    metrics: dict[str, Any] = {**summary.metrics(), "calib_rows": len(stream)}
    if verdict is not None:
        metrics.update(verdict.metrics("ptq_lsq"))
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

    version = 5  # 5: both guard measures in the metrics (lsq_guard off: version 4's results)

    def calibrate(
        self, model: Any, quant: QuantConfig, cfg: PTQConfig, ctx: Any, progress: Path
    ) -> MethodResult:
        return calibrate_ptq(model, quant, cfg, ctx, progress)


def load_or_run_ptq(model: Any, quant: QuantConfig, cfg: PTQConfig, ctx: Any) -> MethodResult:
    """The PTQ base of a method built on it (QuEST, AccuQuant): exactly ``method=ptq`` with
    ``cfg``, so its cached result is shared with ``method=ptq`` jobs — but quantized with the
    caller's ``quant``: ``cfg.quant_overrides`` are the PTQ *row's* own code settings (e.g.
    ``ptq_paper``'s Q-Diffusion per-tensor activations), not those of a method built on it."""
    if cfg.quant_overrides:
        log.info(
            "PTQ base: quantizing with the method's quant config, not the PTQ row's quant_overrides %s",
            dict(cfg.quant_overrides),
        )
        cfg = dataclasses.replace(cfg, quant_overrides={})
    return run_method(METHODS.get("ptq")(), model, quant, cfg, ctx)
