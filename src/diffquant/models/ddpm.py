"""Ancestral DDPM sampling with each sample's own noise, and the learned variance of DiT.

diffusers' ``DDPMScheduler.step`` draws the noise of every step itself (one ``randn`` over the
batch), so a sample's trajectory would depend on the batch it is in and on the global random
state. :class:`SeededDDPMScheduler` is the same scheduler whose ``step`` takes that noise
(``variance_noise``, ``(N, C, h, w)``), which the sampler draws per sample from the job's seed
(:func:`~diffquant.models.base.per_sample_randn`), as it does for DDIM with ``eta > 0``.
``load_scheduler`` gives it for ``model.scheduler=DDPMScheduler``.

With ``variance_type="learned_range"`` (DiT, ``learn_sigma=True``) the model output is
``(N, 2C, h, w)``: ε, then the variance interpolation ``v`` in [-1, 1]; the step's log-variance
is ``(v + 1)/2 · log β_t + (1 - v)/2 · log β̃_t`` (Improved DDPM Eq. 15; DiT's
``p_mean_variance`` with ``LEARNED_RANGE``), the mean the posterior mean of the predicted x_0.
"""

from __future__ import annotations

from typing import Optional

import torch
from diffusers import DDPMScheduler
from diffusers.schedulers.scheduling_ddpm import DDPMSchedulerOutput
from torch import Tensor


class SeededDDPMScheduler(DDPMScheduler):
    """``DDPMScheduler`` whose :meth:`step` adds the given noise instead of drawing its own."""

    def step(
        self,
        model_output: Tensor,
        timestep: int | Tensor,
        sample: Tensor,
        variance_noise: Optional[Tensor] = None,
        generator: Optional[torch.Generator] = None,
        return_dict: bool = True,
    ) -> DDPMSchedulerOutput | tuple:
        """x_{t-1} from x_t ``sample`` ``(N, C, h, w)`` and ``model_output`` (``(N, C, h, w)``, or
        ``(N, 2C, h, w)`` with a learned variance): the DDPM posterior mean of the predicted x_0
        plus the step's standard deviation times ``variance_noise`` (``(N, C, h, w)``; None:
        drawn from ``generator``, as diffusers does). No noise at the last step (t = 0). A
        learned variance type given an ε-only output uses the posterior variance β̃_t."""
        t = int(timestep)
        channels = sample.shape[1]
        predicted_variance = None
        if model_output.shape[1] == 2 * channels and self.variance_type in ("learned", "learned_range"):
            model_output, predicted_variance = model_output[:, :channels], model_output[:, channels:]
        if self.config.prediction_type != "epsilon":
            raise ValueError(
                f"SeededDDPMScheduler supports prediction_type='epsilon', not {self.config.prediction_type!r}"
            )
        # 1. alphas and betas of this (possibly respaced) step
        prev_t = self.previous_timestep(t)
        alpha_prod_t = self.alphas_cumprod[t]
        alpha_prod_t_prev = self.alphas_cumprod[prev_t] if prev_t >= 0 else self.one
        beta_prod_t, beta_prod_t_prev = 1 - alpha_prod_t, 1 - alpha_prod_t_prev
        current_alpha_t = alpha_prod_t / alpha_prod_t_prev
        current_beta_t = 1 - current_alpha_t
        # 2. predicted x_0, clipped or thresholded as the config says
        x0 = (sample - beta_prod_t**0.5 * model_output) / alpha_prod_t**0.5
        if self.config.thresholding:
            x0 = self._threshold_sample(x0)
        elif self.config.clip_sample:
            x0 = x0.clamp(-self.config.clip_sample_range, self.config.clip_sample_range)
        # 3. the posterior mean
        mean = (alpha_prod_t_prev**0.5 * current_beta_t / beta_prod_t) * x0 + (
            current_alpha_t**0.5 * beta_prod_t_prev / beta_prod_t
        ) * sample
        # 4. the noise, scaled by the step's standard deviation
        prev_sample = mean
        if t > 0:
            if variance_noise is None:
                variance_noise = torch.randn(
                    model_output.shape,
                    generator=generator,
                    device=model_output.device,
                    dtype=model_output.dtype,
                )
            variance_type = self.variance_type
            if predicted_variance is None and variance_type in ("learned", "learned_range"):
                variance_type = "fixed_small"  # an ε-only output: the posterior variance β̃_t
            variance = self._get_variance(t, predicted_variance, variance_type)
            if variance_type == "fixed_small_log":
                std = variance
            elif variance_type == "learned_range":
                std = torch.exp(0.5 * variance)
            else:
                std = variance**0.5
            prev_sample = mean + std * variance_noise
        if not return_dict:
            return prev_sample, x0
        return DDPMSchedulerOutput(prev_sample=prev_sample, pred_original_sample=x0)
