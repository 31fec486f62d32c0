"""Real integer execution of calibrated Conv2d / Linear layers (x86 CPU, oneDNN int8 kernels).

A fake-quantized layer computes ``conv(Δx (qx − zx), Δw (qw − zw)) + b`` in FP32. The same value
comes out of an int8 kernel: the input codes ``qx`` (uint8, zero point ``zx``) and the weight codes
run through oneDNN's u8·s8 → s32 convolution / GEMM (``torch.ops.onednn.qconv_pointwise`` /
``qlinear_pointwise``, the kernels PyTorch's x86 inductor quantization lowers to), rescaled to
FP32 by ``Δx Δw`` with the bias added. oneDNN takes symmetric int8 weights (zero point 0), so the
weight codes are stored as ``s = qw − c`` with a per-output-channel offset ``c``:

* weights of at most 7 bits, or symmetric: ``c = zw``, ``s = qw − zw`` fits int8, nothing to add;
* 8-bit affine weights (codes 0..255, ``qw − zw`` spans −255..255): ``c = 128`` and the kernel's
  output gets ``(128 − zw) · Δw · box(x̂)``, where ``box`` sums the dequantized input ``x̂`` over
  the input channels under the kernel window (a one-channel convolution; for Linear the row sum).

The output equals the fake-quantized layer's up to FP32 summation order (integer products are
exact; tested against the fake-quant model). The input codes are computed exactly as
:func:`~diffquant.quant.quantizers.fake_quant` computes them.

Which layers: weight quantizer per output channel (plain, or the two halves of a split shortcut,
each half its own kernel on its own input half), at most 8 bits, any rounding (the codes are read
off the quantized weight, so AdaRound's frozen choices are kept); input quantizer static, per
tensor, one time-step group, at most 8 bits; no SVDQuant / ViDiT-Q transform; ``groups == 1``
for 8-bit affine conv weights. The rest keeps the fake-quant path (:class:`Int8Summary` says
which and why). Use :func:`int8_kernels` as a context, like
:func:`~diffquant.quant.state.frozen_weights`, around code that changes no quantizer.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from diffquant.quant.modules import QuantConv2d, is_quant_layer
from diffquant.quant.quantizers import (
    ActQuantizer,
    SplitActQuantizer,
    SplitWeightQuantizer,
    WeightQuantizer,
    int_codes,
)


def int8_platform_error(device: torch.device | str = "cpu") -> Optional[str]:
    """Why int8 kernels cannot run on ``device`` here (None: they can)."""
    device = torch.device(device)
    if device.type != "cpu":
        return (
            f"int8 kernels run on x86 CPUs (oneDNN) only; this run is on {device.type}: use "
            "evaluator.kernels=fake there (GPU int8 execution is not implemented)"
        )
    if not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.onednn, "qconv_pointwise")):
        return "this PyTorch build has no oneDNN int8 kernels (torch.ops.onednn.qconv_pointwise): use evaluator.kernels=fake"
    return None


@dataclass
class Int8Summary:
    """What :func:`int8_kernels` converted: ``converted`` layer names, and for the others the
    reason each kept the fake-quant path (``kept[name] = reason``)."""

    converted: list[str] = field(default_factory=list)
    kept: dict[str, str] = field(default_factory=dict)

    def reasons(self) -> dict[str, int]:
        """How many layers kept fake quantization, per reason."""
        return dict(Counter(self.kept.values()))


# ---------------------------------------------------------------------------- one kernel
def _input_codes(x: Tensor, q: ActQuantizer) -> tuple[Tensor, float, int]:
    """``x`` as uint8 codes shifted to start at 0 (the codes
    :func:`~diffquant.quant.quantizers.fake_quant` computes), with
    the input scale and the shifted zero point."""
    scale, zp = q.scale.reshape(()), q.zero_point.reshape(())
    codes = int_codes(x, scale, zp, q.q_min, q.q_max)
    return codes.sub_(q.q_min).to(torch.uint8), float(scale), int(zp) - q.q_min


#: the oneDNN ops' output arguments: FP32 out (output scale 1, zero point 0), no fused post-op
_FP32_OUTPUT = (1.0, 0, torch.float32, "none", [], "")


def _dequantized_sum(codes: Tensor, dim: int, x_scale: float, x_zp: int) -> Tensor:
    """``Σ x̂`` over ``dim`` (kept) of the dequantized input ``x̂ = (codes − zx) · Δx``, FP32."""
    return (codes.sum(dim, keepdim=True, dtype=torch.float32) - x_zp * codes.shape[dim]) * x_scale


class _Int8Part:
    """One int8 kernel: the weight codes of one (part of a) layer against one input quantizer.

    ``weight_q`` is the fake-quantized weight ``(C_out, C_in, *k)``; ``wq`` its quantizer.
    """

    def __init__(
        self, weight_q: Tensor, wq: WeightQuantizer, aq: ActQuantizer, conv: Optional[nn.Conv2d]
    ) -> None:
        scale = wq.scale.detach().reshape(-1, *([1] * (weight_q.dim() - 1)))
        zp = wq.zero_point.detach().reshape(scale.shape)
        codes = torch.round(weight_q / scale) + zp  # exact: weight_q = (codes − zw) · Δw
        if wq.mode == "affine" and wq.bits == 8:
            offset = torch.full_like(zp, 128.0)
        else:
            offset = zp
        self.weight = (codes - offset).to(torch.int8)
        # (c − zw) · Δw per output channel: the offset's share of the output, times box(x̂)
        correction = ((offset - zp) * scale).reshape(-1)
        self.correction = correction if bool(correction.ne(0).any()) else None
        # oneDNN's prepacked conv takes FP64 weight scales, its linear FP32
        self.w_scale = wq.scale.detach().reshape(-1).to(torch.float64 if conv is not None else torch.float32)
        self.w_zero = torch.zeros(self.w_scale.numel(), dtype=torch.int64)
        self.aq, self.conv = aq, conv
        if conv is not None:
            x_scale, x_zp = float(aq.scale.reshape(())), int(aq.zero_point.reshape(())) - aq.q_min
            self.packed = torch.ops.onednn.qconv_prepack(
                self.weight,
                self.w_scale,
                x_scale,
                x_zp,
                list(conv.stride),
                list(conv.padding),
                list(conv.dilation),
                conv.groups,
                None,
            )
            self.box = torch.ones(1, 1, *weight_q.shape[2:])
        else:
            self.packed = torch.ops.onednn.qlinear_prepack(self.weight, None)

    def __call__(self, x: Tensor, bias: Optional[Tensor]) -> Tensor:
        codes, x_scale, x_zp = _input_codes(x, self.aq)
        conv = self.conv
        flat = codes if conv is not None else codes.reshape(-1, codes.shape[-1])
        # the ops' shared head: input codes, their scale and zero point, packed weights, their scales
        inputs = (flat, x_scale, x_zp, self.packed, self.w_scale, self.w_zero, bias)
        if conv is not None:
            geometry = (list(conv.stride), list(conv.padding), list(conv.dilation), conv.groups)
            y = torch.ops.onednn.qconv_pointwise(*inputs, *geometry, *_FP32_OUTPUT)
            if self.correction is not None:
                x_hat = _dequantized_sum(codes, 1, x_scale, x_zp)
                box = F.conv2d(x_hat, self.box, None, conv.stride, conv.padding, conv.dilation)
                y = y + box * self.correction.view(1, -1, 1, 1)
            return y
        y = torch.ops.onednn.qlinear_pointwise(*inputs, *_FP32_OUTPUT)
        if self.correction is not None:
            y = y + _dequantized_sum(flat, 1, x_scale, x_zp) * self.correction
        return y.reshape(*codes.shape[:-1], y.shape[-1])


class Int8Kernel:
    """A layer's int8 execution: one :class:`_Int8Part`, or two for a split shortcut (input and
    weight halves, outputs summed; the bias added once)."""

    def __init__(self, layer: nn.Module) -> None:
        conv = layer if isinstance(layer, QuantConv2d) else None
        wq, aq = layer.weight_quantizer, layer.input_quantizer
        weight_q = layer.quantized_weight().detach()
        if isinstance(wq, SplitWeightQuantizer):
            s = wq.split
            self.split: Optional[int] = s
            self.parts = [
                _Int8Part(weight_q[:, :s], wq.head, aq.head, conv),
                _Int8Part(weight_q[:, s:], wq.tail, aq.tail, conv),
            ]
        else:
            self.split = None
            self.parts = [_Int8Part(weight_q, wq, aq, conv)]
        self.layer = layer

    def active(self) -> bool:
        """Whether the layer still computes what the kernel was packed for (weight and input
        quantization on, no range observation, no gradient)."""
        if torch.is_grad_enabled() or not self.layer._weights_on():
            return False
        return all(p.aq.enabled and p.aq._observer is None for p in self.parts)

    def __call__(self, x: Tensor) -> Tensor:
        bias = self.layer.effective_bias()
        bias = None if bias is None else bias.detach().float()
        if self.split is None:
            return self.parts[0](x, bias)
        head, tail = self.parts
        return head(x[:, : self.split], bias) + tail(x[:, self.split :], None)


# ---------------------------------------------------------------------------- which layers
def _act_reason(q: nn.Module) -> Optional[str]:
    if not isinstance(q, ActQuantizer) or q.dynamic:
        return "input quantizer is not static (dynamic per token)"
    if q.per_channel or q.n_groups != 1:
        return "input quantizer per channel or per time-step group"
    if q.bits > 8:
        return "input above 8 bits"
    if not q.enabled or not bool(q.initialized) or q._observer is not None:
        return "input quantizer off, uncalibrated or observing"
    return None


def _weight_reason(q: WeightQuantizer, conv: Optional[nn.Conv2d]) -> Optional[str]:
    if type(q) is not WeightQuantizer:
        return "weight grid not per output channel (group-wise)"
    if q.bits > 8:
        return "weight above 8 bits"
    if q.adaround is not None:
        return "AdaRound still soft (harden it first)"
    if conv is not None and q.mode == "affine" and q.bits == 8 and conv.groups != 1:
        return "8-bit affine weights of a grouped convolution"
    return None


def int8_reason(layer: nn.Module) -> Optional[str]:
    """Why quantized ``layer`` keeps the fake-quant path (None: it runs on an int8 kernel)."""
    wq, aq = layer.weight_quantizer, layer.input_quantizer
    if wq is None or aq is None or not layer._weights_on():
        return "weights or input in full precision"
    if layer.transform is not None:
        return "SVDQuant / ViDiT-Q transform"
    conv = layer if isinstance(layer, QuantConv2d) else None
    if conv is not None and conv.padding_mode != "zeros":
        return "padding mode other than zeros"
    if isinstance(wq, SplitWeightQuantizer) != isinstance(aq, SplitActQuantizer):
        return "split weight without split input (or the reverse)"
    if isinstance(wq, SplitWeightQuantizer):
        if wq.split != aq.split:
            return "weight and input split at different channels"
        pairs = [(wq.head, aq.head), (wq.tail, aq.tail)]
    else:
        pairs = [(wq, aq)]
    for w, a in pairs:
        reason = _weight_reason(w, conv) or _act_reason(a)
        if reason is not None:
            return reason
    return None


@contextlib.contextmanager
def int8_kernels(denoiser: nn.Module) -> Iterator[Int8Summary]:
    """Within the context, every quantized layer :func:`int8_reason` accepts runs on oneDNN int8
    kernels (weights packed once on entry); the others keep the fake-quant path. Yields the
    :class:`Int8Summary`. Inference only (no gradients; nothing may change the quantizers inside);
    on exit the layers fake-quantize again. Raises on a platform without the kernels."""
    error = int8_platform_error(next(denoiser.parameters()).device)
    if error is not None:
        raise RuntimeError(error)
    summary = Int8Summary()
    layers = []
    with torch.no_grad():
        for name, module in denoiser.named_modules():
            if not is_quant_layer(module):
                continue
            reason = int8_reason(module)
            if reason is not None:
                summary.kept[name] = reason
                continue
            module.int8_kernel = Int8Kernel(module)
            layers.append(module)
            summary.converted.append(name)
    try:
        yield summary
    finally:
        for module in layers:
            module.int8_kernel = None
