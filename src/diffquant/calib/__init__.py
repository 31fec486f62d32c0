"""Calibration: FP trajectories on disk (:mod:`collect`), initial activation ranges
(:mod:`ranges`) and BRECQ block reconstruction (:mod:`reconstruct`)."""

from diffquant.calib.collect import (
    CalibSettings,
    CalibStream,
    calib_cache_key,
    collect_calibration,
    denoiser_fingerprint,
    model_identity,
)
from diffquant.calib.ranges import calibrate_act_ranges, observing_act_ranges
from diffquant.calib.reconstruct import (
    ReconReport,
    ReconSettings,
    Unit,
    UnitReport,
    find_units,
    lp_loss,
    reconstruct,
)

__all__ = [
    "CalibSettings",
    "CalibStream",
    "calib_cache_key",
    "collect_calibration",
    "model_identity",
    "denoiser_fingerprint",
    "calibrate_act_ranges",
    "observing_act_ranges",
    "ReconReport",
    "ReconSettings",
    "Unit",
    "UnitReport",
    "find_units",
    "lp_loss",
    "reconstruct",
]
