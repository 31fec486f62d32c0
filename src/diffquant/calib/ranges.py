"""Initial activation ranges: run calibration rows through the denoiser with every activation
quantizer observing its input (see :class:`~diffquant.quant.quantizers.ActQuantizer`).

Two ways, both by :func:`calibrate_act_ranges`:

* ours (the default): a random subset of rows spread over all recorded steps, through the FP
  denoiser (weights FP, activations passed through while observed);
* Q-Diffusion's (``quantized=True``; ``scripts/sample_diffusion_ldm.py`` lines 533-546 of
  q-diffusion): after weight reconstruction, one forward of the initial rows through the
  weight-quantized denoiser in which every activation quantizer sets its range on its first input
  and quantizes at once (later layers see quantized inputs), then, with running statistics, every
  batch of ``running_rows`` in the given order moves the ranges to the EMA of per-batch min/max.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional

import torch
from torch import Tensor, nn

from diffquant.calib.collect import STEP_KEY, CalibStream
from diffquant.quant.quantizers import ActQuantizer
from diffquant.quant.state import iter_quantizers, quant_state
from diffquant.quant.timestep import sampler_step

if TYPE_CHECKING:
    from diffquant.models.denoiser import DenoiserSpec

log = logging.getLogger(__name__)


def minmax_patterns(denoiser: nn.Module, spec: DenoiserSpec, quant_cfg: Any) -> list[str]:
    """The quantizer-name patterns that always get ``minmax`` ranges under ``quant_cfg``: the
    input quantizers of the layers of its ``minmax_act_roles``, and its ``minmax_act_layers``."""
    layers = spec.layers(denoiser, *quant_cfg.minmax_act_roles)
    return [f"^{re.escape(name)}\\." for name in layers] + list(quant_cfg.minmax_act_layers)


@dataclass
class RunningStat:
    """Q-Diffusion's running statistics after the initial range: ``rows`` (global row indices, in
    the order they are fed) in batches of ``batch_size`` (a last, smaller batch is dropped, as the
    reference's ``int(N / 64)`` loop does), each moving every range to the EMA with ``momentum``."""

    rows: Tensor
    batch_size: int = 64
    momentum: float = 0.95


@contextmanager
def observing_act_ranges(
    denoiser: nn.Module,
    method: str = "minmax",
    *,
    p: float = 2.4,
    n_candidates: int = 80,
    seed: int = 0,
    minmax_layers: Sequence[str] = (),
    quantize: bool = False,
) -> Iterator[list[tuple[str, ActQuantizer]]]:
    """Every activation quantizer of ``denoiser`` observes its inputs while the block runs and sets
    its Δ, z from them when the block ends (``method`` ``minmax`` or ``lp``, see
    :class:`~diffquant.quant.quantizers.ActQuantizer`); quantizers whose name matches a regular
    expression of ``minmax_layers`` use ``minmax`` whatever ``method`` is. With ``quantize`` each
    quantizer quantizes its input with the range observed so far (else passes it through). An
    exception drops the partial statistics. Yields the ``(name, quantizer)`` pairs::

        with observing_act_ranges(model.denoiser):
            model.sample_latents(list(range(8)), seed)
    """
    quantizers = list(iter_quantizers(denoiser, "act"))
    forced = [re.compile(pattern) for pattern in minmax_layers]
    for i, (name, q) in enumerate(quantizers):
        own = "minmax" if any(f.search(name) for f in forced) else method
        q.start_observing(own, p, n_candidates, seed=seed * 100_003 + i, quantize=quantize)
    try:
        yield quantizers
    except BaseException:
        for _, q in quantizers:
            q._observer = None  # drop partial statistics
        raise
    for _, q in quantizers:
        q.finish_observing()


@torch.no_grad()
def calibrate_act_ranges(
    denoiser: nn.Module,
    stream: CalibStream,
    *,
    method: str = "lp",
    n_rows: Optional[int] = 256,
    batch_size: int = 64,
    p: float = 2.4,
    n_candidates: int = 80,
    seed: int = 0,
    device: Optional[torch.device] = None,
    minmax_layers: Sequence[str] = (),
    rows: Optional[Tensor] = None,
    running: Optional[RunningStat] = None,
    quantized: bool = False,
) -> int:
    """Set Δ, z of every activation quantizer of ``denoiser`` from calibration rows.

    Initial rows: ``rows`` (global indices, fed in that order) or, when None, ``n_rows`` of a
    fixed random subset spread over all recorded steps (None = all rows), in batches of
    ``batch_size``. ``method``: ``minmax`` (min/max over all rows) or ``lp`` (per batch the
    L_p-optimal clipping range, averaged over batches); quantizers whose name matches a regular
    expression of ``minmax_layers`` use ``minmax`` whatever ``method`` is. Then, with ``running``,
    Q-Diffusion's running statistics over ``running.rows`` (:class:`RunningStat`).

    ``quantized=False`` (ours): weights FP, activations passed through while observed.
    ``quantized=True`` (Q-Diffusion's): weights quantized as they are, every activation
    quantizer quantizes its input with the range it has so far, so later layers see the
    quantized network's activations.

    Time-step-aware quantizers are calibrated per group (the denoiser's time-step hook routes each
    row by its sampler step index, ``_step``). Returns the number of quantizers calibrated.
    """
    device = device or next(denoiser.parameters()).device
    init_rows = stream.subset(n_rows, seed) if rows is None else torch.as_tensor(rows)
    state = dict(weights=True, acts=True) if quantized else dict(weights=False)
    with observing_act_ranges(
        denoiser,
        method,
        p=p,
        n_candidates=n_candidates,
        seed=seed,
        minmax_layers=minmax_layers,
        quantize=quantized,
    ) as quantizers:
        with quant_state(denoiser, **state):
            batches = (
                stream.batches(batch_size, init_rows, device=device, with_step=True)
                if rows is None
                else stream.ordered_batches(batch_size, init_rows, device=device, with_step=True)
            )
            for batch in batches:
                call_rows(denoiser, batch)
            if running is not None:
                for _, q in quantizers:
                    q.start_running(running.momentum)
                for batch in stream.ordered_batches(
                    running.batch_size, running.rows, device=device, drop_last=True, with_step=True
                ):
                    call_rows(denoiser, batch)
    unused = [n for n, q in quantizers if not bool(q.initialized)]
    if unused:
        log.warning(
            "activation quantizers never called during calibration (left uncalibrated, "
            "they will fail if used): %s",
            ", ".join(unused[:8]),
        )
    return len(quantizers) - len(unused)


def call_rows(denoiser: nn.Module, batch: dict[str, Tensor], device: Any = None) -> Any:
    """Call ``denoiser`` on calibration rows whose batch carries their sampler step (``_step``):
    time-step groups are routed by step index, not by time-step value (a schedule may repeat
    one). ``device``: where the inputs go (None: where they are)."""
    kwargs = {k: v if device is None else v.to(device) for k, v in batch.items() if k != STEP_KEY}
    with sampler_step(denoiser, batch.get(STEP_KEY)):
        return denoiser(**kwargs)
