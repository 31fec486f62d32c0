"""The embedded default backbone: the project's digits classifier (64-d features, 10 logits)."""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from diffquant.eval.backbones.digits_cnn import DigitsClassifier
from diffquant.models.loading import ZOO_DIR, MissingWeightsError
from diffquant.registry import BACKBONES


class DigitsBackbone(nn.Module):
    """Penultimate features (FID) and logits (IS) of :class:`DigitsClassifier`."""

    name = "digits_cnn"

    def __init__(self, classifier: DigitsClassifier) -> None:
        super().__init__()
        self.classifier = classifier.eval().requires_grad_(False)
        self.num_features = 64

    def forward(self, images: Tensor) -> dict[str, Tensor]:
        return self.classifier(images)


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
