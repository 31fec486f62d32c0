"""Class-conditional latent diffusion through cross-attention (family ``ldm_class_context``).

The CompVis LDM-4 ImageNet model (``cin256-v2``) conditions a ``UNet2DConditionModel`` on a
one-token context: a learned class embedding (``nn.Embedding(1001, 512)``; class 1000 is the
"no class" of classifier-free guidance). A converted folder
(``python -m diffquant.models.convert ldm_imagenet``) holds ``unet/``, ``vae/`` (``VQModel``),
``scheduler/`` and ``class_embedder/`` (:class:`ClassEmbedder`).

Sample ``i`` gets class ``i % num_classes``. The class embedding stays in full precision, like a
text encoder; methods only replace ``unet``, whose batched call carries
``encoder_hidden_states`` ``(2N, 1, D)`` rows, unconditional first.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from diffusers import UNet2DConditionModel
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import Tensor, nn

from diffquant.models.base import Conditioning, DiffusionModel, SamplerSettings
from diffquant.models.denoiser import UNET
from diffquant.models.ldm import load_scheduler, vae_class
from diffquant.models.loading import check_weights, load_component, read_meta
from diffquant.models.sd import latent_shape
from diffquant.registry import MODELS


class ClassEmbedder(ModelMixin, ConfigMixin):
    """Class ids ``(N,)`` → a one-token context ``(N, 1, embed_dim)``; the last id is the null class."""

    @register_to_config
    def __init__(self, num_embeddings: int = 1001, embed_dim: int = 512) -> None:
        super().__init__()
        self.embedding = nn.Embedding(num_embeddings, embed_dim)

    @property
    def null_class(self) -> int:
        return self.config.num_embeddings - 1

    def forward(self, class_labels: Tensor) -> Tensor:
        return self.embedding(class_labels)[:, None, :]


class ClassContextDiffusion(DiffusionModel):
    """``UNet2DConditionModel`` whose cross-attention context is a learned class embedding."""

    family = "ldm_class_context"
    spec = UNET

    def __init__(self, *args: Any, class_embedder: ClassEmbedder, num_classes: int, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.class_embedder = class_embedder.eval().requires_grad_(False).to(self.device)
        self.num_classes = num_classes

    @torch.no_grad()
    def conditions(self, indices: Sequence[int], seed: int) -> Conditioning:
        labels = torch.tensor(
            [int(i) % self.num_classes for i in indices], dtype=torch.long, device=self.device
        )
        cond = {"encoder_hidden_states": self.class_embedder(labels)}
        uncond = None
        if self.guided:
            null = torch.full_like(labels, self.class_embedder.null_class)
            uncond = {"encoder_hidden_states": self.class_embedder(null)}
        return Conditioning(cond=cond, uncond=uncond, labels=labels.tolist())


@MODELS.register("ldm_class_context")
def build_ldm_class_context(model_cfg: Any, device: torch.device) -> ClassContextDiffusion:
    check_weights(model_cfg, ("unet", "vae", "scheduler", "class_embedder"))
    unet = load_component(UNet2DConditionModel, model_cfg, "unet")
    vae = load_component(vae_class(model_cfg), model_cfg, "vae")
    class_embedder = load_component(ClassEmbedder, model_cfg, "class_embedder")
    scheduler = load_scheduler(model_cfg)
    num_classes = model_cfg.num_classes or class_embedder.null_class
    if num_classes > class_embedder.null_class:
        raise ValueError(
            f"model.num_classes={num_classes} exceeds the {class_embedder.null_class} classes "
            "of the class embedder."
        )
    sampler = SamplerSettings.of(model_cfg)
    return ClassContextDiffusion(
        model_cfg.name,
        unet,
        vae,
        scheduler,
        sampler,
        latent_shape(unet, vae, model_cfg.image_size),
        model_cfg.latent_scale,
        device,
        read_meta(model_cfg),
        class_embedder=class_embedder,
        num_classes=num_classes,
    )
