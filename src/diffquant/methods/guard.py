"""The refinement guard: a method that refines a base result never ends worse than the base.

QuEST and AccuQuant start from the PTQ result and move it to lower their own losses (per-step
denoiser-output MSE on calibration rows; group losses on calibration trajectories). Those fell
while the FID to the FP samples rose (ldm_digits W8A8: PTQ 0.000637, QuEST 0.00327, AccuQuant
0.00339), so a method that refines a base judges the result it will keep against the base, by
the loss that matters and on data it did not train on:

* **held-out trajectories** — ``samples`` FP sampler chains drawn with their own ``seed``
  (:func:`heldout_trajectories`): not the evaluation samples (the job's seed) and not
  AccuQuant's calibration trajectories (its ``seed``);
* **the loss** — the final-image error (:func:`final_image_error`): the MSE between the decoded
  final latents of the quantized sampler and of the FP sampler from the same x_T, conditioning
  and noise, i.e. between the images. Measured on ldm_digits (256 held-out trajectories): the
  latent MSE ranks the W8A8 / W4A8 runs like FID→FP but not W4A4 (PTQ 0.086 < QuEST 0.123,
  while FID→FP is 0.382 vs 0.0655); the image MSE ranks W4A4 like FID→FP too (QuEST 0.00474 <
  PTQ 0.00577): the latent error is dominated by directions the decoder does not render;
* **the decision** (:class:`RefinementGuard`) — the base's loss is measured and its state kept
  (:func:`snapshot_state`) before the refinement starts; after it, the final model (as it will
  be kept: roundings hard) is measured the same way; if it is worse, the base's state is put
  back. ``<prefix>_guard_loss_base``, ``<prefix>_guard_loss_final`` and ``<prefix>_guard_kept``
  (``final`` or ``base``) go to ``metrics.json`` (:meth:`GuardVerdict.metrics`).
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


#: how the per-image errors are reduced: ``mse`` their mean; ``log_mse`` the mean of their
#: log10 (−PSNR/10 up to a constant: a few diverging samples weigh less)
CRITERIA = ("mse", "log_mse")


@torch.no_grad()
def final_image_error(model: Any, traj: Trajectories, batch_size: int, criterion: str = "mse") -> float:
    """The error between the decoded final latents of ``model``'s sampler (as it is: quantized)
    and ``traj``'s (images in the model's output range), every chain started from ``traj``'s x_T
    with its conditioning and noise: the mean per-image MSE (``mse``) or the mean of the
    per-image MSEs' log10 (``log_mse``, floored at 1e-12)."""
    if criterion not in CRITERIA:
        raise ValueError(f"guard criterion {criterion!r}: choose from {', '.join(CRITERIA)}")
    total, n = 0.0, len(traj)
    for lo in range(0, n, batch_size):
        part = traj.rows(list(range(lo, min(n, lo + batch_size))))
        x = rollout(model, part.states[0], 0, traj.n_steps, part.cond, part.indices, part.seed)
        error = model.decode(x) - model.decode(part.states[-1])
        if criterion == "mse":
            total += float(error.pow(2).mean()) * len(part)
        else:
            total += float(error.pow(2).flatten(1).mean(1).clamp_min(1e-12).log10().sum())
    return total / n


@dataclass
class GuardVerdict:
    """The base's and the final model's loss on the held-out trajectories, and which was kept."""

    loss_base: float
    loss_final: float
    kept: str

    def metrics(self, prefix: str) -> dict[str, Any]:
        """``<prefix>_guard_loss_base``, ``<prefix>_guard_loss_final``, ``<prefix>_guard_kept``."""
        return {
            f"{prefix}_guard_loss_base": self.loss_base,
            f"{prefix}_guard_loss_final": self.loss_final,
            f"{prefix}_guard_kept": self.kept,
        }


class RefinementGuard:
    """Measures and keeps the base when created; :meth:`judge` keeps the better of the base and
    the final model (ties keep the final model)."""

    def __init__(self, model: Any, samples: int, seed: int, batch_size: int, criterion: str = "mse") -> None:
        self.model, self.batch_size, self.criterion = model, batch_size, criterion
        self.traj = heldout_trajectories(model, samples, seed, batch_size)
        self.state = snapshot_state(model.denoiser)
        self.loss_base = final_image_error(model, self.traj, batch_size, criterion)

    def judge(self, prefix: str) -> GuardVerdict:
        """Measure the final model; put the base back if it is worse."""
        final = final_image_error(self.model, self.traj, self.batch_size, self.criterion)
        kept = "base" if final > self.loss_base else "final"
        if kept == "base":
            restore_state(self.model.denoiser, self.state)
        log.info(
            "%s guard: held-out final-image %s base %.6g, final %.6g -> keeping the %s model",
            prefix,
            self.criterion,
            self.loss_base,
            final,
            kept,
        )
        return GuardVerdict(self.loss_base, final, kept)
