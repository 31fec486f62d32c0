"""Perceptual distance to the FP model's image with the same seed: ``lpips`` (AccuQuant's column)
and its embedded stand-in ``lpips_digits``. Both are :class:`~diffquant.eval.paired.PairedMetric`
(one value per sample, computed with the sample's chunk, averaged in sample order; 8-bit images).

* ``lpips``: torchmetrics' ``LearnedPerceptualImagePatchSimilarity`` (AlexNet, the LPIPS v0.1
  linear weights shipped with torchmetrics, inputs in [0, 1]; gray images repeated to RGB). It
  needs torchvision and torchvision's AlexNet weights (``alexnet-owt-7be5be79.pth`` in the torch
  hub cache); both are imported / loaded only when the metric is built, and a preflight names
  what to install or download when they are absent. For the standard (InceptionV3) evaluators on
  a cluster; it is not exercised by the CPU test suite (no torchvision there).
* ``lpips_digits``: **not LPIPS.** The same recipe on the embedded digits classifier: the maps of
  the last conv block of each of its three stages (32×32×32, 48×16×16, 64×8×8; see
  :mod:`diffquant.eval.backbones.digits`), each unit-normalised along channels at every position
  (LPIPS's normalisation), squared differences summed over channels, averaged over positions,
  summed over the three layers, with no learned per-channel weights (LPIPS's uncalibrated
  "baseline" variant). 0 for identical images; at most 6 (3 layers × the squared distance 2 of
  two non-negative unit vectors). Its scale is not LPIPS's: compare it only with itself.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torchmetrics.functional.image.lpips import _normalize_tensor

from diffquant.eval.paired import PairedMetric
from diffquant.models.loading import MissingWeightsError
from diffquant.registry import EVALUATORS

ALEXNET_FILE = "alexnet-owt-7be5be79.pth"  # torchvision's AlexNet_Weights.IMAGENET1K_V1


def alexnet_weights_path() -> Path:
    """Where torchvision looks for the AlexNet weights LPIPS uses (``$TORCH_HOME/hub/checkpoints``)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / ALEXNET_FILE


def check_lpips(eval_cfg: Any) -> None:
    """Fail before any work when torchvision or its AlexNet weights are absent (nothing imported)."""
    if importlib.util.find_spec("torchvision") is None:
        raise MissingWeightsError(
            "lpips needs torchvision (torchmetrics' LPIPS runs AlexNet): pip install -e '.[cluster]' "
            "on the GPU machine. On the embedded evaluators use lpips_digits instead."
        )
    path = alexnet_weights_path()
    if not path.is_file():
        raise MissingWeightsError(
            f"lpips needs torchvision's AlexNet weights at {path} (not found). On a machine with "
            'internet access run `python -c "import torchvision; torchvision.models.alexnet('
            "weights='IMAGENET1K_V1')\"` and copy "
            f"{ALEXNET_FILE} into $TORCH_HOME/hub/checkpoints/ of the cluster."
        )


def _rgb(images: Tensor) -> Tensor:
    return images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images


class AlexLpips:
    """torchmetrics' LPIPS network (AlexNet), one value per pair of images in [0, 1]."""

    def __init__(self, device: torch.device) -> None:
        from torchmetrics.image.lpip import LearnedPerceptualImagePatchSimilarity

        self.net = LearnedPerceptualImagePatchSimilarity(net_type="alex", normalize=True).net.to(device)

    def __call__(self, x: Tensor, y: Tensor) -> Tensor:
        """LPIPS of each pair ``(N, C, H, W)`` (C = 1 or 3): ``(N,)``."""
        return self.net(_rgb(x), _rgb(y), normalize=True).reshape(len(x))


def feature_map_distance(maps_x: list[Tensor], maps_y: list[Tensor]) -> Tensor:
    """LPIPS's distance without learned weights: for each layer, the squared distance of the
    channel-wise unit-normalised maps ``(N, C_l, H_l, W_l)``, summed over channels and averaged
    over positions; summed over layers: ``(N,)``."""
    total = None
    for a, b in zip(maps_x, maps_y):
        d = ((_normalize_tensor(a) - _normalize_tensor(b)) ** 2).sum(dim=1).mean(dim=(1, 2))
        total = d if total is None else total + d
    return total


class DigitsFeatureDistance:
    """``lpips_digits``: :func:`feature_map_distance` on the digits backbone's perceptual maps."""

    def __init__(self, backbone: nn.Module) -> None:
        self.backbone = backbone

    def __call__(self, x: Tensor, y: Tensor) -> Tensor:
        return feature_map_distance(self.backbone.perceptual_maps(x), self.backbone.perceptual_maps(y))


@EVALUATORS.register("lpips")
def build_lpips(evaluation) -> PairedMetric:
    """Mean LPIPS (AlexNet) of each sample against the FP model's sample of the same seed."""
    return PairedMetric("lpips", evaluation.fp_images, AlexLpips(evaluation.ctx.device))


build_lpips.needs = frozenset({"fp_images"})
build_lpips.fp_identity = {"lpips": 0.0}
build_lpips.preflight = check_lpips


@EVALUATORS.register("lpips_digits")
def build_lpips_digits(evaluation) -> PairedMetric:
    """Mean digits-classifier feature distance (LPIPS-like stand-in) to the FP model's sample."""
    return PairedMetric("lpips_digits", evaluation.fp_images, DigitsFeatureDistance(evaluation.backbone))


build_lpips_digits.needs = frozenset({"fp_images", "perceptual_maps"})
build_lpips_digits.fp_identity = {"lpips_digits": 0.0}
