"""The text-to-image path: caption vocabulary and prompts, the ``sd`` wrapper (checked against
diffusers' ``StableDiffusionPipeline``), the embedded ``sd_digits`` and its training command."""

from __future__ import annotations

import pytest
import torch

from diffquant.models.loading import ZOO_DIR, MissingWeightsError, build_model
from diffquant.zoo.captions import DIGIT_WORDS, PROMPTS_FILE, TEMPLATES, all_captions, label_of, prompt_lines
from diffquant.zoo.tokenizer import words_of
from tiny_components import write_sd_folder, write_tokenizer

SD_DIGITS = ZOO_DIR / "sd_digits"
EMBEDDED = [
    SD_DIGITS / "model_index.json",
    ZOO_DIR / "digits_clip" / "config.json",
    ZOO_DIR / "digits_classifier",
]
needs_embedded = pytest.mark.skipif(
    not all(p.exists() for p in EMBEDDED),
    reason="embedded weights not trained (python -m diffquant.zoo.train_sd all)",
)

pytestmark = pytest.mark.usefixtures("one_thread")


def test_every_caption_word_is_one_token(tmp_path):
    tokenizer = write_tokenizer(tmp_path)
    for caption in (c for row in all_captions() for c in row):
        ids = tokenizer(caption).input_ids
        assert len(ids) == len(words_of(caption)) + 2, caption  # start + one token per word + end
        assert tokenizer.decode(ids, skip_special_tokens=True).strip() == caption
    assert tokenizer.pad_token_id == tokenizer.eos_token_id and tokenizer.model_max_length == 16


def test_prompt_file_is_the_caption_set_cycling_the_ten_digits():
    lines = PROMPTS_FILE.read_text().splitlines()
    assert lines == prompt_lines() and len(lines) == 50
    assert [label_of(line) for line in lines] == [k % 10 for k in range(50)]
    assert label_of(TEMPLATES[1].format(word="x", n=7)) == 7 and DIGIT_WORDS[7] == "seven"


@pytest.fixture
def tiny_sd(tmp_path, make_cfg):
    folder = write_sd_folder(tmp_path / "sd", in_channels=1)
    cfg = make_cfg(["model=sd_digits", f"model.pretrained={folder}", "model.num_inference_steps=3"])
    return folder, build_model(cfg.model)


def test_unet_call_has_unconditional_rows_then_conditional_rows(tiny_sd):
    _, model = tiny_sd
    cond = model.conditions([0, 1, 52], seed=0)
    assert cond.labels == [prompt_lines()[0], prompt_lines()[1], prompt_lines()[2]]
    x = torch.randn(3, *model.latent_shape)
    kwargs = model.denoiser_kwargs(x, model.timesteps[0], cond)
    states = kwargs["encoder_hidden_states"]
    assert states.shape[0] == 6 and kwargs["timestep"].shape == (6,) and kwargs["sample"].shape[0] == 6
    empty = model.prompt_encoder([""])[0]
    for row in range(3):
        torch.testing.assert_close(states[row], empty)
        torch.testing.assert_close(states[3 + row], model.prompt_encoder([cond.labels[row]])[0])


def test_sampling_equals_stable_diffusion_pipeline(tiny_sd):
    from diffusers import StableDiffusionPipeline

    folder, model = tiny_sd
    pipe = StableDiffusionPipeline.from_pretrained(folder, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    indices = [3, 8]
    ours, prompts = model.sample(indices, seed=0)
    theirs = pipe(
        prompt=prompts,
        latents=model.initial_noise(indices, 0),
        num_inference_steps=3,
        guidance_scale=model.sampler.guidance_scale,
        output_type="pt",
    ).images
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-4)


def test_missing_embedded_weights_name_the_training_command(make_cfg):
    cfg = make_cfg(["model=sd_digits", "model.pretrained=zoo:not_trained"])
    with pytest.raises(MissingWeightsError, match="python -m diffquant.zoo.train_sd all"):
        build_model(cfg.model)


@pytest.mark.slow
def test_training_command_writes_a_loadable_pipeline(tmp_path, make_cfg):
    from diffquant.zoo.train_sd import main

    vae = write_sd_folder(tmp_path / "donor", in_channels=1) / "vae"  # any 1-channel f2 autoencoder
    main(["all", "--out", str(tmp_path / "w"), "--steps-scale", "0.002", "--threads", "1", "--vae", str(vae)])
    for part in (
        "unet",
        "vae",
        "text_encoder",
        "tokenizer",
        "scheduler",
        "model_index.json",
        "diffquant.json",
    ):
        assert (tmp_path / "w" / "sd_digits" / part).exists(), part
    assert (tmp_path / "w" / "digits_clip" / "preprocessor_config.json").is_file()
    cfg = make_cfg(
        ["model=sd_digits", f"model.pretrained={tmp_path / 'w' / 'sd_digits'}", "model.num_inference_steps=2"]
    )
    images, labels = build_model(cfg.model).sample([7], seed=0)
    assert images.shape[:2] == (1, 1) and labels == [prompt_lines()[7]]


@needs_embedded
def test_shipped_sd_digits_is_a_small_stable_diffusion_pipeline():
    from diffusers import StableDiffusionPipeline

    size_mb = sum(p.stat().st_size for p in SD_DIGITS.rglob("*") if p.is_file()) / 2**20
    assert size_mb < 9.0
    pipe = StableDiffusionPipeline.from_pretrained(SD_DIGITS, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    images = pipe("a handwritten seven", num_inference_steps=2, output_type="pt").images
    assert images.shape == (1, 1, 32, 32)


@needs_embedded
def test_sd_digits_fp_run_end_to_end(make_cfg):
    from diffquant.app import run

    metrics = run(
        make_cfg(
            [
                "model=sd_digits",
                "evaluator=clip_digits",
                "logger=none",
                "evaluator.n_samples=20",
                "evaluator.batch_size=20",
            ]
        )
    )
    assert metrics["model"] == "sd_digits" and metrics["fid"] > 0 and metrics["fid_to_fp"] == 0.0
    assert 0 < metrics["clip_score"] <= 100


def test_ptq_quest_and_accuquant_run_on_the_text_to_image_wrapper(tmp_path, make_cfg):
    """Tiny settings; the three share one cached PTQ base. Text encoder and VAE stay FP."""
    from diffquant.context import RunContext
    from diffquant.methods.result_cache import run_method
    from diffquant.quant import is_quant_layer
    from diffquant.registry import METHODS
    from diffquant.schema import typed_run_config

    folder = write_sd_folder(tmp_path / "sd", in_channels=1)
    recon = [
        "recon.weight_iters=2",
        "recon.act_iters=2",
        "recon.batch_size=4",
        "calib.n_samples=2",
        "calib.batch_size=2",
        "act_init_rows=16",
    ]
    settings = {
        "ptq": [f"method.{r}" for r in recon],
        "quest": [f"method.ptq.{r}" for r in recon]
        + [
            "method.tla_epochs=1",
            "method.cma_epochs=1",
            "method.samples_per_step=4",
            "method.batch_size=4",
            "method.timestep_init_rows=16",
            "method.eval_rows=8",
            "method.guard_samples=4",
        ],
        "accuquant": [f"method.ptq.{r}" for r in recon]
        + [
            "method.iters_per_group=2",
            "method.n_samples=2",
            "method.batch_size=2",
            "method.eval_batch_size=4",
            "method.guard_samples=4",
        ],
    }
    for method, extra in settings.items():
        cfg = make_cfg(
            [
                "model=sd_digits",
                f"model.pretrained={folder}",
                "model.num_inference_steps=4",
                f"method={method}",
                "quant=w4a8",
                *extra,
            ],
            name=method,
        )
        model = build_model(cfg.model)
        ctx = RunContext(run_dir=tmp_path / method, cache_dir=tmp_path / "cache", device=torch.device("cpu"))
        run = typed_run_config(cfg)
        result = run_method(METHODS.get(method)(), model, run.quant, run.method, ctx)
        assert result.model is model and result.quant.act_bits == 8, method
        images, _ = model.sample([0, 1], seed=0)
        assert torch.isfinite(images).all(), method
        assert any(is_quant_layer(m) for m in model.denoiser.modules())
        assert not any(is_quant_layer(m) for part in (model.vae, model.text_encoder) for m in part.modules())
    assert len([p for p in (tmp_path / "cache" / "ptq").iterdir() if p.is_dir()]) == 1  # shared
