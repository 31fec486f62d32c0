"""Train the embedded text-to-image models on the digits and their captions, reproducibly, on a CPU.

Usage::

    python -m diffquant.zoo.train_sd {digits_clip,sd_digits,all} [--out DIR] [--seed 0]
                                     [--steps-scale 1.0] [--threads 2] [--vae DIR]

* ``digits_clip``: a small ``CLIPModel`` (ViT image tower on 32×32 digits, text tower on the
  captions of :mod:`diffquant.zoo.captions`) trained contrastively, with the project's own
  tokenizer vocabulary (:mod:`diffquant.zoo.tokenizer`); written with its ``CLIPProcessor`` to
  ``DIR/digits_clip/``. It is the CLIP model of the embedded ``clip_score``.
* ``sd_digits``: a ``StableDiffusionPipeline`` folder ``DIR/sd_digits/``. As in Stable Diffusion
  the text encoder is the (frozen) text tower of a CLIP model, here ``digits_clip``'s; the
  autoencoder is ``ldm_digits``' (``--vae``; trained with the same recipe when absent); only the
  ``UNet2DConditionModel`` (cross-attention transformer blocks) is trained here, on random
  phrasings of each image's caption, replaced by the empty prompt with probability 0.1 for
  classifier-free guidance. Noise schedule and sampler are Stable Diffusion's (``scaled_linear``
  betas 0.00085–0.012; DDIM with ``leading`` spacing).

``all`` trains ``digits_clip`` first (``sd_digits`` needs its text tower). ``DIR`` defaults to the
package's ``zoo/weights/``. Runs are seeded, use deterministic algorithms and a fixed thread count.
``--steps-scale 0.01`` is a smoke run of a few seconds; the full ``all`` run takes about 12 minutes
on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from diffquant.data.digits import load_digits
from diffquant.zoo.captions import TEMPLATES, all_captions
from diffquant.zoo.tokenizer import save_tokenizer
from diffquant.zoo.train import (
    Progress,
    build_sampling_scheduler,
    build_train_scheduler,
    command_line,
    cosine_lr,
    encode_posteriors,
    parse_training_args,
    random_affine,
    random_batch,
    reproducible,
    scaled_steps,
    set_lr,
    train_eps_denoiser,
    train_vae,
    training_parser,
)

MODULE = "diffquant.zoo.train_sd"
DEFAULT_OUT = Path(__file__).resolve().parent / "weights"
MODELS = ("digits_clip", "sd_digits")

IMAGE_SIZE = 32
NUM_CLASSES = 10
MAX_TOKENS = 16  # tokenizer.model_max_length: start + words + end, padded
LATENT_CHANNELS = 4
LATENT_SIZE = 8

# Stable Diffusion's training noise schedule.
SCHEDULE = dict(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
#: The embedded model's sampler (conf/model/sd_digits.yaml).
SAMPLING = {"num_inference_steps": 20, "guidance_scale": 2.0, "eta": 0.0}


@dataclass(frozen=True)
class ClipRecipe:
    """Hyper-parameters of the contrastive CLIP run (steps are optimizer steps of ``batch_size`` pairs)."""

    steps: int = 1000
    batch_size: int = 256
    lr: float = 2e-3
    weight_decay: float = 0.05
    max_shift_px: float = 2.0
    max_rotate_deg: float = 10.0
    max_scale: float = 0.08


@dataclass(frozen=True)
class SdUnetRecipe:
    """Hyper-parameters of the text-conditioned UNet run (epsilon prediction on scaled VAE latents)."""

    steps: int = 2500
    batch_size: int = 128
    lr: float = 1e-3
    warmup_steps: int = 200
    caption_dropout: float = 0.1  # probability of training on the empty prompt
    ema_decay: float = 0.999
    grad_clip: float = 1.0


def caption_corpus() -> list[str]:
    """Every caption, flattened (the tokenizer's training corpus)."""
    return [c for row in all_captions() for c in row]


def caption_tokens(tokenizer) -> Tensor:
    """Token ids of every caption: ``(10, len(TEMPLATES), MAX_TOKENS)`` int64."""
    ids = tokenizer(
        caption_corpus(), padding="max_length", max_length=MAX_TOKENS, truncation=True, return_tensors="pt"
    ).input_ids
    return ids.reshape(NUM_CLASSES, len(TEMPLATES), MAX_TOKENS)


def to_clip_pixels(images01: Tensor) -> Tensor:
    """Digits ``(N, 1, H, W)`` in [0, 1] → CLIP pixel values ``(N, 3, H, W)``, as the shipped
    ``CLIPImageProcessor`` makes them from uint8 images (rescale 1/255, mean = std = 0.5)."""
    return (images01 * 2 - 1).expand(-1, 3, -1, -1)


# --------------------------------------------------------------------------------------------
# digits_clip
# --------------------------------------------------------------------------------------------


def build_clip(tokenizer):
    """A small CLIP: 2-layer ViT (8×8 patches) and 2-layer text transformer, 64 wide, 64-d embeddings."""
    from transformers import CLIPConfig, CLIPModel

    text = dict(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=MAX_TOKENS,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    vision = dict(
        image_size=IMAGE_SIZE,
        patch_size=8,
        num_channels=3,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
    )
    return CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=64))


def build_clip_processor(tokenizer):
    from transformers import CLIPImageProcessor, CLIPProcessor

    size = {"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    images = CLIPImageProcessor(
        size={"shortest_edge": IMAGE_SIZE}, crop_size=size, image_mean=[0.5] * 3, image_std=[0.5] * 3
    )
    return CLIPProcessor(image_processor=images, tokenizer=tokenizer)


def contrastive_loss(image_emb: Tensor, text_emb: Tensor, labels: Tensor, logit_scale: Tensor) -> Tensor:
    """Symmetric InfoNCE over a batch of ``(N, d)`` embeddings where every pair of the same class is
    a positive (captions of one digit are interchangeable): soft targets spread over those pairs."""
    image_emb = F.normalize(image_emb, dim=-1)
    text_emb = F.normalize(text_emb, dim=-1)
    logits = logit_scale.exp().clamp(max=100) * image_emb @ text_emb.T  # (N, N)
    same = (labels[:, None] == labels[None, :]).float()
    targets = same / same.sum(1, keepdim=True)
    return 0.5 * (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets))


@torch.no_grad()
def clip_zero_shot_accuracy(clip, tokens: Tensor, images01: Tensor, labels: Tensor) -> float:
    """Held-out accuracy of classifying images by their most similar class caption (all phrasings averaged)."""
    clip.eval()
    text = F.normalize(clip.get_text_features(tokens.reshape(-1, MAX_TOKENS)), dim=-1)
    class_emb = F.normalize(text.reshape(NUM_CLASSES, len(TEMPLATES), -1).mean(1), dim=-1)  # (10, d)
    image = F.normalize(clip.get_image_features(to_clip_pixels(images01)), dim=-1)
    return (image @ class_emb.T).argmax(1).eq(labels).float().mean().item()


def train_clip(out_dir: Path, seed: int, steps_scale: float, argv: Sequence[str]) -> dict[str, Any]:
    """Build the tokenizer, train the CLIP model, save both (with the processor) to ``out_dir``."""
    recipe = ClipRecipe()
    steps = scaled_steps(recipe.steps, steps_scale)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = save_tokenizer(caption_corpus(), out_dir, MAX_TOKENS)
    tokens = caption_tokens(tokenizer)
    images, labels = load_digits("train", IMAGE_SIZE)
    gen = torch.Generator().manual_seed(seed + 10)
    torch.manual_seed(seed + 10)
    clip = build_clip(tokenizer).train()
    optimizer = torch.optim.AdamW(clip.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)
    progress = Progress("digits_clip", steps)
    for step in range(steps):
        set_lr(optimizer, cosine_lr(step, steps, recipe.lr, warmup=max(1, steps // 20)))
        idx = random_batch(len(images), recipe.batch_size, gen)
        x = random_affine(images[idx], gen, recipe.max_shift_px, recipe.max_rotate_deg, recipe.max_scale)
        template = torch.randint(0, len(TEMPLATES), (len(idx),), generator=gen)
        text = tokens[labels[idx], template]  # (B, MAX_TOKENS)
        out = clip(input_ids=text, pixel_values=to_clip_pixels(x))
        loss = contrastive_loss(out.image_embeds, out.text_embeds, labels[idx], clip.logit_scale)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        progress.update(step + 1, loss=loss.item(), scale=clip.logit_scale.exp().item())
    clip.eval()
    held, held_labels = load_digits("heldout", IMAGE_SIZE)
    meta = {
        "command": command_line(argv, MODULE),
        "seed": seed,
        "steps": steps,
        "seconds": round(progress.elapsed(), 1),
        "final_loss": round(loss.item(), 5),
        "heldout_zero_shot_accuracy": round(clip_zero_shot_accuracy(clip, tokens, held, held_labels), 5),
        "recipe": asdict(recipe),
        "num_parameters": sum(p.numel() for p in clip.parameters()),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }
    clip.save_pretrained(out_dir, safe_serialization=True)
    build_clip_processor(tokenizer).save_pretrained(out_dir)
    (out_dir / "diffquant.json").write_text(json.dumps({"train": meta}, indent=2) + "\n")
    print(
        f"[digits_clip] held-out zero-shot accuracy {meta['heldout_zero_shot_accuracy']:.4f} -> {out_dir}",
        flush=True,
    )
    return meta


# --------------------------------------------------------------------------------------------
# sd_digits
# --------------------------------------------------------------------------------------------


def build_unet():
    """The text-conditioned ``UNet2DConditionModel`` on (N, 4, 8, 8) latents: two levels (32, 64
    channels), a self- and cross-attention transformer block after every ResNet block, 2 heads."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=LATENT_SIZE,
        in_channels=LATENT_CHANNELS,
        out_channels=LATENT_CHANNELS,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(32, 64),
        layers_per_block=1,
        cross_attention_dim=64,
        attention_head_dim=2,  # diffusers' legacy name: the number of heads
        norm_num_groups=8,
    )


def load_text_encoder(clip_dir: Path):
    """``digits_clip``'s text tower as a ``CLIPTextModel`` (frozen) and its tokenizer."""
    from transformers import CLIPModel, CLIPTextModel, CLIPTokenizer

    clip = CLIPModel.from_pretrained(clip_dir, local_files_only=True)
    text_encoder = CLIPTextModel(clip.config.text_config)
    text_encoder.load_state_dict({k: v for k, v in clip.state_dict().items() if k.startswith("text_model.")})
    return text_encoder.eval().requires_grad_(False), CLIPTokenizer.from_pretrained(clip_dir)


def load_or_train_vae(vae_dir: Path, seed: int, steps_scale: float) -> tuple[Any, dict[str, Any]]:
    """``ldm_digits``' autoencoder from ``vae_dir``, or (absent) one trained with its recipe and seed,
    with ``scaling_factor`` = 1 / std of the training latents."""
    from diffusers import AutoencoderKL

    if (vae_dir / "config.json").is_file():
        vae = AutoencoderKL.from_pretrained(vae_dir, local_files_only=True)
        source = (
            f"zoo:{vae_dir.relative_to(DEFAULT_OUT)}" if vae_dir.is_relative_to(DEFAULT_OUT) else str(vae_dir)
        )
        return vae.eval().requires_grad_(False), {"source": source}
    print(f"[sd_digits] no autoencoder at {vae_dir}: training one with ldm_digits' recipe", flush=True)
    vae, meta = train_vae(seed, steps_scale)
    images, _ = load_digits("train", IMAGE_SIZE)
    mean, _ = encode_posteriors(vae, images)
    vae.register_to_config(scaling_factor=1.0 / mean.std().item())
    return vae.eval().requires_grad_(False), {"source": "trained (ldm_digits recipe)", **meta}


@torch.no_grad()
def caption_states(text_encoder, tokens: Tensor, empty: Tensor) -> tuple[Tensor, Tensor]:
    """Text-encoder states of every caption ``(10, T, L, D)`` and of the empty prompt ``(L, D)``."""
    states = text_encoder(tokens.reshape(-1, MAX_TOKENS))[0]
    return states.reshape(*tokens.shape, -1), text_encoder(empty[None])[0][0]


def train_sd_unet(
    lat_mean: Tensor,
    lat_std: Tensor,
    labels: Tensor,
    states: Tensor,
    empty_state: Tensor,
    seed: int,
    steps_scale: float,
    recipe: SdUnetRecipe = SdUnetRecipe(),
) -> tuple[nn.Module, dict]:
    """Train the UNet on scaled latents ``(N, 4, 8, 8)`` with random caption phrasings; return the EMA model."""
    gen = torch.Generator().manual_seed(seed + 20)
    torch.manual_seed(seed + 20)
    unet = build_unet().train()

    def predict(unet: nn.Module, zt: Tensor, t: Tensor, idx: Tensor, gen: torch.Generator) -> Tensor:
        template = torch.randint(0, len(TEMPLATES), (len(idx),), generator=gen)
        context = states[labels[idx], template]  # (B, L, D)
        dropped = torch.rand(len(idx), generator=gen) < recipe.caption_dropout
        context = torch.where(dropped[:, None, None], empty_state.expand_as(context), context)
        return unet(zt, t, encoder_hidden_states=context).sample

    steps = scaled_steps(recipe.steps, steps_scale)
    ema, stats = train_eps_denoiser(
        unet,
        predict,
        lat_mean,
        lat_std,
        build_train_scheduler(SCHEDULE),
        recipe,
        steps,
        gen,
        "sd_digits/unet",
    )
    meta = {
        "steps": stats["steps"],
        "seconds": stats["seconds"],
        "final_loss_avg": stats["final_loss_avg"],
        "recipe": asdict(recipe),
        "num_parameters": sum(p.numel() for p in unet.parameters()),
    }
    return ema, meta


def train_sd(
    out_dir: Path, clip_dir: Path, vae_dir: Path, seed: int, steps_scale: float, argv: Sequence[str]
) -> dict[str, Any]:
    """Assemble and train ``sd_digits``; write the ``StableDiffusionPipeline`` folder ``out_dir``."""
    from diffusers import StableDiffusionPipeline

    if not (clip_dir / "config.json").is_file():
        raise FileNotFoundError(
            f"sd_digits needs digits_clip's text tower at {clip_dir}: run "
            "`python -m diffquant.zoo.train_sd digits_clip` first (or `all`)."
        )
    start = time.perf_counter()
    text_encoder, tokenizer = load_text_encoder(clip_dir)
    vae, vae_meta = load_or_train_vae(vae_dir, seed, steps_scale)
    images, labels = load_digits("train", IMAGE_SIZE)
    lat_mean, lat_std = encode_posteriors(vae, images)  # (1437, 4, 8, 8) each
    scale = vae.config.scaling_factor
    empty = tokenizer("", padding="max_length", max_length=MAX_TOKENS, return_tensors="pt").input_ids[0]
    states, empty_state = caption_states(text_encoder, caption_tokens(tokenizer), empty)
    unet, unet_meta = train_sd_unet(
        lat_mean * scale, lat_std * scale, labels, states, empty_state, seed, steps_scale
    )
    if out_dir.exists():
        shutil.rmtree(out_dir)
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=build_sampling_scheduler(SCHEDULE),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(out_dir, safe_serialization=True)
    meta = {
        "family": "sd",
        "image_size": IMAGE_SIZE,
        "latent_shape": [LATENT_CHANNELS, LATENT_SIZE, LATENT_SIZE],
        "scaling_factor": scale,
        "sampling": SAMPLING,
        "prompts": "assets:prompts/digits.txt",
        "train": {
            "command": command_line(argv, MODULE),
            "seed": seed,
            "steps_scale": steps_scale,
            "seconds": round(time.perf_counter() - start, 1),
            "text_encoder": f"text tower of {clip_dir.name}",
            "vae": vae_meta,
            "unet": unet_meta,
            "noise_schedule": {**SCHEDULE, "prediction_type": "epsilon"},
            "data": "sklearn digits, train split (1437 images), 32x32; captions: diffquant.zoo.captions",
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
        },
    }
    (out_dir / "diffquant.json").write_text(json.dumps(meta, indent=2) + "\n")
    print(f"[sd_digits] wrote {out_dir} ({meta['train']['seconds']:.0f} s)", flush=True)
    return meta


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


def add_vae_option(parser: argparse.ArgumentParser) -> None:
    """``--vae DIR``: the autoencoder to reuse (see :func:`load_or_train_vae`)."""
    parser.add_argument(
        "--vae",
        type=Path,
        default=None,
        help="autoencoder folder to reuse (default: OUT/ldm_digits/vae, trained if absent)",
    )


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    """Parse the command line (see the module docstring)."""
    parser = training_parser(MODULE, __doc__, MODELS, DEFAULT_OUT)
    add_vae_option(parser)
    return parse_training_args(parser, argv)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    names = MODELS if args.model == "all" else (args.model,)
    results: dict[str, Any] = {}
    start = time.perf_counter()
    with reproducible(args.seed, args.threads):
        for name in names:
            if name == "digits_clip":
                results[name] = train_clip(args.out / "digits_clip", args.seed, args.steps_scale, argv)
            else:
                vae_dir = args.vae or args.out / "ldm_digits" / "vae"
                results[name] = train_sd(
                    args.out / "sd_digits",
                    args.out / "digits_clip",
                    vae_dir,
                    args.seed,
                    args.steps_scale,
                    argv,
                )
    print(f"done in {time.perf_counter() - start:.0f} s", flush=True)
    return results


if __name__ == "__main__":
    main()
