"""TFMQ-DM (``method=tfmq``): the temporal information block run alone as the forward runs it,
TIAR before any block (and left alone by block reconstruction), FSC's one range set per step."""

import dataclasses

import pytest
import torch

from diffquant.calib import CalibSettings, ReconSettings, collect_calibration, reconstruct
from diffquant.calib.temporal import check_temporal_outputs, reconstruct_temporal, temporal_layers
from diffquant.context import RunContext
from diffquant.methods import tfmq as tfmq_module
from diffquant.methods.result_cache import run_method
from diffquant.methods.tfmq import TFMQConfig
from diffquant.models.denoiser import DIT, PIXART, UNET
from diffquant.quant import QuantConfig, quant_state, quantize_denoiser
from diffquant.quant.state import iter_quantizers
from diffquant.registry import METHODS
from diffquant.validation import InvalidSetting
from test_dit import call_batch
from tiny_components import randomize, tiny_dit, tiny_pixart
from tiny_models import (
    TinyDiffusion,
    tiny_unet2d,
    tiny_unet2d_condition,
    unet2d_condition_inputs,
    unet2d_inputs,
)

torch.set_num_threads(1)

CALIB = CalibSettings(n_samples=6, step_stride=2, batch_size=4, shard_rows=10)
ACT_CALIB = CalibSettings(n_samples=6, step_stride=1, batch_size=6)
RECON = ReconSettings(weight_iters=24, act_iters=0, batch_size=8, capture_batch_size=16)
W4A8 = QuantConfig(name="w4a8", weight_bits=4, act_bits=8)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def stream(cache):
    return collect_calibration(TinyDiffusion(), CALIB, cache)


def _denoisers():
    return {
        "unet_class": (tiny_unet2d(), UNET, unet2d_inputs(4)),
        "unet_text": (tiny_unet2d_condition(), UNET, unet2d_condition_inputs(4)),
        "dit": (randomize(tiny_dit(), 0), DIT, call_batch("dit")),
        "pixart": (randomize(tiny_pixart(), 0), PIXART, call_batch("pixart")),
    }


@pytest.mark.parametrize("family", ["unet_class", "unet_text", "dit", "pixart"])
def test_temporal_block_runs_alone_as_the_forward_runs_it(family):
    denoiser, spec, batch = _denoisers()[family]
    quantize_denoiser(denoiser, spec, W4A8)
    check_temporal_outputs(denoiser, spec, batch)  # raises if any time_projection output differs
    with torch.no_grad(), quant_state(denoiser, weights=False, acts=False):
        outs = spec.temporal_outputs(denoiser, spec.temporal_inputs(batch))
        assert sorted(outs) == sorted(spec.layers(denoiser, "time_projection"))
        # the class label is part of the embedding where the family embeds it with the time step
        if family in ("unet_class", "dit"):
            other = dict(spec.temporal_inputs(batch), class_labels=torch.zeros_like(batch["class_labels"]))
            changed = spec.temporal_outputs(denoiser, other)
            assert any(not torch.equal(changed[k], outs[k]) for k in outs)


def test_a_temporal_block_that_differs_from_the_forward_is_refused(monkeypatch):
    denoiser, spec, batch = _denoisers()["unet_class"]
    real = type(spec).temporal_outputs

    def without_nonlinearity(self, den, inputs):
        outs = real(self, den, inputs)
        return {k: v * 1.01 for k, v in outs.items()}

    monkeypatch.setattr(type(spec), "temporal_outputs", without_nonlinearity)
    with pytest.raises(RuntimeError, match="differs from the denoiser's own forward"):
        check_temporal_outputs(denoiser, spec, batch)


def _temporal_error(model, stream):
    batch = next(stream.batches(len(stream)))
    inputs = model.spec.temporal_inputs(batch)
    with torch.no_grad():
        with quant_state(model.denoiser, weights=False, acts=False):
            fp = model.spec.temporal_outputs(model.denoiser, inputs)
        with quant_state(model.denoiser, weights=True, acts=False):
            q = model.spec.temporal_outputs(model.denoiser, inputs)
    return sum(float((q[k] - fp[k]).pow(2).sum(1).mean()) for k in fp)


def _weights(model, names):
    modules = dict(model.denoiser.named_modules())
    with torch.no_grad():
        return {n: modules[n].weight_quantizer(modules[n].weight).clone() for n in names}


def test_tiar_reconstructs_the_temporal_block_first_and_blocks_leave_it_alone(stream, tmp_path):
    nearest = TinyDiffusion()
    quantize_denoiser(nearest.denoiser, nearest.spec, W4A8, timesteps=nearest.timesteps)
    model = TinyDiffusion()
    quantize_denoiser(model.denoiser, model.spec, W4A8, timesteps=model.timesteps)
    result = reconstruct_temporal(
        model.denoiser, model.spec, stream, RECON, 60, state_file=tmp_path / "tiar.pt"
    )
    layers = temporal_layers(model.denoiser, model.spec)
    n_proj = len(model.spec.layers(model.denoiser, "time_projection"))
    assert result["layers"] == layers and n_proj == 8 and len(layers) == 2 + n_proj  # MLP + projections
    assert _temporal_error(model, stream) < 0.8 * _temporal_error(nearest, stream)
    modules = dict(model.denoiser.named_modules())
    assert all(modules[n].weight_quantizer.rounding == "hard" for n in layers)

    # block reconstruction with the temporal layers skipped leaves their weights as TIAR set them
    before = _weights(model, layers + ["down_blocks.0.resnets.0.conv1"])
    reconstruct(model.denoiser, model.spec, stream, RECON, skip_weight_layers=layers)
    after = _weights(model, layers + ["down_blocks.0.resnets.0.conv1"])
    assert all(torch.equal(before[n], after[n]) for n in layers)
    assert not torch.equal(before["down_blocks.0.resnets.0.conv1"], after["down_blocks.0.resnets.0.conv1"])
    # ... where plain block reconstruction would round them again inside the resnets
    again = TinyDiffusion()
    quantize_denoiser(again.denoiser, again.spec, W4A8, timesteps=again.timesteps)
    reconstruct_temporal(again.denoiser, again.spec, stream, RECON, 60)
    reconstruct(again.denoiser, again.spec, stream, RECON)
    proj = "down_blocks.0.resnets.0.time_emb_proj"
    assert not torch.equal(_weights(again, [proj])[proj], before[proj])

    # a resumed job loads the finished TIAR instead of rerunning it
    resumed = TinyDiffusion()
    quantize_denoiser(resumed.denoiser, resumed.spec, W4A8, timesteps=resumed.timesteps)
    loaded = reconstruct_temporal(
        resumed.denoiser, resumed.spec, stream, RECON, 0, state_file=tmp_path / "tiar.pt"
    )
    assert loaded["loss"] == result["loss"]
    assert all(torch.equal(a, before[n]) for n, a in _weights(resumed, layers).items())


def _run(cfg, tmp_path, monkeypatch=None):
    ctx = RunContext(run_dir=tmp_path / "run", cache_dir=tmp_path / "cache", device=torch.device("cpu"))
    ctx.run_dir.mkdir(parents=True, exist_ok=True)
    model = TinyDiffusion()
    return model, run_method(METHODS.get("tfmq")(), model, W4A8, cfg, ctx)


def test_tfmq_runs_tiar_before_blocks_and_calibrates_one_range_set_per_step(tmp_path, monkeypatch):
    seen = {}
    real = tfmq_module.reconstruct

    def spy(denoiser, spec, stream, settings, **kw):
        modules = dict(denoiser.named_modules())
        seen["hard_before_blocks"] = [modules[n].weight_quantizer.rounding for n in kw["skip_weight_layers"]]
        return real(denoiser, spec, stream, settings, **kw)

    monkeypatch.setattr(tfmq_module, "reconstruct", spy)
    cfg = TFMQConfig(calib=CALIB, act_calib=ACT_CALIB, recon=RECON, tiar_iters=30)
    model, result = _run(cfg, tmp_path)
    assert seen["hard_before_blocks"] == ["hard"] * 10  # the time MLP's 2 linears, 8 projections
    steps = len(model.timesteps)
    assert result.quant.timestep_aware and result.quant.timestep_groups == steps
    assert result.metrics["tfmq_act_rows"] == ACT_CALIB.n_samples * steps * 2  # every step, guided
    assert result.metrics["tfmq_tiar_layers"] == 10
    quantizers = dict(iter_quantizers(model.denoiser, "act"))
    assert all(q.n_groups == steps for q in quantizers.values())
    # the projections read a function of t alone: their per-step ranges differ between steps
    proj = quantizers["down_blocks.0.resnets.0.time_emb_proj.input_quantizer"]
    assert len({round(float(s), 6) for s in proj.scale[:, 0]}) == steps
    # every other ablation: one set for all steps, no TIAR
    single = TFMQConfig(calib=CALIB, act_calib=ACT_CALIB, recon=RECON, tiar=False, fsc=False)
    model1, result1 = _run(single, tmp_path / "ablation")
    assert not result1.quant.timestep_aware
    assert "tfmq_tiar_layers" not in result1.metrics


@pytest.mark.parametrize(
    "change, key",
    [
        (dict(recon=dataclasses.replace(RECON, act_iters=5)), "recon.act_iters"),
        (dict(act_calib=CalibSettings(step_stride=2)), "act_calib"),
    ],
)
def test_tfmq_refuses_settings_it_does_not_have(change, key):
    with pytest.raises(InvalidSetting, match=key.replace(".", r"\.")):
        TFMQConfig(**change)
