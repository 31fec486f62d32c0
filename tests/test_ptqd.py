"""PTQD (``method=ptqd``): the noise statistics, and the corrected sampler step differing from the
uncorrected one exactly by the documented terms (DDIM at eta = 0 and eta > 0, PNDM)."""

import math

import pytest
import torch
from diffusers import PNDMScheduler

from diffquant.calib import CalibSettings, ReconSettings
from diffquant.context import RunContext
from diffquant.methods.ptq import PTQConfig
from diffquant.methods.ptqd import PTQDConfig, _Moments, build_correction
from diffquant.methods.result_cache import run_method
from diffquant.models.base import per_sample_randn
from diffquant.models.noise_correction import NoiseCorrection
from diffquant.quant import QuantConfig
from diffquant.registry import METHODS
from tiny_models import TinyDiffusion

torch.set_num_threads(1)

W4A8 = QuantConfig(name="w4a8", weight_bits=4, act_bits=8)
BASE = PTQConfig(
    calib=CalibSettings(n_samples=6, step_stride=2, batch_size=6),
    recon=ReconSettings(weight_iters=8, act_iters=4, batch_size=8, capture_batch_size=16),
    act_init_rows=16,
)


def correction(steps: int, channels: int = 4) -> NoiseCorrection:
    g = torch.Generator().manual_seed(3)
    return NoiseCorrection(
        k=[0.05 + 0.01 * i for i in range(steps)],
        bias=torch.randn(steps, channels, generator=g).mul(0.1).tolist(),
        sigma_q=[0.2] * steps,
    )


def _ddim_by_hand(model, eps, x, i, sigma, z):
    """x_prev = √ā_prev x̂_0 + √(1 − ā_prev − σ²) ε + σ z, x̂_0 = (x − √(1 − ā_t) ε) / √ā_t."""
    s = model.scheduler
    t = int(model.timesteps[i])
    prev = t - s.config.num_train_timesteps // s.num_inference_steps
    a_t = s.alphas_cumprod[t]
    a_prev = s.alphas_cumprod[prev] if prev >= 0 else s.final_alpha_cumprod
    x0 = (x - (1 - a_t).sqrt() * eps) / a_t.sqrt()
    return a_prev.sqrt() * x0 + (1 - a_prev - sigma**2).sqrt() * eps + sigma * z


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_corrected_ddim_step_differs_exactly_by_the_documented_terms(eta):
    model = TinyDiffusion()
    model.sampler.eta = eta
    corr = correction(len(model.timesteps))
    indices, seed, i = [0, 1, 2], 5, 2
    cond = model.conditions(indices, seed)
    x = model.initial_noise(indices, seed)
    with torch.no_grad():
        plain = model.step(x, i, cond, indices, seed)
        eps = model.eps(x, model.timesteps[i], cond)
        model.noise_correction = corr
        corrected = model.step(x, i, cond, indices, seed)
    b = torch.tensor(corr.bias[i]).view(1, -1, 1, 1)
    eps_c = (eps - b) / (1 + corr.k[i])
    s = model.scheduler
    t = int(model.timesteps[i])
    prev = t - s.config.num_train_timesteps // s.num_inference_steps
    var = float(s._get_variance(t, prev))
    sigma = eta * math.sqrt(var)
    a_t, a_prev = float(s.alphas_cumprod[t]), float(s.alphas_cumprod[prev])
    c = math.sqrt(1 - a_prev - sigma**2) - math.sqrt(a_prev * (1 - a_t) / a_t)
    sigma_new = math.sqrt(max(sigma**2 - (c * corr.sigma_q[i]) ** 2, 0.0))
    z = per_sample_randn(indices, seed, 2 + i, x.shape[1:])
    assert torch.allclose(plain, _ddim_by_hand(model, eps, x, i, sigma, z), atol=1e-5)
    assert torch.allclose(corrected, _ddim_by_hand(model, eps_c, x, i, sigma_new, z), atol=1e-5)
    if eta > 0:
        assert 0 < sigma_new < sigma  # the residual's variance came out of the sampler's noise
    assert not torch.allclose(corrected, plain, atol=1e-4)
    # a zero correction is no correction
    model.noise_correction = NoiseCorrection([0.0] * 6, [[0.0] * 4] * 6, [0.0] * 6)
    with torch.no_grad():
        assert torch.equal(model.step(x, i, cond, indices, seed), plain)


def test_schedulers_without_eta_get_the_output_correction_only():
    sched = PNDMScheduler(num_train_timesteps=1000, skip_prk_steps=True, steps_offset=1)
    model = TinyDiffusion(scheduler=sched)
    corr = correction(len(model.timesteps))
    assert not corr.calibrates_variance(model.scheduler, model._step_kwargs)
    assert corr.eta(model.scheduler, model._step_kwargs, 0, model.timesteps[0], 1.0) == 1.0
    eps = torch.randn(2, 4, 8, 8)
    assert torch.allclose(corr.correct(eps, 1), (eps - torch.tensor(corr.bias[1]).view(1, 4, 1, 1)) / 1.06)
    learned = torch.cat([eps, eps], dim=1)  # a learned-variance half is left alone
    assert torch.equal(corr.correct(learned, 1)[:, 4:], eps)


def test_noise_statistics_are_the_papers_estimators():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 4, 8, 8, generator=g)
    y = (
        0.07 * x
        + 0.3 * torch.randn(40, 4, 8, 8, generator=g)
        + torch.tensor([0.1, -0.2, 0.0, 0.05]).view(1, 4, 1, 1)
    )
    m = _Moments(4)
    m.add(x[:25], y[:25])
    m.add(x[25:], y[25:])
    k, bias, std = m.finish(4 * 8 * 8)
    xf, yf = x.flatten().double(), y.flatten().double()
    slope = ((xf - xf.mean()) * (yf - yf.mean())).sum() / ((xf - xf.mean()) ** 2).sum()  # OLS with intercept
    assert k == pytest.approx(float(slope), rel=1e-9)
    assert bias == pytest.approx(y.double().mean(dim=(0, 2, 3)).tolist(), rel=1e-9)
    residual = (y - max(k, 0.0) * x).double().flatten(1)
    assert std == pytest.approx(float(residual.std(dim=1).mean()), rel=1e-9)
    corr = build_correction([k, -0.1], [bias, bias], [std, std], PTQDConfig())
    assert corr.k == [pytest.approx(k), 0.0]  # a negative slope is not used
    assert corr.sigma_q[0] == pytest.approx(std / (1 + k))
    off = build_correction([k], [bias], [std], PTQDConfig(correct_bias=False, correct_variance=False))
    assert off.bias == [[0.0] * 4] and off.sigma_q == [0.0]


def test_ptqd_installs_its_correction_and_the_cache_restores_it(tmp_path):
    cfg = PTQDConfig(ptq=BASE, n_samples=6, batch_size=4)
    ctx = RunContext(run_dir=tmp_path, cache_dir=tmp_path / "cache", device=torch.device("cpu"))
    model = TinyDiffusion()
    model.sampler.eta = 1.0
    result = run_method(METHODS.get("ptqd")(), model, W4A8, cfg, ctx)
    assert result.metrics["ptqd_cached"] is False and result.metrics["ptqd_variance_calibrated"] is True
    assert model.noise_correction is not None and model.noise_correction.n_steps == len(model.timesteps)
    assert "ptqd_correction.json" in result.files and "recon_units" in result.metrics  # the base's
    with torch.no_grad():
        first = model.sample_latents([0, 1], 7)
    again = TinyDiffusion()
    again.sampler.eta = 1.0
    loaded = run_method(METHODS.get("ptqd")(), again, W4A8, cfg, ctx)
    assert loaded.metrics["ptqd_cached"] is True
    assert again.noise_correction == model.noise_correction
    with torch.no_grad():
        assert torch.equal(again.sample_latents([0, 1], 7), first)
