"""``ptqd``: PTQD (He et al., NeurIPS 2023) — quantization-noise correction on top of the baseline.

1. **Baseline**: exactly ``method=ptq`` with ``cfg.ptq`` (its cached result is shared).
2. **Noise statistics** along ``n_samples`` FP trajectories (seed ``seed``, the FP model's own
   sampler): at every sampler step ``i`` the FP and the quantized model predict the guided ε on
   the same ``x_t`` (the trajectory follows the FP prediction, as PTQD's
   ``DDIMSampler_collectQuantError``); with ``err = ε_q − ε_fp``:

   * ``k_i``: the least-squares slope of ``err`` on ``ε_fp`` over every element of every sample
     of the step (``scipy.stats.linregress``, intercept dropped), clipped at 0 where used;
   * ``b_i[c]``: the mean of ``err`` per latent channel;
   * ``s_i``: the mean over samples of each sample's std of the residual
     ``err − k_i⁺ ε_fp`` (over its C·h·w elements, unbiased), and ``σ_q,i = s_i / (1 + k_i⁺)``

   (``quant_scripts/analyze_error.py``).
3. **Correction in the sampler** (:class:`~diffquant.models.noise_correction.NoiseCorrection`,
   installed on the model wrapper, so it applies to every family and sampler the wrapper runs):
   ε ← (ε_q − b_i) / (1 + k_i⁺), and, for DDIM with ``eta > 0``, the sampler's noise reduced by
   the residual's variance.

The statistics go into the result (``ptqd_correction.json``, also written to the run folder) and
are installed again when the result is loaded from the cache (:meth:`PTQD.restore`).
PTQD's paper also describes a step-aware mixed-precision option; its code has none
(``experiments/FIDELITY.md``), and neither does this method.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from diffquant.methods.base import Method, MethodResult
from diffquant.methods.ptq import PTQConfig, load_or_run_ptq
from diffquant.methods.trajectory import fp_trajectories
from diffquant.models.noise_correction import NoiseCorrection
from diffquant.quant.config import QuantConfig
from diffquant.quant.state import frozen_weights
from diffquant.quant.timestep import sampler_step
from diffquant.registry import METHODS
from diffquant.validation import positive

log = logging.getLogger(__name__)

CORRECTION_FILE = "ptqd_correction.json"


@dataclass
class PTQDConfig:
    """``method=ptqd`` (module doc).

    Attributes:
        name: ``ptqd``.
        ptq: the baseline (exactly ``method=ptq``'s settings: its cached result is reused).
        n_samples: FP trajectories the noise statistics are measured on (PTQD's code: 1024).
        batch_size: trajectories per batch.
        seed: base seed of those trajectories (keep it apart from calibration and evaluation
            seeds; re-seeded by the run's ``calib_seed``).
        correct_bias: subtract the per-channel residual mean ``b_i`` (else 0).
        correct_variance: reduce DDIM's noise by the residual variance (else ``σ_q = 0``).
        save_checkpoint: also copy the quantized checkpoint into the run folder.
    """

    name: str = "ptqd"
    ptq: PTQConfig = field(default_factory=PTQConfig)
    n_samples: int = 256
    batch_size: int = 128
    seed: int = 20_000
    correct_bias: bool = True
    correct_variance: bool = True
    save_checkpoint: bool = False

    def __post_init__(self) -> None:
        positive(self, "n_samples", "batch_size")


class _Moments:
    """Running sums of one sampler step's noise statistics (float64)."""

    def __init__(self, channels: int) -> None:
        self.n = 0  # elements
        self.sx = self.sy = self.sxy = self.sxx = 0.0
        self.channel_sum = torch.zeros(channels, dtype=torch.float64)
        self.channel_n = 0
        self.per_sample: list[Tensor] = []  # (N, 5): mean x, y, x², y², xy per sample

    def add(self, x: Tensor, y: Tensor) -> None:
        """``x = ε_fp``, ``y = ε_q − ε_fp``, both ``(N, C, h, w)``."""
        x, y = x.double().cpu(), y.double().cpu()
        self.n += x.numel()
        self.sx += float(x.sum())
        self.sy += float(y.sum())
        self.sxy += float((x * y).sum())
        self.sxx += float((x * x).sum())
        self.channel_sum += y.sum(dim=(0, 2, 3))
        self.channel_n += y.shape[0] * y.shape[2] * y.shape[3]
        f = lambda t: t.flatten(1).mean(1)  # noqa: E731
        self.per_sample.append(torch.stack([f(x), f(y), f(x * x), f(y * y), f(x * y)], dim=1))

    def finish(self, elements_per_sample: int) -> tuple[float, list[float], float]:
        """``(k, b, s)`` of the module doc (``k`` unclipped)."""
        mx, my = self.sx / self.n, self.sy / self.n
        var_x = self.sxx / self.n - mx * mx
        k = (self.sxy / self.n - mx * my) / var_x if var_x > 0 else 0.0
        bias = (self.channel_sum / self.channel_n).tolist()
        m = torch.cat(self.per_sample)
        kp = max(k, 0.0)
        # residual r = y − k⁺x per sample: E[r²] − E[r]², unbiased over the sample's elements
        mean_r = m[:, 1] - kp * m[:, 0]
        mean_r2 = m[:, 3] - 2 * kp * m[:, 4] + kp * kp * m[:, 2]
        n = elements_per_sample
        var = (mean_r2 - mean_r**2).clamp(min=0) * n / max(n - 1, 1)
        return k, bias, float(var.sqrt().mean())


@torch.no_grad()
def measure_noise(
    model: Any, n_samples: int, batch_size: int, seed: int
) -> tuple[list[float], list[list[float]], list[float]]:
    """Per sampler step ``(k_i, b_i, s_i)`` (module doc) along FP trajectories of samples
    ``0..n_samples-1`` with ``seed``; the quantized denoiser predicts on the FP trajectory's
    inputs."""
    steps = len(model.timesteps)
    channels = model.latent_shape[0]
    moments = [_Moments(channels) for _ in range(steps)]
    for start in range(0, n_samples, batch_size):
        traj = fp_trajectories(
            model, list(range(start, min(n_samples, start + batch_size))), seed, batch_size
        )
        with frozen_weights(model.denoiser):
            for i in range(steps):
                out_fp = traj.outputs[i][:, :channels]
                with sampler_step(model.denoiser, i):
                    out_q = model.eps(traj.states[i], model.timesteps[i], traj.cond)[:, :channels]
                moments[i].add(out_fp, out_q - out_fp)
    per_sample = int(math.prod(model.latent_shape))
    stats = [m.finish(per_sample) for m in moments]
    return [s[0] for s in stats], [s[1] for s in stats], [s[2] for s in stats]


def build_correction(
    k: list[float], bias: list[list[float]], std: list[float], cfg: PTQDConfig
) -> NoiseCorrection:
    """The correction the sampler applies: ``k⁺``, ``b`` (or 0), ``σ_q = s / (1 + k⁺)`` (or 0)."""
    kp = [max(v, 0.0) for v in k]
    return NoiseCorrection(
        k=kp,
        bias=bias if cfg.correct_bias else [[0.0] * len(b) for b in bias],
        sigma_q=[s / (1.0 + kk) if cfg.correct_variance else 0.0 for s, kk in zip(std, kp)],
    )


@METHODS.register("ptqd", schema=PTQDConfig)
class PTQD(Method):
    """``method=ptqd``: the baseline + PTQD's noise correction in the sampler (module doc)."""

    version = 1

    def calibrate(
        self, model: Any, quant: QuantConfig, cfg: PTQDConfig, ctx: Any, progress: Path
    ) -> MethodResult:
        result = MethodResult(model, quant).merge(load_or_run_ptq(model, quant, cfg.ptq, ctx))
        k, bias, std = measure_noise(model, cfg.n_samples, cfg.batch_size, cfg.seed)
        correction = build_correction(k, bias, std, cfg)
        model.noise_correction = correction
        variance = model.sampler.eta > 0 and correction.calibrates_variance(
            model.scheduler, model._step_kwargs
        )
        result.metrics.update(
            ptqd_k_mean=sum(k) / len(k),
            ptqd_k_min=min(k),
            ptqd_bias_abs_mean=sum(abs(b) for row in bias for b in row) / sum(len(r) for r in bias),
            ptqd_sigma_q_mean=sum(correction.sigma_q) / len(correction.sigma_q),
            ptqd_variance_calibrated=bool(variance and cfg.correct_variance),
            ptqd_samples=cfg.n_samples,
        )
        result.files[CORRECTION_FILE] = correction.to_json()
        log.info(
            "PTQD: k in [%.4f, %.4f], mean |b| %.3g, mean sigma_q %.3g over %d steps",
            min(k),
            max(k),
            result.metrics["ptqd_bias_abs_mean"],
            result.metrics["ptqd_sigma_q_mean"],
            len(k),
        )
        return result

    def restore(self, model: Any, result: MethodResult) -> None:
        """Install the cached result's correction on the model wrapper."""
        model.noise_correction = NoiseCorrection.from_json(result.files[CORRECTION_FILE])
