"""DiT's own sampler: ancestral DDPM with each sample's noise (``SeededDDPMScheduler``), the learned
variance (``model.learned_variance``) and guidance on the first ε channels only
(``model.guidance_channels``)."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDPMScheduler

from diffquant.methods.trajectory import check_scheduler
from diffquant.models.ddpm import SeededDDPMScheduler
from diffquant.models.loading import build_model
from diffquant.schema import typed_run_config
from diffquant.validation import ConfigError
from tiny_components import write_dit_folder

pytestmark = pytest.mark.usefixtures("one_thread")

SCHEDULE = dict(num_train_timesteps=1000, beta_schedule="linear", beta_start=0.0001, beta_end=0.02)
DIT_SAMPLER = [
    "model=dit_xl_2_256",
    "model.num_inference_steps=5",
    "model.guidance_scale=4.0",
    "model.guidance_channels=3",
]  # the rest of DiT's sampler is the config's: DDPM, learned range, linspace spacing


@pytest.mark.parametrize("variance_type", ["learned_range", "fixed_small", "fixed_large"])
def test_seeded_step_is_diffusers_step_with_the_given_noise(variance_type):
    ours = SeededDDPMScheduler(**SCHEDULE, variance_type=variance_type, timestep_spacing="linspace")
    theirs = DDPMScheduler(**SCHEDULE, variance_type=variance_type, timestep_spacing="linspace")
    ours.set_timesteps(50)
    theirs.set_timesteps(50)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, 8, 8, generator=g)
    channels = 8 if variance_type == "learned_range" else 4
    out = torch.randn(3, channels, 8, 8, generator=g)
    if channels == 8:
        out[:, 4:] = out[:, 4:].tanh()  # the variance interpolation lies in [-1, 1]
    for t in (int(theirs.timesteps[0]), int(theirs.timesteps[25]), 0):
        noise = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(t))
        a = ours.step(out, t, x, variance_noise=noise).prev_sample
        b = theirs.step(out, t, x, generator=torch.Generator().manual_seed(t)).prev_sample
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_linspace_spacing_is_dits_respacing():
    """DiT's ``space_timesteps(1000, "250")``: round(i · 999/249), i < 250."""
    s = SeededDDPMScheduler(**SCHEDULE, timestep_spacing="linspace")
    s.set_timesteps(250)
    frac, cur, dit = 999 / 249, 0.0, []
    for _ in range(250):
        dit.append(round(cur))
        cur += frac
    assert sorted(s.timesteps.tolist()) == dit


@pytest.fixture(scope="module")
def dit_model(tmp_path_factory):
    from conftest import compose_config

    folder = write_dit_folder(tmp_path_factory.mktemp("dit") / "dit")
    cfg = compose_config([*DIT_SAMPLER, f"model.pretrained={folder}"], tmp_path_factory.mktemp("o"))
    return build_model(typed_run_config(cfg).model)


def test_the_sampler_gets_eps_and_the_conditional_variance(dit_model):
    model = dit_model
    assert isinstance(model.scheduler, SeededDDPMScheduler) and model.sampler.learned_variance
    assert model.scheduler.config.variance_type == "learned_range"
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    cond = model.conditions([3, 7], seed=0)
    t = model.timesteps[1]
    with torch.no_grad():
        out = model.eps(x, t, cond)
        raw = model.spec.output(model.denoiser, model.denoiser_kwargs(x, t, cond))  # (4, 8, 8, 8)
    uncond, cond_rows = raw.chunk(2)
    assert out.shape == (2, 8, 8, 8)
    guided = uncond[:, :3] + 4.0 * (cond_rows[:, :3] - uncond[:, :3])
    torch.testing.assert_close(out[:, :3], guided)
    assert torch.equal(out[:, 3:4], cond_rows[:, 3:4])  # DiT guides 3 of the 4 channels
    assert torch.equal(out[:, 4:], cond_rows[:, 4:])  # the conditional rows' variance


def test_sampling_is_per_sample_and_uses_the_variance(dit_model):
    model = dit_model
    both = model.sample_latents([0, 1, 2, 3], seed=5)
    halves = torch.cat([model.sample_latents([0, 1], seed=5), model.sample_latents([2, 3], seed=5)])
    torch.testing.assert_close(both, halves, rtol=1e-5, atol=1e-6)  # the batch changes no sample
    assert not torch.allclose(both, model.sample_latents([0, 1, 2, 3], seed=6))
    check_scheduler(model)  # AccuQuant's chains can follow the FP chain's noise
    fixed = model.sampler.__class__(**{**model.sampler.__dict__, "learned_variance": False})
    own, model.sampler = model.sampler, fixed
    try:
        without = model.sample_latents([0, 1, 2, 3], seed=5)
    finally:
        model.sampler = own
    assert not torch.allclose(both, without, atol=1e-4)


def test_learned_variance_needs_a_variance_and_a_scheduler_that_reads_it(tmp_path, make_cfg):
    folder = write_dit_folder(tmp_path / "dit")
    ddim = make_cfg(
        [
            "model=dit_xl_2_256",
            f"model.pretrained={folder}",
            "model.learned_variance=true",
            "model.scheduler=DDIMScheduler",
            "model.num_inference_steps=3",
        ],
        name="ddim",
    )
    with pytest.raises(ValueError, match="variance_type=learned_range"):
        build_model(typed_run_config(ddim).model)
    with pytest.raises(ConfigError, match="guidance_channels=0 must be positive"):
        typed_run_config(make_cfg(["model=dit_digits", "model.guidance_channels=0"], name="zero"))
