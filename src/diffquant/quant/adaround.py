"""AdaRound: learn, per weight, whether to round down or up (Nagel et al. 2020; as in BRECQ and
Q-Diffusion).

The integer weight is ``floor(W / Δ) + h(α)`` with the rectified sigmoid

    h(α) = clamp(σ(α) · (ζ - γ) + γ, 0, 1),    ζ = 1.1, γ = -0.1,

α initialised so that ``h(α) = frac(W / Δ)`` (the soft weight starts at the FP weight). A
regulariser ``λ · Σ (1 - |2 h(α) - 1|^β)`` pushes every ``h`` to 0 or 1 while β is annealed from 20
to 2 after a warm-up (no regulariser for the first 20% of iterations). When done, the choice is
frozen as ``α ≥ 0`` (round up).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

ZETA, GAMMA = 1.1, -0.1


class AdaRound(nn.Module):
    """The learnable rounding offsets of one weight tensor.

    ``alpha``: nn.Parameter of the weight's shape (requires_grad on: it is what the weight stage
    trains).
    """

    def __init__(self, alpha: Tensor) -> None:
        super().__init__()
        self.alpha = nn.Parameter(alpha.clone().float())

    @classmethod
    def from_weight(cls, weight: Tensor, scale: Tensor) -> AdaRound:
        """α such that ``h(α) = frac(weight / scale)``; ``scale`` broadcasts to ``weight``."""
        rest = weight / scale - torch.floor(weight / scale)
        alpha = -torch.log((ZETA - GAMMA) / (rest - GAMMA) - 1)
        return cls(alpha)

    def rectified(self) -> Tensor:
        """h(α) ∈ [0, 1], the soft rounding offset (weight-shaped)."""
        return torch.clamp(torch.sigmoid(self.alpha) * (ZETA - GAMMA) + GAMMA, 0, 1)

    def hard_mask(self) -> Tensor:
        """The frozen choice ``α ≥ 0`` (bool, weight-shaped): round up where True."""
        return self.alpha.detach() >= 0

    def regularizer(self, beta: float) -> Tensor:
        """``Σ (1 - |2 h(α) - 1|^β)`` (a scalar; 0 when every h is 0 or 1)."""
        return (1 - (2 * self.rectified() - 1).abs().pow(beta)).sum()


@dataclass
class RoundingSchedule:
    """β annealing and the regulariser weight of one AdaRound optimisation.

    No regulariser for the first ``warmup · iters`` iterations (β = ``beta_start``); then β falls
    linearly from ``beta_start`` to ``beta_end`` at the last iteration.
    """

    iters: int
    weight: float = 0.01
    warmup: float = 0.2
    beta_start: float = 20.0
    beta_end: float = 2.0

    def beta(self, it: int) -> float:
        start = self.warmup * self.iters
        if it < start:
            return self.beta_start
        rel = (it - start) / max(self.iters - start, 1)
        return self.beta_end + (self.beta_start - self.beta_end) * max(0.0, 1.0 - rel)

    def loss(self, it: int, roundings: list[AdaRound]) -> Tensor:
        """λ · Σ regularisers at iteration ``it`` (0 during warm-up)."""
        if it < self.warmup * self.iters or not roundings:
            return torch.zeros(())
        beta = self.beta(it)
        return self.weight * sum(r.regularizer(beta) for r in roundings)
