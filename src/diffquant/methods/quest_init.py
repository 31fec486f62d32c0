"""QuEST's per-time-step activation ranges: each time-step group's initial (Δ, z) from
calibration rows, as the QuEST code sets them, or by our variants.

What the QuEST code does (hatchetProject/QuEST@a357018, ``sample_diffusion_ldm_imagenet.py``
567-592; the same in ``sample_diffusion_ldm_bedroom.py`` 566-590 and ``..._church.py`` 568-588):

1. after weight reconstruction, with weights **and** activations quantized
   (``qnn.set_quant_state(True, True)``), for every calibration time step one forward of the
   **first 64 rows** of that step (``inds[:64]``; with guidance, conditional rows): every
   activation quantizer of that step sets its range from its first input
   (``ActUniformQuantizer.init_quantization_scale``, ``qdiff/quant_layer.py`` 365-464) and
   quantizes it at once, so later layers see quantized inputs. The range is **min-max** with
   ``--a_min_max`` (ImageNet, LSUN-Bedrooms) or else a **percentile search**: clipping at the
   {0.999, 0.9999, 0.99999} quantiles, the one with the smallest mean squared quantization error
   (442-463; from RepQ-ViT);
2. with ``--running_stat`` (not at W4A4, README.md:37): for every step, all its rows in batches
   of 64 (a last partial batch dropped) move each range to the exponential moving average
   (momentum 0.95) of the per-batch min / max, started from the min / max of the first input
   (``act_momentum_update``, 323-363).

Its Stable Diffusion script (``txt2img.py`` 487-536) instead sets **one** set from 8 random rows
of all steps (routed to the first step), copies it into every step, and then runs the running
statistics over all rows, shuffled, in batches of 8, with the first step selected — so only that
first group moves (it copies before it averages): ``scope="shared"`` below, reproduced as it is.

Our settings (:class:`StepInit`, the ``method.timestep_init*`` keys of
:class:`~diffquant.methods.quest.QuestConfig`):

* ``method``: ``minmax``, ``percentile`` (the search above, :func:`percentile_search_range`) or
  ``lp`` (Q-Diffusion's L_p search of :func:`~diffquant.quant.quantizers.find_range`);
* ``network``: ``quantized`` (as above) or ``fp`` (weights FP, inputs observed and passed on
  unquantized);
* rows: ``rows_per_step`` = the first k rows of every recorded step, one forward per step, in the
  reference's row order (:meth:`CalibStream.reference_order <diffquant.calib.collect.CalibStream.reference_order>`: with guidance the conditional rows first); or,
  when it is None, ``rows`` = a fixed random subset over all steps in batches of ``batch_size``
  (a range then is the min / max over batches for ``minmax``, the row-weighted mean of per-batch
  ranges otherwise);
* ``scope``: ``per_step`` (every group from its own rows) or ``shared`` (the SD script's, from
  ``rows`` random rows);
* ``running``: the running statistics after the initial ranges (``running_batch_size`` rows per
  batch, ``momentum``).

Each row routes to its group by its sampler step index (``_step``,
:func:`~diffquant.quant.timestep.sampler_step`). Groups that get no row copy the nearest group
that did. Quantizers whose names match ``minmax_layers`` always use ``minmax``. ``lp`` /
``minmax`` on the FP network from random rows without running statistics (``method=quest``'s
earlier default) runs exactly the range observer of
:func:`~diffquant.calib.ranges.observing_act_ranges`.

Deliberate differences from the reference: ranges always contain 0 (every quantizer here keeps
zero exact; the reference's asymmetric min-max and percentile ranges of a one-signed tensor do
not), and per-channel running statistics are kept per channel (the reference's per-channel path
starts from the last channel's scalar; it is not used at W4A4, where per-channel ranges are).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
from torch import Tensor, nn

from diffquant.calib.collect import STEP_KEY, CalibStream
from diffquant.calib.ranges import call_rows, observing_act_ranges
from diffquant.quant.quantizers import (
    ActQuantizer,
    _BlockSample,
    channels_first,
    fake_quant,
    find_range,
    int_range,
    range_to_qparams,
    rows_by_group,
)
from diffquant.quant.state import iter_quantizers, quant_state

log = logging.getLogger(__name__)

TIMESTEP_INITS = ("lp", "minmax", "percentile", "ptq")
INIT_NETWORKS = ("fp", "quantized")
INIT_SCOPES = ("per_step", "shared")
PERCENTILES = (0.999, 0.9999, 0.99999)
_LP_MAX_ELEMS = 1 << 16  # as the range observer: elements per batch the L_p loss is measured on


# ---------------------------------------------------------------------------- the search
#: the most elements ``torch.quantile`` takes (above, it raises "input tensor is too large")
_TORCH_QUANTILE_MAX_ELEMS = 1 << 24


def _quantiles(x2d: Tensor, qs: Sequence[float]) -> Tensor:
    """``torch.quantile(x2d, q, dim=1)`` for every ``q`` of ``qs`` (linear interpolation; one sort):
    ``(len(qs), C)``. Where the input is larger than ``torch.quantile`` takes, numpy's percentile
    per row, as the QuEST code falls back to (``qdiff/quant_layer.py`` 443-454)."""
    try:
        return torch.quantile(x2d, torch.tensor(list(qs), dtype=x2d.dtype, device=x2d.device), dim=1)
    except RuntimeError:
        pct = [q * 100 for q in qs]
        out = [np.percentile(row.cpu().numpy(), pct) for row in x2d]  # (C, len(qs)), one pass
        return torch.tensor(np.stack(out, axis=1), dtype=torch.float32, device=x2d.device)


@torch.no_grad()
def percentile_search_range(
    x2d: Tensor, bits: int, mode: str, percentiles: Sequence[float] = PERCENTILES
) -> tuple[Tensor, Tensor]:
    """QuEST's activation range search, per row of ``x2d`` ``(C, N)``: the candidate range
    ``[quantile(1 - p), quantile(p)]`` for each ``p`` of ``percentiles`` whose quantization has
    the smallest mean squared error along the row (the first of equal ones); returns
    ``(lo, hi)``, each ``(C,)`` (``qdiff/quant_layer.py`` 434-463 of the QuEST code, which
    searches per tensor, or per channel when channel-wise)."""
    x2d = x2d.float()
    q_min, q_max = int_range(bits, mode)
    qs = _quantiles(x2d, [*percentiles, *(1.0 - p for p in percentiles)])
    his, los = qs[: len(percentiles)], qs[len(percentiles) :]
    errors = []
    for lo, hi in zip(los, his):
        scale, zp = range_to_qparams(lo, hi, bits, mode)
        score = (fake_quant(x2d, scale[:, None], zp[:, None], q_min, q_max) - x2d).pow_(2)
        errors.append(score.mean(dim=1))
    return _least_error(los, his, errors)


def _least_error(
    los: Sequence[Tensor], his: Sequence[Tensor], errors: Sequence[Tensor]
) -> tuple[Tensor, Tensor]:
    """Per row, the candidate range ``(lo, hi)`` (each ``(C,)``) of least error ``(C,)``, the first
    of equal ones."""
    best_lo, best_hi, best = los[0], his[0], errors[0]
    for lo, hi, err in zip(los[1:], his[1:], errors[1:]):
        better = err < best
        best = torch.where(better, err, best)
        better = better.to(lo.device)
        best_lo, best_hi = torch.where(better, lo, best_lo), torch.where(better, hi, best_hi)
    return best_lo, best_hi


@torch.no_grad()
def percentile_search_range_blocks(
    blocks: Callable[[], Iterator[Tensor]], bits: int, mode: str, percentiles: Sequence[float] = PERCENTILES
) -> tuple[Tensor, Tensor]:
    """:func:`percentile_search_range` of the concatenation along columns of the ``(C, n_i)``
    blocks ``blocks()`` gives (formed again at each call), with one block in memory at a time
    plus, per row, the values the quantiles interpolate between:

    1. the columns ``N``;
    2. per row the ``k`` largest and ``k`` smallest values (``k``: from the extreme percentile's
       rank to the end), merged block by block, and from them the quantiles, linearly
       interpolated as ``torch.quantile`` does;
    3. per candidate, the squared quantization error summed block by block (float64).

    The same candidates as the whole data's; the errors up to summation order."""
    n = 0
    for block in blocks():
        n += block.shape[1]
    qs = [*percentiles, *(1.0 - p for p in percentiles)]
    pos = [q * (n - 1) for q in qs]  # linear interpolation between ranks floor(pos) and one above
    # (float64 here, a rank either side of the float32 / float64 ranks below)
    k_top = min(n, n - math.floor(min(x for x, q in zip(pos, qs) if q >= 0.5)) + 1)
    k_bottom = min(n, math.floor(max(x for x, q in zip(pos, qs) if q < 0.5)) + 3)
    top = bottom = None
    for block in blocks():
        block = block.float()
        top = _extremes(top, block, k_top, largest=True)
        bottom = _extremes(bottom, block, k_bottom, largest=False)
    top, bottom = top.sort(dim=1).values, bottom.sort(dim=1).values  # ascending

    def value(rank: int) -> Tensor:  # each row's rank-th smallest value (C,)
        return bottom[:, rank] if rank < k_bottom else top[:, rank - (n - k_top)]

    # the ranks and weights as _quantiles computes them: torch.quantile's in float32 up to its
    # size limit, numpy's (its fallback) in float64 above
    c = top.shape[0]
    if c * n <= _TORCH_QUANTILE_MAX_ELEMS:
        ranks = torch.tensor(qs, dtype=torch.float32) * (n - 1)
    else:
        ranks = torch.tensor([q * 100 / 100 for q in qs], dtype=torch.float64) * (n - 1)
    quantiles = []
    for rank in ranks:
        below = int(rank.floor())
        low, high = value(below), value(min(below + 1, n - 1))
        weight = (rank - below).expand_as(low)
        quantiles.append(torch.lerp(low.to(rank.dtype), high.to(rank.dtype), weight).to(low.dtype))
    his, los = quantiles[: len(percentiles)], quantiles[len(percentiles) :]
    q_min, q_max = int_range(bits, mode)
    candidates = [range_to_qparams(lo, hi, bits, mode) for lo, hi in zip(los, his)]
    errors = torch.zeros(len(candidates), his[0].shape[0], dtype=torch.float64)
    for block in blocks():
        block = block.float()
        for i, (scale, zp) in enumerate(candidates):
            err = (fake_quant(block, scale[:, None], zp[:, None], q_min, q_max) - block).pow_(2)
            errors[i] += err.sum(dim=1, dtype=torch.float64).cpu()
    return _least_error(los, his, list(errors))


def _extremes(kept: Optional[Tensor], block: Tensor, k: int, largest: bool) -> Tensor:
    """Each row's ``k`` largest (or smallest) values of ``kept`` and ``block`` together."""
    both = block if kept is None else torch.cat([kept, block], dim=1)
    return both.topk(min(k, both.shape[1]), dim=1, largest=largest).values


def search_range(
    x2d: Tensor,
    bits: int,
    mode: str,
    method: str,
    *,
    p: float = 2.4,
    n_candidates: int = 80,
    generator: Optional[torch.Generator] = None,
) -> tuple[Tensor, Tensor]:
    """The range ``(lo, hi)`` ``(C,)`` of data ``x2d`` ``(C, N)`` by ``method`` (``minmax``,
    ``percentile`` or ``lp``)."""
    if method == "percentile":
        return percentile_search_range(x2d, bits, mode)
    return find_range(x2d, bits, mode, method, p, n_candidates, max_elems=_LP_MAX_ELEMS, generator=generator)


# ---------------------------------------------------------------------------- settings
@dataclass
class StepInit:
    """How :func:`init_timestep_ranges` sets the groups' ranges (module doc); built from
    ``QuestConfig`` by :func:`diffquant.methods.quest.step_init`."""

    method: str = "lp"
    network: str = "fp"
    scope: str = "per_step"
    rows: Optional[int] = 512
    rows_per_step: Optional[int] = None
    running: bool = False
    running_batch_size: int = 64
    momentum: float = 0.95
    batch_size: int = 64
    p: float = 2.4
    n_candidates: int = 80
    seed: int = 0

    @property
    def observer(self) -> bool:
        """Whether this is the range observer's setting (L_p / min-max on the FP network from
        random rows: ``method=quest``'s init before the QuEST code's was measured better)."""
        return (
            self.method in ("lp", "minmax")
            and self.network == "fp"
            and self.scope == "per_step"
            and self.rows_per_step is None
            and not self.running
        )


# ---------------------------------------------------------------------------- per quantizer
class _GroupRanges:
    """Forward pre-hook of one :class:`ActQuantizer`: sets the range of the groups of the rows it
    sees (before the quantizer uses it), from the first batch of a group on; with ``momentum``
    set, moves it to the EMA of per-batch min / max. A
    :class:`~diffquant.quant.attention.BlockWatcher`: the attention probabilities' calls come
    block by block of queries (:meth:`observe_blocks`)."""

    def __init__(
        self, q: ActQuantizer, method: str, p: float, n_candidates: int, seed: int, force_group: Optional[int]
    ) -> None:
        self.method, self.p, self.n_candidates = method, p, n_candidates
        self.force_group = force_group
        self.generator = torch.Generator().manual_seed(seed)
        g, c = q.n_groups, q.channels
        # minmax: the range so far; lp / percentile: row-weighted sums of per-batch ranges
        self.acc_lo = torch.zeros(g, c, dtype=torch.float64)
        self.acc_hi = torch.zeros(g, c, dtype=torch.float64)
        self.raw_lo = torch.zeros(g, c, dtype=torch.float64)  # min / max of the data (EMA start)
        self.raw_hi = torch.zeros(g, c, dtype=torch.float64)
        self.count = torch.zeros(g, dtype=torch.float64)
        self.momentum: Optional[float] = None
        self._ignoring = False

    @torch.no_grad()
    def __call__(self, q: ActQuantizer, args: tuple) -> None:
        if self._ignoring:
            return
        x = args[0].detach()
        for g, rows in self._groups(q, x):
            self._update(q, g, rows)

    def _groups(self, q: ActQuantizer, x: Tensor) -> Iterator[tuple[int, Tensor]]:
        """``(group, its rows of x)`` for the groups present in ``x``."""
        if self.force_group is not None and q.n_groups > 1:
            q.group_index = torch.full((1,), self.force_group, dtype=torch.long)
        return rows_by_group(x, q._row_groups(x))

    def _needs_whole(self, g: int) -> bool:
        """Whether group ``g``'s next update needs the call's data, not only its min / max."""
        return self.method != "minmax" and not self._running(g)

    def _running(self, g: int) -> bool:
        return self.momentum is not None and bool(self.count[g] > 0)

    @torch.no_grad()
    def observe_blocks(self, q: ActQuantizer, blocks: Callable[[], Iterator[Tensor]], axis: int) -> None:
        """One call of ``q`` given as blocks along ``axis``: the update of the whole call, with
        one block in memory for min-max ranges, the running statistics (the blocks' min / max)
        and the percentile search (:func:`percentile_search_range_blocks`, forming the blocks
        again); the L_p search gets the call's rows of its group concatenated."""
        raw: dict[int, _BlockSample] = {}  # group: the call's min / max (C,)
        n_rows: dict[int, float] = {}
        parts: dict[int, list[Tensor]] = {}
        for block in blocks():
            for g, rows in self._groups(q, block.detach()):
                if self._needs_whole(g) and self.method == "lp":
                    parts.setdefault(g, []).append(rows)
                    continue
                if g not in raw:
                    raw[g], n_rows[g] = _BlockSample(q.channels, 0, None), float(rows.shape[0])
                raw[g].add(channels_first(rows, q.per_channel, q._ch_axis(rows)))
        for g, rows in parts.items():
            self._update(q, g, torch.cat(rows, dim=axis))
        for g, sample in raw.items():
            lo, hi, n = sample.lo.double().cpu(), sample.hi.double().cpu(), n_rows[g]
            search = lambda lo=lo, hi=hi: (lo, hi)  # noqa: E731  (min-max; unused when running)
            if self._needs_whole(g):  # percentile
                search = functools.partial(self._percentile_of_blocks, q, g, blocks)
            self._add(q, g, n, lo, hi, search)

    def _percentile_of_blocks(
        self, q: ActQuantizer, g: int, blocks: Callable[[], Iterator[Tensor]]
    ) -> tuple[Tensor, Tensor]:
        """The percentile search on group ``g``'s rows of the call ``blocks()`` gives."""

        def group_blocks() -> Iterator[Tensor]:
            for block in blocks():
                for h, rows in self._groups(q, block.detach()):
                    if h == g:
                        yield channels_first(rows, q.per_channel, q._ch_axis(rows))

        lo, hi = percentile_search_range_blocks(group_blocks, q.bits, q.mode)
        return lo.double().cpu(), hi.double().cpu()

    @contextlib.contextmanager
    def observed(self) -> Iterator[None]:
        """Within it, calls of the quantizer are not watched (the blocks of a watched call)."""
        self._ignoring = True
        try:
            yield
        finally:
            self._ignoring = False

    def _update(self, q: ActQuantizer, g: int, x: Tensor) -> None:
        x2d = channels_first(x, q.per_channel, q._ch_axis(x)).float()
        raw_lo = x2d.amin(dim=1).double().cpu()
        raw_hi = x2d.amax(dim=1).double().cpu()

        def search() -> tuple[Tensor, Tensor]:
            lo, hi = search_range(
                x2d,
                q.bits,
                q.mode,
                self.method,
                p=self.p,
                n_candidates=self.n_candidates,
                generator=self.generator,
            )
            return lo.double().cpu(), hi.double().cpu()

        self._add(q, g, float(x.shape[0]), raw_lo, raw_hi, search)

    def _add(
        self,
        q: ActQuantizer,
        g: int,
        n: float,
        raw_lo: Tensor,
        raw_hi: Tensor,
        search: Callable[[], tuple[Tensor, Tensor]],
    ) -> None:
        """Add a call of ``n`` rows of group ``g`` with min / max ``raw_lo`` / ``raw_hi`` ``(C,)``
        float64; ``search()`` gives its range (not called in the running statistics)."""
        if self._running(g):  # running statistics
            m = self.momentum
            self.raw_lo[g] = self.raw_lo[g] * m + raw_lo * (1 - m)
            self.raw_hi[g] = self.raw_hi[g] * m + raw_hi * (1 - m)
            _set_group(q, g, self.raw_lo[g], self.raw_hi[g])
            return
        lo, hi = search()
        minmax = self.method == "minmax"
        if self.count[g] == 0:
            self.raw_lo[g], self.raw_hi[g] = raw_lo, raw_hi
            self.acc_lo[g], self.acc_hi[g] = (lo, hi) if minmax else (lo * n, hi * n)
        else:
            self.raw_lo[g] = torch.minimum(self.raw_lo[g], raw_lo)
            self.raw_hi[g] = torch.maximum(self.raw_hi[g], raw_hi)
            if minmax:
                self.acc_lo[g] = torch.minimum(self.acc_lo[g], lo)
                self.acc_hi[g] = torch.maximum(self.acc_hi[g], hi)
            else:
                self.acc_lo[g] += lo * n
                self.acc_hi[g] += hi * n
        self.count[g] += n
        if minmax:
            _set_group(q, g, self.acc_lo[g], self.acc_hi[g])
        else:
            _set_group(q, g, self.acc_lo[g] / self.count[g], self.acc_hi[g] / self.count[g])

    def fill_unseen(self, q: ActQuantizer) -> int:
        """Groups that saw no row copy the nearest group that did; returns the groups seen."""
        seen = (self.count > 0).nonzero().flatten()
        if len(seen) == 0:
            return 0
        with torch.no_grad():
            for g in (self.count == 0).nonzero().flatten().tolist():
                nearest = int(seen[(seen - g).abs().argmin()])
                q.scale.data[g] = q.scale.data[nearest]
                q.zero_point[g] = q.zero_point[nearest]
        return len(seen)


def _set_group(q: ActQuantizer, g: int, lo: Tensor, hi: Tensor) -> None:
    dev = q.scale.device
    scale, zp = range_to_qparams(lo.float().to(dev), hi.float().to(dev), q.bits, q.mode)
    with torch.no_grad():
        q.scale.data[g] = scale
        q.zero_point[g] = zp
        q.initialized.fill_(True)


# ---------------------------------------------------------------------------- rows
def row_steps(stream: CalibStream) -> Tensor:
    """The sampler step of every calibration row ``(N,)``, in storage order."""
    return torch.cat([b[STEP_KEY] for b in stream.batches(4096, with_step=True)])


def take_rows(stream: CalibStream, rows: Tensor) -> dict[str, Tensor]:
    """The rows ``rows`` (with ``_step``) on the CPU, in the order given."""
    rows = torch.as_tensor(rows, dtype=torch.long)
    parts = list(stream.batches(max(len(rows), 1), rows, with_step=True))
    data = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
    position = torch.argsort(torch.argsort(rows))  # rank of each wanted row among the sorted
    return {k: v[position] for k, v in data.items()}


def _chunks(data: dict[str, Tensor], size: int, drop_last: bool) -> Iterator[dict[str, Tensor]]:
    n = int(data[STEP_KEY].shape[0])
    stop = n - n % size if drop_last else n
    for start in range(0, stop, size):
        yield {k: v[start : start + size] for k, v in data.items()}


def _init_batches(
    stream: CalibStream, s: StepInit, steps: Callable[[], Tensor]
) -> Iterator[dict[str, Tensor]]:
    if s.scope == "per_step" and s.rows_per_step is not None:
        order = stream.reference_order()
        steps = steps()
        for step in stream.index["steps"]:
            rows = order[steps[order] == step][: s.rows_per_step]
            if len(rows):
                yield take_rows(stream, rows)
        return
    yield from stream.batches(s.batch_size, stream.subset(s.rows, s.seed), with_step=True)


def _running_batches(
    stream: CalibStream, s: StepInit, steps: Callable[[], Tensor]
) -> Iterator[dict[str, Tensor]]:
    if s.scope == "shared":
        g = torch.Generator().manual_seed(s.seed + 1)
        order = torch.randperm(len(stream), generator=g)
        yield from _chunks(take_rows(stream, order), s.running_batch_size, drop_last=True)
        return
    order = stream.reference_order()
    steps = steps()
    for step in stream.index["steps"]:
        rows = order[steps[order] == step]
        if len(rows) >= s.running_batch_size:
            yield from _chunks(take_rows(stream, rows), s.running_batch_size, drop_last=True)


# ---------------------------------------------------------------------------- the init
@torch.no_grad()
def init_timestep_ranges(
    denoiser: nn.Module,
    stream: CalibStream,
    s: StepInit,
    *,
    device: Optional[torch.device] = None,
    minmax_layers: Sequence[str] = (),
) -> int:
    """Set every activation quantizer's per-group ranges of ``denoiser`` from ``stream`` by
    ``s`` (module doc); returns the number of quantizers set."""
    device = device or next(denoiser.parameters()).device
    if s.observer:
        with observing_act_ranges(
            denoiser, s.method, p=s.p, n_candidates=s.n_candidates, seed=s.seed, minmax_layers=minmax_layers
        ) as quantizers:
            with quant_state(denoiser, weights=False):
                for batch in stream.batches(s.batch_size, stream.subset(s.rows, s.seed), with_step=True):
                    call_rows(denoiser, batch, device)
        return len(quantizers)

    cached: list[Tensor] = []

    def steps() -> Tensor:  # every row's step, read once and only where needed
        if not cached:
            cached.append(row_steps(stream))
        return cached[0]

    with watching_group_ranges(denoiser, s, minmax_layers) as hooks:
        quantizers = list(iter_quantizers(denoiser, "act"))
        for batch in _init_batches(stream, s, steps):
            call_rows(denoiser, batch, device)
        # groups without rows copy the nearest one that had some; in the shared scope (only
        # group 0 saw rows) that is the reference's copy of the one set into every group
        seen = {n: hooks[n].fill_unseen(q) for n, q in quantizers}
        if s.running:
            for h in hooks.values():
                h.momentum = s.momentum
            for batch in _running_batches(stream, s, steps):
                call_rows(denoiser, batch, device)
    return _report(quantizers, {n: bool(k) for n, k in seen.items()})


@contextlib.contextmanager
def watching_group_ranges(
    denoiser: nn.Module, s: StepInit, minmax_layers: Sequence[str] = ()
) -> Iterator[dict[str, _GroupRanges]]:
    """Within it, every activation quantizer of ``denoiser`` sets its groups' ranges from the
    calls it sees as :func:`init_timestep_ranges` does (by ``s.method``, ``s.network``,
    ``s.scope``; the hooks, by quantizer name, are yielded: set their ``momentum`` for the
    running statistics). The network runs with weights quantized by ``s.network``."""
    quantizers = list(iter_quantizers(denoiser, "act"))
    forced = [re.compile(pattern) for pattern in minmax_layers]
    shared = s.scope == "shared"
    hooks, handles = {}, []
    for i, (name, q) in enumerate(quantizers):
        method = "minmax" if any(f.search(name) for f in forced) else s.method
        hooks[name] = _GroupRanges(
            q, method, s.p, s.n_candidates, s.seed * 100_003 + i, 0 if shared else None
        )
        handles.append(q.register_forward_pre_hook(hooks[name]))
        if s.network == "fp":  # observed, then passed on unquantized
            handles.append(q.register_forward_hook(lambda m, args, out: args[0]))
    try:
        with quant_state(denoiser, weights=s.network == "quantized", acts=True):
            yield hooks
    finally:
        for h in handles:
            h.remove()
        for _, q in quantizers:
            if shared and q.n_groups > 1:
                q.group_index = None


def _report(quantizers: list[tuple[str, ActQuantizer]], seen: dict[str, bool]) -> int:
    unused = [n for n, _ in quantizers if not seen[n]]
    if unused:
        log.warning(
            "activation quantizers never called during the time-step range init (left as they were): %s",
            ", ".join(unused[:8]),
        )
    return len(quantizers) - len(unused)
