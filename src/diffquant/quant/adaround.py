"""AdaRound: learn, per weight, whether to round down or up (Nagel et al. 2020; as in BRECQ and
Q-Diffusion).

The integer weight is ``floor(W / Δ) + h(α)`` with the rectified sigmoid

    h(α) = clamp(σ(α) · (ζ - γ) + γ, 0, 1),    ζ = 1.1, γ = -0.1,

α initialised so that ``h(α) = frac(W / Δ)`` (the soft weight starts at the FP weight). A
regulariser ``λ · Σ (1 - |2 h(α) - 1|^β)`` pushes every ``h`` to 0 or 1 while β is annealed from 20
to 2 after a warm-up (no regulariser for the first 20% of iterations). When done, the choice is
frozen as ``α ≥ 0`` (round up).

The per-weight work of one iteration (the soft rounding, the regulariser, their backward) is tens
of elementwise passes over every weight of the unit, each reading and writing memory. With
``compiled`` set on an :class:`AdaRound` (``method.recon.compile``), both run as
``torch.compile``'d kernels of the same expressions (:func:`soft_quant_expr`,
:func:`regularizer_expr`): one fused loop each way, compiled once per process and tensor rank
(dynamic shapes; the backward recomputes the forward rather than saving its intermediates, and
the regulariser's power is ``exp(β log x)``). When the stage announces the iteration's β before the forward
(:meth:`RoundingSchedule.announce`), the soft rounding and the regulariser are one kernel
(:func:`soft_quant_penalty_expr`): α is read once, and its gradient written once.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor, nn

ZETA, GAMMA = 1.1, -0.1


def rectified_expr(alpha: Tensor) -> Tensor:
    """h(α) = clamp(σ(α) · (ζ - γ) + γ, 0, 1), elementwise."""
    return torch.clamp(torch.sigmoid(alpha) * (ZETA - GAMMA) + GAMMA, 0, 1)


def soft_quant_expr(
    alpha: Tensor,
    w_floor: Tensor,
    scale: Tensor,
    zero_point: Tensor,
    q_min: int,
    q_max: int,
    out_dtype: Optional[torch.dtype] = None,
) -> Tensor:
    """``(clamp(⌊W/Δ⌋ + h(α) + z, q_min, q_max) - z) · Δ`` (weight-shaped): the soft-rounded
    fake-quantized weight as one autograd composition, computed in float32 and cast to
    ``out_dtype`` when given (the dtype autocast would cast it to)."""
    return _soft_quant_of(rectified_expr(alpha), w_floor, scale, zero_point, q_min, q_max, out_dtype)


def _soft_quant_of(
    h: Tensor,
    w_floor: Tensor,
    scale: Tensor,
    zero_point: Tensor,
    q_min: int,
    q_max: int,
    out_dtype: Optional[torch.dtype],
) -> Tensor:
    """:func:`soft_quant_expr` from h = h(α)."""
    out = (torch.clamp(w_floor + h + zero_point, q_min, q_max) - zero_point) * scale
    return out if out_dtype is None else out.to(out_dtype)


def rounding_penalty(h: Tensor, beta: float | Tensor) -> Tensor:
    """``Σ (1 - |2 h - 1|^β)`` (a scalar; 0 when every h is 0 or 1)."""
    return (1 - (2 * h - 1).abs().pow(beta)).sum()


#: below it, ``|2h - 1|^β`` is 0 in float32 for every β ≥ 2 the schedule uses
_POW_FLOOR = 1e-30


def rounding_penalty_exp_log(h: Tensor, beta: Tensor) -> Tensor:
    """:func:`rounding_penalty` with the power as ``exp(β · log|2 h - 1|)`` (what ``pow`` computes;
    ``|2h - 1|`` floored at 1e-30, where the power is 0 either way): the compiled kernels' form.
    Its backward is ``p · β / |2h - 1|`` from the power, where ``pow``'s takes a second power;
    equal to :func:`rounding_penalty` to float rounding."""
    return (1 - torch.exp(beta * torch.log((2 * h - 1).abs().clamp_min(_POW_FLOOR)))).sum()


def regularizer_expr(alpha: Tensor, beta: Tensor) -> Tensor:
    """AdaRound's regulariser of α: :func:`rounding_penalty_exp_log` of h(α) (compiled only)."""
    return rounding_penalty_exp_log(rectified_expr(alpha), beta)


def soft_quant_penalty_expr(
    alpha: Tensor,
    w_floor: Tensor,
    scale: Tensor,
    zero_point: Tensor,
    q_min: int,
    q_max: int,
    out_dtype: Optional[torch.dtype],
    beta: Tensor,
) -> tuple[Tensor, Tensor]:
    """:func:`soft_quant_expr` and :func:`regularizer_expr` of one α together (the weight and a
    scalar): compiled, one loop reads α once for both and one loop writes α's gradient from both."""
    h = rectified_expr(alpha)
    return _soft_quant_of(h, w_floor, scale, zero_point, q_min, q_max, out_dtype), rounding_penalty_exp_log(
        h, beta
    )


@functools.cache
def compiled(fn: Callable) -> Callable:
    """``torch.compile(fn)`` with dynamic shapes (one compilation serves every weight of a rank),
    made on first use and kept for the process.

    Compiled with an activation memory budget of 0 (``torch._functorch.config``): the backward
    kernel recomputes the elementwise forward from α and the floor codes instead of reading
    saved weight-sized intermediates (σ(α), masks), the cheaper way for these memory-bound
    kernels (``python -m diffquant.bench.scale --compile`` measures it).
    """
    kernel = torch.compile(fn, dynamic=True)

    @functools.wraps(fn)
    def call(*args):
        with torch._functorch.config.patch(activation_memory_budget=0.0):
            return kernel(*args)

    return call


class AdaRound(nn.Module):
    """The learnable rounding offsets of one weight tensor.

    ``alpha``: nn.Parameter of the weight's shape (requires_grad on: it is what the weight stage
    trains). ``compiled``: run the soft rounding (while α takes gradients) and the regulariser as
    compiled kernels (see the module docstring); set by the stage that trains α.
    """

    compiled: bool = False
    #: β of this iteration's regulariser, announced before the forward (:meth:`RoundingSchedule.announce`)
    #: so that a compiled soft rounding computes the regulariser with it; None: not announced
    penalty_beta: Optional[float] = None

    def __init__(self, alpha: Tensor) -> None:
        super().__init__()
        self.alpha = nn.Parameter(alpha.clone().float())
        self._penalty: Optional[tuple[float, Tensor]] = None  # (β, the regulariser) of the last soft rounding

    @classmethod
    def from_weight(cls, weight: Tensor, scale: Tensor) -> AdaRound:
        """α such that ``h(α) = frac(weight / scale)``; ``scale`` broadcasts to ``weight``."""
        codes = weight / scale
        rest = codes - torch.floor(codes)
        alpha = -torch.log((ZETA - GAMMA) / (rest - GAMMA) - 1)
        return cls(alpha)

    def rectified(self) -> Tensor:
        """h(α) ∈ [0, 1], the soft rounding offset (weight-shaped)."""
        return rectified_expr(self.alpha)

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
        if self.compiled and need_grad:
            args = (
                self._alpha_input(),
                w_floor,
                scale,
                zero_point,
                q_min,
                q_max,
                _autocast_dtype(self.alpha),
            )
            beta = self.penalty_beta
            if beta is None:
                return compiled(soft_quant_expr)(*args)
            out, penalty = compiled(soft_quant_penalty_expr)(*args, self._beta_tensor(beta))
            self._penalty = (beta, penalty)
            return out
        return _SoftQuant.apply(self.alpha, w_floor, scale, zero_point, q_min, q_max, need_grad)

    def _alpha_input(self) -> Tensor:
        """α as a plain tensor view (gradients flow to the parameter): the compiler gives
        parameters static shapes, which would compile again for every weight shape."""
        return self.alpha.view(self.alpha.shape)

    def hard_mask(self) -> Tensor:
        """The frozen choice ``α ≥ 0`` (bool, weight-shaped): round up where True."""
        return self.alpha.detach() >= 0

    def regularizer(self, beta: float) -> Tensor:
        """``Σ (1 - |2 h(α) - 1|^β)`` (a scalar; 0 when every h is 0 or 1): the one the last
        compiled soft rounding computed with this β (taken once), else computed here."""
        done, self._penalty = self._penalty, None
        if done is not None and done[0] == beta:
            return done[1]
        if self.compiled and self.fused():
            return compiled(regularizer_expr)(self._alpha_input(), self._beta_tensor(beta))
        return rounding_penalty(self.rectified(), beta)

    def _beta_tensor(self, beta: float) -> Tensor:
        """β as a tensor for the compiled kernels: a new float each iteration would be a new
        compilation."""
        return torch.tensor(float(beta), device=self.alpha.device)


def _autocast_dtype(t: Tensor) -> Optional[torch.dtype]:
    """The dtype autocast casts a float32 weight to on ``t``'s device (None when autocast is
    off there): the compiled soft rounding writes its output in it, the convolution or matmul
    then casts nothing."""
    kind = t.device.type
    return torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else None


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

    def regularized(self, it: int) -> bool:
        """Whether iteration ``it`` has the regulariser (it is past the warm-up)."""
        return it >= self.warmup * self.iters

    def beta(self, it: int) -> float:
        if not self.regularized(it):
            return self.beta_start
        start = self.warmup * self.iters
        rel = (it - start) / max(self.iters - start, 1)
        return self.beta_end + (self.beta_start - self.beta_end) * max(0.0, 1.0 - rel)

    def announce(self, it: int, roundings: list[AdaRound]) -> None:
        """Before iteration ``it``'s forward: tell compiled roundings its β (None during the
        warm-up), so that their soft rounding computes the regulariser in the same kernel and
        :meth:`loss` takes it from there."""
        beta = self.beta(it) if self.regularized(it) else None
        for r in roundings:
            r.penalty_beta = beta if r.compiled else None
            r._penalty = None

    def loss(self, it: int, roundings: list[AdaRound]) -> Tensor:
        """λ · Σ regularisers at iteration ``it`` (0 during warm-up)."""
        if not roundings:
            return torch.zeros(())
        if not self.regularized(it):  # on α's device: adding it to a GPU loss needs no copy
            return torch.zeros((), device=roundings[0].alpha.device)
        beta = self.beta(it)
        return self.weight * sum(r.regularizer(beta) for r in roundings)
