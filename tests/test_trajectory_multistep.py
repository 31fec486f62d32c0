"""Trajectory calibration on samplers that keep state between steps (PNDM/PLMS, DPM-Solver++
multistep): the recorded FP trajectories are a plain diffusers sampling loop's, a rollout of the FP
model from the FP chain's state (and scheduler state) reproduces the FP states, the approximate
gradient keeps the history terms of a multistep update, and AccuQuant runs end to end — also as
``experiment=accuquant_sd`` (PNDM) on a tiny Stable Diffusion folder of the real classes."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, PNDMScheduler
from torch import nn

from diffquant.calib import observing_act_ranges
from diffquant.context import RunContext
from diffquant.methods import accuquant as aq
from diffquant.methods import trajectory as tj
from diffquant.methods.result_cache import run_method
from diffquant.models.base import DiffusionModel, SamplerSettings
from diffquant.models.denoiser import UNetSpec
from diffquant.quant import QuantConfig, quant_parameters, quantize_denoiser
from diffquant.quant.state import quant_state
from diffquant.registry import METHODS
from tiny_models import LATENT, N_CLASSES, TinyDiffusion, tiny_unet2d

SEED = 3
STEPS = 6
W4A4 = QuantConfig(name="t", weight_bits=4, act_bits=4)
SCHEDULE = dict(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)

pytestmark = pytest.mark.usefixtures("one_thread")


def pndm():
    """PLMS as Stable Diffusion samples it: 7 time steps for 6 steps, the second repeated."""
    return PNDMScheduler(**SCHEDULE, skip_prk_steps=True, set_alpha_to_one=False, steps_offset=1)


def dpm():
    return DPMSolverMultistepScheduler(**SCHEDULE, solver_order=2)


def dpm3():
    return DPMSolverMultistepScheduler(**SCHEDULE, solver_order=3, lower_order_final=False)


SCHEDULERS = {"pndm": pndm, "dpm2": dpm, "dpm3": dpm3}


def tiny(kind: str, quantized: bool = False) -> TinyDiffusion:
    torch.manual_seed(0)
    model = TinyDiffusion(steps=STEPS, scheduler=SCHEDULERS[kind]())
    if quantized:
        quantize_denoiser(model.denoiser, model.spec, W4A4, timesteps=model.timesteps)
        with observing_act_ranges(model.denoiser, "minmax"):
            model.sample_latents(list(range(8)), 123)
    return model


@torch.no_grad()
def diffusers_loop(model: TinyDiffusion, scheduler, indices: list[int]) -> list[torch.Tensor]:
    """The states of a plain diffusers sampling loop (the UNet called directly, CFG by hand)."""
    scheduler.set_timesteps(STEPS)
    labels = torch.tensor([i % N_CLASSES for i in indices])
    both = torch.cat([torch.full_like(labels, N_CLASSES), labels])
    x = model.initial_noise(indices, SEED)
    states = [x]
    with quant_state(model.denoiser, weights=False, acts=False):
        for t in scheduler.timesteps:
            e_u, e_c = model.denoiser(torch.cat([x, x]), t, class_labels=both).sample.chunk(2)
            x = scheduler.step(e_u + 2.0 * (e_c - e_u), t, x).prev_sample
            states.append(x)
    return states


# ---------------------------------------------------------------------------- (a) recording
@pytest.mark.parametrize("kind", list(SCHEDULERS))
def test_recorded_fp_trajectory_is_the_diffusers_loop(kind):
    model = tiny(kind, quantized=True)  # quantization is switched off while recording
    indices = list(range(6))
    traj = tj.fp_trajectories(model, indices, SEED, batch_size=4)
    reference = diffusers_loop(model, SCHEDULERS[kind](), indices)
    assert traj.n_steps == len(model.timesteps) == len(reference) - 1
    assert traj.outputs.shape[0] == traj.n_steps
    for i, state in enumerate(reference):
        torch.testing.assert_close(traj.states[i], state, rtol=1e-6, atol=1e-7, msg=f"state {i}")
    if kind == "pndm":  # 51 time steps for 50 steps in SD: here 7 for 6, the second repeated
        assert traj.n_steps == STEPS + 1 and model.timesteps[1] == model.timesteps[2]
    assert tj.keeps_state(model)


# ---------------------------------------------------------------------------- (b) FP rollouts
@pytest.mark.parametrize("kind", list(SCHEDULERS))
def test_fp_rollout_from_the_fp_chain_state_reproduces_the_fp_states(kind):
    model = tiny(kind, quantized=True)
    traj = tj.fp_trajectories(model, list(range(6)), SEED, batch_size=6)
    rows = [1, 4, 5]
    part = traj.rows(rows)
    with quant_state(model.denoiser, weights=False, acts=False), torch.no_grad():
        for start in range(traj.n_steps):
            for m in range(1, min(3, traj.n_steps - start) + 1):
                scheduler = tj.scheduler_at(model, traj, start, rows)
                out = tj.rollout(
                    model, part.states[start], start, m, part.cond, part.indices, SEED, scheduler
                )
                torch.testing.assert_close(
                    out,
                    part.states[start + m],
                    rtol=1e-6,
                    atol=1e-7,
                    msg=f"{kind}: steps {start}..{start + m - 1}",
                )
        # the group loss of the FP model is 0 for every group
        cal = aq.TrajectoryCalibration(model, aq.AccuQuantConfig(group_size=2, eval_batch_size=4))
        assert max(cal.all_group_losses(traj)) < 1e-12
        # a rollout from a fresh scheduler (no history) does not: the state is needed
        if traj.n_steps > 3:
            out = tj.rollout(
                model, part.states[3], 3, 1, part.cond, part.indices, SEED, tj.fresh_scheduler(model)
            )
            assert (out - part.states[4]).abs().max() > 1e-4
    with pytest.raises(ValueError, match="keeps state between steps"):
        tj.rollout(model, part.states[2], 2, 1, part.cond, part.indices, SEED)


def test_stochastic_samplers_are_rejected_deterministic_ones_pass():
    for scheduler in (pndm(), dpm(), DDIMScheduler(**SCHEDULE)):
        tj.check_scheduler(TinyDiffusion(steps=3, scheduler=scheduler))
    assert not tj.keeps_state(TinyDiffusion(steps=3))  # DDIM: nothing to replay
    with pytest.raises(ValueError, match="draws its own noise"):
        aq.TrajectoryCalibration(
            TinyDiffusion(steps=3, scheduler=DDPMScheduler(**SCHEDULE)), aq.AccuQuantConfig()
        )


# ---------------------------------------------------------------------------- gradients
def act_scales(model) -> list[nn.Parameter]:
    params = list(quant_parameters(model.denoiser, "act_scale", max_bits=15).values())
    for p in params:
        p.requires_grad_(True)
    return params


def grads(model, params, traj, start, m, mode):
    rows = traj.rows(range(4))
    scheduler = tj.scheduler_at(model, traj, start, range(4))
    return tj.gradient_of(
        params,
        lambda: tj.group_backward(
            model,
            mode,
            rows.states[start],
            start,
            m,
            rows.states[start + m],
            rows.cond,
            rows.indices,
            rows.seed,
            scheduler=scheduler,
        ),
    )


@pytest.mark.parametrize("kind", ["pndm", "dpm2"])
def test_multistep_group_size_one_approx_is_exact(kind):
    model = tiny(kind, quantized=True)
    traj = tj.fp_trajectories(model, list(range(6)), SEED)
    params = act_scales(model)
    for start in (0, 1, 2, 4):
        exact, approx = (
            grads(model, params, traj, start, 1, "exact"),
            grads(model, params, traj, start, 1, "approx"),
        )
        assert exact.abs().sum() > 0
        torch.testing.assert_close(approx, exact, rtol=1e-5, atol=1e-8)
    # M > 1: an approximation (the states' Jacobians), close but not equal
    agreement = tj.gradient_agreement(
        grads(model, params, traj, 2, 3, "exact"), grads(model, params, traj, 2, 3, "approx")
    )
    assert agreement["rel_error"] > 1e-4 and agreement["cosine"] > 0.5


class AdamsBashforth2:
    """A constructed two-step sampler ``x_{k+1} = x_k + c · (1.5 ε_k − 0.5 ε_{k−1})`` (Euler at
    the first step): its state Jacobian is the identity whenever ε does not depend on x, and its
    update reads the previous model output from its history."""

    init_noise_sigma = 1.0
    config: dict = {}

    def __init__(self, c: float = -0.2) -> None:
        self.c = c

    def set_timesteps(self, n: int) -> None:
        self.timesteps = torch.linspace(900, 100, n).long()
        self.history: list[torch.Tensor] = []

    def scale_model_input(self, x, t):
        return x

    def step(self, model_output, timestep, sample):
        update = model_output if not self.history else 1.5 * model_output - 0.5 * self.history[-1]
        self.history = [model_output]
        return SimpleNamespace(prev_sample=sample + self.c * update)


class DetachedInputUNet(nn.Module):
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


class IdentityJacobianMultistep(TinyDiffusion):
    spec = DetachedInputSpec()

    def __init__(self) -> None:
        DiffusionModel.__init__(
            self,
            "ab2",
            DetachedInputUNet(tiny_unet2d(0)),
            nn.Identity(),
            AdamsBashforth2(),
            SamplerSettings(5, 2.0, 0.0),
            LATENT,
            latent_scale=1.0,
        )


def test_approx_keeps_the_history_terms_of_a_multistep_update():
    """With identity state Jacobians the approximation is exact for a multistep sampler too —
    because it keeps ε_k's weight in the later steps of the group (−0.5 c), which dropping the
    history (only ∂x_{k+1}/∂ε_k = 1.5 c) would not."""
    torch.manual_seed(0)
    model = IdentityJacobianMultistep()
    quantize_denoiser(model.denoiser, model.spec, W4A4, timesteps=model.timesteps)
    with observing_act_ranges(model.denoiser, "minmax"):
        model.sample_latents(list(range(8)), 123)
    traj = tj.fp_trajectories(model, list(range(8)), SEED)
    assert tj.keeps_state(model)
    params = act_scales(model)
    for start, m in ((0, 3), (1, 3), (2, 2)):
        exact = grads(model, params, traj, start, m, "exact")
        approx = grads(model, params, traj, start, m, "approx")
        assert exact.norm() > 0
        torch.testing.assert_close(approx, exact, rtol=1e-4, atol=1e-7)


# ---------------------------------------------------------------------------- (c) end to end
@pytest.mark.parametrize(
    "kind, mode, start, order",
    [
        ("pndm", "approx", "fp", "interleaved"),
        ("pndm", "exact", "quant", "sequential"),
        ("dpm2", "approx", "quant", "interleaved"),
        ("dpm3", "exact", "fp", "sequential"),
    ],
)
def test_accuquant_runs_on_multistep_samplers(kind, mode, start, order):
    model = tiny(kind, quantized=True)
    traj = tj.fp_trajectories(model, list(range(8)), SEED)
    cfg = aq.AccuQuantConfig(
        group_size=3,
        grad_mode=mode,
        group_start=start,
        order=order,
        iters_per_group=2,
        n_samples=8,
        batch_size=4,
        act_lr=1e-3,
    )
    cal = aq.TrajectoryCalibration(model, cfg)
    initial = cal.all_group_losses(traj)
    reports = cal.run(traj)
    groups = [(s, tj.group_length(s, traj.n_steps, 3)) for s in tj.group_starts(traj.n_steps, 3)]
    assert [(r.start, r.length) for r in reports] == groups
    final = cal.all_group_losses(traj)
    assert all(torch.isfinite(torch.tensor(final))) and min(initial) > 0
    # finite reports; whether the calibrated model is kept is the method's guard's decision
    # (held-out trajectories, tests/test_guard.py), not the calibration loop's
    assert all(torch.isfinite(torch.tensor([r.loss_before, r.loss_after])).all() for r in reports)


def test_accuquant_sd_experiment_runs_at_tiny_scale(make_cfg, tmp_path):
    """``experiment=accuquant_sd`` (PNDM, guidance 7.5, the paper's quantizer and AccuQuant
    settings) on a tiny random Stable Diffusion folder, iterations cut: it used to fail before any
    work because PNDM keeps state between steps."""
    from diffquant.models.loading import build_model
    from diffquant.schema import typed_run_config
    from test_real_models import tiny_folder

    folder, extra = tiny_folder("sd_v1_4", tmp_path)
    cut = [
        "model.num_inference_steps=3",
        "method.n_samples=2",
        "method.batch_size=2",
        "method.eval_batch_size=2",
        "method.iters_per_group=2",
        "method.ptq.calib.n_samples=1",
        "method.ptq.calib.batch_size=1",
        "method.ptq.calib.n_steps=null",  # ptq_paper_sd's 25 of PNDM's 51 calls: all 4 here
        "method.ptq.act_init_rows=8",
        "method.ptq.act_init_batch_size=4",
        "method.ptq.act_running_batch_size=4",
        "method.ptq.recon.weight_iters=2",
        "method.ptq.recon.act_iters=1",
        "method.ptq.recon.batch_size=4",
        "method.ptq.recon.capture_batch_size=4",
        "method.ptq.recon.max_rows=8",
    ]
    cfg = make_cfg(["experiment=accuquant_sd", f"model.pretrained={folder}", *extra, *cut])
    assert cfg.model.scheduler == "PNDMScheduler" and cfg.method.name == "accuquant"
    model = build_model(cfg.model)
    assert type(model.scheduler).__name__ == "PNDMScheduler" and len(model.timesteps) == 4
    run = typed_run_config(cfg)
    ctx = RunContext(run_dir=tmp_path / "run", cache_dir=tmp_path / "cache", device=torch.device("cpu"))
    result = run_method(METHODS.get("accuquant")(), model, run.quant, run.method, ctx)
    m = result.metrics
    assert m["accuquant_groups"] == 2  # 4 sampler steps in groups of 2
    assert all(v == v for v in m["accuquant_group_losses"])  # finite, not NaN
    images, _ = model.sample([0], seed=0)
    assert torch.isfinite(images).all()


def test_error_accumulation_keeps_each_chains_scheduler():
    """The error-accumulation analysis runs three chains (FP, quantized on the FP state,
    quantized): with a multistep sampler each needs its own scheduler state, else the FP model's
    own errors are not 0."""
    from diffquant.analysis import error_accumulation as erracc

    model = tiny("pndm", quantized=True)
    with quant_state(model.denoiser, weights=False, acts=False):
        fp = erracc.measure_error_accumulation(model, n_samples=4, seed=0)
    assert len(fp.steps) == STEPS + 1
    assert max(fp.accumulated_error_mean) == 0 and max(fp.step_error_mean) == 0
    q = erracc.measure_error_accumulation(model, n_samples=4, seed=0)
    assert q.accumulated_error_mean[0] == pytest.approx(q.step_error_mean[0], rel=1e-6)


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_a_chain_step_is_the_models_step_with_its_noise(eta):
    """A chain's step (its scheduler recorded and swapped in) takes DDIM's eta and the samples'
    own noise exactly as ``model.step`` does: the two give the same state bit for bit."""
    torch.manual_seed(0)
    model = TinyDiffusion(steps=STEPS)
    model.sampler.eta = eta
    cond = model.conditions([0, 1], SEED)
    x = model.initial_noise([0, 1], SEED)
    with torch.no_grad():
        direct = model.step(x, 1, cond, [0, 1], SEED)
        outputs: list[torch.Tensor] = []
        chained = tj.chain_step(model, tj.fresh_scheduler(model), x, 1, cond, [0, 1], SEED, outputs)
    assert len(outputs) == 1 and torch.equal(direct, chained)
    if eta > 0:  # the noise is in: without it the step differs
        model.sampler.eta = 0.0
        with torch.no_grad():
            assert not torch.allclose(direct, model.step(x, 1, cond, [0, 1], SEED))
