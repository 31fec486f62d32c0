"""The papers' "Size (MB)" column: the storage a denoiser needs as deployed.

Counted, in bits, then reported in MiB (2**20 bytes):

* a quantized layer's weight at its bit-width, packed (W4: two per byte; W3: three bits each),
  plus its per-output-channel scale and zero point at 32 bits each (a split weight quantizer's
  two halves each have their own);
* the parameters of every calibrated activation quantizer (scale and zero point per group and
  channel, QuEST's per-step sets included) at 32 bits; dynamic per-token quantizers store none;
* SVDQuant's low-rank branch (:mod:`diffquant.quant.lowrank`) at 16 bits per value, its
  smoothing factors at 32 bits per input channel; with ViDiT-Q's time-step-aware balancing one
  quantized weight (and factor vector) per group of steps;
* every other parameter of the denoiser (biases, norms, embeddings, layers left in FP) at its
  own dtype's width.

Not counted: what exists only for calibration (AdaRound's rounding variables, hardened into the
integer codes; the frozen FP copies of the teacher path). The autoencoder and text encoder stay
outside, as in the papers' tables, which size the UNet / transformer only.
"""

from __future__ import annotations

import math

from torch import nn

from diffquant.quant.adaround import AdaRound
from diffquant.quant.lowrank import BRANCH_BITS, GroupSmooth, SmoothLowRank
from diffquant.quant.modules import is_quant_layer
from diffquant.quant.quantizers import ActQuantizer, WeightQuantizer
from diffquant.quant.state import iter_quantizers

MIB = 2**20


def _tensor_bits(t) -> int:
    return t.numel() * t.element_size() * 8


def denoiser_bits(denoiser: nn.Module) -> int:
    """Bits to store ``denoiser`` as deployed (module docstring)."""
    bits = 0
    counted: set[int] = set()
    quantizer_types = (WeightQuantizer, ActQuantizer, AdaRound)
    for module in denoiser.modules():
        if isinstance(module, quantizer_types):
            counted.update(id(p) for p in module.parameters())  # calibration state, counted below
        if is_quant_layer(module) and module.weight_quantizer is not None:
            counted.add(id(module.weight))
            t = module.transform
            # time-step-aware balancing stores one quantized weight per group instead of one
            holders = list(t.weight_quantizers) if isinstance(t, GroupSmooth) else [module.weight_quantizer]
            for holder in holders:
                for _, wq in iter_quantizers(holder, "weight"):
                    bits += math.prod(wq.weight_shape) * wq.bits + 32 * (
                        wq.scale.numel() + wq.zero_point.numel()
                    )
            if isinstance(t, SmoothLowRank):
                bits += BRANCH_BITS * (t.up.numel() + t.down.numel())
            if t is not None:
                bits += 32 * t.smooth.numel()
    for _, aq in iter_quantizers(denoiser, "act"):
        bits += 32 * (aq.scale.numel() + aq.zero_point.numel())
    for p in denoiser.parameters():
        if id(p) not in counted:
            counted.add(id(p))
            bits += _tensor_bits(p)
    return bits


def model_size_mb(denoiser: nn.Module) -> float:
    """``denoiser_bits`` in MiB."""
    return denoiser_bits(denoiser) / 8 / MIB
