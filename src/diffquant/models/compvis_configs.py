"""The original (CompVis) configs of the papers' checkpoints, as the parts the conversion needs.

Each entry has the nesting of the CompVis YAML files (``model.params.{unet_config,
first_stage_config, cond_stage_config}``), so a real YAML passed with ``--original-config`` can
replace it. Values are those of the released configs:

* ``ldm_bedroom``: ``models/ldm/lsun_beds256`` (LDM-4, VQ-f4), Rombach et al. 2022, Tab. 15;
* ``ldm_church``: ``models/ldm/lsun_churches256`` (LDM-8, KL-f8, ``scale_by_std``);
* ``ldm_celebahq``: ``models/ldm/celeba256`` (LDM-4, VQ-f4);
* ``ldm_imagenet``: ``configs/latent-diffusion/cin256-v2.yaml`` (LDM-4, VQ-f4, class embedding
  as a one-token cross-attention context);
* ``sd_v1_4``: ``configs/stable-diffusion/v1-inference.yaml`` (KL-f8, CLIP ViT-L/14 text encoder).
"""

from __future__ import annotations

import copy
from typing import Any

_VQ_F4 = {
    "target": "ldm.models.autoencoder.VQModelInterface",
    "params": {
        "embed_dim": 3,
        "n_embed": 8192,
        "ddconfig": {
            "double_z": False,
            "z_channels": 3,
            "resolution": 256,
            "in_channels": 3,
            "out_ch": 3,
            "ch": 128,
            "ch_mult": [1, 2, 4],
            "num_res_blocks": 2,
            "attn_resolutions": [],
        },
    },
}
_KL_F8 = {
    "target": "ldm.models.autoencoder.AutoencoderKL",
    "params": {
        "embed_dim": 4,
        "ddconfig": {
            "double_z": True,
            "z_channels": 4,
            "resolution": 256,
            "in_channels": 3,
            "out_ch": 3,
            "ch": 128,
            "ch_mult": [1, 2, 4, 4],
            "num_res_blocks": 2,
            "attn_resolutions": [],
        },
    },
}
_LDM4_UNET = {
    "image_size": 64,
    "in_channels": 3,
    "out_channels": 3,
    "model_channels": 224,
    "attention_resolutions": [8, 4, 2],
    "num_res_blocks": 2,
    "channel_mult": [1, 2, 3, 4],
    "num_head_channels": 32,
}


def _config(
    linear_start: float,
    linear_end: float,
    unet: dict,
    first_stage: dict,
    cond_stage: Any = "__is_unconditional__",
    **extra: Any,
) -> dict:
    return {
        "model": {
            "params": {
                "linear_start": linear_start,
                "linear_end": linear_end,
                "timesteps": 1000,
                **extra,
                "unet_config": {
                    "target": "ldm.modules.diffusionmodules.openaimodel.UNetModel",
                    "params": unet,
                },
                "first_stage_config": first_stage,
                "cond_stage_config": cond_stage,
            }
        }
    }


ORIGINAL_CONFIGS: dict[str, dict] = {
    "ldm_bedroom": _config(0.0015, 0.0195, _LDM4_UNET, _VQ_F4),
    "ldm_celebahq": _config(0.0015, 0.0195, _LDM4_UNET, _VQ_F4),
    "ldm_church": _config(
        0.0015,
        0.0155,
        {
            "image_size": 32,
            "in_channels": 4,
            "out_channels": 4,
            "model_channels": 192,
            "attention_resolutions": [1, 2, 4, 8],
            "num_res_blocks": 2,
            "channel_mult": [1, 2, 2, 4, 4],
            "num_heads": 8,
            "use_scale_shift_norm": True,
            "resblock_updown": True,
        },
        _KL_F8,
        scale_by_std=True,
    ),
    "ldm_imagenet": _config(
        0.0015,
        0.0195,
        {
            "image_size": 64,
            "in_channels": 3,
            "out_channels": 3,
            "model_channels": 192,
            "attention_resolutions": [8, 4, 2],
            "num_res_blocks": 2,
            "channel_mult": [1, 2, 3, 5],
            "num_heads": 1,
            "use_spatial_transformer": True,
            "transformer_depth": 1,
            "context_dim": 512,
        },
        _VQ_F4,
        {
            "target": "ldm.modules.encoders.modules.ClassEmbedder",
            "params": {"n_classes": 1001, "embed_dim": 512, "key": "class_label"},
        },
        conditioning_key="crossattn",
    ),
    "sd_v1_4": _config(
        0.00085,
        0.0120,
        {
            "image_size": 32,
            "in_channels": 4,
            "out_channels": 4,
            "model_channels": 320,
            "attention_resolutions": [4, 2, 1],
            "num_res_blocks": 2,
            "channel_mult": [1, 2, 4, 4],
            "num_heads": 8,
            "use_spatial_transformer": True,
            "transformer_depth": 1,
            "context_dim": 768,
            "legacy": False,
        },
        {
            **_KL_F8,
            "params": {**_KL_F8["params"], "ddconfig": {**_KL_F8["params"]["ddconfig"], "resolution": 512}},
        },
        {"target": "ldm.modules.encoders.modules.FrozenCLIPEmbedder"},
        conditioning_key="crossattn",
        scale_factor=0.18215,
        image_size=64,
    ),
}

#: Image side (pixels) each model samples at.
IMAGE_SIZES = {
    "ldm_bedroom": 256,
    "ldm_celebahq": 256,
    "ldm_church": 256,
    "ldm_imagenet": 256,
    "sd_v1_4": 512,
}


def original_config(model: str) -> dict:
    """A deep copy of the original config of ``model`` (a key of :data:`ORIGINAL_CONFIGS`)."""
    return copy.deepcopy(ORIGINAL_CONFIGS[model])
