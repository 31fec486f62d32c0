"""Sample metrics, registered in ``EVALUATORS`` by the name they report under.

Metrics consume :class:`EvalBatch` records: the backbone runs once per batch and every metric
reads what it needs (features, logits, or images and labels). FID and IS are torchmetrics'
implementations fed through a pass-through "feature network", so features computed once (and saved
per batch, or per shard on a cluster) are all they need.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch import Tensor, nn
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.inception import InceptionScore

from diffquant.registry import EVALUATORS


@dataclass
class EvalBatch:
    """One batch of generated samples: images ``(N, C, H, W)`` in [0, 1] (may be None when only
    saved features are replayed), labels (class ids or prompts), backbone features ``(N, d)`` and
    logits ``(N, k)`` or None, and ``per_sample`` values ``{metric: (N,)}`` of the metrics that
    need the images themselves (computed when the batch was generated; see ``Metric.per_sample``)."""

    images: Optional[Tensor]
    labels: list[Any]
    features: Tensor
    logits: Optional[Tensor]
    per_sample: dict[str, Tensor] = field(default_factory=dict)


class _Passthrough(nn.Module):
    """Hands torchmetrics already-computed features (or logits) unchanged."""

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.num_features = num_features

    def forward(self, x: Tensor) -> Tensor:
        return x


class Metric:
    """Base of a streaming metric: ``update(batch)`` per batch, then ``compute() -> {name: value}``.

    A metric that needs every image (not only backbone features) also defines
    ``per_sample(images, labels) -> (N,)``; its values are saved with each generated batch and come
    back in ``EvalBatch.per_sample[name]``. A builder may define ``preflight(eval_cfg)``, run when
    the evaluation is set up (before any sampling), e.g. to fail fast on missing weights.
    """

    name: str = ""

    def update(self, batch: EvalBatch) -> None:
        raise NotImplementedError

    def compute(self) -> dict[str, float]:
        raise NotImplementedError


class FrechetDistance(Metric):
    """FID between generated features and a fixed set of reference features ``(M, d)``."""

    def __init__(self, name: str, reference: Tensor) -> None:
        self.name = name
        self.fid = FrechetInceptionDistance(feature=_Passthrough(reference.shape[1]), normalize=False)
        self.fid.update(reference.double(), real=True)

    def update(self, batch: EvalBatch) -> None:
        self.fid.update(batch.features.double(), real=False)

    def compute(self) -> dict[str, float]:
        return {self.name: float(self.fid.compute())}


class InceptionScoreMetric(Metric):
    """Inception Score from the backbone's logits (mean over 10 splits; std reported too)."""

    name = "inception_score"

    def __init__(self, splits: int = 10) -> None:
        with warnings.catch_warnings():  # "will save all extracted features": logits, (N, k), small
            warnings.simplefilter("ignore", UserWarning)
            self.metric = InceptionScore(feature=_Passthrough(0), splits=splits)
        self.seen = 0

    def update(self, batch: EvalBatch) -> None:
        if batch.logits is None:
            raise ValueError(
                "inception_score needs a backbone with logits; this one gives only "
                "features: drop it from evaluator.metrics or change evaluator.backbone."
            )
        self.metric.update(batch.logits.double())
        self.seen += len(batch.logits)

    def compute(self) -> dict[str, float]:
        torch.manual_seed(0)  # IS shuffles before splitting; fix it so metrics repeat exactly
        mean, std = self.metric.compute()
        return {"inception_score": float(mean), "inception_score_std": float(std)}


@EVALUATORS.register("fid")
def build_fid(evaluation) -> Metric:
    return FrechetDistance("fid", evaluation.reference_features())


@EVALUATORS.register("fid_to_fp")
def build_fid_to_fp(evaluation) -> Metric:
    """FID to the FP model's samples drawn with the same seeds and labels (FID2FP32)."""
    return FrechetDistance("fid_to_fp", evaluation.fp_features())


@EVALUATORS.register("inception_score")
def build_inception_score(evaluation) -> Metric:
    return InceptionScoreMetric()
