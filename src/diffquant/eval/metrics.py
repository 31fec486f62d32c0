"""Sample metrics, registered in ``EVALUATORS`` by the name they report under.

Metrics consume :class:`EvalBatch` records: the backbone runs once per chunk and every metric
reads what it needs (features, logits, spatial features, or per-sample values computed from the
images when they were generated). FID, sFID and IS are torchmetrics' implementations fed through a
pass-through "feature network", so features computed once (and saved per batch, or per shard on a
cluster) are all they need.

A builder declares what its metric needs beyond the backbone's features, as attributes read by
:class:`~diffquant.eval.evaluation.Evaluation`:

* ``needs``: a set of ``"spatial"`` (the backbone's spatial features, ``EvalBatch.spatial``),
  ``"perceptual_maps"`` (a backbone with ``perceptual_maps(images)``), ``"fp_features"`` (the FP
  model's features of the same samples) and ``"fp_images"`` (the FP model's 8-bit images of the
  same samples, :mod:`diffquant.eval.fp_images`);
* ``fp_identity``: for a metric that compares with the FP model's samples, what the FP model
  scores against itself (``{"fid_to_fp": 0.0}``); the FP job skips it and reports that value;
* ``preflight(eval_cfg)``: run before any sampling, e.g. to fail fast on missing weights.
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
    logits ``(N, k)`` or None, ``per_sample`` values ``{metric: (N,)}`` of the metrics that need
    the images themselves (computed when the batch was generated; see ``Metric.per_sample``), and
    the backbone's spatial features ``(N, s)`` for sFID (None unless a metric needs them)."""

    images: Optional[Tensor]
    labels: list[Any]
    features: Tensor
    logits: Optional[Tensor]
    per_sample: dict[str, Tensor] = field(default_factory=dict)
    spatial: Optional[Tensor] = None


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
    ``per_sample(images, labels, indices) -> (N,)`` (``indices``: the sample indices of the rows,
    one whole chunk); its values are saved with each generated batch and come back in
    ``EvalBatch.per_sample[name]``. What a builder may declare (``needs``, ``fp_identity``,
    ``preflight``): see the module doc.
    """

    name: str = ""

    def update(self, batch: EvalBatch) -> None:
        raise NotImplementedError

    def compute(self) -> dict[str, float]:
        raise NotImplementedError


class FrechetDistance(Metric):
    """FID between generated features and a fixed set of reference features ``(M, d)``.

    ``field`` is the :class:`EvalBatch` attribute read: ``features`` (FID) or ``spatial`` (sFID).
    The features are kept and summed at :meth:`compute`, in sample order and in fixed groups of
    :attr:`GROUP` rows: torchmetrics sums each ``update`` separately, so feeding it the batches as
    they come would make the last bits of the FID depend on the batch size or the shards."""

    GROUP = 4096

    def __init__(self, name: str, reference: Tensor, field: str = "features") -> None:
        self.name = name
        self.reference = reference
        self.field = field
        self.features: list[Tensor] = []

    def update(self, batch: EvalBatch) -> None:
        values = getattr(batch, self.field)
        if values is None:
            raise ValueError(
                f"{self.name}: this batch carries no {self.field} features (it was generated before "
                "the metric was set up); delete the job's progress/ folder and rerun."
            )
        self.features.append(values)

    def compute(self) -> dict[str, float]:
        fid = FrechetInceptionDistance(feature=_Passthrough(self.reference.shape[1]), normalize=False)
        for group in self.reference.double().split(self.GROUP):
            fid.update(group, real=True)
        for group in torch.cat(self.features).double().split(self.GROUP):
            fid.update(group, real=False)
        return {self.name: float(fid.compute())}


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


@EVALUATORS.register("sfid")
def build_sfid(evaluation) -> Metric:
    """sFID: FID on the backbone's spatial features (an intermediate map, flattened) against the
    same real reference images as ``fid`` (``evaluator.reference``), whose spatial features are
    cached like FID's (:meth:`Evaluation.reference_spatial`). InceptionV3: the first 7 channels of
    ``mixed_6/conv`` (2023-d), as ADM's evaluator; digits classifier: channel 0 of its first
    8×8 conv block (64-d). See :mod:`diffquant.eval.backbones`."""
    return FrechetDistance("sfid", evaluation.reference_spatial(), field="spatial")


build_sfid.needs = frozenset({"spatial"})


@EVALUATORS.register("fid_to_fp")
def build_fid_to_fp(evaluation) -> Metric:
    """FID to the FP model's samples drawn with the same seeds and labels (FID2FP32)."""
    return FrechetDistance("fid_to_fp", evaluation.fp_features())


build_fid_to_fp.needs = frozenset({"fp_features"})
build_fid_to_fp.fp_identity = {"fid_to_fp": 0.0}  # FID of the FP model to itself: 0 by definition


@EVALUATORS.register("inception_score")
def build_inception_score(evaluation) -> Metric:
    return InceptionScoreMetric()
