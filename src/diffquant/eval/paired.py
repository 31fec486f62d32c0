"""Fidelity to the FP model's image with the same seed: metrics ``psnr`` and ``ssim`` (AccuQuant's
columns), and the base class of every metric that compares sample ``i`` of the quantized model
with sample ``i`` of the FP model (same seed, initial noise, class or prompt; ``lpips`` and
``lpips_digits`` in :mod:`diffquant.eval.lpips`).

Both images are compared as the 8-bit images they would be saved as (values ``k / 255``, as
papers compare saved samples); the FP ones come from the FP reference's cache entry
(:mod:`diffquant.eval.fp_images`). Each value is computed when the quantized sample's chunk is
generated (``per_sample``, one call on the whole chunk), saved with its batch, and averaged over
the samples at the end in sample order, so the mean does not depend on the batch size or shards.

* ``psnr``: torchmetrics' ``peak_signal_noise_ratio`` per image (data range 1.0, mean over the
  image's pixels and channels), in dB, **capped at** :data:`PSNR_MAX_DB` = 100 dB (the MSE
  floored at 1e-10): an image identical to its FP image has MSE 0 and an infinite PSNR, which
  would make the mean infinite. A one-level difference in one value of a 32×32 gray image reads
  78 dB, so the cap only touches identical images at the embedded sizes (and differences of a
  few single values on 512² RGB images). The FP job reports the cap (its images are its own).
* ``ssim``: torchmetrics' ``structural_similarity_index_measure`` per image (Gaussian window 11,
  σ 1.5, K = (0.01, 0.03), data range 1.0), in float32 (see :func:`ssim_values`); 1 for identical
  images, the FP job's value.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

from diffquant.eval.fp_images import FPImages, to_uint8
from diffquant.eval.metrics import EvalBatch, Metric
from diffquant.registry import EVALUATORS

PSNR_MAX_DB = 100.0

#: Compares quantized images ``x`` with FP images ``y``, both ``(N, C, H, W)`` in [0, 1] on one
#: device, giving one value per pair ``(N,)``.
Compare = Callable[[Tensor, Tensor], Tensor]


class PairedMetric(Metric):
    """Mean over samples of ``compare(sample i, FP sample i)``.

    Args:
        name: the metric's name (its ``metrics.json`` key).
        fp_images: returns the FP reference's images (called when a chunk is generated, so a
            shard merge, which only replays saved values, needs none).
        compare: see :data:`Compare`.
    """

    def __init__(self, name: str, fp_images: Callable[[], FPImages], compare: Compare) -> None:
        self.name = name
        self.fp_images = fp_images
        self.compare = compare
        self.values: list[Tensor] = []

    @torch.no_grad()
    def per_sample(self, images: Tensor, labels: list[Any], indices: range) -> Tensor:
        """``compare`` of images ``(N, C, H, W)`` in [0, 1] of samples ``indices`` with the FP
        images of the same indices: ``(N,)`` float64 on the CPU. Rows whose FP image this job's
        reference lacks (outside its shard) are NaN; they are never part of its batches."""
        fp, present = self.fp_images().get(indices)
        if fp.shape[1:] != images.shape[1:]:
            raise ValueError(
                f"{self.name}: the FP images are {tuple(fp.shape[1:])}, the samples "
                f"{tuple(images.shape[1:])}: not the same model output"
            )
        x = to_uint8(images).float() / 255
        y = fp.to(images.device).float() / 255
        keep = present.to(images.device)[:, None, None, None]
        y = torch.where(keep, y, x)  # placeholder rows: compared with themselves, then dropped
        values = self.compare(x, y).double().cpu().reshape(len(images))
        values[~present] = float("nan")
        return values

    def update(self, batch: EvalBatch) -> None:
        values = batch.per_sample.get(self.name)
        if values is None:
            raise ValueError(
                f"{self.name}: this batch carries no per-image values (it was generated before the "
                "metric was set up); delete the job's progress/ folder and rerun."
            )
        self.values.append(values)

    def compute(self) -> dict[str, float]:
        values = torch.cat(self.values).double()
        bad = int((~torch.isfinite(values)).sum())
        if bad:
            raise FloatingPointError(
                f"{self.name}: {bad} of {len(values)} samples have no finite value (no FP image, "
                "or a non-finite image)"
            )
        return {self.name: float(values.mean())}


def psnr_values(x: Tensor, y: Tensor) -> Tensor:
    """PSNR in dB of each pair ``(N, C, H, W)`` in [0, 1], capped at :data:`PSNR_MAX_DB`: ``(N,)``
    float64 (computed in float64)."""
    psnr = peak_signal_noise_ratio(x.double(), y.double(), data_range=1.0, reduction="none", dim=(1, 2, 3))
    return psnr.clamp(max=PSNR_MAX_DB)


def ssim_values(x: Tensor, y: Tensor) -> Tensor:
    """SSIM of each pair ``(N, C, H, W)`` in [0, 1] (H, W ≥ 11), in the inputs' dtype: ``(N,)``.

    The metric passes float32, as torchmetrics' own metric does: SSIM's variances are differences
    of window means (E[x²] − E[x]²), which float32 rounds by ~1e-7, so the SSIM of a flat, non-zero
    window can be off by ~2e-4 (exact zeros, the digits' background, are exact). float64 would be
    exact to ~1e-12 but is 12× slower on a CPU (2 s instead of 0.16 s per 250 digits)."""
    return structural_similarity_index_measure(x, y, data_range=1.0, reduction="none")


@EVALUATORS.register("psnr")
def build_psnr(evaluation) -> PairedMetric:
    """Mean PSNR (dB) of each sample against the FP model's sample of the same seed."""
    return PairedMetric("psnr", evaluation.fp_images, psnr_values)


build_psnr.needs = frozenset({"fp_images"})
build_psnr.fp_identity = {"psnr": PSNR_MAX_DB}


@EVALUATORS.register("ssim")
def build_ssim(evaluation) -> PairedMetric:
    """Mean SSIM of each sample against the FP model's sample of the same seed."""
    return PairedMetric("ssim", evaluation.fp_images, ssim_values)


build_ssim.needs = frozenset({"fp_images"})
build_ssim.fp_identity = {"ssim": 1.0}
