"""Initial activation ranges: run calibration rows through the FP denoiser with every activation
quantizer observing its input (see :class:`~diffquant.quant.quantizers.ActQuantizer`)."""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Optional

import torch
from torch import nn

from diffquant.calib.collect import CalibStream
from diffquant.quant.quantizers import ActQuantizer
from diffquant.quant.state import iter_quantizers, quant_state

if TYPE_CHECKING:
    from diffquant.models.denoiser import DenoiserSpec

log = logging.getLogger(__name__)


def minmax_patterns(denoiser: nn.Module, spec: DenoiserSpec, quant_cfg: Any) -> list[str]:
    """The quantizer-name patterns that always get ``minmax`` ranges under ``quant_cfg``: the
    input quantizers of the layers of its ``minmax_act_roles``, and its ``minmax_act_layers``."""
    layers = spec.layers(denoiser, *quant_cfg.minmax_act_roles)
    return [f"^{re.escape(name)}\\." for name in layers] + list(quant_cfg.minmax_act_layers)


@contextmanager
def observing_act_ranges(
    denoiser: nn.Module,
    method: str = "minmax",
    *,
    p: float = 2.4,
    n_candidates: int = 80,
    seed: int = 0,
    minmax_layers: Sequence[str] = (),
) -> Iterator[list[tuple[str, ActQuantizer]]]:
    """Every activation quantizer of ``denoiser`` observes its inputs while the block runs and sets
    its Δ, z from them when the block ends (``method`` ``minmax`` or ``lp``, see
    :class:`~diffquant.quant.quantizers.ActQuantizer`); quantizers whose name matches a regular
    expression of ``minmax_layers`` use ``minmax`` whatever ``method`` is. An exception drops the
    partial statistics. Yields the ``(name, quantizer)`` pairs::

        with observing_act_ranges(model.denoiser):
            model.sample_latents(list(range(8)), seed)
    """
    quantizers = list(iter_quantizers(denoiser, "act"))
    forced = [re.compile(pattern) for pattern in minmax_layers]
    for i, (name, q) in enumerate(quantizers):
        own = "minmax" if any(f.search(name) for f in forced) else method
        q.start_observing(own, p, n_candidates, seed=seed * 100_003 + i)
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
) -> int:
    """Set Δ, z of every activation quantizer of ``denoiser`` from ``n_rows`` calibration rows
    (a fixed random subset spread over all recorded steps; None = all rows).

    ``method``: ``minmax`` (min/max over all rows) or ``lp`` (per batch the L_p-optimal clipping
    range, averaged over batches); quantizers whose name matches a regular expression of
    ``minmax_layers`` use ``minmax`` whatever ``method`` is. Time-step-aware quantizers are
    calibrated per group (the denoiser's time-step hook routes each row). Weights stay FP while
    observing. Returns the number of quantizers calibrated.
    """
    device = device or next(denoiser.parameters()).device
    with observing_act_ranges(
        denoiser, method, p=p, n_candidates=n_candidates, seed=seed, minmax_layers=minmax_layers
    ) as quantizers:
        with quant_state(denoiser, weights=False):
            for batch in stream.batches(batch_size, stream.subset(n_rows, seed), device=device):
                denoiser(**batch)
    unused = [n for n, q in quantizers if not bool(q.initialized)]
    if unused:
        log.warning(
            "activation quantizers never called during calibration (left uncalibrated, "
            "they will fail if used): %s",
            ", ".join(unused[:8]),
        )
    return len(quantizers) - len(unused)
