"""PTQ4DM (``method=ptq4dm``): NDTC calibration rows (one normally drawn step per trajectory, with
its true time step) and QDrop's joint reconstruction (activations and unit inputs dropped to FP)."""

import pytest
import torch

from diffquant.calib import (
    CalibSettings,
    ReconSettings,
    calibrate_act_ranges,
    collect_calibration,
    reconstruct,
)
from diffquant.calib.collect import calib_cache_key
from diffquant.calib.reconstruct import mix_inputs
from diffquant.context import RunContext
from diffquant.methods.ptq4dm import PTQ4DMConfig
from diffquant.methods.result_cache import run_method
from diffquant.quant import QuantConfig, quantize_denoiser
from diffquant.quant.quantizers import ActQuantizer
from diffquant.quant.state import activation_drop, iter_quantizers
from diffquant.registry import METHODS
from diffquant.validation import InvalidSetting
from tiny_models import N_CLASSES, TinyDiffusion

torch.set_num_threads(1)

NDTC = CalibSettings(n_samples=12, batch_size=5, shard_rows=10, step_sampling="normal")
W4A8 = QuantConfig(name="w4a8", weight_bits=4, act_bits=8)
JOINT = ReconSettings(
    weight_iters=24, batch_size=8, capture_batch_size=16, joint=True, keep_prob=0.5, input_keep_prob=0.5
)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def ndtc(cache):
    return collect_calibration(TinyDiffusion(), NDTC, cache)


def test_normal_steps_follow_ptq4dm_draw():
    s = CalibSettings(step_sampling="normal", normal_mean=0.4, normal_std=0.4)
    steps = s.normal_steps(list(range(4000)), 20).double()
    assert steps.min() == 0 and steps.max() == 19
    # trunc((0.4 + 0.4 z) * 20) <= 0 ⇔ z < -0.875: P = 0.191; >= 19 ⇔ z >= 1.375: P = 0.085
    assert 0.17 < float((steps == 0).double().mean()) < 0.21
    assert 0.07 < float((steps == 19).double().mean()) < 0.10
    assert torch.equal(s.normal_steps([7, 3], 20), s.normal_steps(list(range(8)), 20)[[7, 3]])  # per sample


def test_ndtc_records_each_trajectory_once_at_its_drawn_step_with_its_time_step(ndtc, cache):
    model = TinyDiffusion()
    S = len(model.timesteps)
    batch = next(ndtc.batches(1000, with_step=True))
    assert len(ndtc) == NDTC.n_samples * 2  # one step per trajectory, uncond + cond rows
    drawn = NDTC.normal_steps(list(range(NDTC.n_samples)), S)
    cond = batch["class_labels"] != N_CLASSES
    assert sorted(batch["_step"][cond].tolist()) == sorted(drawn.tolist())
    assert torch.equal(batch["timestep"], model.timesteps[batch["_step"]])  # the true time step
    # sampling batch size changes nothing
    other = collect_calibration(TinyDiffusion(), CalibSettings(**{**NDTC.__dict__, "batch_size": 3}), cache)
    b2 = next(other.batches(1000, with_step=True))
    key = lambda b: sorted(zip(b["_step"].tolist(), b["sample"].flatten(1).sum(1).tolist()))
    for (s1, v1), (s2, v2) in zip(key(b2), key(batch), strict=True):
        assert s1 == s2 and v1 == pytest.approx(v2, abs=1e-3)
    with pytest.raises(InvalidSetting, match="calib.step_sampling"):
        ndtc.reference_order()


def test_stride_sets_keep_their_cache_keys():
    model = TinyDiffusion()
    key = calib_cache_key(model, CalibSettings())["calib"]
    assert "step_sampling" not in key and "normal_mean" not in key and key["step_stride"] == 2
    assert calib_cache_key(model, NDTC)["calib"]["step_sampling"] == "normal"


def test_activation_drop_mixes_quantized_and_fp_elements():
    q = ActQuantizer(bits=2)
    q.set_range(torch.tensor(-1.0), torch.tensor(1.0))
    x = torch.linspace(-0.97, 0.97, 4001).reshape(1, -1)
    quantized = q(x)
    assert (quantized != x).float().mean() > 0.95
    holder = torch.nn.Sequential(q)
    torch.manual_seed(0)
    with activation_drop(holder, 0.5):
        mixed = q(x)
    assert q.keep_prob is None  # restored
    is_q, is_fp = mixed == quantized, mixed == x
    assert bool((is_q | is_fp).all())
    assert 0.45 < float((is_q & ~is_fp).float().mean()) < 0.55


def test_mix_inputs_takes_each_element_from_either_network():
    torch.manual_seed(0)
    fp, q = torch.zeros(4, 1000), torch.ones(4, 1000)
    out = mix_inputs({"fp_a0": fp, "w_a0": q, "y": fp, "fp_k_t": torch.arange(4)}, 0.5)
    assert 0.45 < float(out["fp_a0"].mean()) < 0.55
    assert torch.equal(out["fp_k_t"], torch.arange(4)) and out["y"] is fp


def test_joint_stage_learns_rounding_and_step_sizes_with_drop(ndtc):
    model = TinyDiffusion()
    quantize_denoiser(model.denoiser, model.spec, W4A8, timesteps=model.timesteps)
    calibrate_act_ranges(model.denoiser, ndtc, method="lp", n_rows=16, batch_size=8)
    before = {n: q.scale.detach().clone() for n, q in iter_quantizers(model.denoiser, "act")}
    seen = []
    real = ActQuantizer.forward

    def spy(self, x):
        seen.append(self.keep_prob)
        return real(self, x)

    ActQuantizer.forward = spy
    try:
        report = reconstruct(model.denoiser, model.spec, ndtc, JOINT)
    finally:
        ActQuantizer.forward = real
    assert 0.5 in seen  # activations were dropped while training
    assert all(u.act_loss is None for u in report.units)  # no separate LSQ stage
    after = dict(iter_quantizers(model.denoiser, "act"))
    assert sum(not torch.equal(before[n], q.scale) for n, q in after.items()) > len(after) // 2
    assert all(q.keep_prob is None for q in after.values())
    assert all(q.rounding == "hard" for _, q in iter_quantizers(model.denoiser, "weight"))


def test_ptq4dm_method_end_to_end_and_cached(tmp_path):
    cfg = PTQ4DMConfig(calib=NDTC, recon=JOINT, act_init_rows=16)
    ctx = RunContext(run_dir=tmp_path, cache_dir=tmp_path / "cache", device=torch.device("cpu"))
    result = run_method(METHODS.get("ptq4dm")(), TinyDiffusion(), W4A8, cfg, ctx)
    assert result.metrics["calib_rows"] == NDTC.n_samples * 2 and result.metrics["ptq4dm_cached"] is False
    again = run_method(METHODS.get("ptq4dm")(), TinyDiffusion(), W4A8, cfg, ctx)
    assert again.metrics["ptq4dm_cached"] is True


@pytest.mark.parametrize(
    "kwargs, key",
    [
        (dict(recon=ReconSettings()), "recon.joint"),
        (dict(act_init_stage="after_weights"), "act_init_stage"),
        (dict(lsq_guard=True), "lsq_guard"),
    ],
)
def test_ptq4dm_refuses_what_it_does_not_do(kwargs, key):
    with pytest.raises(InvalidSetting, match=key.replace(".", r"\.")):
        PTQ4DMConfig(**kwargs)


def test_drop_options_need_the_joint_stage():
    with pytest.raises(InvalidSetting, match="keep_prob"):
        ReconSettings(keep_prob=0.5)
    with pytest.raises(InvalidSetting, match="input_keep_prob"):
        ReconSettings(joint=True, input_keep_prob=1.5)


def test_new_options_at_their_defaults_leave_cached_results_valid():
    """PTQ results cached before NDTC and QDrop existed keep their keys: the new calibration and
    reconstruction fields are left out of the key at their defaults, and enter it when set."""
    from diffquant.methods.ptq import PTQConfig
    from diffquant.quant.typed import as_dict, key_dict

    key = key_dict(PTQConfig())
    old = as_dict(PTQConfig())
    for k in ("joint", "keep_prob", "input_keep_prob", "disk_budget_gb", "autocast", "compile"):
        old["recon"].pop(k)
    for k in ("step_sampling", "normal_mean", "normal_std"):
        old["calib"].pop(k)
    assert key == old
    assert key_dict(PTQ4DMConfig())["recon"]["joint"] is True
    assert key_dict(PTQ4DMConfig())["calib"]["step_sampling"] == "normal"
    # a switch whose kernels changed carries their version: its results, and only those, recomputed
    compiled = key_dict(ReconSettings(compile=True))
    assert compiled["compile"] is True and compiled["compile_code_version"] == 2
    assert "compile_code_version" not in key_dict(ReconSettings())
