"""The bit-width setting a method quantizes to (the ``quant/`` config group).

One dataclass, in the spirit of torchao's ``AOBaseConfig``: every ``conf/quant/*.yaml`` option
(``fp32``, ``w8a8``, ``w4a8``, ``w4a6``, ``w4a4``, ``w3a8``, ``w3a6``) is a setting of it. 32 bits
means "not quantized". Bits outside 2..16 (other than 32) are rejected by :func:`validate_bits`
before any work starts.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Optional

from diffquant.validation import InvalidSetting, one_of, positive

FP_BITS = 32

#: Fields added after results were cached, with the value that reproduces the earlier behaviour:
#: left out of cache and resume keys at that value, so that adding them invalidates nothing.
KEY_NEUTRAL_DEFAULTS = {"act_dynamic_per_token": False, "weight_group_size": None, "act_group_size": None}


@dataclass
class QuantConfig:
    """Bits and granularity of weight / activation fake quantization of the UNet.

    Attributes:
        name: the option's name, e.g. ``w4a8`` (goes into logs).
        weight_bits: bits of every Conv2d/Linear weight (per output channel); 32 = FP.
        act_bits: bits of every quantized input activation and of attention q, k, v; 32 = FP.
        softmax_bits: bits of the post-softmax attention probabilities (unsigned, zero point 0).
        symmetric_weights / symmetric_acts: symmetric (zero point 0) instead of affine ranges.
        act_per_channel: per-channel activation ranges (channel dim 1 for 4-D inputs, last dim for
            token inputs); None = automatic, on at ``act_bits <= 4`` as the QuEST code does.
        act_dynamic_per_token: dynamic per-token activation quantization (ViDiT-Q): every layer
            input and attention q, k, v gets one grid per token (a row of the channel axis: a
            position of a 4-D input, a token of ``(B, L, C)``, a row of ``(B, C)``) from that
            token's own min and max, computed at run time
            (:class:`~diffquant.quant.quantizers.TokenActQuantizer`). Nothing is calibrated:
            range initialisation (``act_init``), running statistics and time-step groups do not
            apply to these quantizers, and LSQ (``ptq``'s activation stage), QuEST and AccuQuant
            learn no step size for them (they still learn everything else, and the step size of
            the post-softmax quantizer, which stays static: unsigned at ``softmax_bits``).
            Excludes ``act_per_channel=true`` and ``act_running_stat=true``.
        act_group_size: with ``act_dynamic_per_token``, one grid per token and group of this many
            channels (SVDQuant's INT4 activations: 64); None = one per token.
        weight_group_size: one weight grid per output channel and group of this many input
            channels (:class:`~diffquant.quant.quantizers.GroupWeightQuantizer`, SVDQuant's INT4
            weights: 64); None = per output channel. Round-to-nearest only (no AdaRound).
        first_last_act_bits: activation bits of the input of the denoiser's first and last layer
            (its ``first`` / ``last`` roles; a UNet's input and output convolutions); None keeps
            them at ``act_bits``.
        shortcut_split: quantize the two halves of a skip concatenation (a UNet up-block
            shortcut's input) separately (Q-Diffusion's split), where the family declares one.
        weight_init / act_init: initial range, ``lp`` (Q-Diffusion's search over 80 clipping
            ratios minimising the L_p error, p = ``lp_norm``) or ``minmax``.
        act_running_stat: after the initial range, follow Q-Diffusion's running statistics
            (``--running_stat``, ``qdiff/quant_layer.py`` ``act_momentum_update``): every further
            calibration batch moves the activation range to the exponential moving average of
            the per-batch min and max (per channel when per-channel), ``m · old + (1 - m) · new``,
            started from the raw min / max of the initial rows; the range is then that EMA
            (the initial ``act_init`` clipping only shapes what the next layers saw first).
            Which rows and in which order is the method's choice (``method.act_running_*``).
        act_momentum: the EMA momentum ``m`` (Q-Diffusion: 0.95).
        minmax_act_roles: denoiser roles (:mod:`diffquant.models.denoiser`) whose input
            quantizers always get a ``minmax`` initial range: by default the inputs that are a
            function of the time step alone (``time_embedding``, ``time_projection``). Their
            rows hold one value per recorded step, and an L_p-clipped range fit to those few
            values clips whole time steps. ``[]`` applies ``act_init`` everywhere.
        minmax_act_layers: further regular expressions searched in activation quantizer names
            (``<layer>.input_quantizer``) that always get ``minmax`` ranges.
        timestep_aware: one activation parameter set per group of sampler steps.
        timestep_groups: number of such groups (the sampler's steps split evenly).
    """

    name: str = "fp32"
    weight_bits: int = FP_BITS
    act_bits: int = FP_BITS
    softmax_bits: int = 8
    symmetric_weights: bool = False
    symmetric_acts: bool = False
    act_per_channel: Optional[bool] = None
    act_dynamic_per_token: bool = False
    act_group_size: Optional[int] = None
    weight_group_size: Optional[int] = None
    first_last_act_bits: Optional[int] = 8
    shortcut_split: bool = True
    weight_init: str = "lp"
    act_init: str = "lp"
    act_running_stat: bool = False
    act_momentum: float = 0.95
    minmax_act_roles: list[str] = field(default_factory=lambda: ["time_embedding", "time_projection"])
    minmax_act_layers: list[str] = field(default_factory=list)
    lp_norm: float = 2.4
    lp_candidates: int = 80
    timestep_aware: bool = False
    timestep_groups: int = 1

    def __post_init__(self) -> None:
        validate_bits(self)

    @property
    def enabled(self) -> bool:
        return self.weight_bits < FP_BITS or self.act_bits < FP_BITS

    @property
    def acts_per_channel(self) -> bool:
        """Static per-channel activation ranges (never with dynamic per-token quantization)."""
        if self.act_dynamic_per_token:
            return False
        return self.act_bits <= 4 if self.act_per_channel is None else bool(self.act_per_channel)


def validate_bits(cfg) -> None:
    """Raise :class:`~diffquant.validation.InvalidSetting` naming the key and the fix for
    impossible bit-widths, unknown init methods, roles or patterns (``QuantConfig`` calls it on
    construction)."""
    for key in ("weight_bits", "act_bits", "softmax_bits", "first_last_act_bits"):
        bits = getattr(cfg, key)
        if bits is None and key == "first_last_act_bits":
            continue
        if bits != FP_BITS and not 2 <= bits <= 16:
            raise InvalidSetting(
                key, f"is impossible: use 2..16 bits, or 32 for full precision (e.g. quant.{key}=4)."
            )
    for key in ("weight_init", "act_init"):
        one_of(cfg, key, ("lp", "minmax"))
    for pattern in cfg.minmax_act_layers:
        try:
            re.compile(pattern)
        except re.error as err:
            raise InvalidSetting(
                "minmax_act_layers",
                f"holds {pattern!r}, not a regular expression "
                f"({err}); e.g. 'quant.minmax_act_layers=[\\.proj_in\\.]'.",
            ) from err
    from diffquant.models.denoiser import ROLES

    unknown = [r for r in cfg.minmax_act_roles if r not in ROLES]
    if unknown:
        raise InvalidSetting(
            "minmax_act_roles", f"has unknown role(s) {unknown}; roles are {', '.join(ROLES)}."
        )
    if getattr(cfg, "act_dynamic_per_token", False):
        for key in ("act_per_channel", "act_running_stat"):
            if getattr(cfg, key):
                raise InvalidSetting(
                    key,
                    "cannot be combined with act_dynamic_per_token=true (each token's range is "
                    f"computed at run time): set quant.{key}="
                    + ("null" if key == "act_per_channel" else "false")
                    + " or quant.act_dynamic_per_token=false.",
                )
    positive(cfg, "timestep_groups", "lp_candidates", "act_group_size", "weight_group_size")
    if getattr(cfg, "act_group_size", None) is not None and not cfg.act_dynamic_per_token:
        raise InvalidSetting(
            "act_group_size",
            "applies to dynamic per-token activations only: set quant.act_dynamic_per_token=true "
            "or quant.act_group_size=null.",
        )
    if not 0.0 <= cfg.act_momentum < 1.0:
        raise InvalidSetting(
            "act_momentum", "must lie in [0, 1) (Q-Diffusion: 0.95), e.g. quant.act_momentum=0.95."
        )


def quant_key(cfg) -> dict:
    """The setting as a plain dict for cache and resume keys: every field, except those of
    :data:`KEY_NEUTRAL_DEFAULTS` at their neutral value (keys made before they existed stay
    valid)."""
    from diffquant.quant.typed import as_dict

    d = as_dict(cfg)
    for key, neutral in KEY_NEUTRAL_DEFAULTS.items():
        if key in d and d[key] == neutral:
            d.pop(key)
    return d
