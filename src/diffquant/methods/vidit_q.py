"""ViDiT-Q (Zhao et al., ICLR 2025): dynamic per-token activations with channel balancing,
``method=vidit_q``.

1. **Dynamic per-token activations** — every layer input and attention q, k, v gets one grid per
   token from its own min and max at run time (``quant.act_dynamic_per_token``,
   :class:`~diffquant.quant.quantizers.TokenActQuantizer`; asymmetric, as the code's
   ``sym: False``); weights per output channel, min-max, asymmetric, round-to-nearest.
2. **Channel balancing** (the code's ``smooth_quant`` block, ``qdiff/models/quant_layer.py``) —
   per input channel ``s_j = max|X_j|^α / max|W_j|^(1-α)`` with the code's fixed ``α`` (no search:
   ``alpha``, 0.11 in its OpenSora W4A8 configs), the activation divided by ``s`` and the weight
   multiplied by it before quantization, on every layer but the embeddings and the first and
   last layers (the code's ``remain_fp`` list).

It is :mod:`diffquant.methods.svdquant`'s pipeline with rank 0 (no low-rank branch) and a one-point
``(α, 1-α)`` grid: the statistics pass, the transform and its checkpointing are the same code.

3. **Time-step-aware balancing** (the code's ``timerange``; ``method=vidit_q_timestep``: two
   groups of sampler steps, as its OpenSora W4A8 config's ``[[0, 500], [501, 1000]]``) — with
   ``quant.timestep_aware`` and ``timestep_groups = G > 1``, one ``s`` per group from that group's
   rows, and one weight quantizer per group for ``W · s_g``
   (:class:`~diffquant.quant.lowrank.GroupSmooth`); each row of a call is routed to its group by
   the denoiser's time-step router. Needs dynamic per-token activations (refused otherwise).

Not built: the metric-decoupled mixed precision (the code keeps a hand-made per-step, per-layer
bit assignment for OpenSora only, with no allocation script). The code's ``act_scale`` is a
momentum average of per-batch maxima, ours the maximum over the statistics rows.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from diffquant.methods.ptq import method_quant
from diffquant.methods.svdquant import LayerChoice, SVDQuant, SVDQuantConfig, smoothing_factors
from diffquant.quant.config import QuantConfig
from diffquant.quant.lowrank import GroupSmooth
from diffquant.quant.swap import _Factory
from diffquant.registry import METHODS
from diffquant.validation import InvalidSetting


@dataclass
class ViDiTQConfig(SVDQuantConfig):
    """``method=vidit_q`` (module doc). Fields of :class:`SVDQuantConfig`; ``rank`` stays 0.

    Attributes:
        alpha: the channel-balancing migration strength (the code's ``alpha``).
    """

    name: str = "vidit_q"
    rank: int = 0
    alpha: float = 0.11
    quant_overrides: dict[str, Any] = field(default_factory=lambda: {"act_dynamic_per_token": True})

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 <= self.alpha <= 1.0:
            raise InvalidSetting("alpha", "must lie in [0, 1], e.g. method.alpha=0.11.")

    def candidates(self) -> list[tuple[float, float]]:
        """One candidate: ``(α, 1 - α)``."""
        return [(self.alpha, 1.0 - self.alpha)]


@METHODS.register("vidit_q", schema=ViDiTQConfig)
class ViDiTQ(SVDQuant):
    """``method=vidit_q``: dynamic per-token activations and channel balancing (module doc)."""

    version = 1
    label = "ViDiT-Q channel balancing"

    @classmethod
    def check(cls, quant: QuantConfig, cfg: ViDiTQConfig) -> None:
        q = method_quant(quant, cfg)
        if q.timestep_aware and q.timestep_groups > 1 and not q.act_dynamic_per_token:
            raise InvalidSetting(
                "quant_overrides",
                "time-step-aware channel balancing (timestep_aware with timestep_groups > 1) needs "
                "dynamic per-token activations: add act_dynamic_per_token: true.",
            )

    def search(self, search: Any, names: list[str]) -> tuple[dict[str, Any], list[LayerChoice]]:
        """One balancing vector per group of sampler steps when the quant config is time-step
        aware (module doc, step 3); otherwise SVDQuant's search with the one candidate."""
        quant, cfg = search.quant, search.cfg
        groups = quant.timestep_groups if quant.timestep_aware else 1
        if groups == 1:
            return super().search(search, names)
        self.check(quant, cfg)
        absmax = search.act_absmax(names, groups)
        denoiser = search.model.denoiser
        splits = search.model.spec.shortcut_splits(denoiser) if quant.shortcut_split else {}
        factory = _Factory(quant)
        transforms, choices = {}, []
        for name in names:
            w = denoiser.get_submodule(name).weight.detach()
            smooth = torch.stack(
                [smoothing_factors(absmax[name][g], w, cfg.alpha, 1.0 - cfg.alpha) for g in range(groups)]
            )
            shape = [1] * w.dim()
            shape[1] = -1
            wqs = [
                factory.weight(w * smooth[g].view(shape), splits.get(name), init=True) for g in range(groups)
            ]
            transforms[name] = GroupSmooth(smooth, wqs, cfg.alpha)
            choices.append(LayerChoice(name, 0, cfg.alpha, 1.0 - cfg.alpha, None, None))
        return transforms, choices
