"""The Python API on a plain diffusers pipeline object built here (no Hydra, no config files)."""

from __future__ import annotations

import copy

import pytest
import torch

import diffquant
from diffquant.quant.modules import is_quant_layer
from diffquant.validation import ConfigError
from tiny_components import ddim, tiny_cond_unet, tiny_text_encoder, tiny_vae, write_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPTS = ["a zero", "a one", "a two", "a three"]
FAST_PTQ = {
    "calib": {"n_samples": 4, "batch_size": 4},
    "recon": {"weight_iters": 4, "act_iters": 2, "batch_size": 4, "capture_batch_size": 8},
    "act_init_rows": 16,
}


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    from diffusers import StableDiffusionPipeline

    torch.manual_seed(0)
    tokenizer = write_tokenizer(tmp_path_factory.mktemp("tok"))
    return StableDiffusionPipeline(
        vae=tiny_vae("kl", 4, 0.5, 3),
        text_encoder=tiny_text_encoder(tokenizer),
        tokenizer=tokenizer,
        unet=tiny_cond_unet(),
        scheduler=ddim(0.00085, 0.012),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def latents(pipe) -> torch.Tensor:
    g = torch.Generator().manual_seed(3)
    return pipe(
        PROMPTS[:2], num_inference_steps=4, guidance_scale=2.0, generator=g, output_type="latent"
    ).images


def test_quantize_a_diffusers_pipeline_in_place(pipeline, tmp_path):
    pipe = copy.deepcopy(pipeline)
    fp = latents(pipeline)
    out = diffquant.quantize(
        pipe,
        quant="w8a8",
        method="ptq",
        prompts=PROMPTS,
        num_inference_steps=4,
        guidance_scale=2.0,
        cache_dir=tmp_path / "c",
        output_dir=tmp_path / "o",
        **FAST_PTQ,
    )
    assert out is pipe
    n_layers = sum(isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)) for m in pipeline.unet.modules())
    assert sum(is_quant_layer(m) for m in pipe.unet.modules()) == n_layers
    assert not any(is_quant_layer(m) for m in pipe.vae.modules())
    result = pipe.diffquant_result
    assert result.metrics["n_quant_layers"] == n_layers and result.metrics["ptq_cached"] is False
    assert result.quant.name == "w8a8" and result.quant.weight_bits == 8
    q = latents(pipe)  # the pipeline's own sampler runs the quantized UNet
    assert not torch.equal(q, fp)
    assert (q - fp).pow(2).mean() < 0.05 * fp.pow(2).mean()  # W8A8 stays close to FP


def test_same_settings_load_the_cached_result(pipeline, tmp_path):
    kwargs = dict(
        quant="w4a8",
        method="ptq_minmax",
        prompts=PROMPTS,
        num_inference_steps=4,
        cache_dir=tmp_path / "c",
        output_dir=tmp_path / "o",
        calib={"n_samples": 4, "batch_size": 4},
    )
    first = diffquant.quantize(copy.deepcopy(pipeline), **kwargs)
    second = diffquant.quantize(copy.deepcopy(pipeline), **kwargs)
    assert second.diffquant_result.metrics["ptq_minmax_cached"] is True
    torch.testing.assert_close(latents(first), latents(second), rtol=0, atol=0)


def test_timestep_aware_method_routes_the_pipelines_positional_timestep(pipeline, tmp_path):
    pipe = diffquant.quantize(
        copy.deepcopy(pipeline),
        quant="w4a8",
        method="quest",
        prompts=PROMPTS,
        num_inference_steps=4,
        guidance_scale=2.0,
        cache_dir=tmp_path / "c",
        output_dir=tmp_path / "o",
        ptq=FAST_PTQ,
        tla_epochs=1,
        cma_epochs=1,
        samples_per_step=4,
        batch_size=4,
        timestep_init_rows=16,
        eval_rows=4,
        guard_samples=4,
    )
    assert pipe.diffquant_result.quant.timestep_aware
    assert torch.isfinite(latents(pipe)).all()


@pytest.mark.parametrize(
    "kwargs, needle",
    [
        ({"recon": {"wieght_iters": 3}}, "Did you mean method.recon.weight_iters?"),
        ({"recon": {"weight_iters": -1}}, "method.recon.weight_iters=-1 must be >= 0"),
        ({"quant": "w5x"}, "quant='w5x'"),
        ({"method": "ptqq"}, "Did you mean 'ptq'?"),
    ],
)
def test_bad_settings_fail_before_any_work_naming_the_key(pipeline, tmp_path, kwargs, needle):
    args = {
        "quant": "w8a8",
        "method": "ptq",
        "prompts": PROMPTS,
        "cache_dir": tmp_path / "c",
        "output_dir": tmp_path / "o",
        **kwargs,
    }
    with pytest.raises((ConfigError, KeyError)) as err:
        diffquant.quantize(copy.deepcopy(pipeline), **args)
    assert needle in str(err.value)
    assert not (tmp_path / "c").exists()


def test_text_to_image_pipeline_needs_prompts(pipeline, tmp_path):
    with pytest.raises(ValueError, match="prompts="):
        diffquant.quantize(
            copy.deepcopy(pipeline), quant="w8a8", method="ptq_minmax", cache_dir=tmp_path / "c"
        )
