"""AccuQuant: group-loss gradients (exact vs approximate), memory behaviour, calibration, the
method's wiring and the error-accumulation analysis — on tiny random UNets (fast)."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from diffquant.analysis import error_accumulation as erracc
from diffquant.calib import observing_act_ranges
from diffquant.context import RunContext
from diffquant.methods import accuquant as aq
from diffquant.methods.base import MethodResult
from diffquant.methods.result_cache import run_method
from diffquant.methods.trajectory import (
    fp_trajectories,
    gradient_agreement,
    gradient_of,
    group_backward,
    group_starts,
)
from diffquant.models.base import DiffusionModel, SamplerSettings
from diffquant.models.denoiser import UNetSpec
from diffquant.quant import QuantConfig, iter_quantizers, quant_parameters, quantize_denoiser
from diffquant.quant.state import quant_state
from diffquant.registry import METHODS
from diffquant.schema import typed
from diffquant.validation import ConfigError, InvalidSetting
from tiny_models import LATENT, TinyDiffusion, tiny_unet2d

SEED = 5


# ---------------------------------------------------------------------------- helpers
def quantize_tiny(
    model: DiffusionModel, weight_bits: int = 4, act_bits: int = 4, **quant_kwargs
) -> DiffusionModel:
    """W/A-quantize ``model.denoiser`` with min-max activation ranges from a few FP trajectories."""
    cfg = QuantConfig(name="t", weight_bits=weight_bits, act_bits=act_bits, **quant_kwargs)
    quantize_denoiser(model.denoiser, model.spec, cfg, timesteps=model.timesteps)
    with observing_act_ranges(model.denoiser, "minmax"):
        model.sample_latents(list(range(8)), 123)
    return model


def act_scales(model: DiffusionModel) -> list[nn.Parameter]:
    params = list(quant_parameters(model.denoiser, "act_scale", max_bits=15).values())
    for p in params:
        p.requires_grad_(True)
    return params


def grads(model, params, traj, start, m, mode):
    rows = traj.rows(range(4))
    return gradient_of(
        params,
        lambda: group_backward(
            model,
            mode,
            rows.states[start],
            start,
            m,
            rows.states[start + m],
            rows.cond,
            rows.indices,
            rows.seed,
        ),
    )


class ShiftScheduler:
    """A constructed sampler ``x_prev = x_t + c · eps``: its Jacobian ``∂x_prev/∂x_t`` is the
    identity whenever eps does not depend (in the autograd sense) on x_t."""

    init_noise_sigma = 1.0
    config: dict = {}

    def __init__(self, c: float = -0.2) -> None:
        self.c = c

    def set_timesteps(self, n: int) -> None:
        self.timesteps = torch.linspace(900, 100, n).long()

    def scale_model_input(self, x, t):
        return x

    def step(self, model_output, timestep, sample):
        return SimpleNamespace(prev_sample=sample + self.c * model_output)


class DetachedInputUNet(nn.Module):
    """A UNet that sees the values of its input but not its graph (∂eps/∂x_t = 0)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, sample, timestep, class_labels=None):
        return self.inner(sample.detach(), timestep, class_labels=class_labels)


class DetachedInputSpec(UNetSpec):
    """The UNet's spec, its layer names under :class:`DetachedInputUNet`'s ``inner``."""

    first_layers = ("inner.conv_in",)
    last_layers = ("inner.conv_out",)

    def shortcut_splits(self, denoiser: nn.Module) -> dict[str, int]:
        return {f"inner.{k}": v for k, v in super().shortcut_splits(denoiser.inner).items()}


class IdentityJacobianDiffusion(TinyDiffusion):
    """TinyDiffusion's conditioning over :class:`ShiftScheduler` and a detached-input UNet."""

    spec = DetachedInputSpec()

    def __init__(self) -> None:
        DiffusionModel.__init__(
            self,
            "identity_jacobian",
            DetachedInputUNet(tiny_unet2d(0)),
            nn.Identity(),
            ShiftScheduler(),
            SamplerSettings(4, 2.0, 0.0),
            LATENT,
            latent_scale=1.0,
        )


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny(one_thread):
    torch.manual_seed(0)
    model = quantize_tiny(TinyDiffusion(steps=6))
    return model, fp_trajectories(model, list(range(8)), SEED)


# ---------------------------------------------------------------------------- gradients
def test_group_size_one_exact_and_approx_gradients_are_identical(tiny):
    model, traj = tiny
    params = act_scales(model)
    for start in (0, 3, 5):
        exact = grads(model, params, traj, start, 1, "exact")
        approx = grads(model, params, traj, start, 1, "approx")
        assert exact.abs().sum() > 0
        torch.testing.assert_close(approx, exact, rtol=1e-5, atol=1e-8)


def test_approx_is_exact_where_the_sampler_jacobian_is_identity():
    torch.manual_seed(0)
    model = quantize_tiny(IdentityJacobianDiffusion())
    traj = fp_trajectories(model, list(range(8)), SEED)
    params = act_scales(model)
    for m in (2, 4):
        exact = grads(model, params, traj, 0, m, "exact")
        approx = grads(model, params, traj, 0, m, "approx")
        assert exact.norm() > 0
        torch.testing.assert_close(approx, exact, rtol=1e-4, atol=1e-7)


def test_approx_differs_from_exact_on_a_real_sampler(tiny):
    """The ablation: on DDIM the Jacobian chain is not the identity, so the approximate gradient
    departs from the exact one as M grows (while M = 1 stays exact)."""
    model, traj = tiny
    params = act_scales(model)
    agreement = {
        m: gradient_agreement(
            grads(model, params, traj, 0, m, "exact"), grads(model, params, traj, 0, m, "approx")
        )
        for m in (1, 3)
    }
    assert agreement[1]["rel_error"] < 1e-5
    assert agreement[3]["rel_error"] > 1e-2
    assert agreement[3]["cosine"] < 1 - 1e-6


class SavedTensorMeter:
    """Peak bytes of tensors saved for backward that are alive at once (a deterministic stand-in
    for activation memory)."""

    def __init__(self) -> None:
        self.live = 0
        self.peak = 0

    def __enter__(self):
        meter = self

        class Saved:
            def __init__(self, t):
                self.t, self.n = t, t.numel() * t.element_size()
                meter.live += self.n
                meter.peak = max(meter.peak, meter.live)

            def __del__(self):
                meter.live -= self.n

        self._ctx = torch.autograd.graph.saved_tensors_hooks(Saved, lambda s: s.t)
        self._ctx.__enter__()
        return self

    def __exit__(self, *exc):
        self._ctx.__exit__(*exc)


def test_approx_holds_one_step_graph_exact_holds_m(tiny):
    model, traj = tiny
    act_scales(model)
    peaks = {}
    for mode in ("exact", "approx"):
        for m in (1, 4):
            with SavedTensorMeter() as meter:
                group_backward(
                    model,
                    mode,
                    traj.states[0, :4],
                    0,
                    m,
                    traj.states[m, :4],
                    traj.rows(range(4)).cond,
                    traj.indices[:4],
                    SEED,
                )
            peaks[mode, m] = meter.peak
    assert peaks["approx", 4] <= 1.05 * peaks["approx", 1]
    assert peaks["exact", 4] >= 3.5 * peaks["exact", 1]


def test_timestep_aware_groups_only_move_their_steps():
    torch.manual_seed(0)
    model = quantize_tiny(TinyDiffusion(steps=6), timestep_aware=True, timestep_groups=6)
    traj = fp_trajectories(model, list(range(4)), SEED)
    params = act_scales(model)
    g = gradient_of(
        params,
        lambda: group_backward(
            model, "approx", traj.states[2], 2, 2, traj.states[4], traj.cond, traj.indices, SEED
        ),
    )
    per_group = torch.stack(
        [gi.reshape(6, -1).abs().sum(1) for gi in g.split([p.numel() for p in params])]
    ).sum(0)
    assert (per_group[[2, 3]] > 0).all() and (per_group[[0, 1, 4, 5]] == 0).all()


# ---------------------------------------------------------------------------- calibration
@pytest.mark.parametrize(
    "mode, learn",
    [("approx", ["act_scale"]), ("exact", ["act_scale"]), ("approx", ["act_scale", "weight_round"])],
)
def test_calibrating_a_group_lowers_its_loss(mode, learn):
    torch.manual_seed(0)
    model = quantize_tiny(TinyDiffusion(steps=6))
    traj = fp_trajectories(model, list(range(16)), SEED)
    cfg = aq.AccuQuantConfig(
        group_size=2,
        grad_mode=mode,
        learn=learn,
        iters_per_group=8,
        n_samples=16,
        batch_size=8,
        act_lr=1e-3,
    )
    cal = aq.TrajectoryCalibration(model, cfg)
    start, m = 4, 2
    learned = aq.LearnedParameters(model.denoiser, cfg)
    before = cal.group_loss_all(traj, traj.states[start], start, m)
    cal.calibrate_group(learned, traj, traj.states[start], start, m, torch.Generator().manual_seed(0))
    learned.restore()
    after = cal.group_loss_all(traj, traj.states[start], start, m)
    assert after < before
    assert all(not p.requires_grad for p in quant_parameters(model.denoiser, "act_scale").values())
    if "weight_round" in learn:  # rounding hardened again
        assert all(q.rounding == "hard" for _, q in iter_quantizers(model.denoiser, "weight"))


def test_soft_rounding_starts_from_the_ptq_rounding(tiny):
    model, _ = tiny
    hard = {n: q.round_up for n, q in iter_quantizers(model.denoiser, "weight")}
    w_before = {
        n: m.quantized_weight().detach().clone()
        for n, m in model.denoiser.named_modules()
        if hasattr(m, "quantized_weight") and m.weight_quantizer is not None
    }
    aq.start_soft_rounding(model.denoiser, 2.0)
    aq.harden_rounding(model.denoiser)  # untouched α → the same choices as round-to-nearest
    for n, m in model.denoiser.named_modules():
        if n in w_before:
            torch.testing.assert_close(m.quantized_weight(), w_before[n])
    for n, q in iter_quantizers(model.denoiser, "weight"):  # back to the fixture's rounding mode
        q.round_up = hard[n]


def test_reported_losses_judge_the_hard_rounded_model():
    """With soft (AdaRound) rounding the network trained is not the one kept: every reported
    loss is that of the hard-rounded model — before: the PTQ model's
    (not the soft one's at α = ±2), after: the kept (hardened) model's."""
    torch.manual_seed(0)
    model = quantize_tiny(TinyDiffusion(steps=4))
    traj = fp_trajectories(model, list(range(8)), SEED)
    cfg = aq.AccuQuantConfig(
        group_size=2,
        learn=["act_scale", "weight_round"],
        round_forward="soft",
        round_init=2.0,
        iters_per_group=3,
        n_samples=8,
        batch_size=4,
    )
    cal = aq.TrajectoryCalibration(model, cfg)
    initial = cal.all_group_losses(traj)
    learned = aq.LearnedParameters(model.denoiser, cfg)  # soft at α = ±2: another network
    soft = cal.all_group_losses(traj)
    with learned.hardened():
        assert cal.all_group_losses(traj) == initial
    assert cal.all_group_losses(traj) == soft  # soft again after the block
    assert soft != initial
    learned.restore()
    reports = cal.run(traj)
    assert [r.loss_before for r in reports] == initial
    assert [r.loss_after for r in reports] == cal.all_group_losses(traj)


def test_weight_round_flips_roundings_where_the_trajectory_loss_wants():
    """``weight_round`` (defaults: the network sees the hard choices, the gradient passes through
    h(α), α started ±0.5 from the PTQ choice) changes roundings where that lowers the hard
    model's loss; AdaRound's relaxation started at the PTQ choices (α = ±2, λ = 0.01) never
    flipped one (see the module doc of diffquant.methods.accuquant)."""
    torch.manual_seed(0)
    model = quantize_tiny(TinyDiffusion(steps=4))
    traj = fp_trajectories(model, list(range(16)), SEED)
    cfg = aq.AccuQuantConfig(
        group_size=2, learn=["weight_round"], iters_per_group=100, n_samples=16, batch_size=8
    )
    assert cfg.round_forward == "hard"
    before = aq.rounding_choices(model.denoiser)
    cal = aq.TrajectoryCalibration(model, cfg)
    initial = cal.all_group_losses(traj)
    cal.run(traj)
    after = aq.rounding_choices(model.denoiser)
    flips = sum(int((a != b).sum()) for a, b in zip(after, before))
    assert flips > 0
    assert sum(cal.all_group_losses(traj)) < sum(initial)
    assert all(q.rounding == "hard" for _, q in iter_quantizers(model.denoiser, "weight"))


@pytest.mark.parametrize("order", ["sequential", "interleaved"])
def test_run_calibrates_all_groups_in_sampler_order_with_quant_starts(order):
    torch.manual_seed(0)
    model = quantize_tiny(TinyDiffusion(steps=5))
    traj = fp_trajectories(model, list(range(8)), SEED)
    cfg = aq.AccuQuantConfig(
        group_size=2, iters_per_group=2, n_samples=8, batch_size=4, group_start="quant", epochs=2, order=order
    )
    reports = aq.TrajectoryCalibration(model, cfg).run(traj)
    assert [(r.epoch, r.start, r.length) for r in reports] == [
        (e, s, n) for e in (0, 1) for s, n in ((0, 2), (2, 2), (4, 1))
    ]
    assert group_starts(20, 8) == [0, 8, 16]


def test_calibration_samples_spread_over_the_classes():
    imagenet = SimpleNamespace(num_classes=1000)
    indices = aq.calibration_indices(imagenet, 256)
    classes = [i % 1000 for i in indices]
    assert len(set(classes)) == 256 and classes[0] == 0 and classes[-1] >= 990
    digits = SimpleNamespace(num_classes=10)  # more samples than classes: 0 .. n-1, balanced
    assert aq.calibration_indices(digits, 64) == list(range(64))
    assert aq.calibration_indices(SimpleNamespace(), 8) == list(range(8))  # text prompts


def test_bad_settings_name_the_key():
    # the config validates itself (the key relative to it) ...
    for key, value in (
        ("grad_mode", "bptt"),
        ("order", "random"),
        ("learn", ["weights"]),
        ("round_forward", "ste"),
        ("round_init", 0.0),
    ):
        with pytest.raises(InvalidSetting, match=key) as err:
            aq.AccuQuantConfig(**{key: value})
        assert err.value.key == key
    # ... and converting the method's config node names the full key
    with pytest.raises(ConfigError, match="method.grad_mode"):
        typed({"grad_mode": "bptt"}, aq.AccuQuantConfig, "method")
    with pytest.raises(ConfigError, match="method.order"):
        typed({"order": "random"}, aq.AccuQuantConfig, "method")
    with pytest.raises(ConfigError, match="method.learn"):
        typed({"learn": ["weights"]}, aq.AccuQuantConfig, "method")


def test_method_records_metrics_and_group_table(tmp_path, monkeypatch):
    def fake_ptq(model, quant_cfg, ptq_cfg, ctx):  # the cached PTQ base, in miniature
        return MethodResult(quantize_tiny(model), quant_cfg, {"ptq_cached": False})

    monkeypatch.setattr(aq, "load_or_run_ptq", fake_ptq)
    torch.manual_seed(0)
    model = TinyDiffusion(steps=4)
    ctx = RunContext(run_dir=tmp_path, cache_dir=tmp_path / "cache", device=torch.device("cpu"))
    cfg = aq.AccuQuantConfig(group_size=2, iters_per_group=2, n_samples=8, batch_size=4)
    w4a4 = QuantConfig(name="w4a4", weight_bits=4, act_bits=4)
    out = run_method(METHODS.get("accuquant")(), model, w4a4, cfg, ctx)
    assert out.model is model and out.quant == w4a4
    m = out.metrics
    assert m["accuquant_groups"] == 2 and len(m["accuquant_group_losses"]) == 2
    assert m["accuquant_s"] > 0  # loss lowering: test_calibrating_a_group_lowers_its_loss
    assert all(math.isfinite(m[k]) for k in ("accuquant_loss_init", "accuquant_loss_final"))
    assert "ptq_cached" not in m  # the base's provenance is not the result's
    groups = json.loads(out.files["accuquant_groups.json"])["groups"]
    assert [g["start"] for g in groups] == [0, 2]
    table = out.tables["accuquant_groups"]
    assert [row[table.columns.index("start")] for row in table.rows] == [0, 2]

    # cached: the same model, quant and method config load the calibrated UNet and its metrics
    torch.manual_seed(0)
    again = TinyDiffusion(steps=4)
    ctx2 = RunContext(run_dir=tmp_path / "again", cache_dir=tmp_path / "cache", device=torch.device("cpu"))
    cached = run_method(METHODS.get("accuquant")(), again, w4a4, cfg, ctx2)
    assert m["accuquant_cached"] is False and cached.metrics["accuquant_cached"] is True
    assert cached.metrics["accuquant_group_losses"] == m["accuquant_group_losses"]
    assert cached.files == out.files and cached.tables == out.tables
    with torch.no_grad():
        assert torch.equal(again.sample_latents([0, 1], 5), model.sample_latents([0, 1], 5))


def test_accuquant_config_reuses_the_ptq_settings(make_cfg):
    from diffquant.quant.typed import as_dict

    aq_cfg = make_cfg(["quant=w4a4", "method=accuquant"], name="a")
    ptq_cfg = make_cfg(["quant=w4a4", "method=ptq"], name="p")
    assert as_dict(aq_cfg.method.ptq) == as_dict(ptq_cfg.method)
    exact = make_cfg(["quant=w4a4", "method=accuquant_exact"], name="e")
    assert exact.method.grad_mode == "exact" and exact.method.name == "accuquant"
    paper = make_cfg(["quant=w4a4", "method=accuquant_paper"], name="q")
    assert paper.method.name == "accuquant"


# ---------------------------------------------------------------------------- error analysis
def test_error_accumulation_curves_and_plot(tiny, tmp_path):
    model, _ = tiny
    res = erracc.measure_error_accumulation(model, n_samples=6, seed=0, batch_size=4, label="q")
    assert len(res.steps) == 6 and len(res.accumulated_error_mean) == 6
    # the first step starts from the same x_T: accumulated = step error there
    assert res.accumulated_error_mean[0] == pytest.approx(res.step_error_mean[0], rel=1e-6)
    assert res.accumulated_error_mean[-1] > 0
    with quant_state(model.denoiser, weights=False, acts=False):
        fp = erracc.measure_error_accumulation(model, n_samples=4, seed=0)
    assert max(fp.accumulated_error_mean) == 0 and max(fp.step_error_mean) == 0
    a, b = tmp_path / "a", tmp_path / "b"
    erracc.save(res, a)
    erracc.save(fp, b)
    assert (a / erracc.PLOT_FILE).stat().st_size > 0
    erracc.main(["plot", str(a), str(b), "--out", str(tmp_path / "both.png"), "--labels", "q", "fp"])
    assert (tmp_path / "both.png").stat().st_size > 0
