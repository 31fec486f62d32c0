"""``tfmq``: TFMQ-DM (Huang et al., CVPR 2024) — temporal feature maintenance.

Steps, keyed to the paper and its code (``ModelTC/TFMQ-DM``; file and line for each setting in
``experiments/FIDELITY.md``):

1. Quantize the denoiser with **one activation parameter set per sampler step** (the job's quant
   config made time-step aware with ``S`` groups, ``S`` = sampler steps), and min-max running
   statistics (``quant.act_running_stat``).
2. **TIAR** — temporal information aware reconstruction: the temporal information block (the
   ``time_embedding`` and ``time_projection`` roles) reconstructed by AdaRound on its own outputs,
   from the time step alone, before any block (:mod:`diffquant.calib.temporal`).
3. Block reconstruction of the rest (BRECQ's AdaRound stage only; the temporal block's layers
   keep their rounding), on the weight-calibration rows (``calib``: every 2nd step here, every
   ``interval_length``-th in the code). **No LSQ stage**, as the code.
4. **FSC** — finite set calibration, on the weight-quantized network with rows of **every**
   sampler step (``act_calib``): per step, an initial range from ``fsc_init_rows`` random rows of
   that step (``quant.act_init``; each quantizer quantizing as soon as it is set), then the
   exponential moving average (momentum ``quant.act_momentum``) of per-batch min / max over all
   the step's rows, ``fsc_batch_size`` per batch, which becomes the step's range.

``tiar=false`` and ``fsc=false`` (one activation set for all steps) are the paper's ablations.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

from diffquant.calib.collect import STEP_KEY, CalibSettings, CalibStream, collect_calibration
from diffquant.calib.ranges import RunningStat, calibrate_act_ranges, minmax_patterns
from diffquant.calib.reconstruct import ReconSettings, reconstruct
from diffquant.calib.temporal import reconstruct_temporal
from diffquant.methods.base import Method, MethodResult, Table
from diffquant.methods.ptq import _check_finite_output, _check_finite_quantizers, check_quant_overrides
from diffquant.quant.config import QuantConfig
from diffquant.quant.swap import quantize_denoiser
from diffquant.registry import METHODS
from diffquant.validation import InvalidSetting, positive

log = logging.getLogger(__name__)


def _weights_only() -> ReconSettings:
    return ReconSettings(act_iters=0)


def _every_step() -> CalibSettings:
    return CalibSettings(step_stride=1)


@dataclass
class TFMQConfig:
    """``method=tfmq`` (module doc).

    Attributes:
        name: ``tfmq``.
        calib: the weight-calibration trajectories (TIAR and block reconstruction).
        act_calib: the FSC trajectories: every sampler step must be recorded (``step_stride=1``).
        recon: block reconstruction (``act_iters`` must be 0: TFMQ-DM learns no step size).
        tiar: reconstruct the temporal information block first (else it is reconstructed inside
            the blocks, as in ``ptq``).
        tiar_iters: TIAR's iterations (None: ``recon.weight_iters``); its batch size, learning
            rate, p and rounding schedule are ``recon``'s.
        fsc: one activation parameter set per sampler step (else one for all steps).
        fsc_init_rows: random rows per step the initial range is set from (the code's 16).
        fsc_batch_size: rows per running-statistics batch (the code's 16).
        quant_overrides: QuantConfig fields quantized with instead of the job's
            (:func:`~diffquant.methods.ptq.method_quant`); the paper config sets the code's.
        save_checkpoint: also copy the quantized checkpoint into the run folder.
    """

    name: str = "tfmq"
    calib: CalibSettings = field(default_factory=CalibSettings)
    act_calib: CalibSettings = field(default_factory=_every_step)
    recon: ReconSettings = field(default_factory=_weights_only)
    tiar: bool = True
    tiar_iters: Optional[int] = None
    fsc: bool = True
    fsc_init_rows: int = 16
    fsc_batch_size: int = 16
    quant_overrides: dict[str, Any] = field(default_factory=dict)
    save_checkpoint: bool = False

    def __post_init__(self) -> None:
        positive(self, "tiar_iters", "fsc_init_rows", "fsc_batch_size")
        if self.recon.act_iters:
            raise InvalidSetting(
                "recon.act_iters",
                f"={self.recon.act_iters}: TFMQ-DM has no LSQ stage (its activation ranges are "
                "FSC's per-step statistics); set it to 0",
            )
        if self.recon.joint:
            raise InvalidSetting("recon.joint", "is true: TFMQ-DM reconstructs weights only; set it false")
        if self.act_calib.step_sampling != "stride" or (
            self.act_calib.n_steps is None and self.act_calib.step_stride != 1
        ):
            raise InvalidSetting(
                "act_calib",
                "must record every sampler step (step_stride=1, no n_steps) for one range set per step",
            )
        check_quant_overrides(self)


def tfmq_quant(quant: QuantConfig, cfg: TFMQConfig, n_steps: int) -> QuantConfig:
    """The quant config TFMQ-DM quantizes with: the job's, with ``cfg.quant_overrides``, one
    activation set per sampler step (``fsc``) and running statistics."""
    q = dataclasses.replace(quant, **dict(cfg.quant_overrides or {}))
    return dataclasses.replace(
        q,
        timestep_aware=cfg.fsc and n_steps > 1,
        timestep_groups=n_steps if cfg.fsc and n_steps > 1 else 1,
        act_running_stat=True,
    )


def fsc_init_rows(stream: CalibStream, per_step: int, seed: int) -> torch.Tensor:
    """``per_step`` random row indices of every recorded step, step after step (a step's rows
    form one batch of the initial forward)."""
    steps = torch.cat([b[STEP_KEY] for b in stream.batches(4096, with_step=True)])
    g = torch.Generator().manual_seed(seed)
    picks = []
    for s in steps.unique().tolist():
        rows = (steps == s).nonzero().flatten()
        picks.append(rows[torch.randperm(len(rows), generator=g)[:per_step]].sort().values)
    return torch.cat(picks)


@METHODS.register("tfmq", schema=TFMQConfig)
class TFMQ(Method):
    """``method=tfmq``: TIAR, weight reconstruction, FSC (module doc)."""

    version = 1

    def calibrate(
        self, model: Any, quant: QuantConfig, cfg: TFMQConfig, ctx: Any, progress: Path
    ) -> MethodResult:
        n_steps = len(model.timesteps)
        quant = tfmq_quant(quant, cfg, n_steps)
        progress = Path(progress)
        # 1. quantize: per-step activation sets, running statistics
        w_stream = collect_calibration(model, cfg.calib, ctx.cache_dir)
        summary = quantize_denoiser(model.denoiser, model.spec, quant, timesteps=model.timesteps)
        text = summary.format()
        log.info("\n%s", text)
        metrics: dict[str, Any] = {**summary.metrics(), "calib_rows": len(w_stream)}
        # 2. TIAR: the temporal information block on its own outputs
        skip: list[str] = []
        if cfg.tiar:
            iters = cfg.tiar_iters if cfg.tiar_iters is not None else cfg.recon.weight_iters
            tiar = reconstruct_temporal(
                model.denoiser, model.spec, w_stream, cfg.recon, iters, state_file=progress / "tiar.pt"
            )
            skip = tiar["layers"]
            metrics.update(tfmq_tiar_layers=len(skip), tfmq_tiar_loss=tiar["loss"])
        # 3. block reconstruction, AdaRound only, the temporal block's layers left as they are
        report = reconstruct(
            model.denoiser,
            model.spec,
            w_stream,
            cfg.recon,
            progress_dir=progress / "blocks",
            skip_weight_layers=skip,
        )
        # 4. FSC: per-step ranges on the weight-quantized network, every step's rows
        a_stream = collect_calibration(model, cfg.act_calib, ctx.cache_dir)
        init = fsc_init_rows(a_stream, cfg.fsc_init_rows, cfg.recon.seed)
        calibrate_act_ranges(
            model.denoiser,
            a_stream,
            method=quant.act_init,
            rows=init,
            batch_size=cfg.fsc_init_rows,
            p=quant.lp_norm,
            n_candidates=quant.lp_candidates,
            seed=cfg.recon.seed,
            device=model.device,
            running=RunningStat(a_stream.reference_order(), cfg.fsc_batch_size, quant.act_momentum),
            quantized=True,
            minmax_layers=minmax_patterns(model.denoiser, model.spec, quant),
        )
        _check_finite_quantizers(model.denoiser, cfg.name)
        _check_finite_output(model, w_stream, cfg.name)
        metrics.update(report.metrics())
        metrics.update(tfmq_act_rows=len(a_stream), tfmq_act_sets=quant.timestep_groups)
        tables = {
            "recon_units": Table(
                ["unit", "kind", "weight_loss", "seconds"],
                [[u.name, u.kind, u.weight_loss, u.seconds] for u in report.units],
            )
        }
        return MethodResult(model, quant, metrics, tables, {"quant_summary.txt": text})
