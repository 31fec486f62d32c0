"""Tiny random-weight components of the real models' classes, written as the folders their configs load.

* :func:`write_sd_folder` — a ``StableDiffusionPipeline`` folder (UNet2DConditionModel, AutoencoderKL,
  CLIPTextModel, the project's CLIPTokenizer vocabulary, a scheduler);
* :func:`write_ldm_folder` — ``unet/`` (UNet2DModel) ``vae/`` (VQModel or AutoencoderKL) ``scheduler/``,
  optionally with the CompVis layout and head count of LSUN-Church;
* :func:`write_class_context_folder` — the ImageNet layout (+ ``class_embedder/``);
* :func:`write_clip_folder` — a ``CLIPModel`` + ``CLIPProcessor`` folder;
* :func:`write_dit_folder` / :func:`write_pixart_folder` — ``DiTPipeline`` / ``PixArtAlphaPipeline``
  layouts (a tiny ``DiTTransformer2DModel`` / ``PixArtTransformer2DModel`` with learned sigma, a
  tiny VAE, for PixArt a tiny ``T5EncoderModel`` with the project's tokenizer);
* :func:`to_compvis_checkpoint` — the inverse of :mod:`diffquant.models.convert`: diffusers
  components → a CompVis-style state dict, for round-trip tests.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from diffquant.models.compvis_unet import (
    ATTENTION_NAMES,
    RESBLOCK_NAMES,
    module_map,
    set_attention_heads,
    unet2d_config,
)
from diffquant.zoo.captions import all_captions
from diffquant.zoo.tokenizer import save_tokenizer

TEXT_DIM = 32


# ------------------------------------------------------------------------------------ components
def tiny_vae(kind: str = "kl", latent_channels: int = 4, scaling_factor: float = 1.0, in_channels: int = 3):
    """A 2-level autoencoder (downsampling factor 2, 32 channels: CompVis' 32-group norms):
    ``AutoencoderKL`` or ``VQModel``."""
    from diffusers import AutoencoderKL, VQModel

    common = dict(
        in_channels=in_channels,
        out_channels=in_channels,
        block_out_channels=(32, 32),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        layers_per_block=1,
        latent_channels=latent_channels,
        sample_size=16,
        scaling_factor=scaling_factor,
    )
    if kind == "vq":
        return VQModel(**common, num_vq_embeddings=32, vq_embed_dim=latent_channels).eval()
    return AutoencoderKL(**common).eval()


def tiny_text_encoder(tokenizer):
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=TEXT_DIM,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        max_position_embeddings=16,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return CLIPTextModel(config).eval()


def tiny_cond_unet(cross_attention_dim: int = TEXT_DIM, in_channels: int = 4, heads: int = 2):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=8,
        in_channels=in_channels,
        out_channels=in_channels,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(32, 32),
        layers_per_block=1,
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=heads,
        norm_num_groups=8,
    ).eval()


#: CompVis ``unet_config.params`` of tiny UNets with the layouts of the real models.
TINY_LDM4_UNET = {
    "image_size": 8,
    "in_channels": 3,
    "out_channels": 3,
    "model_channels": 32,
    "attention_resolutions": [2],
    "num_res_blocks": 1,
    "channel_mult": [1, 2],
    "num_head_channels": 16,
}
TINY_CHURCH_UNET = {
    "image_size": 8,
    "in_channels": 4,
    "out_channels": 4,
    "model_channels": 32,
    "attention_resolutions": [1, 2],
    "num_res_blocks": 1,
    "channel_mult": [1, 2, 2],
    "num_heads": 4,
    "use_scale_shift_norm": True,
    "resblock_updown": True,
}
TINY_CIN_UNET = {
    "image_size": 8,
    "in_channels": 3,
    "out_channels": 3,
    "model_channels": 32,
    "attention_resolutions": [2],
    "num_res_blocks": 1,
    "channel_mult": [1, 2],
    "num_heads": 1,
    "use_spatial_transformer": True,
    "transformer_depth": 1,
    "context_dim": 16,
}
TINY_SD_UNET = {
    "image_size": 8,
    "in_channels": 4,
    "out_channels": 4,
    "model_channels": 32,
    "attention_resolutions": [2, 1],
    "num_res_blocks": 1,
    "channel_mult": [1, 1],
    "num_heads": 2,
    "use_spatial_transformer": True,
    "transformer_depth": 1,
    "context_dim": TEXT_DIM,
    "legacy": False,
}


def tiny_unet2d(params: dict):
    """A ``UNet2DModel`` with the CompVis layout of ``params`` (head count set when fixed)."""
    from diffusers import UNet2DModel

    unet = UNet2DModel(**unet2d_config(params)).eval()
    if params.get("num_head_channels", -1) == -1 and "num_heads" in params:
        set_attention_heads(unet, params["num_heads"])
    return unet


def ddim(beta_start: float = 0.0015, beta_end: float = 0.0195):
    from diffusers import DDIMScheduler

    return DDIMScheduler(
        num_train_timesteps=1000,
        beta_schedule="scaled_linear",
        beta_start=beta_start,
        beta_end=beta_end,
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )


def randomize(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Give every parameter random values (zero-initialised output layers would hide mapping errors)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return module


# ------------------------------------------------------------------------------------ folders
def write_tokenizer(folder: Path):
    """The project's caption vocabulary (16 tokens max), saved to ``folder``."""
    return save_tokenizer([c for row in all_captions() for c in row], folder, 16)


def write_sd_folder(root: Path, scheduler=None, seed: int = 0, in_channels: int = 3) -> Path:
    """A tiny ``StableDiffusionPipeline`` folder at ``root``."""
    from diffusers import StableDiffusionPipeline

    torch.manual_seed(seed)
    tokenizer = write_tokenizer(root.parent / f"{root.name}_tok")
    pipe = StableDiffusionPipeline(
        vae=tiny_vae("kl", 4, 0.5, in_channels),
        text_encoder=tiny_text_encoder(tokenizer),
        tokenizer=tokenizer,
        unet=tiny_cond_unet(),
        scheduler=scheduler or ddim(0.00085, 0.012),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(root)
    return root


def write_ldm_folder(
    root: Path,
    vae_kind: str = "vq",
    unet_params: dict = TINY_LDM4_UNET,
    seed: int = 0,
    scaling_factor: float = 1.0,
) -> Path:
    """A tiny ``ldm`` folder (``unet/``, ``vae/``, ``scheduler/``; ``diffquant.json`` with the head count)."""
    torch.manual_seed(seed)
    unet = tiny_unet2d(unet_params)
    unet.save_pretrained(root / "unet")
    tiny_vae(vae_kind, unet_params["in_channels"], scaling_factor).save_pretrained(root / "vae")
    ddim().save_pretrained(root / "scheduler")
    meta: dict[str, Any] = {}
    if unet_params.get("num_head_channels", -1) == -1:
        meta["unet_attention_heads"] = unet_params["num_heads"]
    (root / "diffquant.json").write_text(json.dumps(meta))
    return root


def write_class_context_folder(root: Path, num_classes: int = 1000, seed: int = 0) -> Path:
    from diffquant.models.ldm_cond import ClassEmbedder

    torch.manual_seed(seed)
    tiny_cond_unet(cross_attention_dim=16, in_channels=3, heads=1).save_pretrained(root / "unet")
    tiny_vae("vq", 3).save_pretrained(root / "vae")
    ddim().save_pretrained(root / "scheduler")
    ClassEmbedder(num_classes + 1, 16).save_pretrained(root / "class_embedder")
    return root


def tiny_dit(num_classes: int = 1000, layers: int = 2):
    """A ``DiTTransformer2DModel`` on 4×8×8 latents, learned sigma (8 output channels), 16-d tokens."""
    from diffusers import DiTTransformer2DModel

    return DiTTransformer2DModel(
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=4,
        out_channels=8,
        num_layers=layers,
        sample_size=8,
        patch_size=2,
        num_embeds_ada_norm=num_classes,
        norm_num_groups=8,
    ).eval()


def tiny_pixart(caption_channels: int = TEXT_DIM, layers: int = 2):
    """A ``PixArtTransformer2DModel`` on 4×8×8 latents, learned sigma, 16-d tokens."""
    from diffusers import PixArtTransformer2DModel

    return PixArtTransformer2DModel(
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=4,
        out_channels=8,
        num_layers=layers,
        sample_size=8,
        patch_size=2,
        cross_attention_dim=16,
        caption_channels=caption_channels,
        norm_num_groups=8,
    ).eval()


def tiny_t5(tokenizer):
    """A 1-layer ``T5EncoderModel`` (``TEXT_DIM``-d states) over ``tokenizer``'s vocabulary."""
    from transformers import T5Config, T5EncoderModel

    config = T5Config(
        vocab_size=len(tokenizer),
        d_model=TEXT_DIM,
        d_kv=8,
        d_ff=64,
        num_layers=1,
        num_heads=2,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
    )
    return T5EncoderModel(config).eval()


def ddpm_linear():
    """DiT's training schedule (linear betas 1e-4 .. 0.02) as a DDIM scheduler."""
    from diffusers import DDIMScheduler

    return DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear", clip_sample=False)


def write_dit_folder(root: Path, seed: int = 0, num_classes: int = 1000) -> Path:
    """A tiny ``DiTPipeline`` folder at ``root`` (``transformer/``, ``vae/``, ``scheduler/``)."""
    torch.manual_seed(seed)
    randomize(tiny_dit(num_classes), seed).save_pretrained(root / "transformer")
    tiny_vae("kl", 4, 0.5).save_pretrained(root / "vae")
    ddpm_linear().save_pretrained(root / "scheduler")
    return root


def write_pixart_folder(root: Path, seed: int = 0) -> Path:
    """A tiny ``PixArtAlphaPipeline`` folder at ``root`` (+ ``text_encoder/`` and ``tokenizer/``:
    the project's CLIP vocabulary stands in for T5's SentencePiece one)."""
    from diffusers import DPMSolverMultistepScheduler

    torch.manual_seed(seed)
    randomize(tiny_pixart(), seed).save_pretrained(root / "transformer")
    tiny_vae("kl", 4, 0.5).save_pretrained(root / "vae")
    tokenizer = write_tokenizer(root / "tokenizer")
    tiny_t5(tokenizer).save_pretrained(root / "text_encoder")
    DPMSolverMultistepScheduler(num_train_timesteps=1000, beta_schedule="linear").save_pretrained(
        root / "scheduler"
    )
    return root


def write_clip_folder(root: Path, seed: int = 0) -> Path:
    """A tiny random ``CLIPModel`` (32×32 images) with a ``CLIPProcessor`` using the project's vocabulary."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    torch.manual_seed(seed)
    tokenizer = write_tokenizer(root)
    text = dict(
        vocab_size=len(tokenizer),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        max_position_embeddings=16,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    vision = dict(
        image_size=32,
        patch_size=8,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
    )
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).save_pretrained(root)
    processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=processor, tokenizer=tokenizer).save_pretrained(root)
    return root


# ------------------------------------------------------------------------------------ CompVis export
def _inverse_names(names: dict[str, str]) -> dict[str, str]:
    return {v: k for k, v in names.items()}


def _rename(suffix: str, names: dict[str, str]) -> str:
    for new in sorted(names, key=len, reverse=True):
        if suffix == new or suffix.startswith(new + "."):
            return names[new] + suffix[len(new) :]
    raise KeyError(suffix)


def compvis_unet_state(unet: torch.nn.Module, params: dict) -> dict[str, Tensor]:
    """A diffusers UNet's weights under CompVis ``openaimodel.UNetModel`` names (no prefix); the
    q, k, v projections of self-attention blocks fused into CompVis' per-head interleaved ``qkv``."""
    from diffquant.models.compvis_unet import attention_heads

    state = unet.state_dict()
    out: dict[str, Tensor] = {}
    for cv, df, kind in module_map(params):
        keys = [k for k in state if k.startswith(df + ".")]
        assert keys, f"no diffusers weights under {df}"
        for key in keys:
            suffix, value = key[len(df) + 1 :], state[key]
            if kind == "attention" and suffix.split(".")[0] in ("to_q", "to_k", "to_v"):
                if suffix.startswith("to_q."):
                    leaf = suffix[5:]
                    q, k, v = (state[f"{df}.{n}.{leaf}"] for n in ("to_q", "to_k", "to_v"))
                    heads = attention_heads(params, q.shape[0])
                    parts = [t.reshape(heads, q.shape[0] // heads, *q.shape[1:]) for t in (q, k, v)]
                    fused = torch.stack(parts, dim=1).reshape(3 * q.shape[0], *q.shape[1:])
                    out[f"{cv}.qkv.{leaf}"] = fused[..., None] if leaf == "weight" else fused
                continue
            names = {
                "resblock": _inverse_names(RESBLOCK_NAMES),
                "attention": _inverse_names(ATTENTION_NAMES),
                "downsample": {"conv": "op"},
                "upsample": {"conv": "conv"},
            }.get(kind)
            new = suffix if names is None else _rename(suffix, names)
            if kind == "attention" and new.startswith("proj_out.weight"):
                value = value[..., None]
            out[f"{cv}.{new}"] = value
    assert len(out) <= len(state)
    return out


def compvis_vae_state(vae: torch.nn.Module) -> dict[str, Tensor]:
    """A diffusers ``AutoencoderKL``/``VQModel``'s weights under CompVis ``Encoder``/``Decoder`` names."""
    n_up = len(vae.decoder.up_blocks)
    out = {}
    for key, value in vae.state_dict().items():
        new = key
        new = re.sub(r"encoder\.down_blocks\.(\d+)\.resnets\.", r"encoder.down.\1.block.", new)
        new = re.sub(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.downsample.", new)
        new = re.sub(
            r"decoder\.up_blocks\.(\d+)\.resnets\.",
            lambda m: f"decoder.up.{n_up - 1 - int(m.group(1))}.block.",
            new,
        )
        new = re.sub(
            r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.",
            lambda m: f"decoder.up.{n_up - 1 - int(m.group(1))}.upsample.",
            new,
        )
        new = re.sub(r"mid_block\.resnets\.(\d)\.", lambda m: f"mid.block_{int(m.group(1)) + 1}.", new)
        new = new.replace("mid_block.attentions.0.", "mid.attn_1.")
        new = new.replace("conv_shortcut", "nin_shortcut").replace("conv_norm_out", "norm_out")
        if "mid.attn_1." in new:
            new = (
                new.replace("group_norm", "norm")
                .replace("to_q", "q")
                .replace("to_k", "k")
                .replace("to_v", "v")
                .replace("to_out.0", "proj_out")
            )
            if value.ndim == 2:
                value = value[:, :, None, None]
        out[new] = value
    return out


def to_compvis_checkpoint(
    unet,
    unet_params: dict,
    vae,
    beta_start: float,
    beta_end: float,
    scale_factor: float | None = None,
    cond: dict[str, Tensor] | None = None,
) -> dict:
    """A CompVis ``LatentDiffusion`` checkpoint ``{"state_dict": ...}`` of diffusers components."""
    state = {"model.diffusion_model." + k: v for k, v in compvis_unet_state(unet, unet_params).items()}
    state.update({"first_stage_model." + k: v for k, v in compvis_vae_state(vae).items()})
    state["betas"] = torch.linspace(beta_start**0.5, beta_end**0.5, 1000, dtype=torch.float64) ** 2
    if scale_factor is not None:
        state["scale_factor"] = torch.tensor(scale_factor)
    state.update(cond or {})
    return {"state_dict": state, "global_step": 0}


def compvis_original_config(
    unet_params: dict,
    vae,
    first_stage_target: str,
    cond_stage: Any = "__is_unconditional__",
    beta_start: float = 0.0015,
    beta_end: float = 0.0195,
) -> dict:
    """The CompVis YAML (as a dict) describing tiny components."""
    c = vae.config
    dd = {
        "double_z": first_stage_target.endswith("AutoencoderKL"),
        "z_channels": c.latent_channels,
        "resolution": c.sample_size,
        "in_channels": c.in_channels,
        "out_ch": c.out_channels,
        "ch": c.block_out_channels[0],
        "ch_mult": [b // c.block_out_channels[0] for b in c.block_out_channels],
        "num_res_blocks": c.layers_per_block,
        "attn_resolutions": [],
    }
    first = {"target": first_stage_target, "params": {"embed_dim": c.latent_channels, "ddconfig": dd}}
    if "VQ" in first_stage_target:
        first["params"]["n_embed"] = c.num_vq_embeddings
    return {
        "model": {
            "params": {
                "linear_start": beta_start,
                "linear_end": beta_end,
                "timesteps": 1000,
                "unet_config": {"params": unet_params},
                "first_stage_config": first,
                "cond_stage_config": cond_stage,
            }
        }
    }
