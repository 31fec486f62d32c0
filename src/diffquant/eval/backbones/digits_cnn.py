"""A small CNN trained on scikit-learn's digits: the feature network for FID and Inception Score.

The real metrics use InceptionV3, which needs downloaded weights and torchvision. For the embedded
``ldm_digits`` model the project ships its own backbone instead, trained by
``python -m diffquant.zoo.train digits_classifier`` on the ``train`` split of
:func:`diffquant.data.load_digits`:

* ``features``: the 64-d penultimate activations (the input of the classification layer), used
  like Inception's 2048-d pool features for FID;
* ``logits``: the 10-way class logits, used like Inception's logits for the Inception Score;
* :meth:`DigitsClassifier.feature_maps`: the intermediate maps of the conv trunk (for sFID's
  spatial features and the ``lpips_digits`` stand-in, see :mod:`diffquant.eval.backbones.digits`).

Inputs are images ``(N, C, H, W)`` in [0, 1] with C = 1 or 3 (RGB is averaged to gray) and any
H×W (resized to 32×32, bilinear with antialiasing, inside :meth:`DigitsClassifier.forward`).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


def _conv_block(c_in: int, c_out: int) -> nn.Sequential:
    """3×3 conv → BatchNorm → ReLU, keeping the spatial size."""
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, kernel_size=3, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    )


class DigitsClassifier(nn.Module):
    """CNN for 32×32 gray digits: three conv stages, global average pooling, 64-d features, 10 logits.

    Args:
        widths: channels of the three conv stages (each two 3×3 convs; the first two stages end
            with a 2×2 max-pool, so 32 → 16 → 8 pixels).
        feature_dim: size of the penultimate feature vector.
        num_classes: number of classes.
        image_size: side in pixels that inputs are resized to.
        dropout: dropout before the classification layer (training only).
        meta: free-form metadata written to ``config.json`` (training command, accuracy, ...).
    """

    def __init__(
        self,
        widths: tuple[int, int, int] | list[int] = (32, 48, 64),
        feature_dim: int = 64,
        num_classes: int = 10,
        image_size: int = 32,
        dropout: float = 0.2,
        meta: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        w1, w2, w3 = (int(w) for w in widths)
        self.config: dict[str, Any] = {
            "model_type": "digits_cnn",
            "widths": [w1, w2, w3],
            "feature_dim": int(feature_dim),
            "num_classes": int(num_classes),
            "image_size": int(image_size),
            "dropout": float(dropout),
            "meta": dict(meta or {}),
        }
        self.image_size = int(image_size)
        self.num_features = int(feature_dim)  # the attribute torchmetrics' FID looks for
        self.num_classes = int(num_classes)
        self.trunk = nn.Sequential(
            _conv_block(1, w1),
            _conv_block(w1, w1),
            nn.MaxPool2d(2),
            _conv_block(w1, w2),
            _conv_block(w2, w2),
            nn.MaxPool2d(2),
            _conv_block(w2, w3),
            _conv_block(w3, w3),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.embed = nn.Sequential(nn.Linear(w3, feature_dim), nn.ReLU(inplace=True))
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(feature_dim, num_classes)

    def preprocess(self, images: Tensor) -> Tensor:
        """Map ``(N, C, H, W)`` images in [0, 1] (C = 1 or 3) to ``(N, 1, 32, 32)`` float in [0, 1]."""
        if images.ndim != 4:
            raise ValueError(f"expected images (N, C, H, W), got shape {tuple(images.shape)}")
        x = images.float()
        if x.shape[1] == 3:
            x = x.mean(dim=1, keepdim=True)
        elif x.shape[1] != 1:
            raise ValueError(f"expected 1 or 3 channels, got {x.shape[1]}")
        if x.shape[-2:] != (self.image_size, self.image_size):
            x = F.interpolate(
                x,
                size=(self.image_size, self.image_size),
                mode="bilinear",
                align_corners=False,
                antialias=True,
            )
        return x

    def forward(self, images: Tensor, maps: Sequence[int] = ()) -> dict[str, Any]:
        """Classify images.

        Args:
            images: ``(N, C, H, W)`` in [0, 1], C = 1 or 3, any H×W.
            maps: indices into :attr:`trunk` whose outputs to return as well (see
                :meth:`feature_maps`); the trunk runs layer by layer either way, so the features
                and logits are the same bits with or without them.

        Returns:
            ``{"features": (N, 64) float32, "logits": (N, 10) float32, "maps": {index: map}}``;
            features are the (post-ReLU) penultimate activations, logits the unnormalised class
            scores, maps the requested trunk outputs ``(N, C_i, H_i, W_i)``.
        """
        x, kept = self.preprocess(images), {}
        for i, layer in enumerate(self.trunk):
            x = layer(x)
            if i in maps:
                kept[i] = x
        features = self.embed(x)
        logits = self.head(self.dropout(features))
        return {"features": features, "logits": logits, "maps": kept}

    def feature_maps(self, images: Tensor, maps: Sequence[int]) -> list[Tensor]:
        """The outputs of trunk layers ``maps`` for images ``(N, C, H, W)`` in [0, 1], in that order.

        With the default widths, the post-ReLU conv blocks are trunk layers 0, 1 (32 channels at
        32×32), 3, 4 (48 at 16×16), 6, 7 (64 at 8×8); 2 and 5 are the max-pools.
        """
        kept = self(images, maps=maps)["maps"]
        return [kept[i] for i in maps]

    @torch.no_grad()
    def predict(self, images: Tensor, batch_size: int = 256) -> Tensor:
        """Return the predicted class ``(N,)`` int64 of images ``(N, C, H, W)`` in [0, 1], in batches."""
        preds = [
            self(images[i : i + batch_size])["logits"].argmax(dim=1)
            for i in range(0, len(images), batch_size)
        ]
        return torch.cat(preds) if preds else torch.empty(0, dtype=torch.long)

    def save_pretrained(self, directory: str | Path) -> None:
        """Write ``config.json`` (constructor arguments and metadata) and ``model.safetensors``."""
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / CONFIG_NAME).write_text(json.dumps(self.config, indent=2, sort_keys=True) + "\n")
        state = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        save_file(state, str(directory / WEIGHTS_NAME), metadata={"format": "pt"})

    @classmethod
    def from_pretrained(
        cls, directory: str | Path, map_location: str | torch.device = "cpu"
    ) -> DigitsClassifier:
        """Load a classifier written by :meth:`save_pretrained`; returned in eval mode."""
        from safetensors.torch import load_file

        directory = Path(directory)
        config = json.loads((directory / CONFIG_NAME).read_text())
        kwargs = {k: v for k, v in config.items() if k != "model_type"}
        model = cls(**kwargs)
        model.load_state_dict(load_file(str(directory / WEIGHTS_NAME), device=str(map_location)))
        return model.to(map_location).eval()
