"""``python -m diffquant.models.convert`` round-trips tiny CompVis checkpoints of every real layout.

A tiny diffusers model is written as a CompVis ``LatentDiffusion`` checkpoint (the inverse mapping
in :mod:`tiny_components`), converted back by the command, loaded through the real model config
(``model.pretrained=<out>``) and compared with the original. The CompVis attention and ResBlock
semantics the mapping relies on (per-head interleaved ``qkv``, a fixed head count, scale-shift norm,
average-pool / nearest resampling) are checked against direct re-statements of those blocks.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
import yaml

from diffquant.models.convert import main as convert_main
from diffquant.models.loading import build_model
from tiny_components import (
    TINY_CHURCH_UNET,
    TINY_CIN_UNET,
    TINY_LDM4_UNET,
    TINY_SD_UNET,
    compvis_original_config,
    ddim,
    randomize,
    tiny_text_encoder,
    tiny_unet2d,
    tiny_vae,
    to_compvis_checkpoint,
    write_tokenizer,
)

KL = "ldm.models.autoencoder.AutoencoderKL"
VQ = "ldm.models.autoencoder.VQModelInterface"

CASES = {
    "ldm_bedroom": dict(params=TINY_LDM4_UNET, vae="vq", target=VQ, betas=(0.0015, 0.0195), scale=None),
    "ldm_church": dict(params=TINY_CHURCH_UNET, vae="kl", target=KL, betas=(0.0015, 0.0155), scale=0.7),
    "ldm_imagenet": dict(params=TINY_CIN_UNET, vae="vq", target=VQ, betas=(0.0015, 0.0195), scale=None),
    "sd_v1_4": dict(params=TINY_SD_UNET, vae="kl", target=KL, betas=(0.00085, 0.012), scale=0.18215),
}

pytestmark = pytest.mark.usefixtures("one_thread")


def original_unet(case: dict, config: dict):
    """The tiny diffusers UNet the checkpoint is made from (architecture from the CompVis config)."""
    params = case["params"]
    if not params.get("use_spatial_transformer"):
        return randomize(tiny_unet2d(params), 1)
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import create_unet_diffusers_config_from_ldm

    unet_config = create_unet_diffusers_config_from_ldm(config, {})
    unet_config["sample_size"] = params["image_size"]
    return randomize(UNet2DConditionModel(**unet_config).eval(), 1)


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """{model: (out folder, originals)} for every case, converted once."""
    results = {}
    for model, case in CASES.items():
        tmp = tmp_path_factory.mktemp(model)
        torch.manual_seed(0)
        vae = randomize(tiny_vae(case["vae"], case["params"]["in_channels"]), 2)
        cond, cond_stage, extra_args, originals = {}, "__is_unconditional__", [], {}
        if model == "ldm_imagenet":
            embedding = torch.randn(11, TINY_CIN_UNET["context_dim"])
            cond = {"cond_stage_model.embedding.weight": embedding}
            cond_stage = {"target": "ldm.modules.encoders.modules.ClassEmbedder", "params": {"n_classes": 11}}
            originals["class_embedding"] = embedding
        if model == "sd_v1_4":
            clip_dir = tmp / "clip"
            tokenizer = write_tokenizer(clip_dir)
            text_encoder = randomize(tiny_text_encoder(tokenizer), 3)
            text_encoder.config.save_pretrained(clip_dir)
            cond = {"cond_stage_model.transformer." + k: v for k, v in text_encoder.state_dict().items()}
            cond_stage = {"target": "ldm.modules.encoders.modules.FrozenCLIPEmbedder"}
            extra_args = ["--clip", str(clip_dir)]
            originals["text_encoder"] = text_encoder
        config = compvis_original_config(case["params"], vae, case["target"], cond_stage, *case["betas"])
        unet = original_unet(case, config)
        ckpt = to_compvis_checkpoint(unet, case["params"], vae, *case["betas"], case["scale"], cond)
        torch.save(ckpt, tmp / "model.ckpt")
        (tmp / "config.yaml").write_text(yaml.safe_dump(config))
        out = tmp / "converted"
        convert_main(
            [
                model,
                "--ckpt",
                str(tmp / "model.ckpt"),
                "--out",
                str(out),
                "--original-config",
                str(tmp / "config.yaml"),
                "--image-size",
                "16",
                *extra_args,
            ]
        )
        results[model] = (out, {"unet": unet, "vae": vae, "state": ckpt["state_dict"], **originals})
    return results


def load(make_cfg, model: str, out, tmp_path):
    overrides = [f"model={model}", f"model.pretrained={out}", "model.num_inference_steps=2"]
    if model == "sd_v1_4":
        prompts = tmp_path / "prompts.txt"
        prompts.write_text("a handwritten seven\nthe digit 1\n")
        overrides += [f"model.prompts={prompts}", "model.image_size=16"]
    if model == "ldm_imagenet":
        overrides.append("model.num_classes=null")  # the tiny class embedder's 10 classes
    return build_model(make_cfg(overrides).model)


@pytest.mark.parametrize("model", list(CASES))
def test_checkpoint_round_trips_through_the_model_config(model, converted, make_cfg, tmp_path):
    out, orig = converted[model]
    wrapper = load(make_cfg, model, out, tmp_path)
    case = CASES[model]
    g = torch.Generator().manual_seed(5)
    c = case["params"]["in_channels"]
    x = torch.randn(2, c, 8, 8, generator=g)
    t = torch.tensor([10, 700])
    kwargs = {}
    if "context_dim" in case["params"]:
        kwargs["encoder_hidden_states"] = torch.randn(2, 3, case["params"]["context_dim"], generator=g)
    with torch.no_grad():
        expected = orig["unet"](x, t, **kwargs).sample
        got = wrapper.denoiser(x, t, **kwargs).sample
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
        z = torch.randn(2, c, 8, 8, generator=g)
        torch.testing.assert_close(
            wrapper.vae.decode(z).sample, orig["vae"].decode(z).sample, atol=1e-5, rtol=1e-5
        )
    # noise schedule, sampler and latent scale as the CompVis model samples
    betas = orig["state"]["betas"].float()
    torch.testing.assert_close(wrapper.scheduler.betas, betas, atol=1e-7, rtol=1e-4)
    sched = wrapper.scheduler.config
    assert sched.steps_offset == 1 and not sched.set_alpha_to_one
    assert wrapper.latent_scale == pytest.approx(case["scale"] or 1.0)
    if model == "sd_v1_4":
        assert type(wrapper.scheduler).__name__ == "PNDMScheduler" and sched.skip_prk_steps
        ids = wrapper.prompt_encoder.tokenizer(["the digit 1"], return_tensors="pt").input_ids
        with torch.no_grad():
            torch.testing.assert_close(wrapper.text_encoder(ids)[0], orig["text_encoder"](ids)[0])
    else:
        assert type(wrapper.scheduler).__name__ == "DDIMScheduler" and not sched.clip_sample
        assert sched.timestep_spacing == "leading"
    if model == "ldm_imagenet":
        torch.testing.assert_close(wrapper.class_embedder.embedding.weight, orig["class_embedding"])
        assert wrapper.num_classes == 10 and wrapper.class_embedder.null_class == 10
    if model == "ldm_church":
        from diffquant.models.compvis_unet import count_attention_heads

        assert set(count_attention_heads(wrapper.denoiser)) == {TINY_CHURCH_UNET["num_heads"]}


# ------------------------------------------------------------------------ CompVis block semantics
def compvis_attention_block(x, p: dict, heads: int):
    """CompVis ``AttentionBlock`` with legacy QKV order, restated: x ``(B, C, H, W)``."""
    b, c, h, w = x.shape
    flat = x.reshape(b, c, -1)
    qkv = F.conv1d(F.group_norm(flat, 32, p["norm.weight"], p["norm.bias"]), p["qkv.weight"], p["qkv.bias"])
    ch = c // heads
    q, k, v = qkv.reshape(b * heads, 3 * ch, -1).split(ch, dim=1)
    scale = 1 / math.sqrt(math.sqrt(ch))
    weight = torch.softmax(torch.einsum("bct,bcs->bts", q * scale, k * scale), dim=-1)
    a = torch.einsum("bts,bcs->bct", weight, v).reshape(b, c, -1)
    return (flat + F.conv1d(a, p["proj_out.weight"], p["proj_out.bias"])).reshape(b, c, h, w)


def compvis_resblock(x, emb, p: dict, down: bool = False, up: bool = False, scale_shift: bool = True):
    """CompVis ``ResBlock`` (optionally resampling, scale-shift norm), restated: x ``(B, C, H, W)``."""
    h = F.silu(F.group_norm(x, 32, p["in_layers.0.weight"], p["in_layers.0.bias"]))
    if down:
        h, x = F.avg_pool2d(h, 2), F.avg_pool2d(x, 2)
    if up:
        h, x = (
            F.interpolate(h, scale_factor=2, mode="nearest"),
            F.interpolate(x, scale_factor=2, mode="nearest"),
        )
    h = F.conv2d(h, p["in_layers.2.weight"], p["in_layers.2.bias"], padding=1)
    e = F.linear(F.silu(emb), p["emb_layers.1.weight"], p["emb_layers.1.bias"])[..., None, None]
    if scale_shift:
        scale, shift = e.chunk(2, dim=1)
        h = F.group_norm(h, 32, p["out_layers.0.weight"], p["out_layers.0.bias"]) * (1 + scale) + shift
    else:
        h = F.group_norm(h + e, 32, p["out_layers.0.weight"], p["out_layers.0.bias"])
    h = F.conv2d(F.silu(h), p["out_layers.3.weight"], p["out_layers.3.bias"], padding=1)
    skip = (
        F.conv2d(x, p["skip_connection.weight"], p["skip_connection.bias"])
        if "skip_connection.weight" in p
        else x
    )
    return skip + h


def block_params(state: dict, prefix: str) -> dict:
    prefix = "model.diffusion_model." + prefix + "."
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


@pytest.mark.parametrize("model, heads", [("ldm_bedroom", 64 // 16), ("ldm_church", 4)])
def test_converted_attention_matches_compvis_attention(model, heads, converted, make_cfg, tmp_path):
    out, orig = converted[model]
    unet = load(make_cfg, model, out, tmp_path).denoiser
    x = torch.randn(2, 64, 4, 4, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = compvis_attention_block(x, block_params(orig["state"], "middle_block.1"), heads)
        torch.testing.assert_close(unet.mid_block.attentions[0](x), expected, atol=1e-5, rtol=1e-5)


def test_converted_resampling_resblocks_match_compvis(converted, make_cfg, tmp_path):
    out, orig = converted["ldm_church"]
    unet = load(make_cfg, "ldm_church", out, tmp_path).denoiser
    g = torch.Generator().manual_seed(0)
    emb = torch.randn(2, 128, generator=g)
    with torch.no_grad():
        x = torch.randn(2, 32, 8, 8, generator=g)
        down = block_params(orig["state"], "input_blocks.2.0")  # level-0 ResBlock(down=True)
        torch.testing.assert_close(
            unet.down_blocks[0].downsamplers[0](x, emb),
            compvis_resblock(x, emb, down, down=True),
            atol=1e-5,
            rtol=1e-5,
        )
        x = torch.randn(2, 64, 2, 2, generator=g)
        up = block_params(orig["state"], "output_blocks.1.1")  # lowest level's ResBlock(up=True)
        torch.testing.assert_close(
            unet.up_blocks[0].upsamplers[0](x, emb),
            compvis_resblock(x, emb, up, up=True),
            atol=1e-5,
            rtol=1e-5,
        )


def test_ema_weights_are_used_when_asked(tmp_path):
    from diffquant.models.convert import unet_state

    state = {
        "model.diffusion_model.out.2.weight": torch.zeros(1),
        "model_ema.diffusion_modelout2weight": torch.ones(1),
    }
    assert unet_state(state, ema=False)["out.2.weight"].item() == 0
    assert unet_state(state, ema=True)["out.2.weight"].item() == 1
    with pytest.raises(KeyError, match="no EMA weights"):
        unet_state({"model.diffusion_model.out.2.weight": torch.zeros(1)}, ema=True)


def test_hub_celebahq_pipeline_is_relaid_as_an_ldm_folder(tmp_path, make_cfg):
    """``--hub`` (here a local LDMPipeline folder: unet, vqvae, scheduler) → unet/vae/scheduler,
    latent scale 1.0 and the CompVis DDIM settings."""
    from diffusers import LDMPipeline

    unet = tiny_unet2d(TINY_LDM4_UNET)
    vqvae = tiny_vae("vq", 3, scaling_factor=0.18215)  # VQModel's default scale, wrong for LDM-4
    LDMPipeline(vqvae=vqvae, unet=unet, scheduler=ddim()).save_pretrained(tmp_path / "hub")
    out = convert_main(["ldm_celebahq", "--hub", str(tmp_path / "hub"), "--out", str(tmp_path / "out")])
    cfg = make_cfg(["model=ldm_celebahq", f"model.pretrained={out}", "model.num_inference_steps=2"])
    model = build_model(cfg.model)
    assert model.latent_scale == 1.0 and model.vae.config.scaling_factor == 1.0
    assert model.scheduler.config.steps_offset == 1 and model.scheduler.config.timestep_spacing == "leading"
    images, _ = model.sample([0], seed=0)
    assert images.shape == (1, 3, 16, 16)


def test_random_folder_has_the_converted_architecture(converted, make_cfg, tmp_path):
    """``--random SEED``: the folder a checkpoint converts to, with seeded random weights (the
    same seed writes the same weights); it loads through the model config and samples. Models
    that need more than a UNet and an autoencoder are refused by name."""
    out_ckpt, _ = converted["ldm_bedroom"]
    config = out_ckpt.parent / "config.yaml"
    args = ["--original-config", str(config), "--image-size", "16"]
    a = convert_main(["ldm_bedroom", "--random", "3", "--out", str(tmp_path / "a"), *args])
    b = convert_main(["ldm_bedroom", "--random", "3", "--out", str(tmp_path / "b"), *args])
    ref, model = load(make_cfg, "ldm_bedroom", out_ckpt, tmp_path), load(make_cfg, "ldm_bedroom", a, tmp_path)
    assert json.loads((a / "diffquant.json").read_text())["random"] is True
    for part in ("denoiser", "vae"):
        mine, theirs = getattr(model, part), getattr(ref, part)
        assert type(mine) is type(theirs)
        assert {k: v.shape for k, v in mine.state_dict().items()} == {
            k: v.shape for k, v in theirs.state_dict().items()
        }
        assert not torch.equal(
            next(iter(mine.state_dict().values())), next(iter(theirs.state_dict().values()))
        )
    assert (a / "unet" / "diffusion_pytorch_model.safetensors").read_bytes() == (
        b / "unet" / "diffusion_pytorch_model.safetensors"
    ).read_bytes()
    assert model.scheduler.config.beta_start == ref.scheduler.config.beta_start
    images, _ = model.sample([0], seed=0)
    assert images.shape == (1, 3, 16, 16) and torch.isfinite(images).all()
    with pytest.raises(ValueError, match="ldm_imagenet is not a self-attention LDM"):
        convert_main(["ldm_imagenet", "--random", "0", "--out", str(tmp_path / "c")])
