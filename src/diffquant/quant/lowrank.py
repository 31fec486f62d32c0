"""SVDQuant's per-layer transform: channel smoothing plus a 16-bit low-rank branch.

For a Conv2d / Linear layer with weight ``W`` ``(C_out, C_in, *k)`` and input ``X``, SVDQuant
(Li et al., ICLR 2025, Eq. 5) computes

    X W = X̂ Ŵ ≈ X̂ L1 L2  +  Q(X̂) Q(R)

* smoothing: ``X̂ = X / λ`` and ``Ŵ = W · λ`` per input channel (``λ`` ``(C_in,)``), moving
  activation outliers into the weight;
* low-rank branch: the top ``r`` singular directions of ``Ŵ`` (reshaped to ``(C_out, C_in·k²)``):
  ``L1 = U_r S_r`` (``up``, ``(C_out, r)``) and ``L2 = V_rᵀ`` (``down``, ``(r, C_in, *k)``), kept in
  16 bits (their values are rounded to float16 on construction) and fed the *unquantized*
  smoothed input;
* residual ``R = Ŵ - L1 L2``: what the layer's weight quantizer quantizes.

A conv's branch is two convolutions: ``down`` with the layer's kernel, stride, padding and
dilation, then ``up`` as a 1×1 conv, so the branch equals ``conv(X̂, L1 L2)`` exactly.

The transform hangs on a quantized layer as ``layer.transform``
(:class:`~diffquant.quant.modules.QuantLayerMixin`); its tensors are part of the quantization
state (saved and reloaded with the quantizers by :mod:`diffquant.quant.checkpoint`).
"""

from __future__ import annotations

import copy
import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from diffquant.quant.quantizers import WeightQuantizer, expand_groups, int_range, weight_bits

BRANCH_BITS = 16


def channel_axis(x: Tensor) -> int:
    """The input-channel axis of a layer input: 1 for ``(B, C, H, W)``, the last otherwise."""
    return 1 if x.dim() == 4 else x.dim() - 1


def _along(v: Tensor, ndim: int, axis: int) -> Tensor:
    shape = [1] * ndim
    shape[axis] = -1
    return v.view(shape)


def top_singular(weight: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """``(up, down)`` of the best rank-``rank`` approximation of ``weight`` ``(C_out, C_in, *k)``
    (Eckart–Young): ``up`` ``(C_out, r)`` = ``U_r S_r``, ``down`` ``(r, C_in, *k)`` = ``V_rᵀ``."""
    flat = weight.detach().reshape(weight.shape[0], -1).double()
    u, s, vh = torch.linalg.svd(flat, full_matrices=False)
    up = (u[:, :rank] * s[:rank]).to(weight.dtype)
    down = vh[:rank].to(weight.dtype).reshape(rank, *weight.shape[1:])
    return up, down


class SmoothLowRank(nn.Module):
    """Smoothing factors ``λ`` and the low-rank branch of one layer (module docstring).

    Buffers: ``smooth`` ``(C_in,)``; ``up`` ``(C_out, r)``, ``down`` ``(r, C_in, *k)`` (``r`` may
    be 0: smoothing only). ``alpha`` is the migration strength the factors were made with
    (recorded, not used).
    """

    def __init__(self, smooth: Tensor, up: Tensor, down: Tensor, alpha: float = float("nan")) -> None:
        super().__init__()
        self.register_buffer("smooth", smooth.detach().clone().contiguous())
        self.register_buffer("up", up.detach().half().to(up.dtype).contiguous())
        self.register_buffer("down", down.detach().half().to(down.dtype).contiguous())
        self.alpha = float(alpha)

    @classmethod
    def empty(cls, weight_shape: tuple[int, ...], rank: int) -> SmoothLowRank:
        """Slots of the right shapes, to be filled from a checkpoint."""
        c_out, c_in, *k = weight_shape
        return cls(torch.ones(c_in), torch.zeros(c_out, rank), torch.zeros(rank, c_in, *k))

    @classmethod
    def from_weight(
        cls, weight: Tensor, smooth: Tensor, rank: int, alpha: float = float("nan")
    ) -> SmoothLowRank:
        """The transform of ``weight`` with factors ``smooth``: the branch is the top ``rank``
        singular directions of the smoothed weight ``W · λ``."""
        smoothed = weight.detach() * _along(smooth, weight.dim(), 1)
        up, down = top_singular(smoothed, rank)
        return cls(smooth, up, down, alpha)

    @property
    def rank(self) -> int:
        return self.up.shape[1]

    def smooth_input(self, x: Tensor) -> Tensor:
        """``X̂ = X / λ`` along the channel axis."""
        return x / _along(self.smooth, x.dim(), channel_axis(x)).to(x.dtype)

    def smooth_weight(self, weight: Tensor) -> Tensor:
        """``Ŵ = W · λ`` along the input-channel axis (dim 1)."""
        return weight * _along(self.smooth, weight.dim(), 1).to(weight.dtype)

    def lowrank_weight(self) -> Tensor:
        """``L1 L2`` in the weight's shape ``(C_out, C_in, *k)``."""
        inner = math.prod(self.down.shape[1:])
        return (self.up @ self.down.reshape(self.rank, inner)).reshape(self.up.shape[0], *self.down.shape[1:])

    def residual(self, weight: Tensor) -> Tensor:
        """``R = W · λ - L1 L2``: the part the weight quantizer quantizes (``W · λ`` at rank 0)."""
        if self.rank == 0:
            return self.smooth_weight(weight)
        return self.smooth_weight(weight) - self.lowrank_weight()

    def branch(self, x_hat: Tensor, conv: Optional[nn.Conv2d] = None) -> Tensor:
        """``X̂ L1 L2`` for a Linear (``conv`` None) or a Conv2d (its stride / padding / dilation)."""
        if self.rank == 0:
            return 0.0
        if conv is None:
            return F.linear(F.linear(x_hat, self.down), self.up)
        mid = F.conv2d(x_hat, self.down, None, conv.stride, conv.padding, conv.dilation)
        return F.conv2d(mid, self.up[:, :, None, None])

    def extra_repr(self) -> str:
        return f"channels={self.smooth.numel()}, rank={self.rank}, alpha={self.alpha:g}"


class GroupSmooth(nn.Module):
    """Time-step-aware channel balancing (ViDiT-Q's ``timerange``): one smoothing vector per group
    of sampler steps, and one weight quantizer per group for the weight it gives.

    Buffers: ``smooth`` ``(G, C_in)``, ``bits`` ``(G,)`` (each group's weight bit-width: ViDiT-Q's
    mixed precision gives some groups more). ``weight_quantizers``: ``G`` weight quantizers of the
    layer's kind, each with its range set on ``W · λ_g``. The rows of a call pick their group from
    :attr:`group_index`, which the denoiser's time-step router sets
    (:func:`~diffquant.quant.timestep.set_group_index`); the layer's own input quantizer must be a
    dynamic one (a per-token grid does not depend on the rows around it).
    """

    def __init__(
        self, smooth: Tensor, weight_quantizers: list[nn.Module], alpha: float = float("nan")
    ) -> None:
        super().__init__()
        if smooth.dim() != 2 or smooth.shape[0] != len(weight_quantizers):
            raise ValueError(f"smooth {tuple(smooth.shape)} needs one row per weight quantizer")
        self.register_buffer("smooth", smooth.detach().clone().contiguous())
        self.weight_quantizers = nn.ModuleList(weight_quantizers)
        # each group's weight bit-width (mixed precision may differ per group): rebuilt on load
        bits = [weight_bits(q) for q in weight_quantizers]
        self.register_buffer("bits", torch.tensor(bits, dtype=torch.long))
        self.alpha = float(alpha)
        self.group_index: Optional[Tensor] = None

    @property
    def n_groups(self) -> int:
        return self.smooth.shape[0]

    def smooth_weight(self, weight: Tensor) -> Tensor:
        """Every group's ``W · λ_g``, ``(G, C_out, C_in, *k)``."""
        return torch.stack([weight * _along(s, weight.dim(), 1).to(weight.dtype) for s in self.smooth])

    def quantized_weights(self, weight: Tensor) -> Tensor:
        """Every group's ``W · λ_g`` through its own weight quantizer, ``(G, C_out, C_in, *k)``
        (what the layer computes with, or freezes in :func:`~diffquant.quant.state.frozen_weights`)."""
        return torch.stack([q(w) for q, w in zip(self.weight_quantizers, self.smooth_weight(weight))])

    def layer_forward(self, layer: nn.Module, x: Tensor, conv: Optional[nn.Conv2d]) -> Tensor:
        """The layer's output: each row through its group's smoothing and its group's weight of
        ``layer.quantized_weight()`` (quantized, frozen or FP as the layer's state says)."""
        if self.group_index is None:
            raise RuntimeError(
                "time-step-aware channel balancing has no time step: call the denoiser (its "
                "time-step router sets it) or diffquant.quant.set_timestep first"
            )
        gi = expand_groups(self.group_index, x)
        weights, bias = layer.quantized_weight(), layer.effective_bias()
        out = None
        for g in gi.unique().tolist():
            rows = (gi == g).nonzero().flatten()
            xg = x[rows] / _along(self.smooth[g], x.dim(), channel_axis(x)).to(x.dtype)
            xq = layer.quantized_input(xg)
            w = weights[g]
            y = layer._conv_forward(xq, w, bias) if conv is not None else F.linear(xq, w, bias)
            if out is None:
                out = y.new_empty((x.shape[0], *y.shape[1:]))
            out[rows] = y
        return out

    def extra_repr(self) -> str:
        return (
            f"channels={self.smooth.shape[1]}, groups={self.n_groups}, bits={self.bits.tolist()}, "
            f"alpha={self.alpha:g}"
        )


def with_bits(quantizer: nn.Module, bits: int) -> nn.Module:
    """A copy of a weight quantizer (plain, group-wise or split) at another bit-width."""
    q = copy.deepcopy(quantizer)
    for m in q.modules():
        if isinstance(m, WeightQuantizer):
            m.bits = int(bits)
            m.q_min, m.q_max = int_range(m.bits, m.mode)
    return q
