"""Text-to-image latent diffusion transformers (family ``pixart``): PixArt-α.

Components are read from a diffusers ``PixArtAlphaPipeline`` folder or hub id
(``PixArt-alpha/PixArt-XL-2-512x512``): ``transformer/`` (``PixArtTransformer2DModel``), ``vae/``
(``AutoencoderKL``), ``text_encoder/`` (``T5EncoderModel``), ``tokenizer/`` (any tokenizer
``AutoTokenizer`` reads: T5's for the real model) and ``scheduler/`` (the checkpoint's own,
DPM-Solver for PixArt-α).

Sample ``i`` gets prompt ``i % len(prompts)`` of ``model.prompts``; with guidance its
unconditional input is the empty prompt, as in ``PixArtAlphaPipeline``. Prompts are encoded as
the pipeline does (no caption cleaning): padded to :data:`MAX_TOKENS` tokens, the T5 states
``encoder_hidden_states`` ``(N, 120, 4096)`` and their mask ``encoder_attention_mask``
``(N, 120)`` (1 = token, 0 = padding) are the denoiser's condition rows. The text encoder and the
autoencoder stay in full precision; the denoiser predicts ε and a variance (8 channels), of
which the sampler keeps ε (:class:`~diffquant.models.denoiser.TransformerSpec`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from diffquant.models.base import SamplerSettings
from diffquant.models.denoiser import PIXART
from diffquant.models.ldm import load_scheduler, randomly_initialised
from diffquant.models.loading import check_weights, load_component, read_meta
from diffquant.models.prompts import load_prompts, prompts_digest
from diffquant.models.sd import TextToImageDiffusion, latent_shape
from diffquant.registry import MODELS

COMPONENTS = ("transformer", "vae", "text_encoder", "tokenizer", "scheduler")
MAX_TOKENS = 120  # PixArt-α's T5 sequence length (PixArtAlphaPipeline's max_sequence_length)


class T5PromptEncoder:
    """Prompts → T5 states ``(N, MAX_TOKENS, D)`` and mask ``(N, MAX_TOKENS)``, as
    ``PixArtAlphaPipeline.encode_prompt`` computes them."""

    def __init__(self, tokenizer: Any, text_encoder: nn.Module, device: torch.device) -> None:
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder.eval().requires_grad_(False).to(device)
        self.device = device
        self._empty: dict[str, Tensor] | None = None

    @torch.no_grad()
    def condition_rows(self, prompts: Sequence[str]) -> dict[str, Tensor]:
        """The denoiser's keyword arguments for ``prompts``: the states and their mask."""
        tokens = self.tokenizer(
            list(prompts),
            padding="max_length",
            max_length=MAX_TOKENS,
            truncation=True,
            add_special_tokens=True,
            return_tensors="pt",
        )
        mask = tokens.attention_mask.to(self.device)
        states = self.text_encoder(tokens.input_ids.to(self.device), attention_mask=mask)[0]
        return {"encoder_hidden_states": states, "encoder_attention_mask": mask}

    def empty_rows(self, n: int) -> dict[str, Tensor]:
        """The empty prompt's states and mask repeated for ``n`` samples (computed once)."""
        if self._empty is None:
            self._empty = self.condition_rows([""])
        return {k: v.expand(n, *v.shape[1:]) for k, v in self._empty.items()}


class TextToImageTransformer(TextToImageDiffusion):
    """``PixArtTransformer2DModel`` conditioned on T5 text states through cross-attention (the
    prompts and their encoding as :class:`~diffquant.models.sd.TextToImageDiffusion`, with a
    :class:`T5PromptEncoder`)."""

    family = "pixart"
    spec = PIXART


@MODELS.register("pixart")
def build_pixart(model_cfg: Any, device: torch.device) -> TextToImageTransformer:
    from diffusers import AutoencoderKL, PixArtTransformer2DModel
    from transformers import AutoTokenizer, T5EncoderModel

    check_weights(model_cfg, COMPONENTS)
    prompts = load_prompts(model_cfg.prompts)
    transformer = load_component(PixArtTransformer2DModel, model_cfg, "transformer")
    if model_cfg.random_weights:
        transformer = randomly_initialised(transformer)
    if getattr(transformer, "use_additional_conditions", False):
        raise ValueError(
            f"model '{model_cfg.name}': PixArt transformers with resolution / aspect-ratio "
            "conditions (the 1024 px models) are not supported; use a 256 or 512 px model."
        )
    vae = load_component(AutoencoderKL, model_cfg, "vae")
    text_encoder = load_component(T5EncoderModel, model_cfg, "text_encoder")
    tokenizer = load_component(AutoTokenizer, model_cfg, "tokenizer")
    scheduler = load_scheduler(model_cfg)
    sampler = SamplerSettings.of(model_cfg)
    meta = {**read_meta(model_cfg), "prompts_sha256": prompts_digest(prompts)}
    return TextToImageTransformer(
        model_cfg.name,
        transformer,
        vae,
        scheduler,
        sampler,
        latent_shape(transformer, vae, model_cfg.image_size),
        model_cfg.latent_scale,
        device,
        meta,
        prompt_encoder=T5PromptEncoder(tokenizer, text_encoder, torch.device(device)),
        prompts=prompts,
    )
