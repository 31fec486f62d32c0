"""Latent diffusion models with a ``UNet2DModel``: unconditional (LSUN, CelebA-HQ) or
class-conditional through the UNet's class embedding (the embedded ``ldm_digits``).

Components are read from a diffusers folder or hub id with the subfolders ``unet/``, ``vae/``
(``AutoencoderKL`` or ``VQModel``, whichever the folder's config names) and ``scheduler/``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import diffusers
import torch
from diffusers import AutoencoderKL, UNet2DModel, VQModel

from diffquant.models.base import Conditioning, DiffusionModel, SamplerSettings
from diffquant.models.ddpm import SeededDDPMScheduler
from diffquant.models.denoiser import UNET
from diffquant.models.loading import check_weights, load_component, read_meta, resolve_location
from diffquant.registry import MODELS


class LatentDiffusion(DiffusionModel):
    """``UNet2DModel`` latent diffusion; sample ``i`` of a class-conditional model gets class
    ``i % num_classes`` (balanced classes), and the null class ``num_classes`` for guidance."""

    family = "ldm"
    spec = UNET

    def __init__(self, *args: Any, num_classes: int | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.num_classes = num_classes
        if self.guided and num_classes is None:
            raise ValueError(
                f"{self.name}: guidance_scale={self.sampler.guidance_scale} needs a "
                "class-conditional model (model.num_classes); set "
                "model.guidance_scale=1.0 for an unconditional one."
            )

    def conditions(self, indices: Sequence[int], seed: int) -> Conditioning:
        if self.num_classes is None:
            return Conditioning(cond={}, uncond=None, labels=[None] * len(indices))
        labels = torch.tensor([int(i) % self.num_classes for i in indices], dtype=torch.long)
        uncond = {"class_labels": torch.full_like(labels, self.num_classes)} if self.guided else None
        return Conditioning(cond={"class_labels": labels}, uncond=uncond, labels=labels.tolist())


def load_scheduler(model_cfg: Any):
    """The checkpoint's scheduler, or ``model_cfg.scheduler`` built from its config, with overrides.
    ``DDPMScheduler`` becomes :class:`~diffquant.models.ddpm.SeededDDPMScheduler` (the same steps,
    each sample's own noise)."""
    location = resolve_location(model_cfg.pretrained)
    cls_name = model_cfg.scheduler
    if cls_name is None:
        cfg_file = Path(location) / "scheduler" / "scheduler_config.json"
        cls_name = json.loads(cfg_file.read_text())["_class_name"] if cfg_file.is_file() else "DDIMScheduler"
    cls = getattr(diffusers, cls_name, None)
    if cls is None:
        raise ValueError(f"model.scheduler={cls_name!r} is not a diffusers scheduler class.")
    if cls is diffusers.DDPMScheduler:  # its step would draw the batch's noise itself
        cls = SeededDDPMScheduler
    scheduler = load_component(cls, model_cfg, "scheduler")
    overrides = dict(model_cfg.scheduler_overrides or {})
    return cls.from_config(scheduler.config, **overrides) if overrides else scheduler


def vae_class(model_cfg: Any) -> type:
    """``VQModel`` or ``AutoencoderKL``, as named by the local ``vae/config.json`` (KL otherwise)."""
    cfg_file = Path(resolve_location(model_cfg.pretrained)) / "vae" / "config.json"
    if cfg_file.is_file() and json.loads(cfg_file.read_text()).get("_class_name") == "VQModel":
        return VQModel
    return AutoencoderKL


def randomly_initialised(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """A copy of ``module``'s architecture with a seeded random initialisation (untrained)."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return type(module).from_config(module.config)


@MODELS.register("ldm")
def build_ldm(model_cfg: Any, device: torch.device) -> LatentDiffusion:
    check_weights(model_cfg, ("unet", "vae", "scheduler"))
    meta = read_meta(model_cfg)
    unet = load_component(UNet2DModel, model_cfg, "unet")
    if model_cfg.random_weights:
        unet = randomly_initialised(unet)
    vae = load_component(vae_class(model_cfg), model_cfg, "vae")
    scheduler = load_scheduler(model_cfg)
    size = unet.config.sample_size
    size = size if isinstance(size, int) else size[0]
    sampler = SamplerSettings.of(model_cfg)
    num_classes = model_cfg.num_classes if model_cfg.num_classes is not None else meta.get("num_classes")
    return LatentDiffusion(
        model_cfg.name,
        unet,
        vae,
        scheduler,
        sampler,
        (unet.config.in_channels, size, size),
        model_cfg.latent_scale,
        device,
        meta,
        num_classes=num_classes,
    )
