"""``model_size_mb``: the papers' Size column, counted from the quantized denoiser."""

from __future__ import annotations

import torch
from torch import nn

from diffquant.models.denoiser import DIT, UNET
from diffquant.quant import QuantConfig, quantize_denoiser
from diffquant.quant.size import denoiser_bits, model_size_mb
from tiny_components import randomize, tiny_dit


class Two(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv_in = nn.Linear(8, 16)  # 128 weights + 16 biases (the UNet spec's first layer)
        self.norm = nn.LayerNorm(16)  # 32 parameters
        self.conv_out = nn.Linear(16, 4, bias=False)  # 64 weights

    def forward(self, x):
        return self.conv_out(self.norm(self.conv_in(x)))


def test_fp_size_is_every_parameter_at_32_bits():
    model = Two()
    assert denoiser_bits(model) == 32 * (128 + 16 + 32 + 64)


def test_quantized_weights_are_packed_at_their_bits_with_their_scales():
    """W4A8 per-tensor activations: weights at 4 bits + per-output-channel scale and zero point,
    one scale and zero point per activation quantizer, biases and the norm at 32 bits."""
    model = Two()
    quantize_denoiser(model, UNET, QuantConfig(weight_bits=4, act_bits=8, act_per_channel=False))
    weights = 4 * (128 + 64) + 64 * (16 + 4)
    acts = 2 * 64  # the two layers' input quantizers
    assert denoiser_bits(model) == weights + acts + 32 * (16 + 32)


def test_w4_is_about_an_eighth_of_fp_on_a_transformer():
    torch.manual_seed(0)
    fp = randomize(tiny_dit(), 0)
    fp_mb = model_size_mb(fp)
    w8, w4 = randomize(tiny_dit(), 0), randomize(tiny_dit(), 0)
    quantize_denoiser(w8, DIT, QuantConfig(weight_bits=8, act_bits=8))
    quantize_denoiser(w4, DIT, QuantConfig(weight_bits=4, act_bits=8))
    assert model_size_mb(w4) < model_size_mb(w8) < fp_mb
    layer_weights = sum(m.weight.numel() for m in fp.modules() if isinstance(m, (nn.Linear, nn.Conv2d)))
    # 8 -> 4 bits saves exactly 4 bits per layer weight (scales and the rest are the same)
    assert (denoiser_bits(w8) - denoiser_bits(w4)) == 4 * layer_weights
