"""PTQD's quantization-noise correction (He et al., NeurIPS 2023), applied in the sampler step.

PTQD models the quantized model's guided noise prediction at sampler step ``i`` as

    ε_q = (1 + k_i) · ε_fp + Δ_i,        Δ_i: residual with per-channel mean b_i[c], std s_i

(``quant_scripts/analyze_error.py`` of ziplab/PTQD). :class:`NoiseCorrection` holds, per sampler
step, ``k_i`` (≥ 0: a negative fit is not used, as the code's ``kt``), ``b_i`` ``(C,)`` and
``σ_q,i = s_i / (1 + k_i)``, and :meth:`DiffusionModel.step
<diffquant.models.base.DiffusionModel.step>` applies it:

1. **correlated part and bias** — the ε the scheduler receives is ``(ε_q − b_i) / (1 + k_i)``
   (``ldm/models/diffusion/ddim.py`` lines 630-631);
2. **variance schedule calibration** — the residual left in ε adds ``c_i² σ_q,i²`` of variance to
   x_prev, where ``c_i`` is the net coefficient of ε in the DDIM update
   ``x_prev = √ā_prev · x̂_0 + √(1 − ā_prev − σ_i²) · ε + σ_i z`` (``c_i = √(1 − ā_prev − σ_i²)
   − √(ā_prev (1 − ā_t) / ā_t)``); the sampler's own noise is reduced to
   ``σ_i' = √(σ_i² − c_i² σ_q,i²)`` (0 when that is not positive; lines 652-662), passed to
   DDIM's step as ``eta' = σ_i' / √variance_i``, so its direction term uses ``σ_i'`` too. At
   ``eta = 0`` there is no noise to reduce: only step 1 acts. Schedulers without ``eta`` (PNDM,
   DDPM) get step 1 only (:meth:`NoiseCorrection.calibrates_variance` says which).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor


@dataclass
class NoiseCorrection:
    """Per-step correction statistics (lists indexed by sampler step, 0 = noisiest).

    Attributes:
        k: correlation coefficient ``k_i`` (already clipped at 0).
        bias: residual mean per latent channel ``b_i`` (``S`` lists of ``C``).
        sigma_q: residual std after the rescaling, ``s_i / (1 + k_i)``.
    """

    k: list[float]
    bias: list[list[float]]
    sigma_q: list[float]

    def __post_init__(self) -> None:
        if not (len(self.k) == len(self.bias) == len(self.sigma_q)):
            raise ValueError("noise correction: k, bias and sigma_q need one entry per sampler step")
        bad = [
            v
            for v in [*self.k, *self.sigma_q, *(b for row in self.bias for b in row)]
            if not math.isfinite(v)
        ]
        if bad:
            raise FloatingPointError(f"noise correction statistics are not finite: {bad[:4]}")

    @property
    def n_steps(self) -> int:
        return len(self.k)

    def correct(self, eps: Tensor, i: int) -> Tensor:
        """``(ε − b_i) / (1 + k_i)`` on the first ``C`` channels of the guided output ``(N, C', h,
        w)`` (a learned-variance half, if any, is left as it is)."""
        self._check_step(i)
        bias = torch.tensor(self.bias[i], dtype=eps.dtype, device=eps.device)
        c = bias.numel()
        head = (eps[:, :c] - bias.view(1, c, 1, 1)) / (1.0 + self.k[i])
        return head if eps.shape[1] == c else torch.cat([head, eps[:, c:]], dim=1)

    @staticmethod
    def calibrates_variance(scheduler: Any, step_params: frozenset[str]) -> bool:
        """Whether the scheduler's step (parameter names ``step_params``, from the model's own
        scheduler: :func:`~diffquant.models.base.step_params`) exposes its noise level (DDIM's
        ``eta``)."""
        return "eta" in step_params and hasattr(scheduler, "_get_variance")

    def eta(self, scheduler: Any, step_params: frozenset[str], i: int, t: Tensor | int, eta: float) -> float:
        """DDIM's ``eta`` giving the reduced noise ``σ_i'`` (module doc), or ``eta`` unchanged
        for ``eta = 0`` and schedulers without it."""
        self._check_step(i)
        if eta <= 0 or not self.calibrates_variance(scheduler, step_params):
            return eta
        t = int(t)
        prev = t - scheduler.config.num_train_timesteps // scheduler.num_inference_steps
        a_t = float(scheduler.alphas_cumprod[t])
        a_prev = float(scheduler.alphas_cumprod[prev]) if prev >= 0 else float(scheduler.final_alpha_cumprod)
        variance = float(scheduler._get_variance(t, prev))
        if variance <= 0:
            return eta
        sigma2 = eta**2 * variance
        c = math.sqrt(max(1.0 - a_prev - sigma2, 0.0)) - math.sqrt(a_prev * (1.0 - a_t) / a_t)
        reduced = sigma2 - (c * self.sigma_q[i]) ** 2
        return math.sqrt(reduced / variance) if reduced > 0 else 0.0

    def _check_step(self, i: int) -> None:
        if not 0 <= i < self.n_steps:
            raise IndexError(
                f"noise correction calibrated for {self.n_steps} sampler steps, used at step {i}: "
                "sample with the number of steps it was calibrated for"
            )

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1) + "\n"

    @classmethod
    def from_json(cls, text: str) -> NoiseCorrection:
        return cls(**json.loads(text))
