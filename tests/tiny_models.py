"""Tiny random-weight diffusers UNets and a tiny :class:`DiffusionModel` for fast tests.

* :func:`tiny_unet2d` — class-conditional ``UNet2DModel`` with attention blocks (the LDM family);
* :func:`tiny_unet2d_condition` — ``UNet2DConditionModel`` with cross-attention (the SD family);
* :class:`TinyDiffusion` — a class-conditional latent model over :func:`tiny_unet2d` with DDIM and
  classifier-free guidance, no autoencoder (``decode`` is the identity).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from diffusers import DDIMScheduler, UNet2DConditionModel, UNet2DModel
from torch import nn

from diffquant.models.base import Conditioning, DiffusionModel, SamplerSettings
from diffquant.models.denoiser import UNET

N_CLASSES = 4
LATENT = (4, 8, 8)
CROSS_DIM = 16


def tiny_unet2d(seed: int = 0) -> UNet2DModel:
    """``UNet2DModel`` on (B, 4, 8, 8): 2 levels (16, 32 channels), attention at the lower level
    and in the mid block, class embeddings for ``N_CLASSES`` + null."""
    torch.manual_seed(seed)
    return UNet2DModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(16, 32),
        layers_per_block=1,
        attention_head_dim=8,
        norm_num_groups=8,
        num_class_embeds=N_CLASSES + 1,
    ).eval()


def tiny_unet2d_condition(seed: int = 0) -> UNet2DConditionModel:
    """``UNet2DConditionModel`` on (B, 4, 8, 8) with cross-attention to (B, L, 16) context."""
    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(16, 32),
        layers_per_block=1,
        cross_attention_dim=CROSS_DIM,
        attention_head_dim=8,
        norm_num_groups=8,
    ).eval()


def unet2d_inputs(n: int = 3, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "sample": torch.randn(n, *LATENT, generator=g),
        "timestep": torch.randint(0, 1000, (n,), generator=g),
        "class_labels": torch.randint(0, N_CLASSES + 1, (n,), generator=g),
    }


def unet2d_condition_inputs(n: int = 3, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "sample": torch.randn(n, *LATENT, generator=g),
        "timestep": torch.randint(0, 1000, (n,), generator=g),
        "encoder_hidden_states": torch.randn(n, 5, CROSS_DIM, generator=g),
    }


class TinyDiffusion(DiffusionModel):
    """Class-conditional latent diffusion over :func:`tiny_unet2d`, guidance 2.0, DDIM (or
    ``scheduler``)."""

    family = "tiny"
    spec = UNET

    def __init__(self, steps: int = 6, guidance: float = 2.0, seed: int = 0, scheduler=None) -> None:
        scheduler = scheduler or DDIMScheduler(
            num_train_timesteps=1000,
            beta_schedule="scaled_linear",
            beta_start=0.00085,
            beta_end=0.012,
            clip_sample=False,
            set_alpha_to_one=False,
            steps_offset=1,
        )
        super().__init__(
            "tiny",
            tiny_unet2d(seed),
            nn.Identity(),
            scheduler,
            SamplerSettings(steps, guidance, 0.0),
            LATENT,
            latent_scale=1.0,
        )

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """No autoencoder: the latents are the images."""
        return latents

    def conditions(self, indices: Sequence[int], seed: int) -> Conditioning:
        labels = torch.tensor([int(i) % N_CLASSES for i in indices])
        uncond = {"class_labels": torch.full_like(labels, N_CLASSES)} if self.guided else None
        return Conditioning({"class_labels": labels}, uncond, labels.tolist())


class TinyTextDiffusion(DiffusionModel):
    """Text-to-image-like latent diffusion over :func:`tiny_unet2d_condition`: sample ``i``'s
    "prompt embedding" is a fixed random (5, 16) context, the null prompt is zeros; guidance 2.0."""

    family = "tiny_text"
    spec = UNET

    def __init__(self, steps: int = 4, guidance: float = 2.0, seed: int = 0) -> None:
        scheduler = DDIMScheduler(
            num_train_timesteps=1000, clip_sample=False, set_alpha_to_one=False, steps_offset=1
        )
        super().__init__(
            "tiny_text",
            tiny_unet2d_condition(seed),
            nn.Identity(),
            scheduler,
            SamplerSettings(steps, guidance, 0.0),
            LATENT,
            latent_scale=1.0,
        )

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """No autoencoder: the latents are the images."""
        return latents

    def conditions(self, indices: Sequence[int], seed: int) -> Conditioning:
        ctx = torch.stack(
            [torch.randn(5, CROSS_DIM, generator=torch.Generator().manual_seed(int(i))) for i in indices]
        )
        uncond = {"encoder_hidden_states": torch.zeros_like(ctx)} if self.guided else None
        return Conditioning({"encoder_hidden_states": ctx}, uncond, [f"prompt {i}" for i in indices])
