"""Train the embedded class-conditional diffusion transformer ``dit_digits``, reproducibly, on a CPU.

Usage::

    python -m diffquant.zoo.train_dit dit_digits [--out DIR] [--seed 0] [--steps-scale 1.0]
                                      [--threads 1] [--vae DIR]

``dit_digits`` is a ``DiTPipeline`` folder ``DIR/dit_digits/{transformer,vae,scheduler}/``,
``model_index.json`` and ``diffquant.json``: a ``DiTTransformer2DModel`` (patch 2 on ``ldm_digits``' 4×8×8 latents, so 16
tokens; adaLN-Zero blocks conditioned on the time step and the class, labels 0..9 plus the null
class 10 of classifier-free guidance) trained with ε-prediction on DiT's noise schedule (linear
betas 1e-4 to 0.02 over 1000 steps), and ``ldm_digits``' autoencoder (``--vae``; trained with its
recipe when absent). Labels are replaced by the null class with probability 0.1, once per
sample for all blocks (diffusers gives every block its own label embedding with its own dropout,
which would drop the label in some blocks and not others; DiT has one shared embedder).
The sampler shipped is DDIM 20 steps, eta 0, as ``ldm_digits``'.

``DIR`` defaults to the package's ``zoo/weights/``. Runs are seeded, use deterministic algorithms
and a fixed thread count; ``--steps-scale 0.01`` is a smoke run of a few seconds.
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
from torch import Tensor, nn

from diffquant.data.digits import load_digits
from diffquant.zoo.train import (
    NULL_CLASS,
    NUM_CLASSES,
    build_sampling_scheduler,
    build_train_scheduler,
    command_line,
    drop_labels,
    encode_posteriors,
    parse_training_args,
    reproducible,
    scaled_steps,
    train_eps_denoiser,
    training_parser,
)
from diffquant.zoo.train_sd import add_vae_option, load_or_train_vae

MODULE = "diffquant.zoo.train_dit"
DEFAULT_OUT = Path(__file__).resolve().parent / "weights"
MODELS = ("dit_digits",)

IMAGE_SIZE = 32
LATENT_CHANNELS = 4
LATENT_SIZE = 8

#: DiT's training noise schedule (Peebles & Xie: linear betas, 1000 steps).
SCHEDULE = dict(num_train_timesteps=1000, beta_schedule="linear", beta_start=0.0001, beta_end=0.02)
#: The embedded model's sampler (conf/model/dit_digits.yaml).
SAMPLING = {"num_inference_steps": 20, "guidance_scale": 2.0, "eta": 0.0}


@dataclass(frozen=True)
class DitArchitecture:
    """``DiTTransformer2DModel`` arguments: width = heads × head_dim."""

    num_layers: int = 6
    num_attention_heads: int = 4
    attention_head_dim: int = 32
    patch_size: int = 2


@dataclass(frozen=True)
class DitRecipe:
    """Hyper-parameters of the transformer run (steps are optimizer steps of ``batch_size`` latents)."""

    steps: int = 4000
    batch_size: int = 128
    lr: float = 5e-4
    warmup_steps: int = 200
    label_dropout: float = 0.1
    ema_decay: float = 0.999
    grad_clip: float = 1.0


def build_transformer(arch: DitArchitecture = DitArchitecture()):
    """The class-conditional ``DiTTransformer2DModel`` on (N, 4, 8, 8) latents, predicting ε (4 channels)."""
    from diffusers import DiTTransformer2DModel

    return DiTTransformer2DModel(
        num_attention_heads=arch.num_attention_heads,
        attention_head_dim=arch.attention_head_dim,
        in_channels=LATENT_CHANNELS,
        out_channels=LATENT_CHANNELS,
        num_layers=arch.num_layers,
        sample_size=LATENT_SIZE,
        patch_size=arch.patch_size,
        num_embeds_ada_norm=NUM_CLASSES,  # label table rows 0..9 + the null class 10
        dropout=0.0,
    )


def shared_label_dropout(transformer: nn.Module) -> None:
    """Turn off the per-block label dropout of diffusers' ``LabelEmbedding`` (dropped once per sample instead)."""
    from diffusers.models.embeddings import LabelEmbedding

    for module in transformer.modules():
        if isinstance(module, LabelEmbedding):
            assert module.embedding_table.num_embeddings == NULL_CLASS + 1
            module.dropout_prob = 0.0


def train_transformer(
    lat_mean: Tensor,
    lat_std: Tensor,
    labels: Tensor,
    seed: int,
    steps_scale: float,
    recipe: DitRecipe = DitRecipe(),
) -> tuple[nn.Module, dict[str, Any]]:
    """Train the ε-prediction DiT on scaled latents ``(N, 4, 8, 8)``; return the EMA model and metadata."""
    gen = torch.Generator().manual_seed(seed + 30)
    torch.manual_seed(seed + 30)
    transformer = build_transformer().train()
    shared_label_dropout(transformer)

    def predict(model: nn.Module, zt: Tensor, t: Tensor, idx: Tensor, gen: torch.Generator) -> Tensor:
        y = drop_labels(labels[idx], recipe.label_dropout, gen)
        return model(zt, timestep=t, class_labels=y).sample

    steps = scaled_steps(recipe.steps, steps_scale)
    ema, stats = train_eps_denoiser(
        transformer,
        predict,
        lat_mean,
        lat_std,
        build_train_scheduler(SCHEDULE),
        recipe,
        steps,
        gen,
        "dit_digits/transformer",
    )
    meta = {
        "steps": stats["steps"],
        "seconds": stats["seconds"],
        "final_loss_avg": stats["final_loss_avg"],
        "recipe": asdict(recipe),
        "architecture": asdict(DitArchitecture()),
        "num_parameters": sum(p.numel() for p in transformer.parameters()),
    }
    return ema, meta


def write_pipeline(out_dir: Path, transformer: nn.Module, vae: nn.Module) -> None:
    """Save ``transformer``, ``vae`` and the sampler as a ``DiTPipeline`` folder (``model_index.json``
    with ``id2label`` included, so ``DiTPipeline.from_pretrained(out_dir)`` loads it like
    ``facebook/DiT-XL-2-256``; that pipeline's ``__call__`` takes the null class to be 1000, so
    guided sampling of this 10-class model goes through diffquant's ``dit`` wrapper)."""
    from diffusers import DiTPipeline

    if out_dir.exists():
        shutil.rmtree(out_dir)
    pipe = DiTPipeline(
        transformer=transformer,
        vae=vae,
        scheduler=build_sampling_scheduler(SCHEDULE),
    )
    pipe.register_to_config(id2label={str(i): str(i) for i in range(NUM_CLASSES)})  # as DiT-XL-2-256's
    pipe.save_pretrained(out_dir, safe_serialization=True)


def train_dit(
    out_dir: Path, vae_dir: Path, seed: int, steps_scale: float, argv: Sequence[str]
) -> dict[str, Any]:
    """Train ``dit_digits``' transformer on ``ldm_digits``' latents; write the ``DiTPipeline`` folder ``out_dir``."""
    start = time.perf_counter()
    vae, vae_meta = load_or_train_vae(vae_dir, seed, steps_scale)
    images, labels = load_digits("train", IMAGE_SIZE)
    lat_mean, lat_std = encode_posteriors(vae, images)  # (1437, 4, 8, 8) each
    scale = vae.config.scaling_factor
    transformer, meta_t = train_transformer(lat_mean * scale, lat_std * scale, labels, seed, steps_scale)
    write_pipeline(out_dir, transformer, vae)
    meta = {
        "family": "dit",
        "num_classes": NUM_CLASSES,
        "null_class": NULL_CLASS,
        "image_size": IMAGE_SIZE,
        "latent_shape": [LATENT_CHANNELS, LATENT_SIZE, LATENT_SIZE],
        "scaling_factor": scale,
        "sampling": SAMPLING,
        "train": {
            "command": command_line(argv, MODULE),
            "seed": seed,
            "steps_scale": steps_scale,
            "seconds": round(time.perf_counter() - start, 1),
            "vae": vae_meta,
            "transformer": meta_t,
            "noise_schedule": {**SCHEDULE, "prediction_type": "epsilon"},
            "data": "sklearn digits, train split (1437 images), 32x32, ldm_digits' autoencoder latents",
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
        },
    }
    (out_dir / "diffquant.json").write_text(json.dumps(meta, indent=2) + "\n")
    print(f"[dit_digits] wrote {out_dir} ({meta['train']['seconds']:.0f} s)", flush=True)
    return meta


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    """Parse the command line (see the module docstring)."""
    parser = training_parser(MODULE, __doc__, MODELS, DEFAULT_OUT)
    add_vae_option(parser)
    return parse_training_args(parser, argv)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Train ``dit_digits``; return ``{"dit_digits": metadata}``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    start = time.perf_counter()
    with reproducible(args.seed, args.threads):
        vae_dir = args.vae or args.out / "ldm_digits" / "vae"
        result = {
            "dit_digits": train_dit(args.out / "dit_digits", vae_dir, args.seed, args.steps_scale, argv)
        }
    print(f"done in {time.perf_counter() - start:.0f} s", flush=True)
    return result


if __name__ == "__main__":
    main()
