"""Convert the papers' CompVis checkpoints into folders the model configs load.

Usage::

    python -m diffquant.models.convert MODEL --ckpt model.ckpt --out DIR [--original-config cfg.yaml]
                                       [--ema] [--clip openai/clip-vit-large-patch14]
    python -m diffquant.models.convert ldm_celebahq --hub CompVis/ldm-celebahq-256 --out DIR
    python -m diffquant.models.convert ldm_bedroom --random 0 --out DIR

``--random SEED`` writes the same folder with seeded random weights and no checkpoint (the
self-attention LDMs ``ldm_bedroom``, ``ldm_church``, ``ldm_celebahq``): the paper-size cost of
every step of a run can be measured without the weights (``make bench-paper-size``); its
``diffquant.json`` says ``"random": true``.

then run with ``model=MODEL model.pretrained=DIR``. ``MODEL`` is one of

=============== =================================================== ===================================
MODEL           checkpoint (ommer-lab / CompVis model zoo)           folder (family)
=============== =================================================== ===================================
ldm_bedroom     ``lsun_bedrooms.zip`` → ``model.ckpt`` (LDM-4 VQ-f4) ``unet vae scheduler`` (``ldm``)
ldm_church      ``lsun_churches.zip`` → ``model.ckpt`` (LDM-8 KL-f8) same, + head count (``ldm_compvis``)
ldm_celebahq    ``celeba.zip`` → ``model.ckpt``, or ``--hub``        ``unet vae scheduler`` (``ldm``)
ldm_imagenet    ``cin256-v2.ckpt`` (LDM-4 VQ-f4, class context)     + ``class_embedder`` (``ldm_class_context``)
sd_v1_4         ``sd-v1-4.ckpt``                                    StableDiffusionPipeline (``sd``)
=============== =================================================== ===================================

How each part is converted:

* Stable Diffusion and ImageNet UNets (``SpatialTransformer`` blocks) → ``UNet2DConditionModel``
  with diffusers' own single-file conversion (``create_unet_diffusers_config_from_ldm``,
  ``convert_ldm_unet_checkpoint``);
* the self-attention LDM UNets, which diffusers cannot convert from a checkpoint →
  ``UNet2DModel`` through :mod:`diffquant.models.compvis_unet`;
* autoencoders (KL or VQ) → ``AutoencoderKL`` / ``VQModel`` with diffusers'
  ``convert_ldm_vae_checkpoint`` (+ the VQ codebook); the latent scale is the checkpoint's
  ``scale_factor`` (1.0 for the VQ models);
* the noise schedule is read from the checkpoint's ``betas`` and written as the CompVis-equivalent
  DDIM (``scaled_linear``, ``leading`` spacing, ``steps_offset=1``; PNDM for Stable Diffusion);
* the ImageNet class embedding → :class:`~diffquant.models.ldm_cond.ClassEmbedder`; the SD text
  encoder → ``CLIPTextModel`` with the config and tokenizer of ``--clip``.

Architectures come from :data:`~diffquant.models.compvis_configs.ORIGINAL_CONFIGS` unless
``--original-config`` names the checkpoint's YAML. Only convert checkpoints you trust: ``.ckpt``
files are pickles.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from diffquant.models.compvis_configs import IMAGE_SIZES, ORIGINAL_CONFIGS, original_config
from diffquant.models.compvis_unet import convert_unet2d_state_dict, fixed_head_count, unet2d_config

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLASS_EMBEDDING_KEY = "cond_stage_model.embedding.weight"
MODELS = tuple(ORIGINAL_CONFIGS)


# ------------------------------------------------------------------------------------ reading
def load_checkpoint(path: Path) -> dict[str, Tensor]:
    """The flat state dict of a CompVis ``.ckpt`` (its ``state_dict``) or ``.safetensors`` file."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    return dict(ckpt.get("state_dict", ckpt))


def read_original_config(model: str, path: Path | None) -> dict:
    """``--original-config`` (a CompVis YAML) or the built-in original config of ``model``."""
    if path is None:
        return original_config(model)
    import yaml

    return yaml.safe_load(Path(path).read_text())


def unet_state(state: dict[str, Tensor], ema: bool) -> dict[str, Tensor]:
    """The UNet weights without the ``model.diffusion_model.`` prefix; ``ema``: the EMA copy
    (``model_ema.<name without dots>``), which CompVis checkpoints may also hold."""
    keys = [k for k in state if k.startswith(UNET_PREFIX)]
    if not ema:
        return {k[len(UNET_PREFIX) :]: state[k] for k in keys}
    ema_keys = {k: "model_ema." + k[len("model.") :].replace(".", "") for k in keys}
    missing = [e for e in ema_keys.values() if e not in state]
    if missing:
        raise KeyError(f"--ema: the checkpoint has no EMA weights (e.g. {missing[0]}); drop --ema.")
    return {k[len(UNET_PREFIX) :]: state[e] for k, e in ema_keys.items()}


def noise_schedule(state: dict[str, Tensor], params: dict) -> dict[str, Any]:
    """``num_train_timesteps``, ``beta_start``, ``beta_end`` of the ``scaled_linear`` schedule: from
    the checkpoint's ``betas`` buffer when present, else from the original config."""
    if "betas" in state:
        betas = state["betas"].double()
        return {
            "num_train_timesteps": len(betas),
            "beta_start": round(float(betas[0]), 8),
            "beta_end": round(float(betas[-1]), 8),
        }
    return {
        "num_train_timesteps": params.get("timesteps", 1000),
        "beta_start": params["linear_start"],
        "beta_end": params["linear_end"],
    }


def latent_scale(state: dict[str, Tensor], params: dict) -> float:
    """The latent scaling factor: the checkpoint's ``scale_factor`` (``scale_by_std`` models), else the
    config's, else 1.0 (CompVis ``LatentDiffusion``'s default)."""
    if "scale_factor" in state:
        return float(state["scale_factor"])
    return float(params.get("scale_factor", 1.0))


# ------------------------------------------------------------------------------------ parts
def convert_vae(state: dict[str, Tensor], first_stage: dict, scaling_factor: float):
    """The first-stage model as ``VQModel`` (CompVis ``VQModelInterface``) or ``AutoencoderKL``."""
    from diffusers import VQModel
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    cls, config = vae_config(first_stage, scaling_factor)
    weights = convert_ldm_vae_checkpoint(state, config)
    if cls is VQModel:
        weights["quantize.embedding.weight"] = state[VAE_PREFIX + "quantize.embedding.weight"]
    vae = cls(**config)
    vae.load_state_dict(weights, strict=True)
    return vae


def vae_config(first_stage: dict, scaling_factor: float) -> tuple[type, dict[str, Any]]:
    """The diffusers class (``VQModel`` or ``AutoencoderKL``) and config of a CompVis first stage."""
    from diffusers import AutoencoderKL, VQModel

    params = first_stage["params"]
    dd = params["ddconfig"]
    if dd.get("attn_resolutions"):
        raise NotImplementedError("autoencoders with attention outside the mid block are not supported")
    n = len(dd["ch_mult"])
    config: dict[str, Any] = {
        "in_channels": dd["in_channels"],
        "out_channels": dd["out_ch"],
        "down_block_types": ["DownEncoderBlock2D"] * n,
        "up_block_types": ["UpDecoderBlock2D"] * n,
        "block_out_channels": [dd["ch"] * m for m in dd["ch_mult"]],
        "layers_per_block": dd["num_res_blocks"],
        "latent_channels": dd["z_channels"],
        "sample_size": dd["resolution"],
        "scaling_factor": scaling_factor,
    }
    if "VQ" in first_stage["target"]:
        return VQModel, {
            **config,
            "num_vq_embeddings": params["n_embed"],
            "vq_embed_dim": params["embed_dim"],
        }
    return AutoencoderKL, config


def convert_unet(state: dict[str, Tensor], config: dict, image_size: int, ema: bool):
    """``UNet2DConditionModel`` (spatial-transformer UNets) or ``UNet2DModel`` (self-attention UNets),
    and the fixed head count to record for the latter (None if heads have a fixed width)."""
    from diffusers import UNet2DConditionModel, UNet2DModel

    unet_params = config["model"]["params"]["unet_config"]["params"]
    vae_factor = 2 ** (
        len(config["model"]["params"]["first_stage_config"]["params"]["ddconfig"]["ch_mult"]) - 1
    )
    sample_size = image_size // vae_factor
    weights = unet_state(state, ema)
    if unet_params.get("use_spatial_transformer"):
        from diffusers.loaders.single_file_utils import (
            convert_ldm_unet_checkpoint,
            create_unet_diffusers_config_from_ldm,
        )

        unet_config = create_unet_diffusers_config_from_ldm(config, state)
        unet_config["sample_size"] = sample_size
        unet = UNet2DConditionModel(**unet_config)
        prefixed = {UNET_PREFIX + k: v for k, v in weights.items()}
        unet.load_state_dict(convert_ldm_unet_checkpoint(prefixed, unet_config), strict=True)
        return unet, None
    unet = UNet2DModel(**unet2d_config(unet_params, sample_size))
    unet.load_state_dict(convert_unet2d_state_dict(weights, unet_params), strict=True)
    return unet, fixed_head_count(unet_params)


def ddim_scheduler(schedule: dict[str, Any]):
    """CompVis' DDIM sampler in diffusers terms (uniform ``leading`` timesteps, ``steps_offset=1``)."""
    from diffusers import DDIMScheduler

    return DDIMScheduler(
        **schedule,
        beta_schedule="scaled_linear",
        prediction_type="epsilon",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        timestep_spacing="leading",
    )


def plms_scheduler(schedule: dict[str, Any]):
    """CompVis' PLMS sampler in diffusers terms (``PNDMScheduler`` without Runge-Kutta warm-up)."""
    from diffusers import PNDMScheduler

    return PNDMScheduler(
        **schedule, beta_schedule="scaled_linear", skip_prk_steps=True, set_alpha_to_one=False, steps_offset=1
    )


def convert_class_embedder(state: dict[str, Tensor]):
    from diffquant.models.ldm_cond import ClassEmbedder

    weight = state[CLASS_EMBEDDING_KEY]
    embedder = ClassEmbedder(num_embeddings=weight.shape[0], embed_dim=weight.shape[1])
    embedder.embedding.weight.data.copy_(weight)
    return embedder


def convert_text_encoder(state: dict[str, Tensor], clip: str):
    """The SD text encoder (``cond_stage_model.transformer.*``) as ``CLIPTextModel`` with the config of
    ``clip`` (hub id or folder with a CLIP or CLIP-text ``config.json``), and ``clip``'s tokenizer."""
    from diffusers.loaders.single_file_utils import convert_ldm_clip_checkpoint
    from transformers import CLIPConfig, CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    try:
        config = CLIPTextConfig.from_pretrained(clip)
    except (OSError, ValueError):
        config = CLIPConfig.from_pretrained(clip).text_config
    if config.model_type != "clip_text_model":
        config = CLIPConfig.from_pretrained(clip).text_config
    text_encoder = CLIPTextModel(config)
    weights = {k: v for k, v in convert_ldm_clip_checkpoint(state).items() if not k.endswith("position_ids")}
    text_encoder.load_state_dict(weights, strict=True)
    tokenizer = (
        CLIPTokenizer.from_pretrained(clip, subfolder="tokenizer")
        if (Path(clip) / "tokenizer").is_dir()
        else CLIPTokenizer.from_pretrained(clip)
    )
    return text_encoder, tokenizer


# ------------------------------------------------------------------------------------ whole models
def convert_checkpoint(
    model: str,
    ckpt: Path,
    out: Path,
    config_path: Path | None = None,
    ema: bool = False,
    clip: str = "openai/clip-vit-large-patch14",
    image_size: int | None = None,
    command: str = "",
) -> Path:
    """Convert ``ckpt`` of ``model`` into the folder ``out`` (see the module docstring)."""
    config = read_original_config(model, config_path)
    params = config["model"]["params"]
    state = load_checkpoint(ckpt)
    image_size = image_size or IMAGE_SIZES[model]
    schedule = noise_schedule(state, params)
    vae = convert_vae(state, params["first_stage_config"], latent_scale(state, params))
    unet, heads = convert_unet(state, config, image_size, ema)
    meta: dict[str, Any] = {
        "model": model,
        "source": str(ckpt),
        "ema": ema,
        "image_size": image_size,
        "noise_schedule": schedule,
        "converted_by": command,
    }
    out = Path(out)
    if model == "sd_v1_4":
        from diffusers import StableDiffusionPipeline

        text_encoder, tokenizer = convert_text_encoder(state, clip)
        pipe = StableDiffusionPipeline(
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            unet=unet,
            scheduler=plms_scheduler(schedule),
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
        pipe.save_pretrained(out, safe_serialization=True)
    else:
        out.mkdir(parents=True, exist_ok=True)
        unet.save_pretrained(out / "unet", safe_serialization=True)
        vae.save_pretrained(out / "vae", safe_serialization=True)
        ddim_scheduler(schedule).save_pretrained(out / "scheduler")
        if CLASS_EMBEDDING_KEY in state:
            embedder = convert_class_embedder(state)
            embedder.save_pretrained(out / "class_embedder", safe_serialization=True)
            meta.update(num_classes=embedder.null_class, null_class=embedder.null_class)
    if heads is not None:
        meta["unet_attention_heads"] = heads
    (out / "diffquant.json").write_text(json.dumps(meta, indent=2) + "\n")
    return out


def random_ldm(
    model: str,
    seed: int,
    out: Path,
    config_path: Path | None = None,
    image_size: int | None = None,
    command: str = "",
) -> Path:
    """The folder :func:`convert_checkpoint` writes for the self-attention LDM ``model``, with
    seeded random weights (UNet and autoencoder, the codebook included) and the original
    config's noise schedule (default image size: the paper's)."""
    from diffusers import UNet2DModel

    config = read_original_config(model, config_path)
    image_size = image_size or IMAGE_SIZES[model]
    params = config["model"]["params"]
    unet_params = params["unet_config"]["params"]
    if params.get("cond_stage_config") != "__is_unconditional__":
        raise ValueError(
            f"--random: {model} is not a self-attention LDM; use ldm_bedroom, ldm_church or ldm_celebahq"
        )
    first_stage = params["first_stage_config"]
    factor = 2 ** (len(first_stage["params"]["ddconfig"]["ch_mult"]) - 1)
    schedule = noise_schedule({}, params)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        unet = UNet2DModel(**unet2d_config(unet_params, image_size // factor))
        cls, vae_cfg = vae_config(first_stage, params.get("scale_factor", 1.0))
        vae = cls(**vae_cfg)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    unet.save_pretrained(out / "unet", safe_serialization=True)
    vae.save_pretrained(out / "vae", safe_serialization=True)
    ddim_scheduler(schedule).save_pretrained(out / "scheduler")
    meta: dict[str, Any] = {
        "model": model,
        "random": True,
        "seed": seed,
        "image_size": image_size,
        "noise_schedule": schedule,
        "converted_by": command,
    }
    heads = fixed_head_count(unet_params)
    if heads is not None:
        meta["unet_attention_heads"] = heads
    (out / "diffquant.json").write_text(json.dumps(meta, indent=2) + "\n")
    return out


def fetch_hub_ldm(hub_id: str, out: Path, command: str = "") -> Path:
    """Re-lay a diffusers ``LDMPipeline`` of the hub (``unet``, ``vqvae``, ``scheduler``) as an ``ldm``
    folder: ``vae/`` with the VQ models' latent scale 1.0, and the CompVis-equivalent DDIM."""
    from diffusers import DDIMScheduler, UNet2DModel, VQModel

    out = Path(out)
    unet = UNet2DModel.from_pretrained(hub_id, subfolder="unet")
    vae = VQModel.from_pretrained(hub_id, subfolder="vqvae")
    vae.register_to_config(scaling_factor=1.0)
    hub_scheduler = DDIMScheduler.from_pretrained(hub_id, subfolder="scheduler")
    schedule = {k: hub_scheduler.config[k] for k in ("num_train_timesteps", "beta_start", "beta_end")}
    unet.save_pretrained(out / "unet", safe_serialization=True)
    vae.save_pretrained(out / "vae", safe_serialization=True)
    ddim_scheduler(schedule).save_pretrained(out / "scheduler")
    meta = {"source": hub_id, "noise_schedule": schedule, "converted_by": command}
    (out / "diffquant.json").write_text(json.dumps(meta, indent=2) + "\n")
    return out


# ------------------------------------------------------------------------------------ command line
def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m diffquant.models.convert",
        description="Convert a CompVis checkpoint into a folder for model.pretrained.",
    )
    parser.add_argument("model", choices=MODELS)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--ckpt", type=Path, help="the CompVis .ckpt (or .safetensors)")
    source.add_argument("--hub", help="a diffusers LDMPipeline hub id or folder (ldm_celebahq)")
    source.add_argument(
        "--random",
        type=int,
        metavar="SEED",
        help="no checkpoint: seeded random weights (self-attention LDMs)",
    )
    parser.add_argument("--out", type=Path, required=True, help="output folder (model.pretrained=OUT)")
    parser.add_argument(
        "--original-config",
        type=Path,
        default=None,
        help="the checkpoint's CompVis YAML (default: the released config of MODEL)",
    )
    parser.add_argument("--ema", action="store_true", help="use the checkpoint's EMA UNet weights")
    parser.add_argument(
        "--clip",
        default="openai/clip-vit-large-patch14",
        help="sd_v1_4: CLIP text config and tokenizer (hub id or folder)",
    )
    parser.add_argument("--image-size", type=int, default=None, help="pixels (default: the paper's)")
    args = parser.parse_args(argv)
    if args.hub and args.model != "ldm_celebahq":
        parser.error("--hub is for ldm_celebahq (the only one of these LDMs published in diffusers format)")
    return args


def main(argv: Sequence[str] | None = None) -> Path:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    command = "python -m diffquant.models.convert " + " ".join(shlex.quote(a) for a in argv)
    if args.hub:
        out = fetch_hub_ldm(args.hub, args.out, command)
    elif args.random is not None:
        out = random_ldm(args.model, args.random, args.out, args.original_config, args.image_size, command)
    else:
        out = convert_checkpoint(
            args.model,
            args.ckpt,
            args.out,
            args.original_config,
            args.ema,
            args.clip,
            args.image_size,
            command,
        )
    print(f"wrote {out}; run with: model={args.model} model.pretrained={out}")
    return out


if __name__ == "__main__":
    main()
