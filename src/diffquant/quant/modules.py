"""Quantized drop-in replacements of ``nn.Conv2d`` and ``nn.Linear``.

They subclass the originals (``isinstance(m, nn.Conv2d)`` still holds, so diffusers code that
checks types keeps working) and share the original ``weight`` and ``bias`` Parameters: the FP
weight is kept as the *latent* weight, from which the quantized weight is computed at every call
(or once per sampling run, inside :func:`~diffquant.quant.state.frozen_weights`).
That is what the FP teacher path uses (``quant_state(denoiser, weights=False)``) and what QuEST
finetunes through the STE.

Each layer quantizes its weight (``weight_quantizer``, per output channel) and its input
activation (``input_quantizer``); either is None when its bit-width is 32 (full precision).

A layer may carry SVDQuant's transform (``transform``, a
:class:`~diffquant.quant.lowrank.SmoothLowRank`): its input is smoothed (``X̂ = X / λ``) before
the input quantizer, its weight quantizer quantizes the residual ``W · λ - L1 L2``, and the
16-bit branch ``X̂ L1 L2`` is added to the output. With weight quantization off the layer
computes with ``W · λ`` and no branch (the same product in full precision).
"""

from __future__ import annotations

from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from diffquant.quant.lowrank import GroupSmooth, SmoothLowRank, with_bits
from diffquant.quant.quantizers import (
    ActQuantizer,
    SplitActQuantizer,
    SplitWeightQuantizer,
    WeightQuantizer,
    weight_bits,
)

AnyWeightQuantizer = Union[WeightQuantizer, SplitWeightQuantizer]
AnyActQuantizer = Union[ActQuantizer, SplitActQuantizer]


class QuantLayerMixin:
    """What QuantConv2d and QuantLinear share: the two quantizer slots and the quantized weight."""

    weight_quantizer: Optional[AnyWeightQuantizer]
    input_quantizer: Optional[AnyActQuantizer]

    def _init_quant(
        self, weight_quantizer: Optional[AnyWeightQuantizer], input_quantizer: Optional[AnyActQuantizer]
    ) -> None:
        self.weight_quantizer = weight_quantizer
        self.input_quantizer = input_quantizer
        self.transform: Optional[SmoothLowRank] = None
        self.register_buffer("fp_weight", None, persistent=False)
        self.register_buffer("fp_bias", None, persistent=False)
        # the fake-quantized weight computed once, while :func:`~diffquant.quant.state.frozen_weights`
        # holds (inference: the quantizer state cannot change in between)
        self.register_buffer("frozen_weight", None, persistent=False)
        # the layer's int8 execution while :func:`~diffquant.quant.int8.int8_kernels` holds
        self.int8_kernel = None

    def keep_fp_copy(self) -> None:
        """Freeze a copy of the current weight and bias as the FP path's parameters, so that
        finetuning the latent weight (QuEST) leaves the FP teacher (weights disabled) unchanged."""
        self.fp_weight = self.weight.detach().clone()
        self.fp_bias = None if self.bias is None else self.bias.detach().clone()

    def _weights_on(self) -> bool:
        wq = self.weight_quantizer
        return wq is not None and wq.enabled

    def _fp_weight(self) -> Tensor:
        return self.weight if self.fp_weight is None else self.fp_weight

    def quantized_weight(self) -> Tensor:
        """The weight the layer computes with: fake-quantized from the latent weight (its
        SVDQuant residual when a transform is set), or the FP weight (the frozen copy if
        :meth:`keep_fp_copy` made one; smoothed when a transform is set) when weights are off
        or FP."""
        if self._weights_on():
            if self.frozen_weight is not None:
                return self.frozen_weight
            return self.compute_quantized_weight()
        w = self._fp_weight()
        return w if self.transform is None else self.transform.smooth_weight(w)

    def compute_quantized_weight(self) -> Tensor:
        """The weight quantizer applied to the latent weight (or to its SVDQuant residual); with
        time-step-aware balancing every group's weight, stacked ``(G, ...)``."""
        t = self.transform
        if isinstance(t, GroupSmooth):
            return t.quantized_weights(self.weight)
        w = self.weight if t is None else t.residual(self.weight)
        return self.weight_quantizer(w)

    def _forward(self, x: Tensor, conv: Optional[nn.Conv2d]) -> Tensor:
        kernel = self.int8_kernel
        if kernel is not None and kernel.active():
            return kernel(x)
        t = self.transform
        if isinstance(t, GroupSmooth):
            return t.layer_forward(self, x, conv)
        if t is not None:
            x = t.smooth_input(x)
        w, b = self.quantized_weight(), self.effective_bias()
        xq = self.quantized_input(x)
        y = self._conv_forward(xq, w, b) if conv is not None else F.linear(xq, w, b)
        if t is not None and self._weights_on():
            y = y + t.branch(x, conv)
        return y

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        # an SVDQuant transform is part of the quantization state: recreate its slots
        up = state_dict.get(prefix + "transform.up")
        smooth = state_dict.get(prefix + "transform.smooth")
        if up is not None and self.transform is None:
            self.transform = SmoothLowRank.empty(tuple(self.weight.shape), up.shape[1]).to(self.weight.device)
        elif smooth is not None and smooth.dim() == 2 and self.transform is None:
            bits = state_dict.get(prefix + "transform.bits")
            own = weight_bits(self.weight_quantizer)
            bits = [own] * smooth.shape[0] if bits is None else bits.tolist()
            wqs = [with_bits(self.weight_quantizer, b) for b in bits]
            self.transform = GroupSmooth(torch.ones_like(smooth), wqs).to(self.weight.device)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def effective_bias(self) -> Optional[Tensor]:
        if self.fp_bias is not None and not self._weights_on():
            return self.fp_bias
        return self.bias

    def quantized_input(self, x: Tensor) -> Tensor:
        return x if self.input_quantizer is None else self.input_quantizer(x)


class QuantConv2d(QuantLayerMixin, nn.Conv2d):
    """``nn.Conv2d`` with fake-quantized weight and input. Input ``(B, C_in, H, W)``."""

    @classmethod
    def from_float(
        cls,
        conv: nn.Conv2d,
        weight_quantizer: Optional[AnyWeightQuantizer],
        input_quantizer: Optional[AnyActQuantizer],
    ) -> QuantConv2d:
        q = cls(
            conv.in_channels,
            conv.out_channels,
            conv.kernel_size,
            stride=conv.stride,
            padding=conv.padding,
            dilation=conv.dilation,
            groups=conv.groups,
            bias=conv.bias is not None,
            padding_mode=conv.padding_mode,
            device="meta",
        )
        q.weight, q.bias = conv.weight, conv.bias
        q.train(conv.training)
        q._init_quant(weight_quantizer, input_quantizer)
        return q

    def forward(self, x: Tensor) -> Tensor:
        return self._forward(x, self)


class QuantLinear(QuantLayerMixin, nn.Linear):
    """``nn.Linear`` with fake-quantized weight and input. Input ``(..., C_in)``."""

    @classmethod
    def from_float(
        cls,
        linear: nn.Linear,
        weight_quantizer: Optional[AnyWeightQuantizer],
        input_quantizer: Optional[AnyActQuantizer],
    ) -> QuantLinear:
        q = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta")
        q.weight, q.bias = linear.weight, linear.bias
        q.train(linear.training)
        q._init_quant(weight_quantizer, input_quantizer)
        return q

    def forward(self, x: Tensor) -> Tensor:
        return self._forward(x, None)


QUANT_LAYER_TYPES = (QuantConv2d, QuantLinear)


def is_quant_layer(module: nn.Module) -> bool:
    return isinstance(module, QUANT_LAYER_TYPES)
