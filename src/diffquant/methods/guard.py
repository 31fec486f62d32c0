"""The refinement guard: a method that refines a base result never ends worse than the base.

QuEST and AccuQuant start from the PTQ result and move it to lower their own losses (per-step
denoiser-output MSE on calibration rows; group losses on calibration trajectories). Those fell
while the FID to the FP samples rose (ldm_digits W8A8: PTQ 0.000637, QuEST 0.00327, AccuQuant
0.00339), so a method that refines a base judges the result it will keep against the base, by
the loss that matters and on data it did not train on:

* **held-out trajectories** — ``samples`` FP sampler chains drawn with their own ``seed``
  (:func:`heldout_trajectories`): not the evaluation samples (the job's seed) and not
  AccuQuant's calibration trajectories (its ``seed``);
* **the loss** — the final-image error (:func:`final_image_errors`): per image, the MSE between
  the decoded final latents of the quantized sampler and of the FP sampler from the same x_T,
  conditioning and noise; reduced two ways, the mean (``mse``) and the mean log10 (``log_mse``).
  The images, not the latents: the latent error is dominated by directions the decoder does not
  render (README, "The guard");
* **the decision** (:class:`RefinementGuard`) — the base's errors are measured and its state kept
  (:func:`snapshot_state`) before the refinement starts; after it, the final model (as it will
  be kept: roundings hard) is measured the same way; if it is worse by the ``criterion``
  (:data:`CRITERIA`; ``both``: worse by either measure), the base's state is put back. Both
  measures of the base and the final model (``<prefix>_guard_mse_base`` ...), the criterion and
  ``<prefix>_guard_kept`` (``final`` or ``base``) go to ``metrics.json``
  (:meth:`GuardVerdict.metrics`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from diffquant.methods.trajectory import Trajectories, fp_trajectories, rollout

log = logging.getLogger(__name__)

KEPT = ("final", "base")


def snapshot_state(denoiser: nn.Module) -> dict[str, Tensor]:
    """Every parameter and buffer of ``denoiser`` (quantizer state, latent weights, biases),
    detached copies on the CPU."""
    return {k: v.detach().cpu().clone() for k, v in denoiser.state_dict().items()}


def restore_state(denoiser: nn.Module, state: dict[str, Tensor]) -> None:
    """Put a :func:`snapshot_state` back (the denoiser must have the same structure)."""
    denoiser.load_state_dict(state, strict=True)


def spread_indices(model: Any, n_samples: int) -> list[int]:
    """Sample indices ``0 .. n_samples-1``, or, for a class-conditional model with more classes
    than samples (sample ``i`` has class ``i % num_classes``), indices spread evenly over the
    classes (ImageNet, 256 samples: classes 0, 3, 7, 11, ..., not 0 .. 255)."""
    classes = getattr(model, "num_classes", None)
    if classes and n_samples < classes:
        return [i * classes // n_samples for i in range(n_samples)]
    return list(range(n_samples))


def heldout_trajectories(model: Any, n_samples: int, seed: int, batch_size: int) -> Trajectories:
    """``n_samples`` FP trajectories (classes spread, :func:`spread_indices`) of seed ``seed``."""
    return fp_trajectories(model, spread_indices(model, n_samples), seed, batch_size)


#: the held-out measures: ``mse`` the mean of the per-image MSEs; ``log_mse`` the mean of their
#: log10 (−PSNR/10 up to a constant: a few diverging samples weigh less)
MEASURES = ("mse", "log_mse")
#: what the guard judges by: one measure, or ``both`` (the refinement is kept only if neither
#: measure gets worse: it may not trade the typical image for the mean, or the mean for it)
CRITERIA = (*MEASURES, "both")


@torch.no_grad()
def final_image_errors(model: Any, traj: Trajectories, batch_size: int) -> dict[str, float]:
    """The error between the decoded final latents of ``model``'s sampler (as it is: quantized)
    and ``traj``'s (images in the model's output range), every chain started from ``traj``'s x_T
    with its conditioning and noise, in every :data:`MEASURES` (one rollout): ``mse`` the mean
    per-image MSE, ``log_mse`` the mean of the per-image MSEs' log10 (floored at 1e-12)."""
    mse, log_mse, n = 0.0, 0.0, len(traj)
    for lo in range(0, n, batch_size):
        part = traj.rows(list(range(lo, min(n, lo + batch_size))))
        x = rollout(model, part.states[0], 0, traj.n_steps, part.cond, part.indices, part.seed)
        per_image = (model.decode(x) - model.decode(part.states[-1])).pow(2).flatten(1).mean(1)
        mse += float(per_image.sum())
        log_mse += float(per_image.clamp_min(1e-12).log10().sum())
    return {"mse": mse / n, "log_mse": log_mse / n}


def final_image_error(model: Any, traj: Trajectories, batch_size: int, measure: str = "mse") -> float:
    """One measure of :func:`final_image_errors`."""
    if measure not in MEASURES:
        raise ValueError(f"guard measure {measure!r}: choose from {', '.join(MEASURES)}")
    return final_image_errors(model, traj, batch_size)[measure]


def improves(final: dict[str, float], base: dict[str, float], criterion: str) -> bool:
    """Whether ``final`` is not worse than ``base`` by ``criterion`` (ties count as not worse)."""
    if criterion not in CRITERIA:
        raise ValueError(f"guard criterion {criterion!r}: choose from {', '.join(CRITERIA)}")
    measures = MEASURES if criterion == "both" else (criterion,)
    return all(final[m] <= base[m] for m in measures)


@dataclass
class GuardVerdict:
    """The base's and the final model's held-out errors (every measure), and which was kept."""

    base: dict[str, float]
    final: dict[str, float]
    criterion: str
    kept: str

    def metrics(self, prefix: str) -> dict[str, Any]:
        """``<prefix>_guard_<measure>_base`` / ``_final`` for every measure,
        ``<prefix>_guard_criterion`` and ``<prefix>_guard_kept``."""
        out: dict[str, Any] = {}
        for m in MEASURES:
            out[f"{prefix}_guard_{m}_base"] = self.base[m]
            out[f"{prefix}_guard_{m}_final"] = self.final[m]
        out[f"{prefix}_guard_criterion"] = self.criterion
        out[f"{prefix}_guard_kept"] = self.kept
        return out


class RefinementGuard:
    """Measures and keeps the base when created; :meth:`judge` keeps the final model unless it
    is worse than the base by ``criterion`` (:func:`improves`)."""

    def __init__(self, model: Any, samples: int, seed: int, batch_size: int, criterion: str = "mse") -> None:
        if criterion not in CRITERIA:
            raise ValueError(f"guard criterion {criterion!r}: choose from {', '.join(CRITERIA)}")
        self.model, self.batch_size, self.criterion = model, batch_size, criterion
        self.traj = heldout_trajectories(model, samples, seed, batch_size)
        self.state = snapshot_state(model.denoiser)
        self.base = final_image_errors(model, self.traj, batch_size)

    def judge(self, prefix: str) -> GuardVerdict:
        """Measure the final model; put the base back if it is worse."""
        final = final_image_errors(self.model, self.traj, self.batch_size)
        kept = "final" if improves(final, self.base, self.criterion) else "base"
        if kept == "base":
            restore_state(self.model.denoiser, self.state)
        log.info(
            "%s guard (%s): held-out final-image mse base %.6g final %.6g, log10 mse base %.4f "
            "final %.4f -> keeping the %s model",
            prefix,
            self.criterion,
            self.base["mse"],
            final["mse"],
            self.base["log_mse"],
            final["log_mse"],
            kept,
        )
        return GuardVerdict(self.base, final, self.criterion, kept)
