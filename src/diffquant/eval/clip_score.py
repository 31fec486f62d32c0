"""CLIP score of generated images against their prompts (metric ``clip_score``).

torchmetrics' ``CLIPScore`` (``max(100 · mean cos(E_image, E_prompt), 0)``) with the CLIP model
of ``evaluator.clip_model``: a hub id (``openai/clip-vit-base-patch16`` as QuEST,
``openai/clip-vit-large-patch14`` as others) already in the Hugging Face cache, a local folder, or
``zoo:digits_clip``, the embedded CLIP trained by the project on the digits and their captions.
The model is supplied to torchmetrics by a zero-argument loader (``local_files_only=True``), so
nothing is downloaded during a job.

The score of each image is computed when its batch is generated (``per_sample``) and saved with
it, so a resumed job does not need the images again.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from diffquant.eval.fp_images import to_uint8
from diffquant.eval.metrics import EvalBatch, Metric
from diffquant.models.loading import ZOO_DIR, MissingWeightsError, is_local
from diffquant.registry import EVALUATORS

EMBEDDED_COMMAND = "python -m diffquant.zoo.train_sd digits_clip"


def resolve_clip_location(spec: str) -> str:
    """``zoo:<name>`` → the packaged folder; a hub id or a path unchanged."""
    return str(ZOO_DIR / spec[4:]) if spec.startswith("zoo:") else spec


def missing_clip_message(spec: str, detail: str) -> str:
    fetch = (
        EMBEDDED_COMMAND
        if spec.startswith("zoo:")
        else f"huggingface-cli download {spec if not is_local(spec) else 'openai/clip-vit-base-patch16'}"
    )
    return (
        f"CLIP model for clip_score not found at {spec!r} ({detail}).\n"
        f"  Get it with: {fetch}\n"
        "  Then point the config at it: evaluator.clip_model=<hub id in the HF cache or local folder>"
    )


def check_clip_model(eval_cfg: Any) -> None:
    """Fail before any work when ``evaluator.clip_model`` is unset or its weights are absent."""
    spec = eval_cfg.clip_model
    if not spec:
        raise ValueError(
            "clip_score needs a CLIP model: set evaluator.clip_model (e.g. "
            "openai/clip-vit-base-patch16, a local folder, or zoo:digits_clip)."
        )
    location = resolve_clip_location(spec)
    if is_local(location) or spec.startswith("zoo:"):
        if not (Path(location).expanduser() / "config.json").is_file():
            raise MissingWeightsError(missing_clip_message(spec, "no config.json in that folder"))
        return
    from huggingface_hub import try_to_load_from_cache

    if not isinstance(try_to_load_from_cache(location, "config.json"), str):
        raise MissingWeightsError(missing_clip_message(spec, "not in the local Hugging Face cache"))


def clip_loader(spec: str) -> Callable[[], tuple[Any, Any]]:
    """A zero-argument callable returning ``(CLIPModel, CLIPProcessor)`` from ``spec``, offline."""
    location = resolve_clip_location(spec)

    def load() -> tuple[Any, Any]:
        from transformers import CLIPModel, CLIPProcessor

        try:
            model = CLIPModel.from_pretrained(location, local_files_only=True)
            processor = CLIPProcessor.from_pretrained(location, local_files_only=True)
        except OSError as err:
            raise MissingWeightsError(missing_clip_message(spec, str(err).splitlines()[0])) from err
        return model.eval().requires_grad_(False), processor

    return load


def to_clip_images(images: Tensor) -> Tensor:
    """Images ``(N, C, H, W)`` in [0, 1] → ``(N, 3, H, W)`` uint8, as CLIP processors expect."""
    if images.shape[1] == 1:
        images = images.expand(-1, 3, -1, -1)
    return to_uint8(images)


class ClipScoreMetric(Metric):
    """Mean CLIP score of images against their labels (prompts), through torchmetrics' ``CLIPScore``."""

    name = "clip_score"

    def __init__(self, loader: Callable[[], tuple[Any, Any]], device: torch.device | str = "cpu") -> None:
        from torchmetrics.multimodal.clip_score import CLIPScore

        self.metric = CLIPScore(model_name_or_path=loader)
        self.device = torch.device(device)
        self.scores: list[Tensor] = []

    @torch.no_grad()
    def per_sample(self, images: Tensor, labels: list[Any], indices: range | None = None) -> Tensor:
        """``100 · cos`` of each image ``(N, C, H, W)`` in [0, 1] with its prompt: ``(N,)`` on the
        CPU (``indices``, the samples' indices, are not needed)."""
        from torchmetrics.functional.multimodal.clip_score import _clip_score_update

        prompts = [str(label) for label in labels]
        scores, _ = _clip_score_update(
            to_clip_images(images).to(self.device), prompts, self.metric.model, self.metric.processor
        )
        return scores.float().cpu()

    def update(self, batch: EvalBatch) -> None:
        scores = batch.per_sample.get(self.name)
        if scores is None:
            raise ValueError(
                "clip_score: this batch carries no per-image CLIP scores (it was generated "
                "before the metric was set up); delete the job's progress/ folder and rerun."
            )
        self.scores.append(scores)

    def compute(self) -> dict[str, float]:
        # one sum over all scores in sample order: per-batch sums would depend on the batch size
        scores = torch.cat(self.scores)
        self.metric.score = scores.sum().to(self.metric.score)
        self.metric.n_samples = torch.tensor(len(scores), device=self.metric.n_samples.device)
        with warnings.catch_warnings():  # states are filled by update() above, not CLIPScore.update
            warnings.filterwarnings("ignore", message=".*was called before the ``update`` method.*")
            return {self.name: float(self.metric.compute())}


@EVALUATORS.register("clip_score")
def build_clip_score(evaluation) -> ClipScoreMetric:
    return ClipScoreMetric(clip_loader(evaluation.cfg.clip_model), evaluation.ctx.device)


build_clip_score.preflight = check_clip_model
