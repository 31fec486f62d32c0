"""A user's diffusers pipeline as a model wrapper, for the Python API (:func:`diffquant.quantize`).

The wrapper shares the pipeline's modules (no copies): quantizing ``model.denoiser`` quantizes
``pipe.unet`` in place, so the pipeline samples with the quantized denoiser afterwards.

* ``StableDiffusionPipeline``-like (``unet``, ``vae``, ``text_encoder``, ``tokenizer``,
  ``scheduler``) → family ``sd``; calibration samples use ``prompts``.
* ``LDMPipeline``-like (``unet`` a ``UNet2DModel``, ``vqvae`` or ``vae``, ``scheduler``) →
  family ``ldm``, unconditional or class-conditional (``num_classes``).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any, Optional

import torch

from diffquant.models.base import DiffusionModel, SamplerSettings
from diffquant.models.ldm import LatentDiffusion
from diffquant.models.sd import PromptEncoder, TextToImageDiffusion, latent_shape


def from_pipeline(
    pipe: Any,
    *,
    name: str = "pipeline",
    num_inference_steps: int = 50,
    guidance_scale: Optional[float] = None,
    eta: float = 0.0,
    prompts: Optional[Sequence[str]] = None,
    num_classes: Optional[int] = None,
    image_size: Optional[int] = None,
    device: torch.device | str | None = None,
) -> DiffusionModel:
    """Wrap ``pipe`` (see the module doc). ``guidance_scale`` defaults to 7.5 for text-to-image
    pipelines (as ``StableDiffusionPipeline``) and 1.0 (no guidance) otherwise. The wrapper
    samples with a copy of the pipeline's scheduler (the pipeline's own is left as it is)."""
    from diffusers import UNet2DConditionModel, UNet2DModel

    unet = getattr(pipe, "unet", None)
    if unet is None:
        raise TypeError(
            f"{type(pipe).__name__} has no `unet`: diffquant.quantize takes a "
            "diffusers pipeline with a UNet denoiser (StableDiffusionPipeline, "
            "LDMPipeline) or a diffquant model wrapper"
        )
    device = torch.device(device) if device is not None else unet.device
    scheduler = copy.deepcopy(pipe.scheduler)
    text_encoder = getattr(pipe, "text_encoder", None)
    if isinstance(unet, UNet2DConditionModel) and text_encoder is not None:
        if not prompts:
            raise ValueError(
                "a text-to-image pipeline calibrates on prompts: pass "
                "prompts=[...] (e.g. a few hundred captions like those you will use)"
            )
        sampler = SamplerSettings(num_inference_steps, 7.5 if guidance_scale is None else guidance_scale, eta)
        return TextToImageDiffusion(
            name,
            unet,
            pipe.vae,
            scheduler,
            sampler,
            latent_shape(unet, pipe.vae, image_size),
            None,
            device,
            {"source": type(pipe).__name__},
            prompt_encoder=PromptEncoder(pipe.tokenizer, text_encoder, device),
            prompts=list(prompts),
        )
    if isinstance(unet, UNet2DModel):
        vae = getattr(pipe, "vqvae", None) or getattr(pipe, "vae", None)
        if vae is None:
            raise TypeError(f"{type(pipe).__name__} has no `vqvae`/`vae` to decode latents")
        size = unet.config.sample_size
        size = size if isinstance(size, int) else size[0]
        sampler = SamplerSettings(num_inference_steps, 1.0 if guidance_scale is None else guidance_scale, eta)
        return LatentDiffusion(
            name,
            unet,
            vae,
            scheduler,
            sampler,
            (unet.config.in_channels, size, size),
            None,
            device,
            {"source": type(pipe).__name__},
            num_classes=num_classes,
        )
    raise TypeError(
        f"{type(pipe).__name__}.unet is a {type(unet).__name__}: diffquant.quantize "
        "wraps UNet2DModel (LDM) and UNet2DConditionModel + text encoder (SD) "
        "pipelines; wrap other models in a DiffusionModel subclass and pass that"
    )
