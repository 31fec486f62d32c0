"""The embedded diffusion transformer ``dit_digits``: the shipped ``DiTPipeline`` folder, its roles,
an FP run end to end, and its training command."""

from __future__ import annotations

import json

import pytest
import torch

from diffquant.methods.quest import QuestConfig
from diffquant.models.loading import ZOO_DIR, MissingWeightsError, build_model
from diffquant.quant import QuantConfig, iter_quantizers, quantize_denoiser

DIT_DIGITS = ZOO_DIR / "dit_digits"
LDM_VAE = ZOO_DIR / "ldm_digits" / "vae"
needs_dit_digits = pytest.mark.skipif(
    not (DIT_DIGITS / "model_index.json").is_file(),
    reason="dit_digits not trained (python -m diffquant.zoo.train_dit dit_digits)",
)

pytestmark = pytest.mark.usefixtures("one_thread")


@needs_dit_digits
def test_shipped_dit_digits_is_a_small_dit_pipeline():
    from diffusers import DiTPipeline

    size_mb = sum(p.stat().st_size for p in DIT_DIGITS.rglob("*") if p.is_file()) / 2**20
    assert size_mb < 13.0, size_mb
    pipe = DiTPipeline.from_pretrained(DIT_DIGITS, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    config = pipe.transformer.config
    assert (config.patch_size, config.sample_size, config.in_channels, config.out_channels) == (2, 8, 4, 4)
    assert config.num_embeds_ada_norm == 10 and config.norm_type == "ada_norm_zero"
    assert sum(p.numel() for p in pipe.transformer.parameters()) <= 2_500_000
    assert pipe.scheduler.config.beta_schedule == "linear" and pipe.scheduler.config.steps_offset == 1
    assert pipe.get_label_ids(["7"]) == [7]
    images = pipe(class_labels=[7], num_inference_steps=2, guidance_scale=1.0, output_type="np").images
    assert images.shape == (1, 32, 32, 1)
    meta = json.loads((DIT_DIGITS / "diffquant.json").read_text())
    assert meta["family"] == "dit" and meta["null_class"] == 10
    assert meta["scaling_factor"] == pipe.vae.config.scaling_factor


@needs_dit_digits
def test_dit_digits_roles_and_quest_layers(make_cfg):
    """Roles of the shipped transformer: patch embedding first, proj_out_2 last, the adaLN
    modulation linears (6 blocks + the final one) as time projections; QuEST's CMA for ``dit`` is
    the MLPs and the q/k/v of every block; every layer is quantized."""
    model = build_model(make_cfg(["model=dit_digits"]).model)
    spec, denoiser = model.spec, model.denoiser
    blocks = range(6)
    assert spec.layers(denoiser, "first") == ["pos_embed.proj"]
    assert spec.layers(denoiser, "last") == ["proj_out_2"]
    assert spec.layers(denoiser, "time_projection") == [
        *(f"transformer_blocks.{b}.norm1.linear" for b in blocks),
        "proj_out_1",
    ]
    critical = spec.layers(denoiser, *QuestConfig().critical_roles_by_family["dit"])
    assert critical == [
        name
        for b in blocks
        for name in (
            *(f"transformer_blocks.{b}.attn1.to_{p}" for p in "qkv"),
            f"transformer_blocks.{b}.ff.net.0.proj",
            f"transformer_blocks.{b}.ff.net.2",
        )
    ]
    quantize_denoiser(denoiser, spec, QuantConfig(weight_bits=4, act_bits=8))
    n_layers = sum(isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)) for m in denoiser.modules())
    weight_quantizers = list(iter_quantizers(denoiser, "weight"))
    assert len(weight_quantizers) == n_layers


@needs_dit_digits
def test_dit_digits_fp_run_end_to_end(make_cfg):
    from diffquant.app import run

    metrics = run(
        make_cfg(["model=dit_digits", "logger=none", "evaluator.n_samples=20", "evaluator.batch_size=20"])
    )
    assert metrics["model"] == "dit_digits" and metrics["fid"] > 0 and metrics["fid_to_fp"] == 0.0


def test_missing_dit_digits_names_the_training_command(make_cfg):
    cfg = make_cfg(["model=dit_digits", "model.pretrained=zoo:not_trained"])
    with pytest.raises(MissingWeightsError, match="python -m diffquant.zoo.train_dit dit_digits"):
        build_model(cfg.model)


@pytest.mark.skipif(not (LDM_VAE / "config.json").is_file(), reason="ldm_digits not trained")
def test_training_command_writes_a_loadable_dit_pipeline(tmp_path, make_cfg):
    from diffquant.zoo.train_dit import main

    threads = torch.get_num_threads()
    result = main(["dit_digits", "--out", str(tmp_path), "--steps-scale", "0.002", "--vae", str(LDM_VAE)])
    assert torch.get_num_threads() == threads
    folder = tmp_path / "dit_digits"
    assert {p.name for p in folder.iterdir()} == {
        "transformer",
        "vae",
        "scheduler",
        "model_index.json",
        "diffquant.json",
    }
    assert result["dit_digits"]["train"]["transformer"]["steps"] == 8
    cfg = make_cfg(["model=dit_digits", f"model.pretrained={folder}", "model.num_inference_steps=2"])
    images, labels = build_model(cfg.model).sample([3, 14], seed=0)
    assert images.shape == (2, 1, 32, 32) and labels == [3, 4] and torch.isfinite(images).all()
