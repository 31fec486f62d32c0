"""Every real model config builds its model from tiny random-weight components of the same classes
(``model.pretrained=<tmp folder>``) and samples a small image, in full precision and at W8A8; absent
weights fail before any work, naming the command that gets them and the config key of a local path."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from diffquant.context import RunContext
from diffquant.methods.result_cache import run_method
from diffquant.models.loading import MissingWeightsError, build_model
from diffquant.quant import is_quant_layer
from diffquant.registry import METHODS
from diffquant.schema import typed_run_config
from tiny_components import (
    TINY_CHURCH_UNET,
    write_class_context_folder,
    write_dit_folder,
    write_ldm_folder,
    write_pixart_folder,
    write_sd_folder,
)

#: The papers' sampler settings each config must carry: (steps, guidance, eta, scheduler class or None).
PAPER_SAMPLERS = {
    "sd_v1_4": (50, 7.5, 0.0, "PNDMScheduler"),
    "ldm_celebahq": (200, 1.0, 0.0, None),
    "ldm_bedroom": (200, 1.0, 1.0, None),
    "ldm_church": (500, 1.0, 0.0, None),
    "ldm_imagenet": (20, 3.0, 0.0, None),
    "dit_xl_2_256": (250, 1.5, 0.0, "DDPMScheduler"),  # DiT's respaced DDPM, learned variance
    "pixart_alpha_512": (20, 4.5, 0.0, None),  # the checkpoint's DPM-Solver
}
REAL_MODELS = list(PAPER_SAMPLERS)
QUANT = [
    "method=ptq_minmax",
    "quant=w8a8",
    "method.calib.n_samples=1",
    "method.calib.batch_size=1",
    "method.act_init_rows=16",
]

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_folder(model: str, root: Path) -> tuple[Path, list[str]]:
    """Write tiny components for ``model`` under ``root``; return the folder and extra overrides."""
    folder = root / model
    if model == "sd_v1_4":
        from diffusers import PNDMScheduler

        write_sd_folder(
            folder,
            PNDMScheduler(
                beta_schedule="scaled_linear",
                beta_start=0.00085,
                beta_end=0.012,
                skip_prk_steps=True,
                set_alpha_to_one=False,
                steps_offset=1,
            ),
        )
        prompts = root / "captions.txt"
        prompts.write_text("a handwritten seven\nthe digit 1\n")
        return folder, [f"model.prompts={prompts}", "model.image_size=16"]
    if model == "ldm_imagenet":
        return write_class_context_folder(folder), []
    if model == "dit_xl_2_256":
        return write_dit_folder(folder), []
    if model == "pixart_alpha_512":
        prompts = root / "captions.txt"
        prompts.write_text("a handwritten seven\nthe digit 1\n")
        return write_pixart_folder(folder), [f"model.prompts={prompts}"]
    if model == "ldm_church":
        return write_ldm_folder(folder, "kl", TINY_CHURCH_UNET, scaling_factor=0.5), []
    return write_ldm_folder(folder, "vq"), []


def untouched_parts(model) -> list[torch.nn.Module]:
    """The FP components a method must leave alone (text encoder / class embedding, autoencoder)."""
    parts = [model.vae]
    for name in ("text_encoder", "class_embedder"):
        if hasattr(model, name):
            parts.append(getattr(model, name))
    return parts


@pytest.mark.parametrize("model_name", REAL_MODELS)
def test_config_carries_the_papers_sampler(model_name, make_cfg):
    cfg = make_cfg([f"model={model_name}"]).model
    steps, guidance, eta, scheduler = PAPER_SAMPLERS[model_name]
    assert (cfg.num_inference_steps, cfg.guidance_scale, cfg.eta) == (steps, guidance, eta)
    assert cfg.scheduler == scheduler
    if model_name == "dit_xl_2_256":  # DiT's sample.py: learned variance, guidance on 3 channels
        assert cfg.learned_variance and cfg.guidance_channels == 3
        assert cfg.scheduler_overrides == {"variance_type": "learned_range", "timestep_spacing": "linspace"}
    assert cfg.get_weights, "every real model names the command that gets its weights"


@pytest.mark.parametrize("model_name", REAL_MODELS)
def test_builds_from_tiny_components_and_samples_fp_and_w8a8(model_name, make_cfg, tmp_path):
    folder, extra = tiny_folder(model_name, tmp_path)
    cfg = make_cfg(
        [f"model={model_name}", f"model.pretrained={folder}", "model.num_inference_steps=2", *extra, *QUANT]
    )
    if model_name == "ldm_imagenet":
        assert cfg.model.num_classes == 1000
    model = build_model(cfg.model)
    images, labels = model.sample([0], seed=0)
    assert images.shape[0] == 1 and images.shape[-1] >= 16 and torch.isfinite(images).all()
    assert 0 <= images.min() and images.max() <= 1 and len(labels) == 1
    if model_name == "sd_v1_4":
        assert labels == ["a handwritten seven"] and images.shape[-1] == 16
    before = [{k: v.clone() for k, v in p.state_dict().items()} for p in untouched_parts(model)]

    ctx = RunContext(run_dir=tmp_path / "run", cache_dir=tmp_path / "cache", device=torch.device("cpu"))
    run = typed_run_config(cfg)
    result = run_method(METHODS.get("ptq_minmax")(), model, run.quant, run.method, ctx)
    assert result.model is model  # ptq_minmax's range_init (minmax) replaces the quant's inits
    assert result.quant == dataclasses.replace(run.quant, weight_init="minmax", act_init="minmax")
    assert result.metrics["n_quant_layers"] == sum(is_quant_layer(m) for m in model.denoiser.modules())
    assert sum(is_quant_layer(m) for m in model.denoiser.modules()) > 0
    q_images, _ = model.sample([0], seed=0)
    assert q_images.shape == images.shape and torch.isfinite(q_images).all()
    for part, state in zip(untouched_parts(model), before):
        assert not any(is_quant_layer(m) for m in part.modules())
        for k, v in part.state_dict().items():
            assert torch.equal(v, state[k]), f"{type(part).__name__}.{k} changed"


@pytest.mark.parametrize("model_name", REAL_MODELS)
def test_missing_weights_name_the_command_and_the_key(model_name, make_cfg, tmp_path):
    cfg = make_cfg([f"model={model_name}", f"model.pretrained={tmp_path / 'absent'}"])
    with pytest.raises(MissingWeightsError) as err:
        build_model(cfg.model)
    text = str(err.value)
    assert cfg.model.get_weights.split()[0] in text and "model.pretrained=" in text
    assert ("diffquant.models.convert" in text) or ("huggingface-cli download" in text)


def test_sd_hub_id_not_in_cache_names_the_download(make_cfg, tmp_path, monkeypatch):
    import huggingface_hub.constants as hf_constants

    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "empty_cache"))
    cfg = make_cfg(["model=sd_v1_4"])
    with pytest.raises(MissingWeightsError, match="huggingface-cli download CompVis/stable-diffusion-v1-4"):
        build_model(cfg.model)


def test_sd_missing_prompt_file_names_the_key_and_the_coco_command(make_cfg, tmp_path):
    folder, _ = tiny_folder("sd_v1_4", tmp_path)
    cfg = make_cfg(["model=sd_v1_4", f"model.pretrained={folder}", f"model.prompts={tmp_path / 'none.txt'}"])
    with pytest.raises(FileNotFoundError, match=r"model.prompts=.*diffquant.models.prompts coco"):
        build_model(cfg.model)
