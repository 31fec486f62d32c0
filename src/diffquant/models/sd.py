"""Text-to-image latent diffusion in the Stable Diffusion layout (family ``sd``).

Components are read from a ``StableDiffusionPipeline`` folder or hub id: ``unet/``
(``UNet2DConditionModel``), ``vae/`` (``AutoencoderKL``), ``text_encoder/`` (``CLIPTextModel``),
``tokenizer/`` (``CLIPTokenizer``) and ``scheduler/``; the safety checker is not loaded.

Sample ``i`` gets prompt ``i % len(prompts)`` of ``model.prompts``; with guidance its
unconditional input is the empty prompt, as in ``StableDiffusionPipeline``. The text encoder and
the autoencoder stay in full precision: methods only replace ``unet``, whose batched call carries
the unconditional rows first and the conditional rows second (``encoder_hidden_states``
``(2N, L, D)``, see :meth:`DiffusionModel.unet_kwargs`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from torch import Tensor, nn

from diffquant.models.base import Conditioning, DiffusionModel, SamplerSettings
from diffquant.models.denoiser import UNET
from diffquant.models.ldm import load_scheduler
from diffquant.models.loading import check_weights, load_component, read_meta
from diffquant.models.prompts import load_prompts, prompts_digest
from diffquant.registry import MODELS

COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")


class PromptEncoder:
    """Prompts → CLIP text-encoder states ``(N, L, D)``, exactly as ``StableDiffusionPipeline``
    encodes them (padded to the tokenizer's ``model_max_length``, last hidden state)."""

    def __init__(self, tokenizer: Any, text_encoder: nn.Module, device: torch.device) -> None:
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder.eval().requires_grad_(False).to(device)
        self.device = device
        self._empty: Tensor | None = None

    @torch.no_grad()
    def __call__(self, prompts: Sequence[str]) -> Tensor:
        tokens = self.tokenizer(
            list(prompts),
            padding="max_length",
            truncation=True,
            return_tensors="pt",
            max_length=self.tokenizer.model_max_length,
        )
        mask = None
        if getattr(self.text_encoder.config, "use_attention_mask", False):
            mask = tokens.attention_mask.to(self.device)
        return self.text_encoder(tokens.input_ids.to(self.device), attention_mask=mask)[0]

    def empty(self, n: int) -> Tensor:
        """The empty prompt's states repeated for ``n`` samples: ``(n, L, D)`` (computed once)."""
        if self._empty is None:
            self._empty = self([""])
        return self._empty.expand(n, -1, -1)

    def condition_rows(self, prompts: Sequence[str]) -> dict[str, Tensor]:
        """The denoiser's keyword arguments for ``prompts``: ``encoder_hidden_states``."""
        return {"encoder_hidden_states": self(prompts)}

    def empty_rows(self, n: int) -> dict[str, Tensor]:
        """The denoiser's keyword arguments of the empty prompt for ``n`` samples."""
        return {"encoder_hidden_states": self.empty(n)}


class TextToImageDiffusion(DiffusionModel):
    """``UNet2DConditionModel`` conditioned on CLIP text states through cross-attention.

    Sample ``i`` gets prompt ``i % len(prompts)``, its unconditional input the empty prompt; the
    ``prompt_encoder`` turns prompts into the denoiser's condition rows (``condition_rows`` /
    ``empty_rows``), so a text-conditioned family with another encoder subclasses this one
    (:class:`~diffquant.models.pixart.TextToImageTransformer`)."""

    family = "sd"
    spec = UNET

    def __init__(self, *args: Any, prompt_encoder: Any, prompts: list[str], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.prompt_encoder = prompt_encoder
        self.prompts = prompts

    @property
    def text_encoder(self) -> nn.Module:
        return self.prompt_encoder.text_encoder

    def prompts_of(self, indices: Sequence[int]) -> list[str]:
        """The prompt of each sample index."""
        return [self.prompts[int(i) % len(self.prompts)] for i in indices]

    def conditions(self, indices: Sequence[int], seed: int) -> Conditioning:
        prompts = self.prompts_of(indices)
        cond = self.prompt_encoder.condition_rows(prompts)
        uncond = self.prompt_encoder.empty_rows(len(prompts)) if self.guided else None
        return Conditioning(cond=cond, uncond=uncond, labels=prompts)

    def describe(self) -> dict[str, Any]:
        n_text = sum(p.numel() for p in self.text_encoder.parameters())
        return {
            **super().describe(),
            "prompts": len(self.prompts),
            "text_encoder_params_m": round(n_text / 1e6, 3),
        }


def latent_shape(unet: nn.Module, vae: nn.Module, image_size: int | None) -> tuple[int, int, int]:
    """``(C, h, w)`` of the UNet's latents: ``image_size`` divided by the autoencoder's downsampling
    factor, or the UNet's own ``sample_size`` when ``image_size`` is None."""
    if image_size is None:
        size = unet.config.sample_size
        size = size if isinstance(size, int) else size[0]
    else:
        factor = 2 ** (len(vae.config.block_out_channels) - 1)
        if image_size % factor:
            raise ValueError(
                f"model.image_size={image_size} is not a multiple of the autoencoder's "
                f"downsampling factor {factor}."
            )
        size = image_size // factor
    return (unet.config.in_channels, size, size)


@MODELS.register("sd")
def build_sd(model_cfg: Any, device: torch.device) -> TextToImageDiffusion:
    from transformers import CLIPTextModel, CLIPTokenizer

    check_weights(model_cfg, COMPONENTS)
    prompts = load_prompts(model_cfg.prompts)
    unet = load_component(UNet2DConditionModel, model_cfg, "unet")
    vae = load_component(AutoencoderKL, model_cfg, "vae")
    text_encoder = load_component(CLIPTextModel, model_cfg, "text_encoder")
    tokenizer = load_component(CLIPTokenizer, model_cfg, "tokenizer")
    scheduler = load_scheduler(model_cfg)
    sampler = SamplerSettings.of(model_cfg)
    meta = {**read_meta(model_cfg), "prompts_sha256": prompts_digest(prompts)}
    return TextToImageDiffusion(
        model_cfg.name,
        unet,
        vae,
        scheduler,
        sampler,
        latent_shape(unet, vae, model_cfg.image_size),
        model_cfg.latent_scale,
        device,
        meta,
        prompt_encoder=PromptEncoder(tokenizer, text_encoder, torch.device(device)),
        prompts=prompts,
    )
