"""``ptq4dm``: PTQ4DM (Shang et al., CVPR 2023) — normally distributed time-step calibration and
QDrop block reconstruction.

1. **NDTC** (calibration data): each of ``calib.n_samples`` FP trajectories is recorded at one
   sampler step drawn from a normal distribution over the steps (μ = 0.4, σ = 0.4 of the
   sampler's steps from the noisiest, truncated and clamped as PTQ4DM's
   ``quant_image_sample.py`` does; :class:`~diffquant.calib.collect.CalibSettings`
   ``step_sampling=normal``), instead of every trajectory at evenly spaced steps. The default
   640 trajectories give as many rows as ``method=ptq``'s 64 trajectories × 10 steps.
2. Initial activation ranges on those rows (the job's ``quant.act_init``), before
   reconstruction.
3. **QDrop reconstruction**, unit by unit (:class:`~diffquant.calib.reconstruct.ReconSettings`
   ``joint``): AdaRound α and activation step sizes learned together, each activation element
   quantized with probability ``recon.keep_prob`` (0.5) and FP otherwise, the unit's input mixed
   element-wise between the quantized and the FP network's (``recon.input_keep_prob``, 0.5).

The result is cached and resumable like ``ptq``'s (:func:`~diffquant.methods.ptq.calibrate_ptq`
runs it: it is ``ptq`` with these calibration and reconstruction settings). Where PTQ4DM's code
differs from its paper (its shipped script never runs the reconstruction; its calibration rows
carry the loop index as time step) is in ``experiments/FIDELITY.md``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from diffquant.calib.collect import CalibSettings
from diffquant.calib.reconstruct import ReconSettings
from diffquant.methods.base import Method, MethodResult
from diffquant.methods.ptq import PTQConfig, calibrate_ptq
from diffquant.quant.config import QuantConfig
from diffquant.registry import METHODS
from diffquant.validation import InvalidSetting


def _ndtc() -> CalibSettings:
    return CalibSettings(n_samples=640, step_sampling="normal", normal_mean=0.4, normal_std=0.4)


def _qdrop() -> ReconSettings:
    return ReconSettings(joint=True, keep_prob=0.5, input_keep_prob=0.5)


@dataclass
class PTQ4DMConfig(PTQConfig):
    """``method=ptq4dm``: :class:`~diffquant.methods.ptq.PTQConfig` with NDTC calibration rows
    (``calib``) and QDrop's joint reconstruction (``recon``); see the module doc. The LSQ guard
    and Q-Diffusion's after-weights range initialisation do not apply (one joint stage)."""

    name: str = "ptq4dm"
    calib: CalibSettings = field(default_factory=_ndtc)
    recon: ReconSettings = field(default_factory=_qdrop)

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.recon.joint:
            raise InvalidSetting(
                "recon.joint", "is false: PTQ4DM reconstructs with QDrop's joint stage (true)"
            )
        if self.act_init_stage != "before_recon":
            raise InvalidSetting(
                "act_init_stage",
                f"={self.act_init_stage}: QDrop's joint stage needs activation ranges before "
                "reconstruction (before_recon)",
            )
        if self.lsq_guard:
            raise InvalidSetting(
                "lsq_guard", "is true: PTQ4DM has no separate LSQ stage to guard; set it false"
            )


@METHODS.register("ptq4dm", schema=PTQ4DMConfig)
class PTQ4DM(Method):
    """``method=ptq4dm``: NDTC rows + QDrop reconstruction (module doc)."""

    version = 1

    def calibrate(
        self, model: Any, quant: QuantConfig, cfg: PTQ4DMConfig, ctx: Any, progress: Path
    ) -> MethodResult:
        return calibrate_ptq(model, quant, cfg, ctx, progress)
