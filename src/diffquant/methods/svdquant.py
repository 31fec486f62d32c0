"""SVDQuant (Li et al., ICLR 2025): smoothing plus a 16-bit low-rank branch, ``method=svdquant``.

Per Conv2d / Linear layer (every family: the layers are found by type, not by name):

1. **Activation statistics** — the per-input-channel absolute maximum ``max|X_j|`` of the layer's
   input over ``search_rows`` calibration rows of the FP model (one pass, forward pre-hooks).
2. **Migration strength search** (paper §4; deepcompressor's ``GridSearch`` with ``num_grids``
   20) — over the candidates ``(α, β)`` = ``(0, 0)``, ``(i/n, 0)`` and ``(i/n, 1 - i/n)`` for
   ``i = 1 … n-1`` (``n = num_grids``: 39 candidates at 20): ``λ_j = max|X_j|^α / max|W_j|^β``
   (``max|W_j|`` over output channels and kernel taps), the transform of
   :mod:`diffquant.quant.lowrank` (top ``r`` singular directions of ``W · λ`` in 16 bits,
   residual ``R = W · λ - L1 L2``), and the output error of the quantized layer
   ``Σ ‖Q(X̂) Q(R) + X̂ L1 L2 - X W‖²`` on the same rows, each layer fed the FP model's inputs
   (second pass; layers grouped so that the candidates of one pass stay within
   ``search_memory_mb``). ``Q(R)``: the job's weight quantizer (per output channel, or per group
   of ``quant.weight_group_size`` input channels; range by ``quant.weight_init``); ``Q(X̂)``: the job's activation quantizer kind, dynamic per token by
   default (``quant_overrides``), else a min-max range of the batch. The candidate with the
   smallest error is kept.
   Then (``lowrank_iters > 0``) the chosen candidate's branch is refined as the code does,
   ``L_k = SVD_r(Ŵ - Q(Ŵ - L_{k-1}))``, every iterate scored on the same rows in one more pass, the
   best kept.
3. **Install** — the denoiser is quantized (:func:`~diffquant.quant.swap.quantize_denoiser`), each
   layer gets its transform and its weight quantizer's range is set on the residual.
4. **Static ranges** — activation quantizers that keep a calibrated range (the post-softmax
   probabilities; every layer input when ``act_dynamic_per_token`` is turned off) are set from
   calibration rows on the smoothed inputs, as ``ptq_minmax`` sets them.

Rank: ``r = min(rank, max(1, round(rank_cap · min(C_out, C_in·k²))))``. The paper's ``r = 32`` is
1–3 % of the rank of its layers (widths 1152–3072; SD v1.4's narrowest are 320); ``rank_cap``
(default 1/8) keeps the branch a comparable share of the embedded models' 32–256-wide layers,
where ``r = 32`` would be up to the full rank (``method.rank_cap=1.0``: the uncapped rank). Layers
with ``groups != 1`` or a non-zero padding mode, and those of ``skip_roles``, get no transform
(quantized as ``ptq_minmax`` quantizes them).

As the authors' code (deepcompressor, ``examples/diffusion/configs/svdquant/``): 4-bit weights in
groups of 64 input channels with min-max ranges, dynamic activations per token and group of 64
channels (``quant_overrides``), no transform on the embeddings and the first and last layers
(``skip_roles``). Not as the code: both grids are affine here, symmetric there (``sint4``;
``method=svdquant_paper`` is symmetric and uncapped: on ``ldm_digits`` W4A4 the symmetric grids
cost far more than the branch gains); the embedded default keeps the one-shot SVD
(``lowrank_iters=0``; the code refines it up to 100 times with early stop, ``svdquant_paper``:
100 iterates, the best kept);
the search feeds every layer the FP model's inputs and scores each layer's own output (the code
scores q, k, v by the attention output). Layers the code leaves in 16 bits (embeddings, time
projections, attention matmuls) are quantized here as in every other method, so that the rows
of a table compare at equal coverage.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from diffquant.calib.collect import STEP_KEY, collect_calibration
from diffquant.calib.ranges import call_rows
from diffquant.methods.base import Method, MethodResult, Table
from diffquant.methods.ptq import (
    PTQMinMaxConfig,
    _check_finite_output,
    _check_finite_quantizers,
    init_act_ranges,
    method_quant,
)
from diffquant.models.denoiser import ROLES, is_layer
from diffquant.quant.config import FP_BITS, QuantConfig
from diffquant.quant.lowrank import SmoothLowRank, channel_axis, top_singular
from diffquant.quant.quantizers import (
    expand_groups,
    fake_quant,
    range_to_qparams,
)
from diffquant.quant.swap import QuantizerFactory, quantize_denoiser
from diffquant.registry import METHODS
from diffquant.validation import InvalidSetting, positive

log = logging.getLogger(__name__)

_EPS = 1e-5


@dataclass
class SVDQuantConfig(PTQMinMaxConfig):
    """``method=svdquant`` (module doc). Fields of :class:`PTQMinMaxConfig` set the calibration
    trajectories and the static activation ranges.

    Attributes:
        rank: the low-rank branch's rank ``r`` (paper: 32; 0 = smoothing only).
        rank_cap: at most this fraction of a layer's rank ``min(C_out, C_in·k²)`` (module doc);
            1.0 = no cap.
        num_grids: ``n`` of the ``(α, β)`` candidate grid (module doc; the code's 20).
        search_rows: calibration rows of the statistics and of the search (a fixed random subset
            over all recorded steps, seed ``act_init_seed``).
        search_batch_size: rows per forward in the two passes.
        lowrank_iters: refinements of the chosen candidate's branch, ``L_k = SVD_r(Ŵ - Q(Ŵ - L_{k-1}))``
            (deepcompressor: up to 100 with early stop); every iterate's output error is measured
            in one further pass and the smallest kept (0: the one-shot SVD).
        search_memory_mb: bound on the candidates (quantized residuals and branches) held at once
            during the search; layers are searched in as many passes as that needs.
        skip_roles: denoiser roles whose layers get no transform.
        ablation: the variant's label in tables (``vidit_q[timestep]``), None for the default.
    """

    KEY_NEUTRAL_DEFAULTS: ClassVar[dict[str, Any]] = {"lowrank_iters": 0}

    name: str = "svdquant"
    rank: int = 32
    rank_cap: float = 0.125
    num_grids: int = 20
    search_rows: int = 64
    search_batch_size: int = 16
    search_memory_mb: int = 2048
    lowrank_iters: int = 0
    ablation: Optional[str] = None
    skip_roles: list[str] = field(
        default_factory=lambda: ["first", "last", "time_embedding", "time_projection"]
    )
    quant_overrides: dict[str, Any] = field(
        default_factory=lambda: {
            "act_dynamic_per_token": True,
            "act_group_size": 64,
            "weight_group_size": 64,
        }
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        positive(self, "num_grids", "search_rows", "search_batch_size", "search_memory_mb")
        positive(self, "rank", "lowrank_iters", allow_zero=True)
        if not 0.0 < self.rank_cap <= 1.0:
            raise InvalidSetting("rank_cap", "must lie in (0, 1], e.g. method.rank_cap=0.125 (1.0: no cap).")
        unknown = [r for r in self.skip_roles if r not in ROLES]
        if unknown:
            raise InvalidSetting(
                "skip_roles", f"has unknown role(s) {unknown}; roles are {', '.join(ROLES)}."
            )

    def candidates(self) -> list[tuple[float, float]]:
        """The ``(α, β)`` grid (module doc)."""
        n = self.num_grids
        steps = [i / n for i in range(1, n)]
        return [(0.0, 0.0)] + [(a, 0.0) for a in steps] + [(a, 1.0 - a) for a in steps]


# ---------------------------------------------------------------------------- layers
def transformable(layer: nn.Module) -> bool:
    """Whether SVDQuant's transform applies: Linear, or Conv2d with one group and zero padding."""
    if isinstance(layer, nn.Conv2d):
        return layer.groups == 1 and layer.padding_mode == "zeros"
    return isinstance(layer, nn.Linear)


def layer_rank(weight: Tensor, rank: int, cap: float) -> int:
    """The branch rank of a weight ``(C_out, C_in, *k)`` (module doc)."""
    if rank == 0:
        return 0
    full = min(weight.shape[0], math.prod(weight.shape[1:]))
    return max(1, min(rank, full - 1, round(cap * full)))


def smoothing_factors(act_absmax: Tensor, weight: Tensor, alpha: float, beta: float) -> Tensor:
    """``λ_j = max|X_j|^α / max|W_j|^β`` ``(C_in,)`` (SmoothQuant's formula with β = 1 - α;
    SVDQuant §4)."""
    w_absmax = weight.detach().abs().transpose(0, 1).reshape(weight.shape[1], -1).amax(dim=1)
    lam = act_absmax.clamp(min=_EPS).pow(alpha) / w_absmax.clamp(min=_EPS).pow(beta)
    return lam.clamp(min=_EPS)


def _apply(layer: nn.Module, x: Tensor, weight: Tensor) -> Tensor:
    if isinstance(layer, nn.Conv2d):
        return F.conv2d(x, weight, layer.bias, layer.stride, layer.padding, layer.dilation)
    return F.linear(x, weight, layer.bias)


def _quantize_input(x: Tensor, bits: int, quant: QuantConfig) -> Tensor:
    """``x`` through the kind of input quantizer the job gives this layer: dynamic per token, or
    (static quantizers) a min-max range of this batch, per tensor or per channel."""
    q = QuantizerFactory(quant).act(x.shape[channel_axis(x)], bits)
    if q is None:
        return x
    if q.dynamic:
        return q(x)
    axis = channel_axis(x)
    flat = x.movedim(axis, 0).reshape(x.shape[axis], -1) if quant.acts_per_channel else x.reshape(1, -1)
    scale, zp = range_to_qparams(flat.amin(1), flat.amax(1), bits, q.mode)
    shape = [1] * x.dim()
    if quant.acts_per_channel:
        shape[axis] = -1
    return fake_quant(x, scale.view(shape), zp.view(shape), q.q_min, q.q_max)


@dataclass
class _Candidate:
    alpha: float
    beta: float
    transform: SmoothLowRank
    q_residual: Tensor


@dataclass
class LayerChoice:
    """The search's result for one layer: its rank, the chosen ``(α, β)`` and the relative output
    error ``Σ‖ŷ - y‖² / Σ‖y‖²`` of the chosen candidate and of no smoothing (``(0, 0)``) on the
    search rows."""

    name: str
    rank: int
    alpha: float
    beta: float
    rel_error: Optional[float]
    rel_error_unsmoothed: Optional[float]
    refinement: int = 0


class _Search:
    """The two passes of steps 1-2 over the FP denoiser (module doc)."""

    def __init__(
        self, model: Any, stream: Any, quant: QuantConfig, cfg: SVDQuantConfig, bits: dict[str, int]
    ) -> None:
        self.model, self.stream, self.quant, self.cfg, self.bits = model, stream, quant, cfg, bits
        self.rows = stream.subset(cfg.search_rows, cfg.act_init_seed)

    def _passes(self, hooks: dict[str, Any]) -> None:
        denoiser = self.model.denoiser
        handles = [denoiser.get_submodule(n).register_forward_pre_hook(h) for n, h in hooks.items()]
        try:
            with torch.no_grad():
                for batch in self.stream.batches(
                    self.cfg.search_batch_size, self.rows, device=self.model.device, with_step=True
                ):
                    self.row_steps = batch[STEP_KEY]
                    call_rows(denoiser, batch)
        finally:
            for h in handles:
                h.remove()

    def act_absmax(self, names: list[str], groups: int = 1) -> dict[str, Tensor]:
        """Step 1: ``max|X_j|`` per layer, ``(C_in,)``; with ``groups > 1`` one row per group of
        sampler steps (step ``i`` in group ``i · G // S``), ``(G, C_in)`` (a group without rows
        takes the maximum over all rows)."""
        stats: dict[str, Tensor] = {}
        n_steps = len(self.model.timesteps)

        def hook_for(name: str):
            def hook(module: nn.Module, args: tuple) -> None:
                x = args[0].detach()
                axis = channel_axis(x)
                per_row = x.abs().movedim(axis, -1).reshape(x.shape[0], -1, x.shape[axis]).amax(1)
                gi = expand_groups(self.row_steps.to(x.device) * groups // n_steps, x)
                m = torch.full((groups, x.shape[axis]), -1.0, device=x.device, dtype=per_row.dtype)
                m = m.index_reduce_(0, gi, per_row, "amax")
                stats[name] = m if name not in stats else torch.maximum(stats[name], m)

            return hook

        self._passes({n: hook_for(n) for n in names})
        for name, m in stats.items():
            overall = m.amax(0)
            m = torch.where(m < 0, overall.expand_as(m), m)
            stats[name] = m[0] if groups == 1 else m
        return stats

    def quantize_weight(self, w: Tensor) -> Tensor:
        """``w`` through a weight quantizer of the job's kind, its range set on ``w``."""
        with torch.no_grad():
            return QuantizerFactory(self.quant).weight(w, None, init=True)(w)

    def candidates(self, name: str, absmax: Tensor) -> list[_Candidate]:
        """The ``(α, β)`` grid's transforms of one layer, with their quantized residuals."""
        w = self.model.denoiser.get_submodule(name).weight.detach()
        r = layer_rank(w, self.cfg.rank, self.cfg.rank_cap)
        out = []
        for alpha, beta in self.cfg.candidates():
            t = SmoothLowRank.from_weight(w, smoothing_factors(absmax, w, alpha, beta), r, alpha)
            out.append(_Candidate(alpha, beta, t, self.quantize_weight(t.residual(w))))
        return out

    def refinements(self, name: str, first: _Candidate) -> list[_Candidate]:
        """Step 2b: ``first`` and its ``lowrank_iters`` refinements ``L_k = SVD_r(Ŵ - Q(Ŵ - L_{k-1}))``
        (deepcompressor's iteration), each with its quantized residual."""
        w = self.model.denoiser.get_submodule(name).weight.detach()
        t0 = first.transform
        w_hat = t0.smooth_weight(w)
        out, q_res = [first], first.q_residual
        for _ in range(self.cfg.lowrank_iters):
            up, down = top_singular(w_hat - q_res, t0.rank)
            t = SmoothLowRank(t0.smooth, up, down, t0.alpha)
            q_res = self.quantize_weight(t.residual(w))
            out.append(_Candidate(first.alpha, first.beta, t, q_res))
        return out

    def choose(
        self, names: list[str], absmax: dict[str, Tensor]
    ) -> tuple[dict[str, SmoothLowRank], list[LayerChoice]]:
        """Step 2, in groups of layers bounded by ``search_memory_mb``: each layer's best
        transform and the search's record."""
        budget = self.cfg.search_memory_mb * 2**20
        groups: list[list[str]] = [[]]
        used = 0
        for n in names:
            held = len(self.cfg.candidates()) + self.cfg.lowrank_iters + 1
            size = 2 * 4 * self.model.denoiser.get_submodule(n).weight.numel() * held
            if groups[-1] and used + size > budget:
                groups.append([])
                used = 0
            groups[-1].append(n)
            used += size
        chosen: dict[str, SmoothLowRank] = {}
        choices = []
        for group in groups:
            cands = {n: self.candidates(n, absmax[n]) for n in group}
            rel_errors = self._errors(cands)
            best = {n: min(range(len(rel)), key=rel.__getitem__) for n, rel in rel_errors.items()}
            refined = {
                n: self.refinements(n, cands[n][best[n]])
                for n in group
                if self.cfg.lowrank_iters and cands[n][best[n]].transform.rank
            }
            refined_errors = self._errors(refined) if refined else {}
            for n in group:
                rel = rel_errors[n]
                c, err, k = cands[n][best[n]], rel[best[n]], 0
                if n in refined:  # the best iterate (iterate 0 is the one-shot branch)
                    k = min(range(len(refined_errors[n])), key=refined_errors[n].__getitem__)
                    c, err = refined[n][k], refined_errors[n][k]
                base = next((r for r, x in zip(rel, cands[n]) if x.alpha == 0.0 and x.beta == 0.0), None)
                choices.append(LayerChoice(n, c.transform.rank, c.alpha, c.beta, err, base, k))
                chosen[n] = c.transform
        return chosen, choices

    def _errors(self, cands: dict[str, list[_Candidate]]) -> dict[str, list[float]]:
        """Relative output error ``Σ‖ŷ - y‖² / Σ‖y‖²`` of every candidate of every layer of
        ``cands``, in one pass."""
        err = {n: torch.zeros(len(c), dtype=torch.float64) for n, c in cands.items()}
        ref = {n: torch.zeros((), dtype=torch.float64) for n in cands}

        def hook_for(name: str):
            def hook(module: nn.Module, args: tuple) -> None:
                x = args[0].detach()
                y = _apply(module, x, module.weight)
                ref[name] += y.double().pow(2).sum()
                conv = module if isinstance(module, nn.Conv2d) else None
                for i, c in enumerate(cands[name]):
                    x_hat = c.transform.smooth_input(x)
                    xq = _quantize_input(x_hat, self.bits[name], self.quant)
                    y_hat = _apply(module, xq, c.q_residual) + c.transform.branch(x_hat, conv)
                    err[name][i] += (y_hat - y).double().pow(2).sum()

            return hook

        self._passes({n: hook_for(n) for n in cands})
        return {n: (err[n] / ref[n].clamp(min=1e-30)).tolist() for n in cands}

    def run(self, names: list[str]) -> tuple[dict[str, SmoothLowRank], list[LayerChoice]]:
        absmax = self.act_absmax(names)
        missing = [n for n in names if n not in absmax]
        if missing:
            raise RuntimeError(f"svdquant: layers never called on calibration rows: {missing[:5]}")
        return self.choose(names, absmax)


def svdquant_targets(model: Any, quant: QuantConfig, cfg: SVDQuantConfig) -> list[str]:
    """The layers that get a transform, in module order."""
    skip = set(model.spec.layers(model.denoiser, *cfg.skip_roles)) if cfg.skip_roles else set()
    return [
        n
        for n, m in model.denoiser.named_modules()
        if is_layer(m) and transformable(m) and n not in skip and quant.weight_bits < FP_BITS
    ]


@METHODS.register("svdquant", schema=SVDQuantConfig)
class SVDQuant(Method):
    """``method=svdquant``: SVDQuant's smoothing and 16-bit low-rank branch (module doc)."""

    version = 1
    label = "SVDQuant"

    def search(self, search: _Search, names: list[str]) -> tuple[dict[str, nn.Module], list[LayerChoice]]:
        """Steps 1-2: each layer's transform and the search's record."""
        return search.run(names)

    def calibrate(
        self, model: Any, quant: QuantConfig, cfg: SVDQuantConfig, ctx: Any, progress: Path
    ) -> MethodResult:
        quant = method_quant(quant, cfg)
        stream = collect_calibration(model, cfg.calib, ctx.cache_dir)
        names = svdquant_targets(model, quant, cfg)
        first_last = set(model.spec.layers(model.denoiser, "first", "last"))
        fl_bits = quant.first_last_act_bits if quant.first_last_act_bits is not None else quant.act_bits
        bits = {n: (fl_bits if n in first_last else quant.act_bits) for n in names}
        # steps 1-2: statistics and the per-layer search on the FP model
        transforms, choices = self.search(_Search(model, stream, quant, cfg, bits), names)
        # step 3: quantize, install the transforms, weight ranges on the residuals
        summary = quantize_denoiser(
            model.denoiser, model.spec, quant, timesteps=model.timesteps, init_weights=False
        )
        for name, layer in model.denoiser.named_modules():
            wq = getattr(layer, "weight_quantizer", None)
            if wq is None:
                continue
            if name in transforms:
                layer.transform = transforms[name].to(layer.weight.device)
            with torch.no_grad():
                t = layer.transform
                w = layer.weight if not isinstance(t, SmoothLowRank) else t.residual(layer.weight)
                wq.init_range(w, quant.weight_init, quant.lp_norm, quant.lp_candidates)
        # step 4: static activation ranges on the smoothed inputs
        init_act_ranges(model, stream, quant, cfg)
        _check_finite_quantizers(model.denoiser, cfg.name)
        _check_finite_output(model, stream, cfg.name)
        text = summary.format() + f"\n  {self.label} transforms: {len(transforms)} layers"
        log.info("\n%s", text)
        ranks = [c.rank for c in choices]
        best = [c.rel_error for c in choices]
        n = max(1, len(choices))
        p = cfg.name
        unsmoothed = [c.rel_error_unsmoothed for c in choices]
        mean = lambda values: None if any(v is None for v in values) else sum(values) / n
        metrics = {
            **summary.metrics(),
            "calib_rows": len(stream),
            f"{p}_layers": len(choices),
            f"{p}_rank_mean": sum(ranks) / n,
            f"{p}_alpha_mean": sum(c.alpha for c in choices) / n,
            f"{p}_rel_err_mean": mean(best),
            f"{p}_rel_err_unsmoothed_mean": mean(unsmoothed),
            f"{p}_branch_params": sum(
                t.up.numel() + t.down.numel() for t in transforms.values() if isinstance(t, SmoothLowRank)
            ),
        }
        table = Table(
            ["layer", "rank", "alpha", "beta", "rel_err", "rel_err_unsmoothed", "refinement"],
            [
                [c.name, c.rank, c.alpha, c.beta, c.rel_error, c.rel_error_unsmoothed, c.refinement]
                for c in choices
            ],
        )
        return MethodResult(model, quant, metrics, {f"{p}_layers": table}, {"quant_summary.txt": text})
