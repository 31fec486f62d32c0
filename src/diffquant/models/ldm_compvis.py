"""``ldm`` models converted from CompVis checkpoints whose attention has a fixed head count
(family ``ldm_compvis``; LSUN-Church).

The folder is an ``ldm`` folder (``unet/``, ``vae/``, ``scheduler/``) written by
``python -m diffquant.models.convert``; its ``diffquant.json`` names the head count
(``unet_attention_heads``) that diffusers' ``UNet2DModel`` config cannot express
(see :mod:`diffquant.models.compvis_unet`).
"""

from __future__ import annotations

from typing import Any

import torch

from diffquant.models.compvis_unet import set_attention_heads
from diffquant.models.ldm import LatentDiffusion, build_ldm
from diffquant.registry import MODELS


@MODELS.register("ldm_compvis")
def build_ldm_compvis(model_cfg: Any, device: torch.device) -> LatentDiffusion:
    model = build_ldm(model_cfg, device)
    heads = model.meta.get("unet_attention_heads")
    if heads:
        set_attention_heads(model.denoiser, int(heads))
    return model
