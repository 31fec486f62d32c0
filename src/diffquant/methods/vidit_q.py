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

4. **Mixed precision** (the code's metric-decoupled assignment, ``method=vidit_q_mp``) — on top of
   step 3, the weights of every layer in the first ``mp_first_groups`` (noisiest) step groups and
   of the layers of ``mp_roles`` in every group at ``mp_bits``: the released OpenSora W4A8
   assignment (``t20_weight_4_mp.yaml``: the first 5 of 20 steps all W8, the MLP ``fc1`` / ``fc2``
   W8 at every step) is ``timestep_groups=4``, ``mp_first_groups=1``,
   ``mp_roles=[feed_forward]``, ``mp_bits=8``. The code derives its assignment by hand from
   per-layer sensitivity runs (CLIP / VQA / optical-flow metrics per layer kind and step range);
   there is no allocation script, so the assignment is a setting here, not searched.

The code's ``act_scale`` is a momentum average of per-batch maxima, ours the maximum over the
statistics rows.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from diffquant.methods.ptq import method_quant
from diffquant.methods.svdquant import LayerChoice, SVDQuant, SVDQuantConfig, smoothing_factors
from diffquant.models.denoiser import ROLES
from diffquant.quant.config import QuantConfig
from diffquant.quant.lowrank import GroupSmooth
from diffquant.quant.swap import QuantizerFactory
from diffquant.registry import METHODS
from diffquant.validation import InvalidSetting, positive


@dataclass
class ViDiTQConfig(SVDQuantConfig):
    """``method=vidit_q`` (module doc). Fields of :class:`SVDQuantConfig`; ``rank`` stays 0.

    Attributes:
        alpha: the channel-balancing migration strength (the code's ``alpha``).
        mp_bits: the weight bit-width of the mixed-precision layers (module doc, step 4).
        mp_first_groups: leading (noisiest) step groups whose layers all get ``mp_bits``.
        mp_roles: denoiser roles whose layers get ``mp_bits`` in every step group.
    """

    KEY_NEUTRAL_DEFAULTS: ClassVar[dict[str, Any]] = {
        **SVDQuantConfig.KEY_NEUTRAL_DEFAULTS,
        "mp_bits": 8,
        "mp_first_groups": 0,
        "mp_roles": [],
    }

    name: str = "vidit_q"
    rank: int = 0
    alpha: float = 0.11
    mp_bits: int = 8
    mp_first_groups: int = 0
    mp_roles: list[str] = field(default_factory=list)
    quant_overrides: dict[str, Any] = field(default_factory=lambda: {"act_dynamic_per_token": True})

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 <= self.alpha <= 1.0:
            raise InvalidSetting("alpha", "must lie in [0, 1], e.g. method.alpha=0.11.")
        positive(self, "mp_bits", "mp_first_groups", allow_zero=True)
        unknown = [r for r in self.mp_roles if r not in ROLES]
        if unknown:
            raise InvalidSetting("mp_roles", f"has unknown role(s) {unknown}; roles are {', '.join(ROLES)}.")

    @property
    def mixed_precision(self) -> bool:
        return self.mp_first_groups > 0 or bool(self.mp_roles)

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
        grouped = q.timestep_aware and q.timestep_groups > 1
        if grouped and not q.act_dynamic_per_token:
            raise InvalidSetting(
                "quant_overrides",
                "time-step-aware channel balancing (timestep_aware with timestep_groups > 1) needs "
                "dynamic per-token activations: add act_dynamic_per_token: true.",
            )
        if cfg.mixed_precision and not grouped:
            raise InvalidSetting(
                "mp_first_groups",
                "mixed precision (mp_first_groups / mp_roles) assigns bits per step group: set "
                "quant_overrides timestep_aware: true and timestep_groups > 1 (method=vidit_q_mp).",
            )
        if grouped and cfg.mp_first_groups > q.timestep_groups:
            raise InvalidSetting(
                "mp_first_groups",
                f"is more than the {q.timestep_groups} step groups (quant.timestep_groups).",
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
        factory = QuantizerFactory(quant)
        high = QuantizerFactory(dataclasses.replace(quant, weight_bits=cfg.mp_bits))
        mp_layers = set(search.model.spec.layers(denoiser, *cfg.mp_roles)) if cfg.mp_roles else set()
        transforms, choices = {}, []
        for name in names:
            w = denoiser.get_submodule(name).weight.detach()
            smooth = torch.stack(
                [smoothing_factors(absmax[name][g], w, cfg.alpha, 1.0 - cfg.alpha) for g in range(groups)]
            )
            shape = [1] * w.dim()
            shape[1] = -1
            wqs = [
                (high if g < cfg.mp_first_groups or name in mp_layers else factory).weight(
                    w * smooth[g].view(shape), splits.get(name), init=True
                )
                for g in range(groups)
            ]
            transforms[name] = GroupSmooth(smooth, wqs, cfg.alpha)
            choices.append(LayerChoice(name, 0, cfg.alpha, 1.0 - cfg.alpha, None, None))
        return transforms, choices
