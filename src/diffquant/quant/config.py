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

FP_BITS = 32


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
        first_last_act_bits: activation bits of the first and last layer (conv_in, conv_out);
            None keeps them at ``act_bits``.
        shortcut_split: quantize the two halves of the skip concatenation feeding an up-block
            ``ResnetBlock2D.conv_shortcut`` separately (Q-Diffusion's split).
        weight_init / act_init: initial range, ``lp`` (Q-Diffusion's search over 80 clipping
            ratios minimising the L_p error, p = ``lp_norm``) or ``minmax``.
        minmax_act_layers: regular expressions searched in activation quantizer names whose
            initial range is always ``minmax``: inputs that are a function of the time step
            alone (the time-embedding MLP, ``time_emb_proj``). Their rows hold one value per
            recorded step, and an L_p-clipped range fit to those few values clips whole time
            steps (ldm_digits W4A4: ``time_embedding.linear_1`` reconstruction loss 0.55 with
            ``lp``, 0.04 with ``minmax``). ``[]`` applies ``act_init`` everywhere.
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
    first_last_act_bits: Optional[int] = 8
    shortcut_split: bool = True
    weight_init: str = "lp"
    act_init: str = "lp"
    minmax_act_layers: list[str] = field(
        default_factory=lambda: [r"time_embedding\.", r"time_emb_proj"])
    lp_norm: float = 2.4
    lp_candidates: int = 80
    timestep_aware: bool = False
    timestep_groups: int = 1

    @property
    def enabled(self) -> bool:
        return self.weight_bits < FP_BITS or self.act_bits < FP_BITS

    @property
    def acts_per_channel(self) -> bool:
        return self.act_bits <= 4 if self.act_per_channel is None else bool(self.act_per_channel)


def validate_bits(cfg) -> None:
    """Raise ValueError naming the fix for impossible bit-widths or unknown init methods."""
    for key in ("weight_bits", "act_bits", "softmax_bits", "first_last_act_bits"):
        bits = getattr(cfg, key)
        if bits is None and key == "first_last_act_bits":
            continue
        if bits != FP_BITS and not 2 <= bits <= 16:
            raise ValueError(f"quant.{key}={bits} is impossible: use 2..16 bits, or 32 for full "
                             f"precision (e.g. quant.{key}=4).")
    for key in ("weight_init", "act_init"):
        if getattr(cfg, key) not in ("lp", "minmax"):
            raise ValueError(f"quant.{key}={getattr(cfg, key)!r} is unknown: use 'lp' or 'minmax'.")
    for pattern in cfg.minmax_act_layers:
        try:
            re.compile(pattern)
        except re.error as err:
            raise ValueError(f"quant.minmax_act_layers: {pattern!r} is not a regular expression "
                             f"({err}); e.g. 'quant.minmax_act_layers=[time_embedding\\.]'.") from err
    if cfg.timestep_groups < 1:
        raise ValueError(f"quant.timestep_groups={cfg.timestep_groups} must be >= 1.")
