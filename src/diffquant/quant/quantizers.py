"""Uniform affine fake quantization: the math, and the weight / activation quantizer modules.

A fake quantizer maps a float tensor to the nearest point of a uniform grid and back:

    x_int = clamp(round(x / Δ) + z, q_min, q_max)        # integer code
    x_q   = (x_int - z) · Δ                              # back to float

``Δ`` (scale) and ``z`` (zero point) come from a clipping range ``[lo, hi]``. Three grids:

* ``affine``    : z = round(-lo / Δ), codes [0, 2^b - 1]                  (weights, activations)
* ``symmetric`` : z = 0, codes [-2^(b-1), 2^(b-1) - 1], Δ = absmax / (2^(b-1) - 1)
* ``unsigned``  : z = 0, codes [0, 2^b - 1], Δ = hi / (2^b - 1)           (softmax probabilities)

Rounding uses a straight-through estimator (:func:`round_ste`), so gradients reach both ``x``
and ``Δ`` (the LSQ gradient, without LSQ's gradient scaling, as in Q-Diffusion). Outside the
range the gradient w.r.t. ``x`` is zero (plain clamp).

Initial ranges: ``minmax`` (the tensor's range) or ``lp``, Q-Diffusion's search that shrinks the
range by ratios 1.00, 0.99, ... (``n_candidates`` of them, 80 → down to 0.21) and keeps the one
with the smallest ``mean(|x - x_q|^p)`` (p = 2.4), per channel when the quantizer is per-channel.

Modules:

* :class:`WeightQuantizer` — per output channel (dim 0), fixed Δ/z after init; rounding is
  ``nearest`` (round-to-nearest through the STE), ``soft`` (AdaRound, learning α; see
  :mod:`diffquant.quant.adaround`) or ``hard`` (the AdaRound choices frozen as a ``round_up`` mask;
  the FP latent weight still gets gradients through ``floor`` by the STE, as QuEST needs).
* :class:`GroupWeightQuantizer` — per output channel and group of ``group_size`` input channels
  (SVDQuant's INT4 grid, groups of 64), round-to-nearest only.
* :class:`ActQuantizer` — per tensor or per channel (dim 1 of 4-D inputs, last dim otherwise),
  learnable Δ (LSQ), optionally *time-step aware*: ``n_groups`` parameter sets, one per group of
  sampler steps, selected per batch row by :attr:`ActQuantizer.group_index`.
* :class:`TokenActQuantizer` — *dynamic per-token* (ViDiT-Q): each token's range is its own min
  and max, computed at run time, optionally per group of ``group_size`` channels of the token;
  nothing is calibrated or learned.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable, Iterable, Iterator
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from diffquant.quant.adaround import AdaRound

MODES = ("affine", "symmetric", "unsigned")
_EPS = 1e-8


# ---------------------------------------------------------------------------- the math
def round_ste(x: Tensor) -> Tensor:
    """``round(x)`` forward, identity backward."""
    return (x.round() - x).detach() + x


def floor_ste(x: Tensor) -> Tensor:
    """``floor(x)`` forward, identity backward."""
    return (x.floor() - x).detach() + x


def int_range(bits: int, mode: str) -> tuple[int, int]:
    """The integer codes ``(q_min, q_max)`` of a ``bits``-bit grid of the given mode."""
    if mode == "symmetric":
        return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    if mode in ("affine", "unsigned"):
        return 0, 2**bits - 1
    raise ValueError(f"unknown quantization mode {mode!r}; use one of {MODES}")


def range_to_qparams(lo: Tensor, hi: Tensor, bits: int, mode: str) -> tuple[Tensor, Tensor]:
    """Scale Δ and zero point z (float tensors holding integers) for clipping range [lo, hi].

    ``lo``/``hi`` have any (equal) shape, e.g. ``(C,)``; the range is widened to contain 0 so that
    zero is exact. Δ is clamped to at least 1e-8 (an all-zero channel would give Δ = 0).
    """
    q_min, q_max = int_range(bits, mode)
    lo, hi = torch.minimum(lo, torch.zeros_like(lo)), torch.maximum(hi, torch.zeros_like(hi))
    if mode == "symmetric":
        scale = torch.maximum(-lo, hi) / q_max
        return scale.clamp_min(_EPS), torch.zeros_like(scale)
    if mode == "unsigned":
        return (hi / q_max).clamp_min(_EPS), torch.zeros_like(hi)
    scale = ((hi - lo) / (q_max - q_min)).clamp_min(_EPS)
    zero_point = torch.round(-lo / scale).clamp(q_min, q_max)
    return scale, zero_point


def int_codes(x: Tensor, scale: Tensor, zero_point: Tensor, q_min: int, q_max: int) -> Tensor:
    """The integer codes ``clamp(round(x / Δ) + z, q_min, q_max)`` of ``x`` (a new float tensor of
    ``x``'s shape, no gradient), for broadcastable ``scale`` / ``zero_point``."""
    return (x / scale).round_().add_(zero_point).clamp_(q_min, q_max)


def fake_quant(x: Tensor, scale: Tensor, zero_point: Tensor, q_min: int, q_max: int) -> Tensor:
    """Quantize-dequantize ``x`` with broadcastable ``scale``/``zero_point`` (STE on round).

    Without autograd (inference, or no input needing a gradient) a fused in-place path computes
    the same values about 5x faster on CPU.
    """
    if not torch.is_grad_enabled() or not (x.requires_grad or scale.requires_grad):
        return int_codes(x, scale, zero_point, q_min, q_max).sub_(zero_point).mul_(scale)
    x_int = torch.clamp(round_ste(x / scale) + zero_point, q_min, q_max)
    return (x_int - zero_point) * scale


def lp_search_range(
    x2d: Tensor,
    bits: int,
    mode: str,
    p: float = 2.4,
    n_candidates: int = 80,
    lo: Optional[Tensor] = None,
    hi: Optional[Tensor] = None,
    col_weight: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor]:
    """Q-Diffusion's clipping search, per row of ``x2d`` ``(C, N)``: returns ``(lo, hi)``, each ``(C,)``.

    Candidate ``i`` (0 ≤ i < n_candidates ≤ 100) scales the full range by ``1 - 0.01 i``; the
    candidate with the smallest ``mean(|x - q(x)|^p)`` along the row wins (the first one on a tie;
    NaN losses never win). ``lo``/``hi`` override the full range (e.g. computed on more data than
    the ``x2d`` sample the loss is measured on); ``col_weight`` ``(N,)`` replaces the mean by a
    weighted sum (for a weighted subsample).

    The unweighted search is computed block by block of rows, all candidates of a block while it
    is in cache, with the exact ops of the candidate-by-candidate loop (:func:`_lp_losses`): the
    losses, hence the chosen ranges, are bit-identical to :func:`_lp_search_range_loop`.
    """
    if not 1 <= n_candidates <= 100:
        raise ValueError(f"lp_candidates={n_candidates} must be in 1..100 (ratios 1.00 - 0.01 i)")
    x2d = x2d.float()
    if col_weight is not None or not x2d.is_contiguous():
        # a permuted x2d would fake-quantize in its memory order: keep the original loop for it
        return _lp_search_range_loop(x2d, bits, mode, p, n_candidates, lo, hi, col_weight)
    lo0 = x2d.amin(dim=1) if lo is None else lo.float()
    hi0 = x2d.amax(dim=1) if hi is None else hi.float()
    with torch.no_grad():
        # candidate ranges (C, K): the same float32 products as ``lo0 * ratio`` one ratio at a time
        ratios = torch.tensor([1.0 - 0.01 * i for i in range(n_candidates)], dtype=torch.float32)
        c_lo, c_hi = lo0[:, None] * ratios.to(lo0.device), hi0[:, None] * ratios.to(hi0.device)
        losses = _lp_losses(x2d, c_lo, c_hi, bits, mode, p)  # (K, C)
        # the loop keeps the first strictly smaller loss: argmin's first minimum, NaN never chosen
        best = torch.nan_to_num(losses, nan=math.inf).argmin(dim=0, keepdim=True)  # (1, C)
        return c_lo.gather(1, best.t())[:, 0], c_hi.gather(1, best.t())[:, 0]


_LP_BLOCK_ELEMS = 1 << 17  # elements of x2d per row block of the L_p search (512 KiB, in L2)
_POW_ALIGN = 64  # the row blocks start at flat offsets that are multiples of this (see _lp_losses)


def _lp_losses(x2d: Tensor, c_lo: Tensor, c_hi: Tensor, bits: int, mode: str, p: float) -> Tensor:
    """``mean(|x - q_k(x)|^p)`` per candidate range and row: ``(K, C)`` float32, for ``x2d``
    ``(C, N)`` float32 and candidate ranges ``c_lo``/``c_hi`` ``(C, K)``.

    Bit-identical to :func:`fake_quant` + ``abs`` + ``pow`` + ``mean(dim=1)`` on the whole
    ``(C, N)`` tensor per candidate (the loop of :func:`_lp_search_range_loop`):

    * every op but ``pow`` (div, round, add, clamp, sub, mul, abs) is exact IEEE arithmetic,
      whatever the tensor layout, and they are done in the loop's order;
    * ``pow`` is not: CPU kernels compute an element with the SIMD routine (Sleef) or, in the
      last ``numel % (2 · vector width)`` elements of each contiguous run a thread processes,
      with ``std::pow``, and the two differ in the last bit. At one thread the whole-tensor call
      is one run, so row blocks that start at flat offsets divisible by :data:`_POW_ALIGN` (a
      multiple of every CPU vector step) and end on such an offset, or at the tensor's end, give
      every element the routine it gets in the whole-tensor call. With more threads, or off the
      CPU, the whole tensor is one block (the original layout, the same kernel split).
    * the row means reduce whole rows of the same length along the contiguous dim, as before.
    """
    c, n = x2d.shape
    k = c_lo.shape[1]
    q_min, q_max = int_range(bits, mode)
    scale, zp = range_to_qparams(c_lo, c_hi, bits, mode)  # (C, K) each, elementwise as per candidate
    scale_t, zp_t = scale.t().contiguous(), zp.t().contiguous()  # (K, C)
    losses = torch.empty(k, c, dtype=torch.float32, device=x2d.device)
    if x2d.device.type != "cpu" or torch.get_num_threads() > 1 or c * n <= _LP_BLOCK_ELEMS:
        rows = c
    else:  # whole rows, as many as fit the block, a multiple of `step` rows (aligned offsets)
        step = _POW_ALIGN // math.gcd(n, _POW_ALIGN)
        rows = max(step, (_LP_BLOCK_ELEMS // max(n, 1)) // step * step)
    buf = torch.empty(min(rows, c), n, dtype=torch.float32, device=x2d.device)
    for r0 in range(0, c, rows):
        r1 = min(c, r0 + rows)
        x, b = x2d[r0:r1], buf[: r1 - r0]
        for i in range(k):
            s, z = scale_t[i, r0:r1, None], zp_t[i, r0:r1, None]
            torch.div(x, s, out=b)
            b.round_().add_(z).clamp_(q_min, q_max).sub_(z).mul_(s).sub_(x).abs_()
            b.pow_(p)
            torch.mean(b, dim=1, out=losses[i, r0:r1])
    return losses


def _lp_search_range_loop(
    x2d: Tensor,
    bits: int,
    mode: str,
    p: float,
    n_candidates: int,
    lo: Optional[Tensor],
    hi: Optional[Tensor],
    col_weight: Optional[Tensor],
) -> tuple[Tensor, Tensor]:
    """:func:`lp_search_range` one candidate at a time over the whole ``(C, N)`` tensor (the
    weighted search, whose ``err @ col_weight`` product is summed by BLAS in a layout-dependent
    order, keeps this form)."""
    x2d = x2d.float()
    lo0 = x2d.amin(dim=1) if lo is None else lo.float()
    hi0 = x2d.amax(dim=1) if hi is None else hi.float()
    q_min, q_max = int_range(bits, mode)
    best = torch.full_like(lo0, math.inf)
    best_lo, best_hi = lo0.clone(), hi0.clone()
    with torch.no_grad():
        for i in range(n_candidates):
            ratio = 1.0 - 0.01 * i
            c_lo, c_hi = lo0 * ratio, hi0 * ratio
            scale, zp = range_to_qparams(c_lo, c_hi, bits, mode)
            err = (fake_quant(x2d, scale[:, None], zp[:, None], q_min, q_max) - x2d).abs_().pow_(p)
            loss = err.mean(dim=1) if col_weight is None else err @ col_weight
            better = loss < best
            best = torch.where(better, loss, best)
            best_lo = torch.where(better, c_lo, best_lo)
            best_hi = torch.where(better, c_hi, best_hi)
    return best_lo, best_hi


def _sample_size(channels: int, max_elems: int) -> int:
    """Columns per row of the L_p loss's sample: ``max_elems`` spread over ``channels`` rows, at
    least 8."""
    return max(8, max_elems // max(channels, 1))


def _tail_sample_weights(n: int, keep: int, device: torch.device) -> tuple[int, Tensor]:
    """The number of top columns of a tail-preserving sample of ``keep`` of ``n`` columns
    (``keep // 4``, at least 1) and the ``(keep,)`` weights of its columns, top ones first: 1/n for
    each top column, (n - n_top)/(n · n_rest) for each of the ``n_rest`` uniform ones."""
    n_top = max(1, keep // 4)
    n_rest = keep - n_top
    weight = torch.cat([torch.full((n_top,), 1.0 / n), torch.full((n_rest,), (n - n_top) / (n * n_rest))])
    return n_top, weight.to(device)


def _tail_preserving_sample(
    x2d: Tensor, keep: int, generator: Optional[torch.Generator]
) -> tuple[Tensor, Tensor]:
    """``keep`` columns per row of ``x2d`` ``(C, N)`` and their weights ``(keep,)``: the
    ``keep // 4`` largest ``|x|`` of the row exactly (weight 1/N), and a uniform sample of the
    rest (weight (N - k)/(N · n_rest)), so the weighted L_p loss is an unbiased estimate of the
    full mean that never misses the outliers the clipping decision hinges on."""
    c, n = x2d.shape
    n_top, weight = _tail_sample_weights(n, keep, x2d.device)
    top = x2d.abs().topk(n_top, dim=1).indices
    scores = torch.rand(c, n, generator=generator).to(x2d.device)
    scores.scatter_(1, top, -1.0)
    rest = scores.topk(keep - n_top, dim=1).indices
    cols = torch.cat([top, rest], dim=1)
    return torch.gather(x2d, 1, cols), weight


def find_range(
    x2d: Tensor,
    bits: int,
    mode: str,
    method: str,
    p: float = 2.4,
    n_candidates: int = 80,
    max_elems: int = 1 << 18,
    generator: Optional[torch.Generator] = None,
) -> tuple[Tensor, Tensor]:
    """The initial clipping range ``(lo, hi)`` ``(C,)`` of data ``x2d`` ``(C, N)`` by ``method``.

    ``minmax``: the row's min and max. ``lp``: :func:`lp_search_range` on the full data's
    min/max, the loss measured on at most ``max_elems`` elements (each row's largest values
    exactly plus a weighted random sample of the rest, fixed by ``generator``).
    """
    lo, hi = x2d.amin(dim=1).float(), x2d.amax(dim=1).float()
    if method == "minmax":
        return lo, hi
    if method != "lp":
        raise ValueError(f"unknown range init {method!r}; use 'lp' or 'minmax'")
    c, n = x2d.shape
    keep = _sample_size(c, max_elems)
    if n <= keep:
        return lp_search_range(x2d, bits, mode, p, n_candidates, lo, hi)
    sample, weight = _tail_preserving_sample(x2d.float(), keep, generator)
    return lp_search_range(sample, bits, mode, p, n_candidates, lo, hi, col_weight=weight)


def _same_key(a: tuple, b: tuple) -> bool:
    """Two :meth:`WeightQuantizer._tensor_key` pairs name the same, unchanged tensors."""
    for ka, kb in zip(a, b):
        root = ka[0]()
        if root is None or root is not kb[0]() or ka[1:] != kb[1:]:
            return False
    return True


def expand_groups(group_index: Tensor, x: Tensor) -> Tensor:
    """The time-step group of each row of ``x`` ``(B,)`` from a router's ``group_index`` (one
    entry for all rows, or one per row of the call, repeated when ``x`` holds several rows per
    call row)."""
    gi = group_index.reshape(-1).to(x.device)
    if gi.numel() == 1:
        return gi.expand(x.shape[0])
    if gi.numel() != x.shape[0]:
        if x.shape[0] % gi.numel():
            raise RuntimeError(f"{gi.numel()} time steps for an input batch of {x.shape[0]}")
        gi = gi.repeat_interleave(x.shape[0] // gi.numel())
    return gi


def channels_first(x: Tensor, per_channel: bool, ch_axis: int) -> Tensor:
    """``x`` as ``(C, N)`` with the channel axis first (``(1, numel)`` when per-tensor)."""
    if not per_channel:
        return x.reshape(1, -1)
    return x.movedim(ch_axis, 0).reshape(x.shape[ch_axis], -1)


# ---------------------------------------------------------------------------- weights
class WeightQuantizer(nn.Module):
    """Per-output-channel fake quantizer of a weight ``(C_out, ...)``.

    Buffers: ``scale``, ``zero_point`` ``(C_out,)``; ``round_up`` (bool, weight-shaped) once the
    rounding is ``hard``. ``rounding`` is ``nearest``, ``soft`` (AdaRound α in :attr:`adaround`)
    or ``hard``. ``enabled = False`` returns the weight unchanged (the FP path).
    """

    kind = "weight"
    _floor_cache: Optional[tuple[tuple, Tensor]] = None  # class default: modules pickled before it

    def __init__(self, weight_shape: tuple[int, ...], bits: int, mode: str = "affine") -> None:
        super().__init__()
        self.bits, self.mode = int(bits), mode
        self.q_min, self.q_max = int_range(self.bits, mode)
        self.weight_shape = tuple(weight_shape)
        c_out = self.weight_shape[0]
        self.register_buffer("scale", torch.ones(c_out))
        self.register_buffer("zero_point", torch.zeros(c_out))
        self.register_buffer("round_up", None)
        self.adaround: Optional[AdaRound] = None
        self.enabled = True
        # floor(W / Δ) of the soft rounding, kept with the identity of the W and Δ it came from
        self._floor_cache: Optional[tuple[tuple, Tensor]] = None

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_floor_cache"] = None  # weak references neither pickle nor belong to a copy
        return state

    @property
    def rounding(self) -> str:
        if self.adaround is not None:
            return "soft"
        return "hard" if self.round_up is not None else "nearest"

    def _bshape(self, t: Tensor) -> Tensor:
        return t.view(-1, *([1] * (len(self.weight_shape) - 1)))

    @torch.no_grad()
    def init_range(self, weight: Tensor, method: str = "lp", p: float = 2.4, n_candidates: int = 80) -> None:
        """Set Δ, z per output channel from ``weight`` by ``minmax`` or the ``lp`` search."""
        lo, hi = find_range(
            weight.detach().reshape(weight.shape[0], -1),
            self.bits,
            self.mode,
            method,
            p,
            n_candidates,
            max_elems=1 << 62,
        )
        scale, zp = range_to_qparams(lo, hi, self.bits, self.mode)
        self.scale.copy_(scale)
        self.zero_point.copy_(zp)
        self._floor_cache = None

    # -- AdaRound life cycle
    def start_adaround(self, weight: Tensor) -> AdaRound:
        """Switch to ``soft`` rounding with α initialised so that h(α) = frac(W / Δ)."""
        self.round_up = None
        self._floor_cache = None
        self.adaround = AdaRound.from_weight(weight.detach(), self._bshape(self.scale))
        return self.adaround

    @torch.no_grad()
    def harden(self) -> None:
        """Freeze the AdaRound choices: ``soft`` → ``hard`` (α is dropped, ``round_up`` kept)."""
        self._floor_cache = None
        if self.adaround is None:
            return
        self.round_up = self.adaround.hard_mask()
        self.adaround = None

    @staticmethod
    def _tensor_key(t: Tensor) -> tuple:
        """What identifies the values of ``t`` while it lives: its root tensor (weakly: a freed
        tensor never matches, so a new one at the same address cannot alias), the version counter
        (bumped by every in-place write through autograd-visible tensors: optimizer steps,
        ``copy_`` under ``no_grad``, ``param.data = …`` swaps change the address), and the view."""
        root = t if t._base is None else t._base
        return (weakref.ref(root), t._version, t.data_ptr(), t.shape, t.stride(), t.dtype, t.device)

    def _floor_codes(self, weight: Tensor, scale: Tensor) -> Tensor:
        """``floor(W / Δ)`` (weight-shaped, no gradient), computed once per (weight, Δ) state.

        The soft rounding's integer part is constant while W and Δ are: it is cached, keyed on
        both tensors' identity, version and layout (:meth:`_tensor_key`), so any change to
        either (an in-place update, a new tensor, a different view) recomputes it. Writes that
        bypass the version counter (``tensor.data.copy_(…)``) are not seen: do not modify W or Δ
        that way while rounding is ``soft``.
        """
        key = (self._tensor_key(weight), self._tensor_key(self.scale))
        cache = self._floor_cache
        if cache is not None and _same_key(cache[0], key):
            return cache[1]
        w_floor = torch.floor(weight.detach() / scale)
        self._floor_cache = (key, w_floor)
        return w_floor

    def forward(self, weight: Tensor) -> Tensor:
        if not self.enabled:
            return weight
        scale, zp = self._bshape(self.scale), self._bshape(self.zero_point)
        if self.adaround is not None:
            w_floor = self._floor_codes(weight, scale)
            ada = self.adaround
            if (
                ada.fused()
                and w_floor.dtype == ada.alpha.dtype == scale.dtype == zp.dtype
                and not (scale.requires_grad or zp.requires_grad)
            ):
                return ada.soft_quant(w_floor, scale, zp, self.q_min, self.q_max)
            w_int = w_floor + ada.rectified()
        elif self.round_up is not None:
            w_int = floor_ste(weight / scale) + self.round_up.to(weight.dtype)
        else:
            w_int = round_ste(weight / scale)
        w_int = torch.clamp(w_int + zp, self.q_min, self.q_max)
        return (w_int - zp) * scale

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        # the rounding mode is part of the state: recreate the slots the checkpoint fills
        key, alpha_key = prefix + "round_up", prefix + "adaround.alpha"
        if key in state_dict:
            self.adaround = None
            self.round_up = torch.zeros_like(state_dict[key], dtype=torch.bool)
        elif alpha_key in state_dict:
            self.round_up = None
            if self.adaround is None:
                self.adaround = AdaRound(torch.zeros_like(state_dict[alpha_key]))
        else:
            self.adaround, self.round_up = None, None
        self._floor_cache = None
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def extra_repr(self) -> str:
        return f"bits={self.bits}, mode={self.mode}, per_channel, rounding={self.rounding}"


class GroupWeightQuantizer(WeightQuantizer):
    """Fake quantizer of a weight ``(C_out, C_in, *k)`` with one grid per output channel and group
    of ``group_size`` consecutive input channels (with all their kernel taps; the last group may be
    smaller): SVDQuant's group-wise INT4 (deepcompressor ``group_shape [1, 64]``).

    Buffers ``scale``, ``zero_point`` ``(C_out, G)``, ``G = ceil(C_in / group_size)``. Rounding is
    round-to-nearest only: AdaRound (:meth:`start_adaround`) is refused.
    """

    def __init__(
        self, weight_shape: tuple[int, ...], bits: int, mode: str = "affine", group_size: int = 64
    ) -> None:
        super().__init__(weight_shape, bits, mode)
        self.group_size = int(group_size)
        c_out, c_in = self.weight_shape[0], self.weight_shape[1]
        n_groups = -(-c_in // self.group_size)
        self.scale = torch.ones(c_out, n_groups)
        self.zero_point = torch.zeros(c_out, n_groups)

    def _bshape(self, t: Tensor) -> Tensor:
        full = t.repeat_interleave(self.group_size, dim=1)[:, : self.weight_shape[1]]
        return full.view(*full.shape, *([1] * (len(self.weight_shape) - 2)))

    @torch.no_grad()
    def init_range(self, weight: Tensor, method: str = "lp", p: float = 2.4, n_candidates: int = 80) -> None:
        """Set Δ, z per output channel and input-channel group by ``minmax`` or the ``lp`` search."""
        w = weight.detach()
        for g in range(self.scale.shape[1]):
            part = w[:, g * self.group_size : (g + 1) * self.group_size].reshape(w.shape[0], -1)
            lo, hi = find_range(part, self.bits, self.mode, method, p, n_candidates, max_elems=1 << 62)
            scale, zp = range_to_qparams(lo, hi, self.bits, self.mode)
            self.scale[:, g] = scale
            self.zero_point[:, g] = zp

    def start_adaround(self, weight: Tensor) -> AdaRound:
        raise RuntimeError(
            "group-wise weight quantization (quant.weight_group_size) rounds to nearest only: "
            "use a method without AdaRound (e.g. method=svdquant or ptq_minmax), or "
            "quant.weight_group_size=null"
        )

    def extra_repr(self) -> str:
        return f"bits={self.bits}, mode={self.mode}, per_channel_group({self.group_size}), rounding={self.rounding}"


def weight_bits(quantizer: nn.Module) -> int:
    """The bit-width of a weight quantizer (plain, group-wise, or the halves of a split one)."""
    return next(m.bits for m in quantizer.modules() if isinstance(m, WeightQuantizer))


class SplitWeightQuantizer(nn.Module):
    """Two weight quantizers for the input-channel halves ``W[:, :split]`` and ``W[:, split:]``
    of a conv fed by a concatenation (Q-Diffusion's shortcut split); each is per output channel
    and has its own AdaRound."""

    kind = "weight_split"

    def __init__(
        self,
        weight_shape: tuple[int, ...],
        split: int,
        bits: int,
        mode: str = "affine",
        group_size: Optional[int] = None,
    ) -> None:
        super().__init__()
        if not 0 < split < weight_shape[1]:
            raise ValueError(f"split {split} outside the {weight_shape[1]} input channels")
        self.split = int(split)
        head = (weight_shape[0], split, *weight_shape[2:])
        tail = (weight_shape[0], weight_shape[1] - split, *weight_shape[2:])
        make = lambda shape: (
            WeightQuantizer(shape, bits, mode)
            if group_size is None
            else GroupWeightQuantizer(shape, bits, mode, group_size)
        )
        self.head, self.tail = make(head), make(tail)

    def init_range(self, weight: Tensor, method: str = "lp", p: float = 2.4, n_candidates: int = 80) -> None:
        self.head.init_range(weight[:, : self.split], method, p, n_candidates)
        self.tail.init_range(weight[:, self.split :], method, p, n_candidates)

    @property
    def enabled(self) -> bool:
        return self.head.enabled

    def start_adaround(self, weight: Tensor) -> list[AdaRound]:
        return [
            self.head.start_adaround(weight[:, : self.split]),
            self.tail.start_adaround(weight[:, self.split :]),
        ]

    def harden(self) -> None:
        self.head.harden()
        self.tail.harden()

    def forward(self, weight: Tensor) -> Tensor:
        return torch.cat([self.head(weight[:, : self.split]), self.tail(weight[:, self.split :])], 1)


# ---------------------------------------------------------------------------- activations
class ActQuantizer(nn.Module):
    """Fake quantizer of an activation, per tensor or per channel, with a learnable step (LSQ).

    Parameters/buffers: ``scale`` (nn.Parameter, ``(G, C)``; ``requires_grad`` off until a
    method trains it), ``zero_point`` ``(G, C)``, ``initialized`` (bool). ``G`` = ``n_groups``
    (1 unless time-step aware), ``C`` = channels (1 when per-tensor). The channel axis is 1 for
    4-D inputs ``(B, C, H, W)`` and the last one otherwise (``(B, C)``, ``(B, L, C)``).

    With ``G > 1`` every batch row picks its group from :attr:`group_index` (LongTensor ``(B,)``,
    set by the UNet's time-step hook, see :mod:`diffquant.quant.timestep`).

    Range calibration: between :meth:`start_observing` and :meth:`finish_observing` the quantizer
    records, per group, the batch's clipping range (``minmax``: min/max over all batches; ``lp``:
    the mean over batches of each batch's best range) and passes its input through unchanged, or,
    with ``quantize=True``, quantizes it with the range observed so far (Q-Diffusion's
    initialisation: each quantizer is set on its first input and quantizes at once, so later
    layers see quantized inputs). After :meth:`start_running` every further batch moves the range
    to the exponential moving average of the per-batch min / max (Q-Diffusion's running
    statistics), started from the raw min / max of the batches seen before.

    QDrop (:func:`~diffquant.quant.state.activation_drop`, PTQ4DM's reconstruction): while
    :attr:`keep_prob` is set, each element of the output is the quantized value with that
    probability and the input unchanged otherwise (a fresh Bernoulli mask per call, drawn from the
    global torch generator), so gradients see a mix of quantized and FP activations.
    """

    kind = "act"
    dynamic = False  # True: ranges computed at run time (TokenActQuantizer), never calibrated
    _ready = False  # class default: modules pickled before the host-side flag existed

    def __init__(
        self, bits: int, mode: str = "affine", channels: int = 1, n_groups: int = 1, per_channel: bool = False
    ) -> None:
        super().__init__()
        self.bits, self.mode = int(bits), mode
        self.q_min, self.q_max = int_range(self.bits, mode)
        self.per_channel = bool(per_channel)
        self.channels = int(channels) if per_channel else 1
        self.n_groups = int(n_groups)
        self.scale = nn.Parameter(torch.ones(self.n_groups, self.channels), requires_grad=False)
        self.register_buffer("zero_point", torch.zeros(self.n_groups, self.channels))
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))
        # a host-side copy of `initialized` (reading the buffer in forward would sync the GPU)
        self._ready = False
        self.enabled = True
        self.group_index: Optional[Tensor] = None
        self.keep_prob: Optional[float] = None
        self._observer: Optional[_RangeObserver] = None

    # -- shapes
    def _ch_axis(self, x: Tensor) -> int:
        return 1 if x.dim() == 4 else x.dim() - 1

    def _row_groups(self, x: Tensor) -> Optional[Tensor]:
        """Group of each row of ``x`` ``(B,)``, or None when there is one group."""
        if self.n_groups == 1:
            return None
        gi = self.group_index
        if gi is None:
            raise RuntimeError(
                "time-step-aware activation quantizer has no time step: call the UNet (its "
                "time-step hook sets it) or diffquant.quant.set_timestep(module, timestep) first"
            )
        return expand_groups(gi, x)

    def _broadcast(self, t: Tensor, x: Tensor, groups: Optional[Tensor]) -> Tensor:
        """``(G, C)`` parameters → a tensor broadcastable to ``x``."""
        axis = self._ch_axis(x)
        if groups is None:
            shape = [1] * x.dim()
            shape[axis] = t.shape[1]
            return t[0].view(shape)
        shape = [1] * x.dim()
        shape[0], shape[axis] = x.shape[0], t.shape[1]
        return t[groups].view(shape)

    # -- forward
    def forward(self, x: Tensor) -> Tensor:
        if self._observer is not None:
            self._observer.observe(x, self._row_groups(x))
            if not self._observer.quantize:
                return x
            self._set_qparams(*self._observer.ranges())
        return self._quantize(x)

    @property
    def observing(self) -> bool:
        """Whether ranges are being observed (between :meth:`start_observing` and
        :meth:`finish_observing`)."""
        return self._observer is not None

    def observe_blocks(self, blocks: Iterable[Tensor]) -> None:
        """Observe one call's input given as ``blocks`` along one axis that is neither the batch
        (0) nor the channel axis, e.g. the query blocks of attention probabilities ``(B, heads,
        l, L_k)``: the range update is that of one call on the concatenated input (``minmax``
        exactly; ``lp``: the search on a tail-preserving sample drawn across the blocks, see
        :class:`_BlockSample`), with one block in memory at a time. Then call
        :meth:`forward_observed` on the blocks, recomputed, for the output."""
        if self._observer is None:
            raise RuntimeError("observe_blocks needs start_observing first")
        self._observer.observe_blocks(blocks, self._row_groups)
        if self._observer.quantize:
            self._set_qparams(*self._observer.ranges())

    def forward_observed(self, x: Tensor) -> Tensor:
        """The output for a block of an input already observed by :meth:`observe_blocks` (the
        input itself while observation passes inputs through)."""
        if self._observer is not None and not self._observer.quantize:
            return x
        return self._quantize(x)

    def _quantize(self, x: Tensor) -> Tensor:
        if not self.enabled:
            return x
        if not self._ready and not self._check_initialized():
            raise RuntimeError(
                "activation quantizer used before its range was calibrated: run "
                "diffquant.calib.calibrate_act_ranges (or load a quantized "
                "checkpoint) first, or disable activations with quant_state"
            )
        groups = self._row_groups(x)
        scale = self._broadcast(self.scale, x, groups)
        zp = self._broadcast(self.zero_point, x, groups)
        out = fake_quant(x, scale, zp, self.q_min, self.q_max)
        if self.keep_prob is not None:
            out = torch.where(torch.rand_like(x) < self.keep_prob, out, x)
        return out

    def _check_initialized(self) -> bool:
        """Read the ``initialized`` buffer (a host sync on a GPU) and remember a True: only
        reached while the host-side flag is False, i.e. before calibration or when other code
        wrote the buffer directly (``initialized.fill_(True)``)."""
        self._ready = bool(self.initialized)
        return self._ready

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        self._ready = bool(self.initialized)  # once per load, not per forward

    # -- range calibration
    def start_observing(
        self, method: str, p: float = 2.4, n_candidates: int = 80, seed: int = 0, quantize: bool = False
    ) -> None:
        """Start recording ranges by ``method`` (``minmax`` / ``lp``); with ``quantize`` the
        inputs are quantized with the range observed so far instead of passed through."""
        self._observer = _RangeObserver(self, method, p, n_candidates, seed, quantize)

    def start_running(self, momentum: float) -> None:
        """From now on, further batches update the range as an EMA of per-batch min / max with
        ``momentum`` (Q-Diffusion's ``act_momentum_update``); needs :meth:`start_observing`."""
        if self._observer is None:
            raise RuntimeError("start_running needs start_observing first (the initial range)")
        self._observer.momentum = float(momentum)

    @torch.no_grad()
    def finish_observing(self) -> None:
        """Set Δ, z of every group from the observed ranges (unseen groups copy the nearest)."""
        obs, self._observer = self._observer, None
        if obs is None:
            return
        self._set_qparams(*obs.ranges())

    @torch.no_grad()
    def _set_qparams(self, lo: Optional[Tensor], hi: Optional[Tensor]) -> None:
        if lo is None:
            return  # never called: stays uninitialised
        scale, zp = range_to_qparams(lo, hi, self.bits, self.mode)
        self.scale.data.copy_(scale)
        self.zero_point.copy_(zp)
        self.initialized.fill_(True)
        self._ready = True

    def set_range(self, lo: Tensor, hi: Tensor) -> None:
        """Set Δ, z from a range ``(G, C)`` (or broadcastable) directly."""
        scale, zp = range_to_qparams(
            lo.expand_as(self.scale).float(), hi.expand_as(self.scale).float(), self.bits, self.mode
        )
        with torch.no_grad():
            self.scale.data.copy_(scale)
            self.zero_point.copy_(zp)
            self.initialized.fill_(True)
        self._ready = True

    def extra_repr(self) -> str:
        gran = f"per_channel({self.channels})" if self.per_channel else "per_tensor"
        return f"bits={self.bits}, mode={self.mode}, {gran}, groups={self.n_groups}"


def rows_by_group(x: Tensor, groups: Optional[Tensor]) -> Iterator[tuple[int, Tensor]]:
    """``(group, its rows of x)`` for each time-step group present in ``groups`` ``(B,)``
    (None: one group, 0, with every row)."""
    if groups is None:
        yield 0, x
        return
    for g in groups.unique().tolist():
        yield int(g), x[groups == g]


class _RangeObserver:
    """Accumulates clipping ranges per time-step group for one :class:`ActQuantizer`.

    Before ``momentum`` is set (the initial rows), ``minmax`` keeps the min / max over batches and
    ``lp`` the row-weighted mean of per-batch optima; the raw min / max is kept as well. Once
    ``momentum`` is set (:meth:`ActQuantizer.start_running`), each further batch of a group that
    was seen moves its raw min / max to ``m · old + (1 - m) · batch`` and that EMA is the range.
    """

    MAX_ELEMS = 1 << 16  # elements per batch the L_p loss is measured on (a random subset)

    def __init__(
        self, q: ActQuantizer, method: str, p: float, n_candidates: int, seed: int, quantize: bool = False
    ):
        self.q, self.method, self.p, self.n_candidates = q, method, p, n_candidates
        self.quantize = bool(quantize)
        self.momentum: Optional[float] = None
        self.generator = torch.Generator().manual_seed(seed)
        g, c = q.n_groups, q.channels
        self.lo = torch.zeros(g, c, dtype=torch.float64)
        self.hi = torch.zeros(g, c, dtype=torch.float64)
        self.raw_lo = torch.zeros(g, c, dtype=torch.float64)
        self.raw_hi = torch.zeros(g, c, dtype=torch.float64)
        self.count = torch.zeros(g, dtype=torch.float64)
        self.running = torch.zeros(g, dtype=torch.bool)

    @torch.no_grad()
    def observe(self, x: Tensor, groups: Optional[Tensor]) -> None:
        for g, rows in rows_by_group(x.detach(), groups):
            self._add(g, rows, rows.shape[0])

    @torch.no_grad()
    def observe_blocks(
        self, blocks: Iterable[Tensor], row_groups: Callable[[Tensor], Optional[Tensor]]
    ) -> None:
        """One call given block by block (:meth:`ActQuantizer.observe_blocks`): per time-step
        group a :class:`_BlockSample` gathers the call's min / max (and its L_p sample), then the
        call is added as :meth:`observe` adds a whole one."""
        q = self.q
        samples: dict[int, _BlockSample] = {}
        n_rows: dict[int, int] = {}
        for block in blocks:
            block = block.detach()
            for g, x in rows_by_group(block, row_groups(block)):
                if g not in samples:
                    lp = self.method != "minmax" and not self._running(g)
                    c = q.channels if q.per_channel else 1
                    samples[g] = _BlockSample(c, self.MAX_ELEMS if lp else 0, self.generator)
                    n_rows[g] = x.shape[0]
                samples[g].add(channels_first(x, q.per_channel, q._ch_axis(x)))
        for g, sample in samples.items():
            raw_lo, raw_hi = sample.lo.double().cpu(), sample.hi.double().cpu()
            if self._running(g):
                self._move_running(g, raw_lo, raw_hi, n_rows[g])
                continue
            if self.method == "minmax":
                lo, hi = sample.lo, sample.hi
            elif self.method == "lp":
                lo, hi = sample.lp_range(q.bits, q.mode, self.p, self.n_candidates)
            else:
                raise ValueError(f"unknown range init {self.method!r}; use 'lp' or 'minmax'")
            self._accumulate(g, raw_lo, raw_hi, lo.double().cpu(), hi.double().cpu(), n_rows[g])

    def _running(self, g: int) -> bool:
        return self.momentum is not None and bool(self.count[g] > 0)

    def _add(self, g: int, x: Tensor, n_rows: int) -> None:
        q = self.q
        x2d = channels_first(x, q.per_channel, q._ch_axis(x))
        raw_lo = x2d.amin(dim=1).float().double().cpu()
        raw_hi = x2d.amax(dim=1).float().double().cpu()
        if self._running(g):
            self._move_running(g, raw_lo, raw_hi, n_rows)
            return
        lo, hi = find_range(
            x2d,
            q.bits,
            q.mode,
            self.method,
            self.p,
            self.n_candidates,
            max_elems=self.MAX_ELEMS,
            generator=self.generator,
        )
        self._accumulate(g, raw_lo, raw_hi, lo.double().cpu(), hi.double().cpu(), n_rows)

    def _move_running(self, g: int, raw_lo: Tensor, raw_hi: Tensor, n_rows: int) -> None:
        """Running statistics: the raw min / max move to their EMA with the call's."""
        m = self.momentum
        self.raw_lo[g] = self.raw_lo[g] * m + raw_lo * (1 - m)
        self.raw_hi[g] = self.raw_hi[g] * m + raw_hi * (1 - m)
        self.running[g] = True
        self.count[g] += n_rows

    def _accumulate(
        self, g: int, raw_lo: Tensor, raw_hi: Tensor, lo: Tensor, hi: Tensor, n_rows: int
    ) -> None:
        """Add one call's raw min / max and clipping range ``(C,)`` float64 of group ``g``."""
        if self.count[g] == 0:
            self.raw_lo[g], self.raw_hi[g] = raw_lo, raw_hi
        else:
            self.raw_lo[g] = torch.minimum(self.raw_lo[g], raw_lo)
            self.raw_hi[g] = torch.maximum(self.raw_hi[g], raw_hi)
        if self.method == "minmax":
            if self.count[g] == 0:
                self.lo[g], self.hi[g] = lo, hi
            else:
                self.lo[g], self.hi[g] = torch.minimum(self.lo[g], lo), torch.maximum(self.hi[g], hi)
        else:  # row-weighted mean of per-call optima
            self.lo[g] += lo * n_rows
            self.hi[g] += hi * n_rows
        self.count[g] += n_rows

    def ranges(self) -> tuple[Optional[Tensor], Optional[Tensor]]:
        seen = self.count > 0
        if not seen.any():
            return None, None
        lo, hi = self.lo.clone(), self.hi.clone()
        if self.method != "minmax":
            lo[seen] /= self.count[seen, None]
            hi[seen] /= self.count[seen, None]
        lo[self.running], hi[self.running] = self.raw_lo[self.running], self.raw_hi[self.running]
        seen_idx = seen.nonzero().flatten()
        for g in (~seen).nonzero().flatten().tolist():
            nearest = seen_idx[(seen_idx - g).abs().argmin()]
            lo[g], hi[g] = lo[nearest], hi[nearest]
        dev = self.q.scale.device
        return lo.float().to(dev), hi.float().to(dev)


class _BlockSample:
    """One call's range statistics gathered block by block of columns of ``(C, n_i)`` blocks:
    the per-row min / max and, with ``max_elems``, the tail-preserving sample of
    :func:`find_range` (per row the ``keep // 4`` largest ``|x|`` and a uniform sample without
    replacement of ``keep - keep // 4`` of the rest, ``keep = max(8, max_elems // C)``) drawn
    across the blocks: the largest ``|x|`` are merged block by block, and the uniform sample is
    the columns with the largest of one uniform random key each (drawn from ``generator`` block
    by block), those of the top set left out. Memory: a block and ``2 · keep`` columns."""

    def __init__(self, channels: int, max_elems: int, generator: Optional[torch.Generator]) -> None:
        self.lo: Optional[Tensor] = None
        self.hi: Optional[Tensor] = None
        self.n = 0
        self.keep = _sample_size(channels, max_elems) if max_elems else 0
        self.n_top = max(1, self.keep // 4)  # as _tail_sample_weights (merged before n is known)
        self.generator = generator
        self.top: Optional[tuple[Tensor, Tensor, Tensor]] = None  # |x|, column, x; (C, ≤ n_top)
        self.pool: Optional[tuple[Tensor, Tensor, Tensor]] = None  # key, column, x; (C, ≤ keep)

    def add(self, x2d: Tensor) -> None:
        x2d = x2d.float()
        lo, hi = x2d.amin(dim=1), x2d.amax(dim=1)
        self.lo = lo if self.lo is None else torch.minimum(self.lo, lo)
        self.hi = hi if self.hi is None else torch.maximum(self.hi, hi)
        if self.keep:
            c, n = x2d.shape
            cols = torch.arange(self.n, self.n + n, device=x2d.device).expand(c, n)
            keys = torch.rand(c, n, generator=self.generator).to(x2d.device)
            self.top = self._merge(self.top, x2d.abs(), cols, x2d, self.n_top)
            self.pool = self._merge(self.pool, keys, cols, x2d, self.keep)
        self.n += x2d.shape[1]

    @staticmethod
    def _merge(kept, score: Tensor, cols: Tensor, x: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
        """The ``k`` columns of largest ``score`` per row, of those kept and a new block."""
        top = score.topk(min(k, score.shape[1]), dim=1).indices
        new = (score.gather(1, top), cols.gather(1, top), x.gather(1, top))
        if kept is not None:
            new = tuple(torch.cat([a, b], dim=1) for a, b in zip(kept, new))
            top = new[0].topk(min(k, new[0].shape[1]), dim=1).indices
            new = tuple(t.gather(1, top) for t in new)
        return new

    def lp_range(self, bits: int, mode: str, p: float, n_candidates: int) -> tuple[Tensor, Tensor]:
        """:func:`lp_search_range` on the call's full range, the loss measured on all its data
        (at most ``keep`` columns) or on the weighted sample."""
        _, cols, x = self.pool
        if self.n <= self.keep:  # every column is in the pool: the exact search, in column order
            order = cols.argsort(dim=1)
            return lp_search_range(
                x.gather(1, order).contiguous(), bits, mode, p, n_candidates, self.lo, self.hi
            )
        _, top_cols, top_x = self.top
        c = x.shape[0]
        offset = torch.arange(c, device=x.device)[:, None] * self.n
        in_top = torch.isin(cols + offset, top_cols + offset)
        rank = torch.arange(cols.shape[1], device=x.device).expand_as(cols).masked_fill(in_top, cols.shape[1])
        n_top, weight = _tail_sample_weights(self.n, self.keep, x.device)
        rest = (
            rank.topk(self.keep - n_top, dim=1, largest=False).indices.sort(dim=1).values
        )  # highest keys first
        sample = torch.cat([top_x, x.gather(1, rest)], dim=1)
        return lp_search_range(sample, bits, mode, p, n_candidates, self.lo, self.hi, col_weight=weight)


class TokenActQuantizer(ActQuantizer):
    """Dynamic per-token fake quantizer (ViDiT-Q's activation granularity).

    Every *token* gets its own grid, from its own min and max computed at run time: a token is a
    row of the channel axis — one position ``(b, :, h, w)`` of a 4-D input ``(B, C, H, W)``, one
    ``(b, l, :)`` of a token input ``(B, L, C)``, one row of ``(B, C)``. The range is widened to
    contain 0 (zero stays exact), as for every grid here (:func:`range_to_qparams`).

    There is nothing to calibrate or learn: the quantizer is ready at construction
    (``initialized`` is True), ignores range observation (:meth:`start_observing` is a no-op), has
    one group whatever the time step, and its ``scale`` / ``zero_point`` (``(1, 1)``) are unused
    placeholders kept so that code listing quantizer parameters (finite checks, state dicts) sees
    the usual slots. :func:`~diffquant.quant.state.iter_quantizers` lists it under kind
    ``dynamic``, not ``act``, so range calibration, time-step groups and LSQ / QuEST / AccuQuant
    step-size learning skip it. The per-token scale is detached: gradients reach ``x`` straight
    through the rounding (the STE), never through the range.
    """

    kind = "dynamic"
    dynamic = True

    def __init__(self, bits: int, mode: str = "affine", group_size: Optional[int] = None) -> None:
        super().__init__(bits, mode, channels=1, n_groups=1, per_channel=False)
        self.group_size = None if group_size is None else int(group_size)
        self.initialized.fill_(True)
        self._ready = True

    def forward(self, x: Tensor) -> Tensor:
        if not self.enabled:
            return x
        axis = self._ch_axis(x)
        gs = self.group_size
        if gs is not None and x.shape[axis] > gs:  # one grid per token and group of channels
            t = x.movedim(axis, -1)
            c = t.shape[-1]
            pad = -c % gs
            t = F.pad(t, (0, pad)) if pad else t
            q = self._quant_along(t.reshape(*t.shape[:-1], -1, gs), -1)
            q = q.reshape(*t.shape)[..., :c]
            return q.movedim(-1, axis)
        return self._quant_along(x, axis)

    def _quant_along(self, x: Tensor, axis: int) -> Tensor:
        with torch.no_grad():
            lo = x.amin(dim=axis, keepdim=True).float()
            hi = x.amax(dim=axis, keepdim=True).float()
            scale, zp = range_to_qparams(lo, hi, self.bits, self.mode)
        return fake_quant(x, scale.to(x.dtype), zp.to(x.dtype), self.q_min, self.q_max)

    def start_observing(self, *args, **kwargs) -> None:
        """Nothing to observe: the range is each token's own, at run time."""

    def set_range(self, lo: Tensor, hi: Tensor) -> None:
        raise RuntimeError("a dynamic per-token quantizer has no fixed range to set")

    def extra_repr(self) -> str:
        group = "" if self.group_size is None else f"_group({self.group_size})"
        return f"bits={self.bits}, mode={self.mode}, dynamic_per_token{group}"


class SplitActQuantizer(nn.Module):
    """Two activation quantizers for channels ``[:split]`` and ``[split:]`` of a concatenated
    input ``(B, C, H, W)`` (the up-block skip concatenation)."""

    kind = "act_split"

    def __init__(self, split: int, head: ActQuantizer, tail: ActQuantizer) -> None:
        super().__init__()
        self.split = int(split)
        self.head, self.tail = head, tail

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([self.head(x[:, : self.split]), self.tail(x[:, self.split :])], dim=1)
