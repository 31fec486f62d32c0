"""Class-conditional latent diffusion transformers (family ``dit``): DiT (Peebles & Xie).

Components are read from a diffusers ``DiTPipeline`` folder or hub id (``facebook/DiT-XL-2-256``):
``transformer/`` (``DiTTransformer2DModel``), ``vae/`` (``AutoencoderKL``) and ``scheduler/``.

Sample ``i`` gets class ``i % num_classes``; with guidance its unconditional input is the null
class, the label embedding's extra row ``num_embeds_ada_norm`` (1000 for ImageNet), as in
``DiTPipeline``. The denoiser's batched call carries ``class_labels`` ``(2N,)``, unconditional
rows first. DiT-XL/2 predicts ε and a variance (8 output channels): the sampler keeps ε
(:class:`~diffquant.models.denoiser.TransformerSpec`). The autoencoder stays in full precision.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from diffquant.models.base import Conditioning, DiffusionModel, SamplerSettings
from diffquant.models.denoiser import DIT
from diffquant.models.ldm import load_scheduler, randomly_initialised, vae_class
from diffquant.models.loading import check_weights, load_component, read_meta
from diffquant.models.sd import latent_shape
from diffquant.registry import MODELS

COMPONENTS = ("transformer", "vae", "scheduler")


class ClassConditionalDiT(DiffusionModel):
    """``DiTTransformer2DModel`` conditioned on a class label through its adaLN-Zero blocks."""

    family = "dit"
    spec = DIT

    def __init__(self, *args: Any, num_classes: int, null_class: int, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.num_classes = int(num_classes)
        self.null_class = int(null_class)

    def conditions(self, indices: Sequence[int], seed: int) -> Conditioning:
        labels = torch.tensor([int(i) % self.num_classes for i in indices], dtype=torch.long)
        uncond = {"class_labels": torch.full_like(labels, self.null_class)} if self.guided else None
        return Conditioning(cond={"class_labels": labels}, uncond=uncond, labels=labels.tolist())


def null_class_of(transformer: torch.nn.Module) -> int:
    """The label id of "no class": the label table's extra row (``num_embeds_ada_norm``)."""
    return int(transformer.config.num_embeds_ada_norm)


@MODELS.register("dit")
def build_dit(model_cfg: Any, device: torch.device) -> ClassConditionalDiT:
    from diffusers import DiTTransformer2DModel

    check_weights(model_cfg, COMPONENTS)
    transformer = load_component(DiTTransformer2DModel, model_cfg, "transformer")
    if model_cfg.random_weights:
        transformer = randomly_initialised(transformer)
    vae = load_component(vae_class(model_cfg), model_cfg, "vae")
    scheduler = load_scheduler(model_cfg)
    null_class = null_class_of(transformer)
    num_classes = model_cfg.num_classes or null_class
    if num_classes > null_class:
        raise ValueError(
            f"model.num_classes={num_classes} exceeds the {null_class} classes of the DiT's label "
            "embedding (config num_embeds_ada_norm)."
        )
    sampler = SamplerSettings.of(model_cfg)
    return ClassConditionalDiT(
        model_cfg.name,
        transformer,
        vae,
        scheduler,
        sampler,
        latent_shape(transformer, vae, model_cfg.image_size),
        model_cfg.latent_scale,
        device,
        read_meta(model_cfg),
        num_classes=num_classes,
        null_class=null_class,
    )
