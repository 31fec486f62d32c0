"""Calibration: FP trajectories on disk (:mod:`collect`), initial activation ranges
(:mod:`ranges`), BRECQ block reconstruction (:mod:`reconstruct`) and TFMQ-DM's temporal-block
reconstruction (:mod:`temporal`)."""

from diffquant.calib.collect import (
    CalibSettings,
    CalibStream,
    calib_cache_key,
    collect_calibration,
    denoiser_fingerprint,
    model_identity,
)
from diffquant.calib.ranges import RunningStat, calibrate_act_ranges, observing_act_ranges
from diffquant.calib.reconstruct import (
    ReconReport,
    ReconSettings,
    Unit,
    UnitReport,
    find_units,
    lp_loss,
    reconstruct,
)
from diffquant.calib.temporal import check_temporal_outputs, reconstruct_temporal

__all__ = [
    "CalibSettings",
    "CalibStream",
    "calib_cache_key",
    "collect_calibration",
    "model_identity",
    "denoiser_fingerprint",
    "calibrate_act_ranges",
    "observing_act_ranges",
    "RunningStat",
    "ReconReport",
    "ReconSettings",
    "Unit",
    "UnitReport",
    "find_units",
    "lp_loss",
    "reconstruct",
    "check_temporal_outputs",
    "reconstruct_temporal",
]
