"""A user's diffusers pipeline as a model wrapper, for the Python API (:func:`diffquant.quantize`).

The wrapper shares the pipeline's modules (no copies): quantizing ``model.denoiser`` quantizes
``pipe.unet`` in place, so the pipeline samples with the quantized denoiser afterwards.

* ``StableDiffusionPipeline``-like (``unet``, ``vae``, ``text_encoder``, ``tokenizer``,
  ``scheduler``) → family ``sd``; calibration samples use ``prompts``.
* ``LDMPipeline``-like (``unet`` a ``UNet2DModel``, ``vqvae`` or ``vae``, ``scheduler``) →
  family ``ldm``, unconditional or class-conditional (``num_classes``).
* ``DiTPipeline`` (``transformer`` a ``DiTTransformer2DModel``) → family ``dit`` (classes
  ``0..num_classes-1``, default all); ``PixArtAlphaPipeline`` (``transformer`` a
  ``PixArtTransformer2DModel``, T5 ``text_encoder`` + ``tokenizer``) → family ``pixart``;
  quantizing ``model.denoiser`` quantizes ``pipe.transformer``.
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

    if getattr(pipe, "transformer", None) is not None:
        return _from_transformer_pipeline(
            pipe, name, num_inference_steps, guidance_scale, eta, prompts, num_classes, image_size, device
        )
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


def _from_transformer_pipeline(
    pipe: Any,
    name: str,
    num_inference_steps: int,
    guidance_scale: Optional[float],
    eta: float,
    prompts: Optional[Sequence[str]],
    num_classes: Optional[int],
    image_size: Optional[int],
    device: torch.device | str | None,
) -> DiffusionModel:
    """``DiTPipeline`` → :class:`~diffquant.models.dit.ClassConditionalDiT`;
    ``PixArtAlphaPipeline`` → :class:`~diffquant.models.pixart.TextToImageTransformer`. Guidance
    defaults to each pipeline's own (DiT 4.0, PixArt-α 4.5)."""
    from diffusers import DiTTransformer2DModel, PixArtTransformer2DModel

    from diffquant.models.dit import ClassConditionalDiT, null_class_of
    from diffquant.models.pixart import T5PromptEncoder, TextToImageTransformer

    transformer = pipe.transformer
    device = torch.device(device) if device is not None else transformer.device
    scheduler = copy.deepcopy(pipe.scheduler)
    shape = latent_shape(transformer, pipe.vae, image_size)
    meta = {"source": type(pipe).__name__}
    if isinstance(transformer, DiTTransformer2DModel):
        sampler = SamplerSettings(num_inference_steps, 4.0 if guidance_scale is None else guidance_scale, eta)
        null = null_class_of(transformer)
        args = (name, transformer, pipe.vae, scheduler, sampler, shape, None, device, meta)
        return ClassConditionalDiT(*args, num_classes=num_classes or null, null_class=null)
    if isinstance(transformer, PixArtTransformer2DModel):
        if not prompts:
            raise ValueError(
                "a text-to-image pipeline calibrates on prompts: pass "
                "prompts=[...] (e.g. a few hundred captions like those you will use)"
            )
        sampler = SamplerSettings(num_inference_steps, 4.5 if guidance_scale is None else guidance_scale, eta)
        return TextToImageTransformer(
            *(name, transformer, pipe.vae, scheduler, sampler, shape, None, device, meta),
            prompt_encoder=T5PromptEncoder(pipe.tokenizer, pipe.text_encoder, device),
            prompts=list(prompts),
        )
    raise TypeError(
        f"{type(pipe).__name__}.transformer is a {type(transformer).__name__}: diffquant.quantize "
        "wraps DiTTransformer2DModel (DiTPipeline) and PixArtTransformer2DModel "
        "(PixArtAlphaPipeline) pipelines; wrap other models in a DiffusionModel subclass"
    )
