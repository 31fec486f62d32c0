"""Train the embedded models on scikit-learn's digits, reproducibly, on a CPU.

Usage::

    python -m diffquant.zoo.train {ldm_digits,digits_classifier,all} [--out DIR] [--seed 0]
                                  [--steps-scale 1.0] [--threads 1]

* ``digits_classifier``: the :class:`~diffquant.eval.backbones.digits_cnn.DigitsClassifier`
  backbone for FID / Inception Score, written to ``DIR/digits_classifier/``.
* ``ldm_digits``: a class-conditional latent diffusion model built from diffusers classes
  (``AutoencoderKL`` f4 VAE, ``UNet2DModel`` with class embeddings, ``DDIMScheduler``), written to
  ``DIR/ldm_digits/{vae,unet,scheduler}/`` plus ``DIR/ldm_digits/diffquant.json``.

``DIR`` defaults to the package's ``zoo/weights/``. Every run is seeded (``torch.manual_seed`` and
explicit generators), uses deterministic algorithms and a fixed thread count, so the same command
on the same machine type writes the same weights. ``--steps-scale`` multiplies every step count
(``0.01`` is a smoke run of a few seconds). The full ``all`` run needs about 20 CPU-minutes on one
thread (classifier ~2, VAE ~8, UNet ~9); its wall time grows when other jobs share the cores.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import shlex
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from diffquant.data.digits import load_digits
from diffquant.eval.backbones.digits_cnn import DigitsClassifier

#: Default output root: the weights folder shipped inside the package.
DEFAULT_OUT = Path(__file__).resolve().parent / "weights"
MODELS = ("digits_classifier", "ldm_digits")

IMAGE_SIZE = 32
NUM_CLASSES = 10
NULL_CLASS = 10  # label of the "no class" embedding used for classifier-free guidance
LATENT_CHANNELS = 4
LATENT_SIZE = 8

# The LDM-4 training noise schedule ("scaled_linear" betas from 0.0015 to 0.0195 over 1000 steps).
SCHEDULE = dict(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.0015, beta_end=0.0195)


# --------------------------------------------------------------------------------------------
# Run settings
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ClassifierRecipe:
    """Hyper-parameters of the classifier run (steps are optimizer steps of ``batch_size`` images)."""

    steps: int = 1200
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 1e-4
    max_shift_px: float = 2.0  # random translation, pixels at 32×32
    max_rotate_deg: float = 10.0
    max_scale: float = 0.08  # random zoom in [1 - s, 1 + s]


@dataclass(frozen=True)
class VaeRecipe:
    """Hyper-parameters of the VAE run; loss = L1 + MSE (per pixel, images in [-1, 1]) + kl_weight·KL/pixel."""

    steps: int = 1500
    batch_size: int = 32
    lr: float = 1e-3
    kl_weight: float = 1e-4
    max_shift_px: float = 1.0
    max_rotate_deg: float = 5.0
    max_scale: float = 0.04


@dataclass(frozen=True)
class UnetRecipe:
    """Hyper-parameters of the diffusion UNet run (epsilon prediction on scaled VAE latents)."""

    steps: int = 2000
    batch_size: int = 128
    lr: float = 5e-4
    warmup_steps: int = 200
    weight_decay: float = 0.0
    label_dropout: float = 0.1  # probability of replacing a label by NULL_CLASS
    ema_decay: float = 0.999
    grad_clip: float = 1.0


def scaled_steps(steps: int, scale: float) -> int:
    """Return ``steps × scale`` rounded, at least 1."""
    return max(1, int(round(steps * scale)))


@contextlib.contextmanager
def reproducible(seed: int, threads: int) -> Iterator[None]:
    """Seed torch, fix the thread count and turn on deterministic algorithms; restore them on exit."""
    old_threads = torch.get_num_threads()
    old_det = torch.are_deterministic_algorithms_enabled()
    old_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.set_flush_denormal(True)  # denormal floats can make CPU kernels many times slower
    torch.manual_seed(seed)
    try:
        yield
    finally:
        torch.set_flush_denormal(False)
        torch.set_num_threads(old_threads)
        torch.use_deterministic_algorithms(old_det, warn_only=old_warn)


class Progress:
    """Prints ``[name] step i/n  key=value ...  (elapsed s)`` about ``prints`` times over a run."""

    def __init__(self, name: str, total: int, prints: int = 10) -> None:
        self.name, self.total = name, total
        self.every = max(1, total // prints)
        self.start = time.perf_counter()

    def update(self, step: int, **values: float) -> None:
        """Report after optimizer step ``step`` (1-based) if it is a reporting step or the last one."""
        if step % self.every == 0 or step == self.total:
            text = "  ".join(f"{k}={v:.4f}" for k, v in values.items())
            print(f"[{self.name}] step {step}/{self.total}  {text}  ({self.elapsed():.0f} s)", flush=True)

    def elapsed(self) -> float:
        """Seconds since the run started."""
        return time.perf_counter() - self.start


# --------------------------------------------------------------------------------------------
# Shared helpers
# --------------------------------------------------------------------------------------------


def random_affine(
    images: Tensor, generator: torch.Generator, max_shift_px: float, max_rotate_deg: float, max_scale: float
) -> Tensor:
    """Randomly shift, rotate and zoom images ``(N, C, H, W)`` (zero padding, values kept in range).

    Shifts are uniform in ±``max_shift_px`` pixels, rotations in ±``max_rotate_deg`` degrees, zoom
    factors in ``[1 - max_scale, 1 + max_scale]``; one draw per image from ``generator``.
    """
    n, _, h, w = images.shape
    u = torch.rand(n, 4, generator=generator) * 2 - 1  # (N, 4) in [-1, 1]
    angle = u[:, 0] * math.radians(max_rotate_deg)
    scale = 1 + u[:, 1] * max_scale
    shift_x = u[:, 2] * max_shift_px * 2 / w  # grid units: the image spans [-1, 1]
    shift_y = u[:, 3] * max_shift_px * 2 / h
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack(
        [torch.stack([cos, -sin, shift_x], dim=1), torch.stack([sin, cos, shift_y], dim=1)], dim=1
    )  # (N, 2, 3)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def random_batch(n: int, batch_size: int, generator: torch.Generator) -> Tensor:
    """Return ``batch_size`` random row indices ``(batch_size,)`` int64 in ``[0, n)``, without replacement."""
    return torch.randperm(n, generator=generator)[:batch_size]


def cosine_lr(step: int, total: int, base_lr: float, warmup: int) -> float:
    """Learning rate at optimizer step ``step`` (0-based): linear warm-up, then cosine decay to 5%."""
    if step < warmup:
        return base_lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return base_lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress)))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set the learning rate of every parameter group."""
    for group in optimizer.param_groups:
        group["lr"] = lr


def command_line(argv: Sequence[str], module: str = "diffquant.zoo.train") -> str:
    """The command that reproduces this run of ``python -m <module>``, as a shell string."""
    return f"python -m {module} " + " ".join(shlex.quote(a) for a in argv)


# --------------------------------------------------------------------------------------------
# digits_classifier
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def accuracy(model: DigitsClassifier, images: Tensor, labels: Tensor) -> float:
    """Top-1 accuracy (fraction in [0, 1]) of ``model`` on images ``(N, 1, H, W)`` and labels ``(N,)``."""
    was_training = model.training
    model.eval()
    acc = (model.predict(images) == labels).float().mean().item()
    model.train(was_training)
    return acc


def train_classifier(out_dir: Path, seed: int, steps_scale: float, argv: Sequence[str]) -> dict[str, Any]:
    """Train :class:`DigitsClassifier` on the train split and save it to ``out_dir``; return its metadata."""
    recipe = ClassifierRecipe()
    steps = scaled_steps(recipe.steps, steps_scale)
    images, labels = load_digits("train", IMAGE_SIZE)  # (1437, 1, 32, 32) in [0, 1], (1437,)
    held_images, held_labels = load_digits("heldout", IMAGE_SIZE)
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = DigitsClassifier()
    optimizer = torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)
    progress = Progress("digits_classifier", steps)
    model.train()
    loss_value = float("nan")
    for step in range(steps):
        set_lr(optimizer, cosine_lr(step, steps, recipe.lr, warmup=max(1, steps // 20)))
        idx = random_batch(len(images), recipe.batch_size, gen)
        x = random_affine(images[idx], gen, recipe.max_shift_px, recipe.max_rotate_deg, recipe.max_scale)
        loss = F.cross_entropy(model(x)["logits"], labels[idx], label_smoothing=0.05)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        loss_value = loss.item()
        progress.update(step + 1, loss=loss_value)
    model.eval()
    meta = {
        "command": command_line(argv),
        "seed": seed,
        "steps": steps,
        "seconds": round(progress.elapsed(), 1),
        "final_loss": round(loss_value, 5),
        "train_accuracy": round(accuracy(model, images, labels), 5),
        "heldout_accuracy": round(accuracy(model, held_images, held_labels), 5),
        "recipe": asdict(recipe),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }
    model.config["meta"] = meta
    model.save_pretrained(out_dir)
    print(f"[digits_classifier] held-out accuracy {meta['heldout_accuracy']:.4f} -> {out_dir}", flush=True)
    return meta


# --------------------------------------------------------------------------------------------
# ldm_digits: VAE
# --------------------------------------------------------------------------------------------


def build_vae():
    """The f4 ``AutoencoderKL``: (N, 1, 32, 32) images in [-1, 1] ↔ (N, 4, 8, 8) latents."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=1,
        out_channels=1,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(32, 64, 64),
        layers_per_block=1,
        latent_channels=LATENT_CHANNELS,
        norm_num_groups=16,
        sample_size=IMAGE_SIZE,
        scaling_factor=1.0,
    )


def vae_loss(vae, x: Tensor, kl_weight: float, generator: torch.Generator) -> tuple[Tensor, dict[str, float]]:
    """VAE loss on images ``x`` ``(N, 1, 32, 32)`` in [-1, 1]: per-pixel L1 + MSE + kl_weight·KL per pixel."""
    posterior = vae.encode(x).latent_dist
    z = posterior.sample(generator=generator)
    recon = vae.decode(z).sample
    l1 = (recon - x).abs().mean()
    mse = (recon - x).pow(2).mean()
    kl = posterior.kl().mean() / x[0].numel()
    loss = l1 + mse + kl_weight * kl
    return loss, {"loss": loss.item(), "l1": l1.item(), "mse": mse.item(), "kl": kl.item()}


@torch.no_grad()
def vae_eval_mse(vae, images01: Tensor, batch_size: int = 256) -> float:
    """Mean squared reconstruction error (images in [0, 1]) of the posterior mean on ``(N, 1, 32, 32)``."""
    vae.eval()
    errs = []
    for i in range(0, len(images01), batch_size):
        x = images01[i : i + batch_size] * 2 - 1
        recon = vae.decode(vae.encode(x).latent_dist.mode()).sample
        errs.append(((recon.clamp(-1, 1) - x) / 2).pow(2).flatten(1).mean(1))
    return torch.cat(errs).mean().item()


def train_vae(seed: int, steps_scale: float, recipe: VaeRecipe = VaeRecipe()) -> tuple[Any, dict[str, Any]]:
    """Train the VAE on the train split; return it (eval mode, ``scaling_factor`` still 1) and metadata."""
    steps = scaled_steps(recipe.steps, steps_scale)
    images, _ = load_digits("train", IMAGE_SIZE)
    gen = torch.Generator().manual_seed(seed + 1)
    torch.manual_seed(seed + 1)
    vae = build_vae().train()
    optimizer = torch.optim.AdamW(vae.parameters(), lr=recipe.lr, weight_decay=0.0)
    progress = Progress("ldm_digits/vae", steps)
    stats: dict[str, float] = {}
    for step in range(steps):
        set_lr(optimizer, cosine_lr(step, steps, recipe.lr, warmup=max(1, steps // 30)))
        idx = random_batch(len(images), recipe.batch_size, gen)
        x = (
            random_affine(images[idx], gen, recipe.max_shift_px, recipe.max_rotate_deg, recipe.max_scale) * 2
            - 1
        )
        loss, stats = vae_loss(vae, x, recipe.kl_weight, gen)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        progress.update(step + 1, **stats)
    vae.eval()
    held, _ = load_digits("heldout", IMAGE_SIZE)
    meta = {
        "steps": steps,
        "seconds": round(progress.elapsed(), 1),
        "final_losses": {k: round(v, 6) for k, v in stats.items()},
        "heldout_recon_mse": round(vae_eval_mse(vae, held), 6),
        "recipe": asdict(recipe),
    }
    print(f"[ldm_digits/vae] held-out reconstruction MSE {meta['heldout_recon_mse']:.5f}", flush=True)
    return vae, meta


@torch.no_grad()
def encode_posteriors(vae, images01: Tensor, batch_size: int = 256) -> tuple[Tensor, Tensor]:
    """Posterior ``(mean, std)`` latents, each ``(N, 4, 8, 8)``, of images ``(N, 1, 32, 32)`` in [0, 1]."""
    means, stds = [], []
    for i in range(0, len(images01), batch_size):
        dist = vae.encode(images01[i : i + batch_size] * 2 - 1).latent_dist
        means.append(dist.mean)
        stds.append(dist.std)
    return torch.cat(means), torch.cat(stds)


# --------------------------------------------------------------------------------------------
# ldm_digits: UNet
# --------------------------------------------------------------------------------------------


def build_unet():
    """The class-conditional ``UNet2DModel`` on (N, 4, 8, 8) latents; labels 0..9 plus null class 10."""
    from diffusers import UNet2DModel

    return UNet2DModel(
        sample_size=LATENT_SIZE,
        in_channels=LATENT_CHANNELS,
        out_channels=LATENT_CHANNELS,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(64, 96),
        layers_per_block=1,
        attention_head_dim=32,
        norm_num_groups=16,
        num_class_embeds=NUM_CLASSES + 1,
        dropout=0.0,
    )


def build_train_scheduler(schedule: dict[str, Any] = SCHEDULE):
    """The DDPM noise schedule used for training (default: the LDM-4 betas), for ``add_noise``."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(**schedule, prediction_type="epsilon", clip_sample=False)


def build_sampling_scheduler(schedule: dict[str, Any] = SCHEDULE):
    """The DDIM sampler shipped with a model, set up like CompVis DDIM (and Stable Diffusion's
    pipelines: ``leading`` spacing, offset 1), with the training betas ``schedule``."""
    from diffusers import DDIMScheduler

    return DDIMScheduler(
        **schedule,
        prediction_type="epsilon",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        timestep_spacing="leading",
    )


class Ema:
    """Exponential moving average of a module's floating-point state; decay warms up as (1+n)/(10+n)."""

    def __init__(self, module: nn.Module, decay: float) -> None:
        self.decay = decay
        self.module = copy.deepcopy(module).eval().requires_grad_(False)
        self.updates = 0

    @torch.no_grad()
    def update(self, module: nn.Module) -> None:
        """Blend the current weights of ``module`` into the average."""
        self.updates += 1
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for avg, cur in zip(self.module.state_dict().values(), module.state_dict().values()):
            if avg.dtype.is_floating_point:
                avg.lerp_(cur, 1 - decay)
            else:
                avg.copy_(cur)


def drop_labels(labels: Tensor, p: float, generator: torch.Generator) -> Tensor:
    """Replace each label ``(N,)`` by :data:`NULL_CLASS` with probability ``p``."""
    drop = torch.rand(labels.shape, generator=generator) < p
    return torch.where(drop, torch.full_like(labels, NULL_CLASS), labels)


def train_eps_denoiser(
    denoiser: nn.Module,
    predict: Callable[[nn.Module, Tensor, Tensor, Tensor, torch.Generator], Tensor],
    lat_mean: Tensor,
    lat_std: Tensor,
    noise_scheduler: Any,
    recipe: Any,
    steps: int,
    generator: torch.Generator,
    name: str,
) -> tuple[nn.Module, dict[str, Any]]:
    """The ε-prediction training loop every zoo denoiser shares; returns the EMA model and
    ``{steps, seconds, final_loss, final_loss_avg}``.

    Each step draws, from ``generator`` and in this order, the batch's rows ``idx`` (``(B,)``), a
    fresh posterior sample of their scaled latents ``lat_mean + lat_std · ε`` ``(B, C, h, w)``,
    the noise and a uniform time step; ``predict(denoiser, z_t, t, idx, generator)`` draws the
    conditioning it needs and returns ε̂ ``(B, C, h, w)``; the MSE to the noise is minimised
    with AdamW (``recipe``: lr, warmup_steps, grad_clip, ema_decay, batch_size, optional
    weight_decay) under :func:`cosine_lr`.
    """
    ema = Ema(denoiser, recipe.ema_decay)
    optimizer = torch.optim.AdamW(
        denoiser.parameters(), lr=recipe.lr, weight_decay=getattr(recipe, "weight_decay", 0.0)
    )
    progress = Progress(name, steps)
    running = None
    for step in range(steps):
        set_lr(
            optimizer, cosine_lr(step, steps, recipe.lr, warmup=min(recipe.warmup_steps, max(1, steps // 10)))
        )
        idx = random_batch(len(lat_mean), recipe.batch_size, generator)
        z0 = lat_mean[idx] + lat_std[idx] * torch.randn(lat_mean[idx].shape, generator=generator)
        noise = torch.randn(z0.shape, generator=generator)
        t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (len(idx),), generator=generator)
        pred = predict(denoiser, noise_scheduler.add_noise(z0, noise, t), t, idx, generator)
        loss = F.mse_loss(pred, noise)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(denoiser.parameters(), recipe.grad_clip)
        optimizer.step()
        ema.update(denoiser)
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        progress.update(step + 1, loss=loss.item(), loss_avg=running)
    stats = {
        "steps": steps,
        "seconds": round(progress.elapsed(), 1),
        "final_loss": round(loss.item(), 6),
        "final_loss_avg": round(running, 6),
    }
    return ema.module, stats


def train_unet(
    lat_mean: Tensor,
    lat_std: Tensor,
    labels: Tensor,
    seed: int,
    steps_scale: float,
    recipe: UnetRecipe = UnetRecipe(),
) -> tuple[nn.Module, dict[str, Any]]:
    """Train the epsilon-prediction UNet on scaled latents ``(N, 4, 8, 8)``; return the EMA model and metadata.

    ``lat_mean``/``lat_std`` are the VAE posterior already multiplied by the scaling factor; each
    step draws a fresh posterior sample, a uniform timestep in [0, 1000) and Gaussian noise.
    """
    gen = torch.Generator().manual_seed(seed + 2)
    torch.manual_seed(seed + 2)
    unet = build_unet().train()

    def predict(unet: nn.Module, zt: Tensor, t: Tensor, idx: Tensor, gen: torch.Generator) -> Tensor:
        return unet(zt, t, class_labels=drop_labels(labels[idx], recipe.label_dropout, gen)).sample

    steps = scaled_steps(recipe.steps, steps_scale)
    ema, stats = train_eps_denoiser(
        unet, predict, lat_mean, lat_std, build_train_scheduler(), recipe, steps, gen, "ldm_digits/unet"
    )
    meta = {
        **stats,
        "recipe": asdict(recipe),
        "num_parameters": sum(p.numel() for p in unet.parameters()),
    }
    return ema, meta


def train_ldm(out_dir: Path, seed: int, steps_scale: float, argv: Sequence[str]) -> dict[str, Any]:
    """Train VAE then UNet and write the diffusers-style folder ``out_dir`` (``vae/``, ``unet/``, ``scheduler/``)."""
    start = time.perf_counter()
    vae, vae_meta = train_vae(seed, steps_scale)
    images, labels = load_digits("train", IMAGE_SIZE)
    lat_mean, lat_std = encode_posteriors(vae, images)  # (1437, 4, 8, 8) each
    scaling_factor = 1.0 / lat_mean.std().item()
    vae.register_to_config(scaling_factor=scaling_factor)
    print(
        f"[ldm_digits] latent std {1 / scaling_factor:.4f} -> scaling_factor {scaling_factor:.4f}", flush=True
    )
    unet, unet_meta = train_unet(
        lat_mean * scaling_factor, lat_std * scaling_factor, labels, seed, steps_scale
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    vae.save_pretrained(out_dir / "vae", safe_serialization=True)
    unet.save_pretrained(out_dir / "unet", safe_serialization=True)
    build_sampling_scheduler().save_pretrained(out_dir / "scheduler")
    meta = {
        "family": "ldm",
        "num_classes": NUM_CLASSES,
        "null_class": NULL_CLASS,
        "image_size": IMAGE_SIZE,
        "latent_shape": [LATENT_CHANNELS, LATENT_SIZE, LATENT_SIZE],
        "scaling_factor": scaling_factor,
        "sampling": {"num_inference_steps": 20, "eta": 0.0, "guidance_scale": 3.0},
        "train": {
            "command": command_line(argv),
            "seed": seed,
            "steps_scale": steps_scale,
            "steps": {"vae": vae_meta["steps"], "unet": unet_meta["steps"]},
            "seconds": round(time.perf_counter() - start, 1),
            "final_losses": {"vae": vae_meta["final_losses"], "unet": unet_meta["final_loss_avg"]},
            "noise_schedule": {**SCHEDULE, "prediction_type": "epsilon"},
            "vae": vae_meta,
            "unet": unet_meta,
            "data": "sklearn digits, train split (1437 images), 32x32, pixels/16 in [0, 1] mapped to [-1, 1]",
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
        },
    }
    (out_dir / "diffquant.json").write_text(json.dumps(meta, indent=2) + "\n")
    print(f"[ldm_digits] wrote {out_dir} ({meta['train']['seconds']:.0f} s)", flush=True)
    return meta


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


def training_parser(
    module: str, doc: str, models: Sequence[str], default_out: Path
) -> argparse.ArgumentParser:
    """The options every zoo training command has (``diffquant.zoo.train``, ``.train_sd``)."""
    parser = argparse.ArgumentParser(prog=f"python -m {module}", description=doc.split("\n\n")[0])
    parser.add_argument("model", choices=[*models, "all"], help="which model to train")
    parser.add_argument("--out", type=Path, default=default_out, help="weights root (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--steps-scale", type=float, default=1.0, help="multiply every step count (0.01: smoke run)"
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads, fixed for reproducibility (default %(default)s: on a shared 2-core "
        "machine one thread is much faster than two, which stall each other when the cores are busy)",
    )
    return parser


def parse_training_args(parser: argparse.ArgumentParser, argv: Sequence[str]) -> argparse.Namespace:
    """``parser.parse_args(argv)``, rejecting a non-positive ``--steps-scale``."""
    args = parser.parse_args(argv)
    if args.steps_scale <= 0:
        parser.error("--steps-scale must be positive")
    return args


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    """Parse the command line (see the module docstring)."""
    return parse_training_args(training_parser("diffquant.zoo.train", __doc__, MODELS, DEFAULT_OUT), argv)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Train the requested model(s); return ``{model: metadata}``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    names = MODELS if args.model == "all" else (args.model,)
    results: dict[str, Any] = {}
    start = time.perf_counter()
    with reproducible(args.seed, args.threads):
        for name in names:
            trainer = train_classifier if name == "digits_classifier" else train_ldm
            results[name] = trainer(args.out / name, args.seed, args.steps_scale, argv)
    print(f"done in {time.perf_counter() - start:.0f} s", flush=True)
    return results


if __name__ == "__main__":
    main()
