"""One job's evaluation: a backbone, the selected metrics, and their reference features.

Reference features (real images through the backbone: pool features for FID, spatial features
for sFID) and the FP model's samples (features for ``fid_to_fp``, 8-bit images for the paired
metrics ``psnr``, ``ssim``, ``lpips``...) are cached under the shared cache folder, keyed by what
produced them, so a sweep computes each once.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor

from diffquant.cache import CacheEntry, atomic_torch_save
from diffquant.context import RunContext
from diffquant.eval.fp_images import FPImages
from diffquant.eval.metrics import EvalBatch, Metric
from diffquant.eval.reference import load_reference_images
from diffquant.registry import BACKBONES, EVALUATORS
from diffquant.validation import ConfigError

#: metric needs (a builder's ``needs``) that the backbone must serve: need -> its attribute
BACKBONE_NEEDS = {"spatial": "spatial_layer", "perceptual_maps": "perceptual_maps"}


def metric_needs(name: str) -> frozenset[str]:
    """What metric ``name`` needs beyond backbone features (its builder's ``needs``)."""
    return frozenset(getattr(EVALUATORS.get(name), "needs", ()))


def fp_identity(name: str) -> Optional[dict[str, float]]:
    """What the FP model scores against itself on metric ``name`` (None: not a comparison with
    the FP model's samples)."""
    return getattr(EVALUATORS.get(name), "fp_identity", None)


class Evaluation:
    """Streams sample batches into the metrics of ``eval_cfg.metrics``.

    ``fp_job``: this job evaluates the FP model itself, so the metrics that compare with the FP
    model's samples (``fid_to_fp``, ``psnr``...) are not computed; :meth:`fp_identity` gives their
    values.
    """

    def __init__(self, eval_cfg: Any, ctx: RunContext, fp_job: bool = False) -> None:
        from diffquant.eval.sampling import SampleGrid

        self.cfg = eval_cfg
        self.ctx = ctx
        self.grid = SampleGrid.of(eval_cfg)  # fails early on a bad evaluator.chunk_size
        if getattr(eval_cfg, "kernels", "fake") == "int8":  # fails early where int8 cannot run
            from diffquant.quant.int8 import int8_platform_error

            error = int8_platform_error(ctx.device)
            if error is not None:
                raise ConfigError(f"evaluator.kernels=int8: {error}")
        self.backbone = BACKBONES.get(eval_cfg.backbone)(eval_cfg).to(ctx.device).eval()
        self.fp_job = fp_job
        self.skipped = [m for m in eval_cfg.metrics if fp_job and fp_identity(m) is not None]
        self.metric_names = [m for m in eval_cfg.metrics if m not in self.skipped]
        self.needs = frozenset().union(*(metric_needs(m) for m in self.metric_names))
        # what the quantized jobs of this evaluator need of the FP samples (an FP job stores it)
        self.fp_needs = frozenset().union(*(metric_needs(m) for m in eval_cfg.metrics)) & {
            "fp_features",
            "fp_images",
        }
        for name in self.metric_names:
            self._check_backbone(name)
            preflight = getattr(EVALUATORS.get(name), "preflight", None)
            if preflight is not None:
                preflight(eval_cfg)
        self._fp_features: Optional[Tensor] = None
        self._fp_images: Optional[FPImages] = None
        self.metrics: dict[str, Metric] = {}

    def _check_backbone(self, name: str) -> None:
        for need in metric_needs(name) & set(BACKBONE_NEEDS):
            if getattr(self.backbone, BACKBONE_NEEDS[need], None) is None:
                raise ValueError(
                    f"metric {name} needs {need.replace('_', ' ')} of the backbone, and "
                    f"evaluator.backbone={self.cfg.backbone} ({type(self.backbone).__name__}) has "
                    f"none: drop {name} from evaluator.metrics or change evaluator.backbone."
                )

    def fp_identity(self) -> dict[str, float]:
        """The values of the skipped metrics for the FP model itself (``{"fid_to_fp": 0.0}``...)."""
        out: dict[str, float] = {}
        for name in self.skipped:
            out.update(fp_identity(name))
        return out

    # ------------------------------------------------------------ features
    @torch.no_grad()
    def features(self, images: Tensor, batch_size: int = 256) -> dict[str, Optional[Tensor]]:
        """Backbone outputs for images ``(N, C, H, W)`` in [0, 1], on the CPU: ``features``
        ``(N, d)``, ``logits`` ``(N, k)`` or None, ``spatial`` ``(N, s)`` (None unless a metric
        needs it)."""
        feats, logits, spatial = [], [], []
        for chunk in images.split(batch_size):
            out = self.backbone(chunk.to(self.ctx.device))
            feats.append(out["features"].float().cpu())
            if out.get("logits") is not None:
                logits.append(out["logits"].float().cpu())
            if "spatial" in self.needs:
                spatial.append(out["spatial"].float().cpu())
        return {
            "features": torch.cat(feats),
            "logits": torch.cat(logits) if logits else None,
            "spatial": torch.cat(spatial) if spatial else None,
        }

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

    def reference_spatial(self) -> Tensor:
        """The backbone's spatial features ``(M, s)`` of the same real reference images (cached
        like :meth:`reference_features`, keyed also by the layer they are read from)."""
        layer = self.backbone.spatial_layer
        entry = CacheEntry(
            self.ctx.cache_dir,
            "reference_spatial",
            {**self.backbone_key(), "reference": self.cfg.reference, "layer": layer},
        )
        with entry.lock():
            if not entry.done():
                with entry.writing() as tmp:
                    images = load_reference_images(self.cfg.reference)
                    atomic_torch_save(self.features(images)["spatial"], tmp / "spatial.pt")
        return entry.load("spatial.pt")

    def fp_reference_entry(self, model_key: dict[str, Any], n: int, seed: int) -> CacheEntry:
        """Where the FP model's features for ``n`` samples of ``seed`` live (sampled on the chunks
        of ``evaluator.chunk_size``, which fix their low bits: part of the key)."""
        return CacheEntry(
            self.ctx.cache_dir,
            "fp_samples",
            {
                **self.backbone_key(),
                "model": model_key,
                "n": n,
                "seed": seed,
                "chunk_size": self.grid.chunk_size,
            },
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

    def set_fp_images(self, images: FPImages) -> None:
        self._fp_images = images

    def fp_images(self) -> FPImages:
        """The FP model's 8-bit images of this job's samples (for the paired metrics)."""
        if self._fp_images is None:
            raise RuntimeError(
                "psnr / ssim / lpips need the FP model's images: the app keeps them in the FP "
                "reference before quantizing (Evaluation.set_fp_images)."
            )
        return self._fp_images

    def per_sample(self, images: Tensor, labels: list[Any], indices: range) -> dict[str, Tensor]:
        """Per-image values ``{metric: (N,)}`` of the started metrics that need the images
        themselves, for images ``(N, C, H, W)`` of samples ``indices`` (one whole chunk)."""
        return {
            name: metric.per_sample(images, labels, indices)
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
