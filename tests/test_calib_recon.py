"""Calibration data (collect, cache, stream), block reconstruction, checkpoints, resume and the
``ptq`` / ``ptq_minmax`` methods on a tiny class-conditional latent model with guidance."""

import dataclasses
import importlib
import json

import pytest
import torch

from diffquant.calib import (
    CalibSettings,
    ReconSettings,
    calibrate_act_ranges,
    collect_calibration,
    find_units,
    reconstruct,
)
from diffquant.context import RunContext
from diffquant.methods.ptq import PTQConfig, PTQMinMaxConfig, load_or_run_ptq
from diffquant.methods.result_cache import run_method
from diffquant.models.denoiser import UNET
from diffquant.quant import (
    QuantConfig,
    load_quantized,
    quant_state,
    quantize_denoiser,
    quantizer_state_dict,
    save_quantized,
)
from diffquant.quant.state import iter_quantizers
from diffquant.registry import METHODS
from tiny_models import N_CLASSES, TinyDiffusion, TinyTextDiffusion

torch.set_num_threads(1)
recon_module = importlib.import_module("diffquant.calib.reconstruct")  # the function shadows it

CALIB = CalibSettings(n_samples=6, step_stride=2, batch_size=4, shard_rows=10)
RECON = ReconSettings(weight_iters=24, act_iters=12, batch_size=8, capture_batch_size=16)
W4A8 = QuantConfig(name="w4a8", weight_bits=4, act_bits=8)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def stream(cache):
    return collect_calibration(TinyDiffusion(), CALIB, cache)


def _rows_close(unet_a, unet_b, stream, atol=0.0):
    batch = next(stream.batches(12, stream.subset(12, 5)))
    with torch.no_grad():
        a, b = UNET.forward(unet_a, batch), UNET.forward(unet_b, batch)
    return torch.allclose(a, b, atol=atol) if atol else torch.equal(a, b)


def test_calibration_rows_cover_the_trajectories(stream, cache, monkeypatch):
    model = TinyDiffusion()
    steps = list(range(0, 6, CALIB.step_stride))
    assert len(stream) == CALIB.n_samples * len(steps) * 2  # guidance: uncond + cond rows
    assert json.loads((stream.path / "index.json").read_text())["steps"] == steps
    assert len(list(stream.path.glob("shard_*.pt"))) > 1  # sharded, streamed
    seen = torch.cat([b["_step"] for b in stream.batches(7, with_step=True)])
    assert seen.numel() == len(stream)
    batch = next(stream.batches(1000, with_step=True))
    assert set(batch) == {"sample", "timestep", "class_labels", "_step"}
    assert torch.equal(batch["timestep"], model.timesteps[batch["_step"]])
    n_null = int((batch["class_labels"] == N_CLASSES).sum())
    assert n_null == len(stream) // 2  # the unconditional half
    sub = stream.subset(10, seed=1)
    assert sum(b["sample"].shape[0] for b in stream.batches(3, sub)) == 10

    # the second request is served from the cache: no sampling
    monkeypatch.setattr(
        TinyDiffusion, "sample_latents", lambda *a, **k: pytest.fail("calibration data was recomputed")
    )
    again = collect_calibration(TinyDiffusion(), CALIB, cache)
    assert again.path == stream.path


def test_units_follow_execution_order(stream):
    model = TinyDiffusion()
    quantize_denoiser(model.denoiser, model.spec, W4A8)
    units = find_units(model.denoiser, model.spec, next(stream.batches(2)))
    names = [u.name for u in units]
    assert names[:3] == ["time_embedding.linear_1", "time_embedding.linear_2", "conv_in"]
    assert names[-1] == "conv_out"
    kinds = {u.kind for u in units}
    assert kinds == {"layer", "resnet", "attention"}
    assert "down_blocks.1.attentions.0" in names and "up_blocks.0.resnets.1" in names
    assert not any(n.startswith("down_blocks.1.attentions.0.") for n in names)


def _calibrated(stream, progress_dir=None, on_unit_done=None, recon=RECON):
    model = TinyDiffusion()
    quantize_denoiser(model.denoiser, model.spec, W4A8, timesteps=model.timesteps)
    calibrate_act_ranges(model.denoiser, stream, method="lp", n_rows=24, batch_size=12)
    report = reconstruct(
        model.denoiser, model.spec, stream, recon, progress_dir=progress_dir, on_unit_done=on_unit_done
    )
    return model, report


def test_reconstruction_beats_initial_ranges_and_roundtrips(stream, tmp_path):
    minmax = TinyDiffusion()
    quantize_denoiser(minmax.denoiser, minmax.spec, W4A8)
    calibrate_act_ranges(minmax.denoiser, stream, method="lp", n_rows=24, batch_size=12)
    model, report = _calibrated(stream)
    assert len(report.units) == 18 and all(u.weight_loss is not None for u in report.units)

    batch = next(stream.batches(len(stream)))
    with torch.no_grad():
        with quant_state(model.denoiser, weights=False, acts=False):
            fp = model.spec.forward(model.denoiser, batch)
        err_recon = (model.spec.forward(model.denoiser, batch) - fp).pow(2).mean()
        err_init = (minmax.spec.forward(minmax.denoiser, batch) - fp).pow(2).mean()
    assert err_recon < err_init

    path = save_quantized(model.denoiser, tmp_path / "q.pt", W4A8, meta={"x": 1})
    fresh = TinyDiffusion()
    summary, meta = load_quantized(fresh.denoiser, fresh.spec, path)
    assert meta == {"x": 1} and summary.n_quant_layers == 51
    assert _rows_close(model.denoiser, fresh.denoiser, stream)  # identical outputs


def test_resume_after_interruption_matches_uninterrupted(stream, tmp_path):
    full, _ = _calibrated(stream, progress_dir=tmp_path / "a")

    class Stop(Exception):
        pass

    def stop_after_5(i, report):
        if i == 4:
            raise Stop

    with pytest.raises(Stop):
        _calibrated(stream, progress_dir=tmp_path / "b", on_unit_done=stop_after_5)
    assert json.loads((tmp_path / "b" / "progress.json").read_text())["done"] == 5
    resumed, report = _calibrated(stream, progress_dir=tmp_path / "b")
    assert report.resumed_from == 5 and len(report.units) == 18
    assert _rows_close(full.denoiser, resumed.denoiser, stream)
    full_state, resumed_state = quantizer_state_dict(full.denoiser), quantizer_state_dict(resumed.denoiser)
    assert full_state.keys() == resumed_state.keys()
    assert all(torch.equal(full_state[k], resumed_state[k]) for k in full_state)  # bit for bit


def test_progress_writes_each_unit_once(stream, tmp_path):
    """The base state once, then per unit only its own quantizers: the bytes written stay about
    twice one state, not (units x state)."""
    model, report = _calibrated(stream, progress_dir=tmp_path)
    index = json.loads((tmp_path / "progress.json").read_text())
    names = [u.name for u in report.units]
    assert index["done"] == 18 and index["unit_states"] == [f"unit_{i:04d}.pt" for i in range(1, 19)]
    full = quantizer_state_dict(model.denoiser)
    base = torch.load(tmp_path / "state_base.pt", weights_only=True)
    assert base.keys() == {k for k in full if not k.endswith("round_up")}  # before any AdaRound
    covered = set()
    for unit, file in zip(names, index["unit_states"]):
        state = torch.load(tmp_path / file, weights_only=True)
        assert state and all(k.startswith(f"{unit}.") for k in state), unit
        assert all(torch.equal(state[k], full[k]) for k in state)  # units never overwrite each other
        covered |= set(state)
    # what no unit reconstructs kept its base value
    assert all(torch.equal(base[k], full[k]) for k in full.keys() - covered)
    assert covered >= {k for k in full if k.endswith("round_up")}
    size = lambda d: sum(v.numel() * v.element_size() for v in d.values())  # noqa: E731
    unit_bytes = sum(size(torch.load(tmp_path / f, weights_only=True)) for f in index["unit_states"])
    assert unit_bytes <= size(full)


def test_divergence_names_the_fix(stream, monkeypatch):
    monkeypatch.setattr(recon_module, "lp_loss", lambda *a: torch.tensor(float("nan")))
    with pytest.raises(FloatingPointError, match="method.recon.weight_lr"):
        _calibrated(stream)


def test_ptq_methods_cache_and_metrics(cache, tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    ctx = RunContext(run_dir=run_dir, cache_dir=cache, device=torch.device("cpu"))
    ptq = PTQConfig(
        calib=CALIB,
        recon=dataclasses.replace(RECON, weight_iters=8, act_iters=4),
        act_init_rows=24,
        save_checkpoint=True,
    )
    first = load_or_run_ptq(TinyDiffusion(), W4A8, ptq, ctx)
    model, metrics = first.model, first.metrics
    assert metrics["n_quant_layers"] == 51 and metrics["ptq_cached"] is False
    assert metrics["recon_units"] == 18 and (run_dir / "quantized_denoiser.pt").exists()
    assert first.quant == W4A8 and len(first.tables["recon_units"].rows) == 18

    ctx2 = RunContext(run_dir=run_dir, cache_dir=cache, device=torch.device("cpu"))
    again = load_or_run_ptq(TinyDiffusion(), W4A8, ptq, ctx2)
    assert again.metrics["ptq_cached"] is True
    assert again.metrics["ptq_calib_s"] == metrics["ptq_calib_s"]
    assert again.quant == first.quant and again.tables == first.tables
    stream = collect_calibration(TinyDiffusion(), CALIB, cache)
    assert _rows_close(model.denoiser, again.model.denoiser, stream)

    ctx3 = RunContext(run_dir=run_dir, cache_dir=cache, device=torch.device("cpu"))
    floor = run_method(METHODS.get("ptq_minmax")(), TinyDiffusion(), W4A8, PTQMinMaxConfig(calib=CALIB), ctx3)
    assert floor.metrics["n_quant_layers"] == 51 and "recon_units" not in floor.metrics
    assert floor.metrics["ptq_minmax_cached"] is False
    assert floor.model.denoiser.conv_in.weight_quantizer.rounding == "nearest"
    assert model.denoiser.conv_in.weight_quantizer.rounding == "hard"


def test_reconstruction_of_cross_attention_unet(tmp_path):
    model = TinyTextDiffusion()
    stream = collect_calibration(model, CalibSettings(n_samples=4, step_stride=2), tmp_path)
    quantize_denoiser(model.denoiser, model.spec, W4A8)
    calibrate_act_ranges(model.denoiser, stream, n_rows=16, batch_size=16)
    report = reconstruct(
        model.denoiser, model.spec, stream, dataclasses.replace(RECON, weight_iters=6, act_iters=4)
    )
    kinds = {u.name: u.kind for u in report.units}
    assert "down_blocks.0.attentions.0.transformer_blocks.0" in kinds
    assert kinds["down_blocks.0.attentions.0.proj_in"] == "layer"
    assert set(kinds.values()) == {"layer", "resnet", "transformer"}
    assert all(u.act_loss is not None and u.act_loss == u.act_loss for u in report.units)


def test_time_step_only_inputs_get_minmax_ranges(stream):
    """``minmax_layers`` overrides the L_p search for the quantizers it names, and only those."""
    ranges = {}
    for forced in ((), (r"time_embedding\.",)):
        model = TinyDiffusion()
        quantize_denoiser(model.denoiser, model.spec, QuantConfig(name="w8a4", weight_bits=8, act_bits=4))
        calibrate_act_ranges(
            model.denoiser, stream, method="lp", n_rows=24, batch_size=12, minmax_layers=forced
        )
        ranges[forced] = {
            n: (q.scale.detach().clone(), q.zero_point.detach().clone())
            for n, q in iter_quantizers(model.denoiser, "act")
        }
    lp, forced = ranges[()], ranges[(r"time_embedding\.",)]
    temb = [n for n in lp if n.startswith("time_embedding.")]
    assert temb and all(torch.equal(lp[n][0], forced[n][0]) for n in lp if n not in temb)
    # min-max never clips, so its step is at least the L_p search's (which clips the tails)
    assert all((forced[n][0] >= lp[n][0] - 1e-7).all() for n in temb)
    assert any((forced[n][0] > lp[n][0] * 1.01).any() for n in temb)


def test_cache_keys_name_the_numerics():
    """Results differ with the CPU thread count (summation order), the CPU capability torch
    dispatches on and the torch version, so cache keys include them."""
    from diffquant.calib.collect import calib_cache_key

    model, threads = TinyDiffusion(), torch.get_num_threads()
    key = calib_cache_key(model, CALIB)
    assert key["model"]["numerics"] == {
        "device": "cpu",
        "cpu_threads": threads,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "torch": torch.__version__,
    }
    try:
        torch.set_num_threads(threads + 1)
        assert calib_cache_key(model, CALIB) != key
    finally:
        torch.set_num_threads(threads)
    assert calib_cache_key(model, CALIB) == key
