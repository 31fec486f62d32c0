"""EfficientDM (``method=efficientdm``): LoRA on the quantized weights, merged and quantized at the
configured bits; one learned activation step size per sampler step; an FP teacher that LoRA and
quantization do not touch; resume after a stop; the merged weights restored from the cache."""

import pytest
import torch

from diffquant.calib import CalibSettings
from diffquant.context import RunContext
from diffquant.methods import efficientdm as edm
from diffquant.methods.efficientdm import EfficientDMConfig, LoRADelta, attach_lora, lora_layers, merge_lora
from diffquant.methods.ptq import PTQMinMaxConfig
from diffquant.methods.result_cache import run_method
from diffquant.quant import QuantConfig, quantize_denoiser
from diffquant.quant.state import iter_quantizers, quant_state
from diffquant.registry import METHODS
from tiny_models import TinyDiffusion

torch.set_num_threads(1)

W4A8 = QuantConfig(name="w4a8", weight_bits=4, act_bits=8)
BASE = PTQMinMaxConfig(calib=CalibSettings(n_samples=4, step_stride=2, batch_size=4), act_init_rows=16)
CFG = EfficientDMConfig(base=BASE, rank=4, epochs=10, batch_size=2, lora_lr_divisor=5.0, act_lr=1e-3)


def _ctx(tmp_path, name="run"):
    (tmp_path / name).mkdir(parents=True, exist_ok=True)
    return RunContext(run_dir=tmp_path / name, cache_dir=tmp_path / "cache", device=torch.device("cpu"))


def test_lora_is_b_times_a_and_merging_keeps_the_quantized_layer_exact():
    model = TinyDiffusion()
    quantize_denoiser(model.denoiser, model.spec, W4A8)
    layers = lora_layers(model.denoiser, model.spec, ["first", "last", "time_embedding"])
    assert "conv_in" not in layers and "time_embedding.linear_1" not in layers
    assert "down_blocks.0.resnets.0.conv1" in layers
    conv = layers["down_blocks.0.resnets.0.conv1"]
    w0 = conv.weight.detach().clone()
    deltas = attach_lora(layers, rank=4)
    d = deltas["down_blocks.0.resnets.0.conv1"]
    assert d.A.shape == (4, *w0.shape[1:]) and d.B.shape == (w0.shape[0], 4)
    assert torch.equal(conv.weight, w0)  # B starts at zero: no change before training
    with torch.no_grad():
        d.B.normal_(0, 0.05)
    x = torch.randn(2, w0.shape[1], 8, 8)
    with torch.no_grad(), quant_state(model.denoiser, weights=True, acts=False):
        before = conv(x)
        expected_weight = w0 + (d.B @ d.A.flatten(1)).view_as(w0)
    assert torch.allclose(conv.weight, expected_weight)
    merge_lora(layers)
    assert not hasattr(conv, "parametrizations")
    assert torch.allclose(conv.weight, expected_weight)
    with torch.no_grad(), quant_state(model.denoiser, weights=True, acts=False):
        assert torch.equal(conv(x), before)
        # the merged weight quantizes to the configured 4-bit grid of each output channel
        wq = conv.weight_quantizer
        q = conv.weight_quantizer(conv.weight)
        codes = q / wq.scale.view(-1, 1, 1, 1) + wq.zero_point.view(-1, 1, 1, 1)
    assert torch.allclose(codes, codes.round(), atol=1e-3)
    assert codes.round().min() >= 0 and codes.round().max() <= 15
    assert not torch.equal(q, wq(w0))  # and differs from the base's quantized weight


def test_efficientdm_distils_merges_and_learns_one_step_size_per_step(tmp_path, monkeypatch):
    teacher_ok = []
    real_eps = type(TinyDiffusion()).eps
    fp = TinyDiffusion()

    def spy(self, x, t, cond):
        out = real_eps(self, x, t, cond)
        if not torch.is_grad_enabled() and all(not d.enabled for d in _ACTIVE):  # the teacher
            teacher_ok.append(torch.allclose(out, real_eps(fp, x, t, cond), atol=1e-5))
        return out

    _ACTIVE.clear()
    real_attach = edm.attach_lora

    def attach(layers, rank):
        deltas = real_attach(layers, rank)
        _ACTIVE.extend(deltas.values())
        return deltas

    monkeypatch.setattr(edm, "attach_lora", attach)
    monkeypatch.setattr(TinyDiffusion, "eps", spy)
    model = TinyDiffusion()
    result = run_method(METHODS.get("efficientdm")(), model, W4A8, CFG, _ctx(tmp_path))
    steps = len(model.timesteps)
    assert teacher_ok and all(teacher_ok)  # targets are the FP model's, LoRA and quantization off
    assert result.metrics["efficientdm_iters"] == CFG.epochs * steps
    # on a trajectory it never saw, the quantized model is closer to the FP one than its base
    assert (
        result.metrics["efficientdm_probe_loss_after"] < 0.9 * result.metrics["efficientdm_probe_loss_before"]
    )
    assert result.quant.timestep_aware and result.quant.timestep_groups == steps
    for _, q in iter_quantizers(model.denoiser, "act"):
        assert q.n_groups == steps
    moved = [q for _, q in iter_quantizers(model.denoiser, "act") if q.bits < 16]
    assert any(len({round(float(v), 7) for v in q.scale[:, 0]}) > 1 for q in moved)  # per-step sets
    assert not any(hasattr(m, "parametrizations") for m in model.denoiser.modules())  # merged

    # the cached result restores the merged weights: the same samples
    with torch.no_grad():
        first = model.sample_latents([0, 1], 3)
    again = TinyDiffusion()
    loaded = run_method(METHODS.get("efficientdm")(), again, W4A8, CFG, _ctx(tmp_path, "again"))
    assert loaded.metrics["efficientdm_cached"] is True
    with torch.no_grad():
        assert torch.equal(again.sample_latents([0, 1], 3), first)


_ACTIVE: list[LoRADelta] = []


def test_a_stopped_finetuning_resumes_to_the_same_model(tmp_path, monkeypatch):
    class Stop(Exception):
        pass

    full = TinyDiffusion()
    run_method(METHODS.get("efficientdm")(), full, W4A8, CFG, _ctx(tmp_path / "a"))

    real = edm.check_stop

    def stop_after_two(*a, where=None, **k):
        if where and where.startswith("EfficientDM: trajectory 2"):
            raise Stop
        return real(*a, where=where, **k)

    monkeypatch.setattr(edm, "check_stop", stop_after_two)
    with pytest.raises(Stop):
        run_method(METHODS.get("efficientdm")(), TinyDiffusion(), W4A8, CFG, _ctx(tmp_path / "b"))
    monkeypatch.setattr(edm, "check_stop", real)
    resumed = TinyDiffusion()
    run_method(METHODS.get("efficientdm")(), resumed, W4A8, CFG, _ctx(tmp_path / "b"))
    for (n, a), (_, b) in zip(full.denoiser.named_parameters(), resumed.denoiser.named_parameters()):
        assert torch.equal(a, b), n
