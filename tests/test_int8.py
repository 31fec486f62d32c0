"""int8 kernels (:mod:`diffquant.quant.int8`): each converted layer computes what its fake-quantized
layer computes, up to FP32 summation order, from integer codes that reproduce the quantized weight
exactly; layers the kernels cannot run keep fake quantization and say why."""

from __future__ import annotations

import pytest
import torch

from diffquant.calib import observing_act_ranges
from diffquant.models.denoiser import UNET
from diffquant.quant import QuantConfig, is_quant_layer, quant_state, quantize_denoiser
from diffquant.quant.int8 import Int8Kernel, int8_kernels, int8_platform_error, int8_reason
from diffquant.quant.quantizers import SplitWeightQuantizer, WeightQuantizer
from diffquant.schema import EvaluatorConfig
from diffquant.validation import InvalidSetting
from tiny_models import tiny_unet2d, tiny_unet2d_condition, unet2d_condition_inputs, unet2d_inputs

pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.skipif(int8_platform_error("cpu") is not None, reason="no oneDNN int8 kernels here"),
]

MODELS = {
    "unet2d": (tiny_unet2d, unet2d_inputs),
    "unet2d_condition": (tiny_unet2d_condition, unet2d_condition_inputs),
}
CONFIGS = {
    "w8a8": dict(weight_bits=8, act_bits=8),  # affine 8-bit weights: the offset correction
    "w8a8_symmetric": dict(weight_bits=8, act_bits=8, symmetric_weights=True, symmetric_acts=True),
    "w4a8": dict(weight_bits=4, act_bits=8),
    "w4a6": dict(weight_bits=4, act_bits=6),
}


def calibrated(model: str, **quant):
    build, make_inputs = MODELS[model]
    denoiser, inputs = build(), make_inputs()
    quantize_denoiser(denoiser, UNET, QuantConfig(name="q", **quant))
    with observing_act_ranges(denoiser, "minmax"), torch.no_grad():
        denoiser(**inputs)
    return denoiser, inputs


@pytest.mark.parametrize("model", list(MODELS))
@pytest.mark.parametrize("config", list(CONFIGS))
def test_every_layer_computes_its_fake_quantized_output(model, config):
    denoiser, inputs = calibrated(model, **CONFIGS[config])
    errors: dict[str, float] = {}

    def compare(name):
        def hook(layer, args, out):
            y = Int8Kernel(layer)(args[0])
            errors[name] = ((y - out).abs().max() / out.abs().max().clamp_min(1e-12)).item()

        return hook

    layers = {n: m for n, m in denoiser.named_modules() if is_quant_layer(m)}
    handles = [m.register_forward_hook(compare(n)) for n, m in layers.items()]
    with torch.no_grad():
        denoiser(**inputs)
    for h in handles:
        h.remove()
    assert set(errors) == set(layers)
    assert max(errors.values()) < 1e-5  # FP32 summation order, nothing more
    assert any(isinstance(m.weight_quantizer, SplitWeightQuantizer) for m in layers.values())
    with torch.no_grad(), int8_kernels(denoiser) as summary:
        int8 = UNET.forward(denoiser, inputs)
    assert summary.kept == {} and sorted(summary.converted) == sorted(layers)
    with torch.no_grad():
        fake = UNET.forward(denoiser, inputs)
    # each layer agrees to 1e-5 (above); through the network those FP32 summation-order
    # differences move later activations across 8-bit rounding boundaries (a step is 1/255 of a
    # quantizer's range): 0.8% of the output's magnitude on an Intel Xeon, 3.1% on the
    # full-size UNet (README); a wrong kernel is off by the output's own size
    assert (int8 - fake).abs().max() < 3e-2 * fake.abs().max()
    with torch.no_grad():  # the context is gone: fake quantization again, bit for bit
        assert torch.equal(UNET.forward(denoiser, inputs), fake)


@pytest.mark.parametrize("config", ["w8a8", "w4a8", "w8a8_symmetric"])
def test_weight_codes_reproduce_the_quantized_weight_exactly(config):
    """Codes read off the quantized weight, AdaRound's frozen rounding included: int8 codes plus
    the per-channel offset, times Δw, are the fake-quantized weight bit for bit."""
    denoiser, _ = calibrated("unet2d", **CONFIGS[config])
    layers = [
        m for m in denoiser.modules() if is_quant_layer(m) and isinstance(m.weight_quantizer, WeightQuantizer)
    ]
    wq = layers[1].weight_quantizer
    g = torch.Generator().manual_seed(0)
    wq.start_adaround(layers[1].weight)
    wq.adaround.alpha.data = torch.randn(wq.adaround.alpha.shape, generator=g) * 3
    wq.harden()
    for layer in layers[:4]:
        part = Int8Kernel(layer).parts[0]
        q = layer.weight_quantizer
        shape = (-1,) + (1,) * (layer.weight.dim() - 1)
        zp, scale = q.zero_point.view(shape), q.scale.view(shape)
        offset = torch.full_like(zp, 128.0) if (q.mode, q.bits) == ("affine", 8) else zp
        rebuilt = (part.weight.float() + offset - zp) * scale
        assert part.weight.dtype == torch.int8
        assert torch.equal(rebuilt, layer.quantized_weight())


def test_layers_the_kernels_cannot_run_keep_fake_quantization():
    dynamic, _ = calibrated("unet2d", weight_bits=8, act_bits=8, act_dynamic_per_token=True)
    grouped, _ = calibrated("unet2d", weight_bits=4, act_bits=8, weight_group_size=4)
    steps, _ = calibrated("unet2d", weight_bits=8, act_bits=8, act_per_channel=True)
    for denoiser, reason in (
        (dynamic, "input quantizer is not static (dynamic per token)"),
        (grouped, "weight grid not per output channel (group-wise)"),
        (steps, "input quantizer per channel or per time-step group"),
    ):
        with int8_kernels(denoiser) as summary:
            assert reason in summary.reasons()
            assert all(int8_reason(m) is not None for n, m in denoiser.named_modules() if n in summary.kept)


def test_kernels_step_aside_for_gradients_and_switched_off_quantizers():
    denoiser, inputs = calibrated("unet2d", weight_bits=8, act_bits=8)
    with torch.no_grad(), quant_state(denoiser, weights=False):
        fp_weights = UNET.forward(denoiser, inputs)
    fake = UNET.forward(denoiser, inputs).detach()
    with int8_kernels(denoiser):
        with torch.no_grad(), quant_state(denoiser, weights=False):
            assert torch.equal(UNET.forward(denoiser, inputs), fp_weights)
        assert torch.equal(UNET.forward(denoiser, inputs).detach(), fake)  # grad mode: fake quant


def test_bad_kernels_setting_and_other_devices_are_refused():
    with pytest.raises(InvalidSetting, match="kernels"):
        EvaluatorConfig(name="x", kernels="int4")
    assert "evaluator.kernels=fake" in int8_platform_error("meta")
