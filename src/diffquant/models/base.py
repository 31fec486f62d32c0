"""The model wrapper every method and evaluator works through.

A :class:`DiffusionModel` holds the diffusers components of a latent diffusion model (the
denoiser — a UNet or a transformer —, autoencoder, scheduler and, for text-to-image models, the
text encoder) and exposes one guided denoising step. Everything else is built on that step:

* sampling (``sample_latents`` → ``decode``) for evaluation;
* calibration, which records the denoiser inputs of the FP model's own trajectories (a forward
  pre-hook on ``denoiser`` sees every call: see :meth:`denoiser_kwargs`);
* AccuQuant, which rolls ``step`` out over several steps;
* time-step-aware quantizers, which route by the sampler step index :meth:`step` declares around
  each denoiser call (:func:`~diffquant.quant.timestep.sampler_step`; a time step may repeat in a
  schedule, e.g. PNDM's), else by the time-step argument the denoiser receives.

Everything family-specific about the denoiser (its calling convention, which layers play which
role) is declared by the wrapper's :attr:`DiffusionModel.spec`
(:class:`~diffquant.models.denoiser.DenoiserSpec`); methods read it and never name modules.

Conventions
-----------
* Latents ``x_t`` are ``(N, C, h, w)`` float tensors in the denoiser's latent space (already multiplied
  by the autoencoder's scaling factor).
* Sample ``i`` of a job with seed ``s`` always gets the same initial noise, condition and (for
  eta > 0) per-step noise, whatever the batch size or shard it is drawn in: every random draw is
  made from a generator seeded by :func:`sample_seed` ``(s, i, stream)``.
* With classifier-free guidance the denoiser is called once on the batch ``[uncond; cond]`` (2N rows),
  each row with its own timestep entry, so that every row is an independent calibration sample.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import Tensor, nn

from diffquant.models.denoiser import DenoiserSpec
from diffquant.models.noise_correction import NoiseCorrection
from diffquant.quant.int8 import int8_kernels
from diffquant.quant.state import frozen_weights
from diffquant.quant.timestep import sampler_step

_SEED_MULT = 1_000_003


def sample_seed(seed: int, index: int, stream: int = 0) -> int:
    """The seed of random stream ``stream`` (0 = initial noise, 1 = condition, 2+k = step k noise)
    of sample ``index`` in a job seeded ``seed``; distinct for distinct triples in practice."""
    return (seed * _SEED_MULT + index) * 1_009 + stream


def per_sample_randn(
    indices: Sequence[int], seed: int, stream: int, shape: Sequence[int], device: torch.device | str = "cpu"
) -> Tensor:
    """Standard normal noise of shape ``(len(indices), *shape)``, row ``j`` drawn from the generator
    of sample ``indices[j]`` (CPU generator, so results match across devices)."""
    rows = []
    for i in indices:
        g = torch.Generator().manual_seed(sample_seed(seed, int(i), stream))
        rows.append(torch.randn(tuple(shape), generator=g))
    return torch.stack(rows).to(device)


@dataclass
class Conditioning:
    """The conditioning of a batch of N samples.

    ``cond`` / ``uncond`` are UNet keyword arguments with one row per sample, e.g.
    ``{"class_labels": LongTensor(N)}`` or ``{"encoder_hidden_states": (N, L, D)}``; ``uncond`` is
    None when guidance is off. ``labels`` describes each sample for evaluators (class ids, or
    prompts for text-to-image models).
    """

    cond: dict[str, Tensor]
    uncond: Optional[dict[str, Tensor]]
    labels: list[Any]

    def __len__(self) -> int:
        return len(self.labels)

    def to(self, device: torch.device | str) -> Conditioning:
        move = lambda d: None if d is None else {k: v.to(device) for k, v in d.items()}  # noqa: E731
        return Conditioning(move(self.cond), move(self.uncond), self.labels)


def step_params(scheduler: Any) -> frozenset[str]:
    """The parameter names of ``scheduler.step`` (what :func:`step_noise_kwargs` may pass)."""
    return frozenset(inspect.signature(scheduler.step).parameters)


def step_noise_kwargs(
    params: frozenset[str], eta: float, x_t: Tensor, i: int, indices: Optional[Sequence[int]], seed: int
) -> dict[str, Any]:
    """The extra arguments of a scheduler's ``step`` (parameter names ``params``, from
    :func:`step_params`) at sampler step ``i``: DDIM's ``eta`` and, where the step adds noise
    (DDIM with eta > 0, :class:`~diffquant.models.ddpm.SeededDDPMScheduler`), each sample's own
    noise ``(N, C, h, w)`` from its index and the job's seed."""
    kwargs: dict[str, Any] = {}
    if "eta" in params:
        kwargs["eta"] = eta
    if "variance_noise" in params and ("eta" not in params or eta > 0):
        idx = range(x_t.shape[0]) if indices is None else indices
        kwargs["variance_noise"] = per_sample_randn(idx, seed, 2 + i, x_t.shape[1:], x_t.device)
    return kwargs


@dataclass
class SamplerSettings:
    """How the sampler runs: steps, guidance scale (1 = no guidance) and DDIM eta.

    ``learned_variance``: the denoiser's output is ε and a variance interpolation (``2C``
    channels, DiT's ``learn_sigma``) and the scheduler's step uses both (DDPM with
    ``variance_type=learned_range``); off: the sampler gets ε only. ``guidance_channels``: guide
    only the first ``k`` ε channels, the others are the conditional rows' own (DiT's
    ``forward_with_cfg`` guides 3 of 4); None: all.
    """

    num_inference_steps: int = 20
    guidance_scale: float = 1.0
    eta: float = 0.0
    learned_variance: bool = False
    guidance_channels: Optional[int] = None

    @classmethod
    def of(cls, model_cfg: Any) -> SamplerSettings:
        """The sampler settings of a model config (``model.num_inference_steps``,
        ``model.guidance_scale``, ``model.eta``, ``model.learned_variance``,
        ``model.guidance_channels``)."""
        return cls(
            model_cfg.num_inference_steps,
            model_cfg.guidance_scale,
            model_cfg.eta,
            bool(getattr(model_cfg, "learned_variance", False)),
            getattr(model_cfg, "guidance_channels", None),
        )


class DiffusionModel:
    """A latent diffusion model: denoiser + autoencoder + scheduler (+ conditioning).

    Subclasses set :attr:`spec` (their denoiser's description) and implement :meth:`conditions`
    (what conditions sample ``i`` gets). The denoiser is quantized in place; ``denoiser`` is the
    only attribute methods modify.
    """

    family: str = "base"
    spec: DenoiserSpec
    #: sampling quantizes each weight once per run (:func:`~diffquant.quant.state.frozen_weights`,
    #: the same samples bit for bit); False: at every denoiser call (``make bench-speed`` times both)
    freeze_weights: bool = True
    #: how quantized Conv2d / Linear layers execute while sampling: ``fake`` or ``int8``
    #: (:func:`~diffquant.quant.int8.int8_kernels`; ``evaluator.kernels``)
    kernels: str = "fake"
    #: what the last sampling run executed on int8 kernels (None: fake quantization only)
    int8_summary: Optional[Any] = None
    #: PTQD's per-step correction of the guided output and of the sampler's noise
    #: (:class:`~diffquant.models.noise_correction.NoiseCorrection`), set by ``method=ptqd``
    noise_correction: Optional[NoiseCorrection] = None

    def __init__(
        self,
        name: str,
        denoiser: nn.Module,
        vae: nn.Module,
        scheduler: Any,
        sampler: SamplerSettings,
        latent_shape: Sequence[int],
        latent_scale: Optional[float] = None,
        device: torch.device | str = "cpu",
        meta: Optional[dict] = None,
    ) -> None:
        if not isinstance(getattr(self, "spec", None), DenoiserSpec):
            raise TypeError(
                f"{type(self).__name__} must declare its denoiser: a class attribute "
                "`spec` (a diffquant.models.denoiser.DenoiserSpec)"
            )
        self.name = name
        self.denoiser = denoiser.eval().requires_grad_(False).to(device)
        self.vae = vae.eval().requires_grad_(False).to(device)
        self.scheduler = scheduler
        self.sampler = sampler
        self.latent_shape = tuple(latent_shape)
        cfg_scale = getattr(getattr(vae, "config", None), "scaling_factor", None)
        self.latent_scale = float(latent_scale if latent_scale is not None else (cfg_scale or 1.0))
        self.device = torch.device(device)
        self.meta = meta or {}
        self.scheduler.set_timesteps(sampler.num_inference_steps)
        # read once, from the model's own scheduler: a chain may swap in a recording wrapper
        # (methods.trajectory) whose step forwards ``*args, **kwargs``
        self._step_kwargs = step_params(self.scheduler)
        if sampler.learned_variance:
            self._check_learned_variance()

    def _check_learned_variance(self) -> None:
        """``sampler.learned_variance`` needs a denoiser with 2C output channels and a scheduler
        whose step reads the variance half (``variance_type`` learned / learned_range)."""
        config = getattr(self.denoiser, "config", None)
        c_in, c_out = getattr(config, "in_channels", None), getattr(config, "out_channels", None)
        if c_in is not None and c_out != 2 * c_in:
            raise ValueError(
                f"{self.name}: model.learned_variance=true needs a denoiser that predicts a variance "
                f"({2 * c_in} output channels for {c_in} latent channels); this one has {c_out}: "
                "set model.learned_variance=false."
            )
        if getattr(self.scheduler.config, "variance_type", None) not in ("learned", "learned_range"):
            raise ValueError(
                f"{self.name}: model.learned_variance=true needs a scheduler that uses the variance: "
                "model.scheduler=DDPMScheduler with model.scheduler_overrides.variance_type=learned_range "
                f"(this one is {type(self.scheduler).__name__})."
            )

    # ---------------------------------------------------------------- conditioning and noise
    @property
    def guided(self) -> bool:
        return self.sampler.guidance_scale != 1.0

    @property
    def timesteps(self) -> Tensor:
        """The sampler's timesteps, first (noisiest) to last: LongTensor ``(num_inference_steps,)``."""
        return self.scheduler.timesteps

    def conditions(self, indices: Sequence[int], seed: int) -> Conditioning:
        """The conditioning of samples ``indices`` in a job seeded ``seed``."""
        raise NotImplementedError

    def initial_noise(self, indices: Sequence[int], seed: int) -> Tensor:
        """x_T for samples ``indices``: ``(N, *latent_shape)``, scaled by the scheduler's init sigma."""
        x = per_sample_randn(indices, seed, 0, self.latent_shape, self.device)
        return x * float(getattr(self.scheduler, "init_noise_sigma", 1.0))

    # ---------------------------------------------------------------- one step
    def denoiser_kwargs(self, x_t: Tensor, t: Tensor | int, cond: Conditioning) -> dict[str, Tensor]:
        """The keyword arguments of the (single) denoiser call for one step: the latents
        (B, C, h, w) and time steps (B,) under the spec's argument names, and the condition rows;
        B = 2N with guidance ([uncond; cond]), else N."""
        if self.guided:
            if cond.uncond is None:
                raise ValueError(
                    f"{self.name}: guidance_scale={self.sampler.guidance_scale} needs "
                    "unconditional inputs, but the conditioning has none"
                )
            sample = torch.cat([x_t, x_t])
            extra = {k: torch.cat([cond.uncond[k], cond.cond[k]]) for k in cond.cond}
        else:
            sample, extra = x_t, dict(cond.cond)
        ts = torch.as_tensor(t, device=x_t.device).reshape(-1).expand(sample.shape[0]).clone()
        return {self.spec.sample_arg: sample, self.spec.timestep_arg: ts, **extra}

    def eps(self, x_t: Tensor, t: Tensor | int, cond: Conditioning) -> Tensor:
        """The guided model output for x_t at timestep t, what the scheduler's step takes: ε
        ``(N, C, h, w)``, or with ``sampler.learned_variance`` ε and the conditional rows'
        variance interpolation ``(N, 2C, h, w)``. With ``sampler.guidance_channels = k`` only
        ε's first ``k`` channels are guided, the others are the conditional rows'."""
        kwargs = self.denoiser_kwargs(self.scheduler.scale_model_input(x_t, t), t, cond)
        channels = x_t.shape[1]
        if self.sampler.learned_variance:
            out = self.spec.output(self.denoiser, kwargs)
            eps, variance = out[:, :channels], out[:, channels:]
        else:
            eps, variance = self.spec.forward(self.denoiser, kwargs), None
        if self.guided:
            e_u, e_c = eps.chunk(2)
            eps = e_u + self.sampler.guidance_scale * (e_c - e_u)
            k = self.sampler.guidance_channels
            if k is not None and k < channels:
                eps = torch.cat([eps[:, :k], e_c[:, k:]], dim=1)
            variance = None if variance is None else variance.chunk(2)[1]
        return eps if variance is None else torch.cat([eps, variance], dim=1)

    def step(
        self, x_t: Tensor, i: int, cond: Conditioning, indices: Optional[Sequence[int]] = None, seed: int = 0
    ) -> Tensor:
        """One guided denoising step from sampler step ``i`` (0 = noisiest): returns x_{t_i} → x_prev.

        ``indices``/``seed`` identify the samples so that eta > 0 draws the same per-step noise for
        the same sample in every run. Differentiable in x_t and in the UNet's parameters.
        """
        t = self.timesteps[i]
        with sampler_step(self.denoiser, i):  # time-step-aware quantizers route by step index
            model_out = self.eps(x_t, t, cond)
        eta = self.sampler.eta
        if self.noise_correction is not None:  # PTQD: rescaled, de-biased ε; reduced noise
            model_out = self.noise_correction.correct(model_out, i)
            eta = self.noise_correction.eta(self.scheduler, self._step_kwargs, i, t, eta)
        kwargs = step_noise_kwargs(self._step_kwargs, eta, x_t, i, indices, seed)
        return self.scheduler.step(model_out, t, x_t, **kwargs).prev_sample

    # ---------------------------------------------------------------- sampling
    @torch.no_grad()
    def sample_latents(
        self, indices: Sequence[int], seed: int, *, on_step: Optional[Callable[[int, Tensor], None]] = None
    ) -> Tensor:
        """Run the whole sampler for samples ``indices``: returns x_0 latents ``(N, C, h, w)``.

        ``on_step(i, x_t)`` is called before step ``i`` with the current latents.
        """
        cond = self.conditions(indices, seed).to(self.device)
        x = self.initial_noise(indices, seed)
        self.scheduler.set_timesteps(self.sampler.num_inference_steps)
        freeze = frozen_weights(self.denoiser) if self.freeze_weights else contextlib.nullcontext()
        kernels = int8_kernels(self.denoiser) if self.kernels == "int8" else contextlib.nullcontext()
        with freeze, kernels as int8:  # quantize each weight once, not at every step
            self.int8_summary = int8
            for i in range(len(self.timesteps)):
                if on_step is not None:
                    on_step(i, x)
                x = self.step(x, i, cond, indices, seed)
        return x

    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        """Latents → images ``(N, C_img, H, W)`` in [0, 1]."""
        out = self.vae.decode(latents / self.latent_scale)
        images = out.sample if hasattr(out, "sample") else out[0]
        return ((images.float() + 1) / 2).clamp(0, 1)

    @torch.no_grad()
    def sample(self, indices: Sequence[int], seed: int) -> tuple[Tensor, list[Any]]:
        """Images ``(N, C_img, H, W)`` in [0, 1] and their labels (class ids or prompts)."""
        labels = self.conditions(indices, seed).labels
        return self.decode(self.sample_latents(indices, seed)), labels

    # ---------------------------------------------------------------- bookkeeping
    def describe(self) -> dict[str, Any]:
        """A short, JSON-able description (for logs and the summary line)."""
        n_params = sum(p.numel() for p in self.denoiser.parameters())
        return {
            "name": self.name,
            "family": self.family,
            "denoiser_params_m": round(n_params / 1e6, 3),
            "steps": self.sampler.num_inference_steps,
            "guidance": self.sampler.guidance_scale,
            "eta": self.sampler.eta,
            "latent_shape": list(self.latent_shape),
        }
