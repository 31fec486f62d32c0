"""One job's evaluation: a backbone, the selected metrics, and their reference features.

Reference features (real images through the backbone) and the FP model's features for
``fid_to_fp`` are cached under the shared cache folder, keyed by what produced them, so a sweep
computes each once.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor

from diffquant.cache import CacheEntry, atomic_torch_save
from diffquant.context import RunContext
from diffquant.eval.metrics import EvalBatch, Metric
from diffquant.eval.reference import load_reference_images
from diffquant.registry import BACKBONES, EVALUATORS


class Evaluation:
    """Streams sample batches into the metrics of ``eval_cfg.metrics``.

    ``skip`` lists metrics not computed in this job (``fid_to_fp`` for the FP model itself).
    """

    def __init__(self, eval_cfg: Any, ctx: RunContext, skip: tuple[str, ...] = ()) -> None:
        self.cfg = eval_cfg
        self.ctx = ctx
        self.backbone = BACKBONES.get(eval_cfg.backbone)(eval_cfg).to(ctx.device).eval()
        self.metric_names = [m for m in eval_cfg.metrics if m not in skip]
        for name in self.metric_names:
            preflight = getattr(EVALUATORS.get(name), "preflight", None)
            if preflight is not None:
                preflight(eval_cfg)
        self._fp_features: Optional[Tensor] = None
        self.metrics: dict[str, Metric] = {}

    # ------------------------------------------------------------ features
    @torch.no_grad()
    def features(self, images: Tensor, batch_size: int = 256) -> dict[str, Optional[Tensor]]:
        """Backbone outputs for images ``(N, C, H, W)`` in [0, 1], on the CPU."""
        feats, logits = [], []
        for chunk in images.split(batch_size):
            out = self.backbone(chunk.to(self.ctx.device))
            feats.append(out["features"].float().cpu())
            if out.get("logits") is not None:
                logits.append(out["logits"].float().cpu())
        return {"features": torch.cat(feats), "logits": torch.cat(logits) if logits else None}

    def backbone_key(self) -> dict[str, Any]:
        return {"backbone": self.cfg.backbone, "weights": self.cfg.backbone_weights}

    def reference_features(self) -> Tensor:
        """Backbone features ``(M, d)`` of the real reference images (cached)."""
        entry = CacheEntry(
            self.ctx.cache_dir, "reference", {**self.backbone_key(), "reference": self.cfg.reference}
        )
        with entry.lock():
            if not entry.done():
                with entry.writing() as tmp:
                    images = load_reference_images(self.cfg.reference)
                    atomic_torch_save(self.features(images)["features"], tmp / "features.pt")
        return entry.load("features.pt")

    def fp_reference_entry(self, model_key: dict[str, Any], n: int, seed: int) -> CacheEntry:
        """Where the FP model's features for ``n`` samples of ``seed`` live."""
        return CacheEntry(
            self.ctx.cache_dir,
            "fp_samples",
            {**self.backbone_key(), "model": model_key, "n": n, "seed": seed},
        )

    def set_fp_features(self, features: Tensor) -> None:
        self._fp_features = features

    def fp_features(self) -> Tensor:
        if self._fp_features is None:
            raise RuntimeError(
                "fid_to_fp needs the FP model's features: the app computes them "
                "before quantizing (Evaluation.set_fp_features)."
            )
        return self._fp_features

    def per_sample(self, images: Tensor, labels: list[Any]) -> dict[str, Tensor]:
        """Per-image values ``{metric: (N,)}`` of the started metrics that need the images themselves."""
        return {
            name: metric.per_sample(images, labels)
            for name, metric in self.metrics.items()
            if hasattr(metric, "per_sample")
        }

    # ------------------------------------------------------------ metrics
    def start(self) -> None:
        """Build the metrics (after the FP features are set)."""
        self.metrics = {name: EVALUATORS.get(name)(self) for name in self.metric_names}

    def update(self, batch: EvalBatch) -> None:
        for metric in self.metrics.values():
            metric.update(batch)

    def compute(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for metric in self.metrics.values():
            out.update(metric.compute())
        return out
