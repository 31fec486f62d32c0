"""The embedded default backbone: the project's digits classifier.

Outputs, for images ``(N, C, H, W)`` in [0, 1]:

* ``features`` ``(N, 64)``: the penultimate activations (FID, like Inception's 2048-d pool);
* ``logits`` ``(N, 10)``: the class scores (Inception Score);
* ``spatial`` ``(N, 64)``: sFID's spatial features, channel 0 of the first conv block of the
  third stage (trunk layer 6: 64 channels at 8×8, post-ReLU) flattened in (H, W, C) order. ADM's
  evaluator takes the first 7 channels of Inception's ``mixed_6/conv`` (the first conv of a
  mid-level block, 17×17) so that sFID has about as many dimensions as FID (7·17·17 = 2023 vs
  2048); here one channel at 8×8 gives the 64 dimensions of the FID features.

:meth:`DigitsBackbone.perceptual_maps` gives the maps the ``lpips_digits`` stand-in compares:
the last conv block of each of the three stages (trunk layers 1, 4, 7: 32 channels at 32×32,
48 at 16×16, 64 at 8×8), the analogue of the five ReLU stages of AlexNet that LPIPS reads.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from diffquant.eval.backbones.digits_cnn import DigitsClassifier
from diffquant.models.loading import ZOO_DIR, MissingWeightsError
from diffquant.registry import BACKBONES

SPATIAL_LAYER = 6  # trunk index: first conv block of the third stage (64 channels at 8×8)
SPATIAL_CHANNELS = 1
PERCEPTUAL_LAYERS = (1, 4, 7)  # trunk indices: the end of each conv stage, before its pooling


class DigitsBackbone(nn.Module):
    """Features (FID), logits (IS) and spatial features (sFID) of :class:`DigitsClassifier`."""

    name = "digits_cnn"
    spatial_layer = f"trunk.{SPATIAL_LAYER}[:{SPATIAL_CHANNELS}]"  # identifies the sFID features

    def __init__(self, classifier: DigitsClassifier) -> None:
        super().__init__()
        self.classifier = classifier.eval().requires_grad_(False)
        self.num_features = 64

    def forward(self, images: Tensor) -> dict[str, Tensor]:
        """``{"features": (N, 64), "logits": (N, 10), "spatial": (N, 64)}``, float32."""
        out = self.classifier(images, maps=(SPATIAL_LAYER,))
        spatial = out["maps"][SPATIAL_LAYER][:, :SPATIAL_CHANNELS]
        return {
            "features": out["features"],
            "logits": out["logits"],
            "spatial": spatial.permute(0, 2, 3, 1).flatten(1),
        }

    def perceptual_maps(self, images: Tensor) -> list[Tensor]:
        """The maps of :data:`PERCEPTUAL_LAYERS` for images ``(N, C, H, W)`` in [0, 1]:
        ``[(N, 32, 32, 32), (N, 48, 16, 16), (N, 64, 8, 8)]`` with the default widths."""
        return self.classifier.feature_maps(images, PERCEPTUAL_LAYERS)


@BACKBONES.register("digits_cnn")
def build_digits_backbone(eval_cfg: Any) -> DigitsBackbone:
    path = eval_cfg.backbone_weights or str(ZOO_DIR / "digits_classifier")
    try:
        return DigitsBackbone(DigitsClassifier.from_pretrained(path))
    except (OSError, FileNotFoundError) as err:
        raise MissingWeightsError(
            f"Digits classifier weights not found at {path!r} ({err}). Train them with "
            "`python -m diffquant.zoo.train digits_classifier` or set evaluator.backbone_weights."
        ) from err
