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
        codes = weight / scale
        rest = codes - torch.floor(codes)
        alpha = -torch.log((ZETA - GAMMA) / (rest - GAMMA) - 1)
        return cls(alpha)

    def rectified(self) -> Tensor:
        """h(α) ∈ [0, 1], the soft rounding offset (weight-shaped)."""
        return torch.clamp(torch.sigmoid(self.alpha) * (ZETA - GAMMA) + GAMMA, 0, 1)

    def fused(self) -> bool:
        """Whether :meth:`soft_quant` may stand for the autograd composition of
        :meth:`rectified` (False for subclasses that redefine :meth:`rectified`)."""
        return type(self).rectified is AdaRound.rectified

    def soft_quant(
        self, w_floor: Tensor, scale: Tensor, zero_point: Tensor, q_min: int, q_max: int
    ) -> Tensor:
        """The soft-rounded fake-quantized weight ``(clamp(w_floor + h(α) + z, q_min, q_max) - z) · Δ``.

        ``w_floor`` = ``floor(W / Δ)`` (weight-shaped, float32, no gradient), ``scale`` Δ and
        ``zero_point`` z broadcastable to it (no gradient). Values and the gradient reaching α
        are bit-identical to the autograd composition ``(clamp(w_floor + rectified() + z, …) - z)
        · Δ`` (see :class:`_SoftQuant`), with two weight-sized temporaries instead of about ten.
        """
        need_grad = torch.is_grad_enabled() and self.alpha.requires_grad
        return _SoftQuant.apply(self.alpha, w_floor, scale, zero_point, q_min, q_max, need_grad)

    def hard_mask(self) -> Tensor:
        """The frozen choice ``α ≥ 0`` (bool, weight-shaped): round up where True."""
        return self.alpha.detach() >= 0

    def regularizer(self, beta: float) -> Tensor:
        """``Σ (1 - |2 h(α) - 1|^β)`` (a scalar; 0 when every h is 0 or 1)."""
        return (1 - (2 * self.rectified() - 1).abs().pow(beta)).sum()


class _SoftQuant(torch.autograd.Function):
    """AdaRound's soft fake quantization with a hand-written backward (α only).

    Forward: the same elementwise ops as the autograd graph, in the same order, done in place on
    one buffer: ``s = σ(α)``, ``h' = s · (ζ - γ) + γ``, ``h = clamp(h', 0, 1)``,
    ``c' = (h + ⌊W/Δ⌋) + z``, ``out = (clamp(c', q_min, q_max) - z) · Δ`` (float addition is
    commutative, so ``h + ⌊W/Δ⌋`` is ``⌊W/Δ⌋ + h`` bit for bit).

    Backward: the chain autograd runs, with its kernels: ``g · Δ`` (mul backward), zero where
    ``c'`` or ``h'`` was outside its clamp range (clamp backward passes the gradient on the closed
    range), ``· (ζ - γ)`` (scalar mul backward), ``sigmoid_backward(·, s)``. Saved: ``s`` (float32)
    and the combined in-range mask (bool).
    """

    @staticmethod
    def forward(ctx, alpha, w_floor, scale, zero_point, q_min, q_max, need_grad):  # type: ignore[override]
        s = torch.sigmoid(alpha)
        out = s.mul(ZETA - GAMMA).add_(GAMMA)
        mask = (out >= 0).logical_and_(out <= 1) if need_grad else None
        out.clamp_(0, 1).add_(w_floor).add_(zero_point)
        if need_grad:
            mask.logical_and_(out >= q_min).logical_and_(out <= q_max)
            ctx.save_for_backward(s, mask, scale)
        out.clamp_(q_min, q_max).sub_(zero_point).mul_(scale)
        return out

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        s, mask, scale = ctx.saved_tensors
        g = grad * scale
        g = torch.where(mask, g, torch.zeros((), dtype=g.dtype, device=g.device))
        g = torch.ops.aten.sigmoid_backward(g * (ZETA - GAMMA), s)
        return g, None, None, None, None, None, None


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
        if not roundings:
            return torch.zeros(())
        if it < self.warmup * self.iters:  # on α's device: adding it to a GPU loss needs no copy
            return torch.zeros((), device=roundings[0].alpha.device)
        beta = self.beta(it)
        return self.weight * sum(r.regularizer(beta) for r in roundings)
