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

Not built: the *time-step-aware* balancing (one ``s`` per range of time steps, with one weight
quantizer per range: the code's ``timerange``) and the metric-decoupled mixed precision (the code
keeps a hand-made per-step, per-layer bit assignment for OpenSora only, no allocation script);
the code's ``act_scale`` is a momentum average of per-batch maxima, ours the maximum over the
statistics rows.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from diffquant.methods.svdquant import SVDQuant, SVDQuantConfig
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
