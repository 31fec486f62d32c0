"""``frozen_weights``: sampling quantizes each weight once per run instead of at every denoiser call,
with the same samples bit for bit."""

from __future__ import annotations

import contextlib

import pytest
import torch

from diffquant.models import base
from diffquant.models.loading import build_model
from diffquant.quant import (
    QuantConfig,
    frozen_weights,
    is_quant_layer,
    iter_quantizers,
    quant_state,
    quantize_denoiser,
)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def quantized(tmp_path_factory):
    from conftest import compose_config

    cfg = compose_config(["model=ldm_digits", "model.num_inference_steps=4"], tmp_path_factory.mktemp("f"))
    fp = build_model(cfg.model)
    model = build_model(cfg.model)
    quantize_denoiser(model.denoiser, model.spec, QuantConfig(weight_bits=4, act_bits=32))
    return fp, model


def count_weight_quantizer_calls(denoiser):
    calls = []
    handles = [
        q.register_forward_hook(lambda *_: calls.append(1)) for _, q in iter_quantizers(denoiser, "weight")
    ]
    return calls, handles


def test_sampling_quantizes_each_weight_once_with_the_same_samples(quantized, monkeypatch):
    _, model = quantized
    n_quantizers = len(list(iter_quantizers(model.denoiser, "weight")))  # split layers have two
    calls, handles = count_weight_quantizer_calls(model.denoiser)
    try:
        frozen = model.sample_latents([0, 1, 2], seed=0)
        assert len(calls) == n_quantizers  # once each for 4 steps (one denoiser call per step)
        calls.clear()
        monkeypatch.setattr(base, "frozen_weights", lambda denoiser: contextlib.nullcontext())
        per_call = model.sample_latents([0, 1, 2], seed=0)
        assert len(calls) == 4 * n_quantizers
    finally:
        for h in handles:
            h.remove()
    assert torch.equal(frozen, per_call)
    assert all(m.frozen_weight is None for m in model.denoiser.modules() if is_quant_layer(m))


def test_weights_off_inside_the_context_are_the_fp_weights(quantized):
    fp, model = quantized
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    kwargs = {"sample": x, "timestep": torch.tensor([500, 20]), "class_labels": torch.tensor([3, 10])}
    with torch.no_grad(), frozen_weights(model.denoiser):
        quant_out = model.denoiser(**kwargs).sample
        with quant_state(model.denoiser, weights=False):
            fp_out = model.denoiser(**kwargs).sample
        with frozen_weights(model.denoiser):  # nested: keeps the outer weights
            again = model.denoiser(**kwargs).sample
    assert torch.equal(fp_out, fp.denoiser(**kwargs).sample.detach())
    assert torch.equal(again, quant_out) and not torch.equal(quant_out, fp_out)
    with torch.no_grad():
        assert torch.equal(model.denoiser(**kwargs).sample, quant_out)  # unfrozen: same values
