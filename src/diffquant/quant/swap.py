"""Module swapping: turn a denoiser into its fake-quantized version, in place.

:func:`quantize_denoiser` replaces

* every ``nn.Conv2d`` / ``nn.Linear`` by :class:`QuantConv2d` / :class:`QuantLinear` (weight per
  output channel, input activation per tensor, per channel, or dynamic per token with
  ``quant.act_dynamic_per_token``);
* the processor of every diffusers ``Attention`` by :class:`QuantAttnProcessor` (q, k, v at the
  activation bit-width, post-softmax probabilities unsigned at ``softmax_bits``);

with two policies from the :class:`QuantConfig`:

* first/last layer: the input activations of the layers of the denoiser's ``first`` and
  ``last`` roles (:mod:`diffquant.models.denoiser`) use ``first_last_act_bits`` (their weights
  keep ``weight_bits``);
* shortcut split: a layer fed by a concatenation of two tensors of different ranges (a UNet's
  up-block shortcut sees ``cat([hidden_states, skip], dim=1)``) has its input and weight
  quantized in two halves, split where the family's spec says
  (:meth:`~diffquant.models.denoiser.DenoiserSpec.shortcut_splits`).

The VAE and text encoder are separate modules and are never touched. A bit-width of 32 leaves
that kind of tensor in full precision (no quantizer is created).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Optional

import torch
from torch import nn

from diffquant.quant.attention import QuantAttnProcessor, is_quant_attention
from diffquant.quant.config import FP_BITS, QuantConfig, validate_bits
from diffquant.quant.modules import QuantConv2d, QuantLinear, is_quant_layer
from diffquant.quant.quantizers import (
    ActQuantizer,
    GroupWeightQuantizer,
    SplitActQuantizer,
    SplitWeightQuantizer,
    TokenActQuantizer,
    WeightQuantizer,
)
from diffquant.quant.state import is_quantized, iter_quantizers
from diffquant.quant.timestep import attach_timestep_router
from diffquant.quant.typed import as_dataclass

if TYPE_CHECKING:
    from diffquant.models.denoiser import DenoiserSpec


@dataclass
class QuantSummary:
    """What :func:`quantize_denoiser` quantized.

    ``layers``: quantized layer count per type (``Conv2d``, ``Linear``); ``attention``: number of
    ``Attention`` modules with quantized matmuls; ``split_shortcuts``: names of split convs;
    ``first_last``: layers with ``first_last_act_bits``; ``quantizers``: leaf quantizer counts.
    """

    quant: dict[str, Any]
    layers: dict[str, int] = field(default_factory=dict)
    attention: int = 0
    split_shortcuts: list[str] = field(default_factory=list)
    first_last: list[str] = field(default_factory=list)
    quantizers: dict[str, int] = field(default_factory=dict)

    @property
    def n_quant_layers(self) -> int:
        """Number of quantized Conv2d/Linear layers."""
        return sum(self.layers.values())

    def metrics(self) -> dict[str, int]:
        """Numbers for ``metrics.json``."""
        return {
            "n_quant_layers": self.n_quant_layers,
            "n_quant_conv2d": self.layers.get("Conv2d", 0),
            "n_quant_linear": self.layers.get("Linear", 0),
            "n_quant_attention": self.attention,
            "n_split_shortcuts": len(self.split_shortcuts),
        }

    def format(self) -> str:
        """A small table for the log."""
        q = self.quant
        w = "FP" if q["weight_bits"] >= FP_BITS else f"{q['weight_bits']}-bit per-channel"
        gran = "per-channel" if q.get("_acts_per_channel") else "per-tensor"
        if q.get("act_dynamic_per_token"):
            gran = "dynamic per-token"
        a = "FP" if q["act_bits"] >= FP_BITS else f"{q['act_bits']}-bit {gran}"
        groups = q["timestep_groups"] if q.get("timestep_aware") else 1
        fl = q.get("first_last_act_bits") or q["act_bits"]
        lines = [
            f"Quantized denoiser [{q.get('name', '?')}]: weights {w}, activations {a}"
            + (f", {groups} time-step groups" if groups > 1 else ""),
            f"  {'module type':<28}{'count':>6}  {'W bits':>6}  {'A bits':>6}",
        ]
        for kind in ("Conv2d", "Linear"):
            if self.layers.get(kind):
                lines.append(f"  {kind:<28}{self.layers[kind]:>6}  {q['weight_bits']:>6}  {q['act_bits']:>6}")
        if self.attention:
            sm = q["softmax_bits"]
            lines.append(
                f"  {'Attention (q,k,v | softmax)':<28}{self.attention:>6}  {'-':>6}  "
                f"{q['act_bits']}|{sm}".rstrip()
            )
        if self.first_last:
            lines.append(f"  first/last layer inputs at {fl} bits: {', '.join(self.first_last)}")
        if self.split_shortcuts:
            lines.append(f"  split shortcuts: {len(self.split_shortcuts)}")
        lines.append(
            f"  n_quant_layers = {self.n_quant_layers}; quantizers: "
            + ", ".join(f"{k} {v}" for k, v in sorted(self.quantizers.items()))
        )
        return "\n".join(lines)


# ---------------------------------------------------------------------------- structure
def _attention_modules(denoiser: nn.Module) -> list[tuple[str, nn.Module]]:
    from diffusers.models.attention_processor import Attention

    return [(n, m) for n, m in denoiser.named_modules() if isinstance(m, Attention)]


# ---------------------------------------------------------------------------- swapping
class QuantizerFactory:
    """Builds the quantizers of one :class:`QuantConfig` (what :func:`quantize_denoiser` installs,
    and what a method needs beside them, e.g. SVDQuant's candidates)."""

    def __init__(self, cfg: QuantConfig) -> None:
        self.cfg = cfg
        self.w_mode = "symmetric" if cfg.symmetric_weights else "affine"
        self.a_mode = "symmetric" if cfg.symmetric_acts else "affine"
        self.groups = cfg.timestep_groups if cfg.timestep_aware else 1

    def act(
        self,
        channels: int,
        bits: Optional[int] = None,
        mode: Optional[str] = None,
        per_channel: Optional[bool] = None,
    ) -> Optional[ActQuantizer]:
        bits = self.cfg.act_bits if bits is None else bits
        if bits >= FP_BITS or self.cfg.act_bits >= FP_BITS:
            return None
        if self.cfg.act_dynamic_per_token:
            return TokenActQuantizer(bits, mode or self.a_mode, self.cfg.act_group_size)
        pc = self.cfg.acts_per_channel if per_channel is None else per_channel
        return ActQuantizer(bits, mode or self.a_mode, channels, self.groups, pc)

    def layer_input(self, channels: int, bits: int, split: Optional[int]):
        if split is None:
            return self.act(channels, bits)
        head, tail = self.act(split, bits), self.act(channels - split, bits)
        return None if head is None else SplitActQuantizer(split, head, tail)

    def weight(self, weight: torch.Tensor, split: Optional[int], init: bool):
        cfg = self.cfg
        if cfg.weight_bits >= FP_BITS:
            return None
        shape = tuple(weight.shape)
        gs = cfg.weight_group_size
        if split is not None:
            q = SplitWeightQuantizer(shape, split, cfg.weight_bits, self.w_mode, gs)
        elif gs is not None:
            q = GroupWeightQuantizer(shape, cfg.weight_bits, self.w_mode, gs)
        else:
            q = WeightQuantizer(shape, cfg.weight_bits, self.w_mode)
        q.to(weight.device)
        if init:
            q.init_range(weight, cfg.weight_init, cfg.lp_norm, cfg.lp_candidates)
        return q


def _set_child(root: nn.Module, name: str, child: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, attr, child)


def quantize_denoiser(
    denoiser: nn.Module,
    spec: DenoiserSpec,
    quant_cfg: Any,
    timesteps: Optional[Sequence[int]] = None,
    *,
    init_weights: bool = True,
) -> QuantSummary:
    """Swap ``denoiser``'s layers and attention processors for fake-quantized ones, in place.

    Args:
        denoiser: a diffusers ``UNet2DModel`` / ``UNet2DConditionModel`` (any module works; the
            first/last and split policies apply where the diffusers names exist).
        quant_cfg: a :class:`QuantConfig` (or a DictConfig of one).
        timesteps: the sampler's time steps (noisiest first); required when
            ``quant_cfg.timestep_aware`` (installs the time-step router hook).
        init_weights: set weight ranges now (``quant_cfg.weight_init``); False when the ranges
            are about to be loaded from a checkpoint.

    Activation quantizers start uncalibrated: run
    :func:`diffquant.calib.calibrate_act_ranges` (or load a checkpoint) before using them.
    """
    cfg = as_dataclass(quant_cfg, QuantConfig)
    validate_bits(cfg)
    if is_quantized(denoiser) or any(is_quant_layer(m) for m in denoiser.modules()):
        raise ValueError("the denoiser is already quantized; quantize a fresh FP denoiser")
    factory = QuantizerFactory(cfg)
    splits = spec.shortcut_splits(denoiser) if cfg.shortcut_split else {}
    first_last = set(spec.layers(denoiser, "first", "last"))
    fl_bits = cfg.first_last_act_bits if cfg.first_last_act_bits is not None else cfg.act_bits
    summary = QuantSummary(quant={**dataclasses.asdict(cfg), "_acts_per_channel": cfg.acts_per_channel})

    targets = [(n, m) for n, m in denoiser.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    for name, layer in targets:
        is_conv = isinstance(layer, nn.Conv2d)
        channels = layer.in_channels if is_conv else layer.in_features
        split = splits.get(name) if is_conv else None
        bits = fl_bits if name in first_last else cfg.act_bits
        if name in first_last and cfg.act_bits < FP_BITS:
            summary.first_last.append(name)
        w_q = factory.weight(layer.weight, split, init_weights)
        a_q = factory.layer_input(channels, bits, split)
        if a_q is not None:
            a_q.to(layer.weight.device)
        cls = QuantConv2d if is_conv else QuantLinear
        _set_child(denoiser, name, cls.from_float(layer, w_q, a_q))
        kind = "Conv2d" if is_conv else "Linear"
        summary.layers[kind] = summary.layers.get(kind, 0) + 1
        if split is not None and (w_q is not None or a_q is not None):
            summary.split_shortcuts.append(name)

    if cfg.act_bits < FP_BITS:
        for _name, attn in _attention_modules(denoiser):
            inner, kv_inner = attn.inner_dim, attn.inner_kv_dim
            sm_bits = cfg.softmax_bits
            proc = QuantAttnProcessor(
                factory.act(inner),
                factory.act(kv_inner),
                factory.act(kv_inner),
                None
                if sm_bits >= FP_BITS
                else ActQuantizer(sm_bits, "unsigned", 1, factory.groups, per_channel=False),
            )
            attn.set_processor(proc.to(next(attn.parameters()).device))
            summary.attention += 1

    for _name, q in iter_quantizers(denoiser):
        k = type(q).__name__
        summary.quantizers[k] = summary.quantizers.get(k, 0) + 1
    if factory.groups > 1:
        if timesteps is None:
            raise ValueError(
                "quant.timestep_aware=true needs the sampler's timesteps: call "
                "quantize_denoiser(model.denoiser, model.spec, cfg, timesteps=model.timesteps)"
            )
        attach_timestep_router(denoiser, spec, [int(t) for t in timesteps], factory.groups)
    return summary


def quantized_attention_modules(denoiser: nn.Module) -> list[str]:
    """Names of the ``Attention`` modules whose matmuls are quantized."""
    return [n for n, m in denoiser.named_modules() if is_quant_attention(m)]
