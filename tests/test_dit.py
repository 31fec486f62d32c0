"""Transformer denoisers: the ``dit`` (class-conditional) and ``pixart`` (text-to-image) families on
tiny random-weight ``DiTTransformer2DModel`` / ``PixArtTransformer2DModel`` of the real classes, and
the dynamic per-token activation option (``quant.act_dynamic_per_token``) every family can use.

Roles resolve to the expected layers; every Linear / Conv2d and every attention matmul is quantized
exactly once; W8A8 stays close to FP; the learned-sigma half of the output never reaches the
sampler; the real configs fail before any work naming the command that gets their weights, and run
end to end on tiny folders with every method. The full-size forwards are marked ``slow``.
"""

from __future__ import annotations

import resource
from collections import Counter
from pathlib import Path

import pytest
import torch

from conftest import run_cli
from diffquant.app import run
from diffquant.calib.ranges import observing_act_ranges
from diffquant.models.denoiser import DIT, PIXART
from diffquant.models.loading import MissingWeightsError, build_model
from diffquant.quant import (
    ActQuantizer,
    QuantConfig,
    TokenActQuantizer,
    iter_quantizers,
    quant_parameters,
    quant_state,
    quantize_denoiser,
)
from diffquant.quant.attention import is_quant_attention
from diffquant.validation import InvalidSetting
from tiny_components import TEXT_DIM, randomize, tiny_dit, tiny_pixart

pytestmark = pytest.mark.usefixtures("one_thread")

BLOCKS = (0, 1)
QKV = [f"transformer_blocks.{b}.attn1.to_{p}" for b in BLOCKS for p in "qkv"]
FF = [f"transformer_blocks.{b}.ff.net.{p}" for b in BLOCKS for p in ("0.proj", "2")]


# ---------------------------------------------------------------------------- helpers
def tiny(family: str) -> tuple[torch.nn.Module, object]:
    """A tiny random denoiser of ``family`` and its spec."""
    torch.manual_seed(0)
    if family == "dit":
        return randomize(tiny_dit(), 0), DIT
    return randomize(tiny_pixart(), 0), PIXART


def call_batch(family: str, n: int = 4, seed: int = 0) -> dict[str, torch.Tensor]:
    """Keyword arguments of one denoiser call: latents (n, 4, 8, 8), time steps (n,), conditions."""
    g = torch.Generator().manual_seed(seed)
    batch = {
        "hidden_states": torch.randn(n, 4, 8, 8, generator=g),
        "timestep": torch.linspace(999, 1, n).long(),
    }
    if family == "dit":
        batch["class_labels"] = torch.tensor([3, 1000, 7, 1000][:n])
    else:
        batch["encoder_hidden_states"] = torch.randn(n, 6, TEXT_DIM, generator=g)
        mask = torch.ones(n, 6, dtype=torch.long)
        mask[:, 4:] = 0  # padded tokens, as the T5 prompt encoder's mask has them
        batch["encoder_attention_mask"] = mask
    return batch


def n_layers(module: torch.nn.Module) -> int:
    return sum(isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)) for m in module.modules())


def n_attention(module: torch.nn.Module) -> int:
    from diffusers.models.attention_processor import Attention

    return sum(isinstance(m, Attention) for m in module.modules())


def quantize_calibrated(family: str, **quant: object) -> tuple[torch.nn.Module, object, object]:
    """A tiny denoiser quantized with ``quant`` (min-max ranges from two batches of random calls)."""
    model, spec = tiny(family)
    cfg = QuantConfig(weight_init="minmax", act_init="minmax", **quant)
    summary = quantize_denoiser(model, spec, cfg)
    with torch.no_grad(), observing_act_ranges(model, "minmax"), quant_state(model, weights=False):
        for seed in (1, 2):
            spec.forward(model, call_batch(family, seed=seed))
    return model, spec, summary


# ---------------------------------------------------------------------------- roles
def test_dit_roles_resolve():
    model, spec = tiny("dit")
    assert spec.layers(model, "first") == ["pos_embed.proj"]
    assert spec.layers(model, "last") == ["proj_out_2"]
    assert spec.layers(model, "time_embedding") == [
        f"transformer_blocks.{b}.norm1.emb.timestep_embedder.linear_{i}" for b in BLOCKS for i in (1, 2)
    ]
    assert spec.layers(model, "time_projection") == [
        "transformer_blocks.0.norm1.linear",
        "transformer_blocks.1.norm1.linear",
        "proj_out_1",
    ]
    assert spec.layers(model, "self_attention_qkv") == QKV
    assert spec.layers(model, "attention_out") == [f"transformer_blocks.{b}.attn1.to_out.0" for b in BLOCKS]
    assert spec.layers(model, "feed_forward") == FF
    assert spec.layers(model, "cross_attention_q", "cross_attention_kv") == []
    units = [n for n, m in model.named_modules() if spec.unit_kind(m) == "transformer"]
    assert units == ["transformer_blocks.0", "transformer_blocks.1"]
    assert spec.layer_type("transformer_blocks.1.attn1.to_q") == "attn1.to_q"


def test_pixart_roles_resolve():
    model, spec = tiny("pixart")
    assert spec.layers(model, "first", "last") == ["pos_embed.proj", "proj_out"]
    assert spec.layers(model, "time_embedding") == [
        "adaln_single.emb.timestep_embedder.linear_1",
        "adaln_single.emb.timestep_embedder.linear_2",
    ]
    assert spec.layers(model, "time_projection") == ["adaln_single.linear"]
    assert spec.layers(model, "self_attention_qkv") == QKV
    assert spec.layers(model, "cross_attention_q") == [f"transformer_blocks.{b}.attn2.to_q" for b in BLOCKS]
    assert spec.layers(model, "cross_attention_kv") == [
        f"transformer_blocks.{b}.attn2.to_{p}" for b in BLOCKS for p in "kv"
    ]
    assert spec.layers(model, "attention_out") == [
        f"transformer_blocks.{b}.attn{a}.to_out.0" for b in BLOCKS for a in (1, 2)
    ]
    assert spec.layers(model, "feed_forward") == FF
    assert spec.timestep(("x", "c", torch.tensor([5])), {}).item() == 5  # forward(hidden, ehs, t)


@pytest.mark.parametrize("family", ["dit", "pixart"])
def test_learned_sigma_half_never_reaches_the_sampler(family):
    model, spec = tiny(family)
    batch = call_batch(family)
    with torch.no_grad():
        raw = model(**batch).sample
        eps = spec.forward(model, batch)
    assert raw.shape == (4, 8, 8, 8) and eps.shape == (4, 4, 8, 8)
    assert torch.equal(eps, raw[:, :4])


# ---------------------------------------------------------------------------- quantization
@pytest.mark.parametrize("family", ["dit", "pixart"])
@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "per_token"])
def test_every_layer_and_attention_matmul_is_quantized_exactly_once(family, dynamic):
    fp_layers, fp_attention = n_layers(tiny(family)[0]), n_attention(tiny(family)[0])
    model, spec, summary = quantize_calibrated(
        family, weight_bits=8, act_bits=8, act_dynamic_per_token=dynamic
    )
    assert summary.n_quant_layers == fp_layers == (21 if family == "dit" else 27)
    assert summary.attention == fp_attention == (2 if family == "dit" else 4)
    assert sum(is_quant_attention(m) for m in model.modules()) == fp_attention
    quantizers = dict(iter_quantizers(model))
    # a weight and an input quantizer per layer; q, k, v and softmax quantizers per attention
    assert len(quantizers) == 2 * fp_layers + 4 * fp_attention
    # each quantizer runs exactly once per call of the layer / attention that owns it (DiT's final
    # modulation reuses block 0's time-step embedder: those layers run twice, and so do theirs)
    owner = {n: n.rsplit(".", 2 if ".processor." in n else 1)[0] for n in quantizers}
    watched = {**quantizers, **{o: model.get_submodule(o) for o in owner.values()}}
    calls: Counter[str] = Counter()
    handles = [
        m.register_forward_hook(lambda m, a, o, name=name: calls.update([name]))
        for name, m in watched.items()
    ]
    with torch.no_grad():
        spec.forward(model, call_batch(family, n=2))
    for h in handles:
        h.remove()
    assert all(calls[n] == calls[owner[n]] >= 1 for n in quantizers), calls
    twice = sorted({owner[n] for n in quantizers if calls[n] == 2})
    if family == "dit":
        assert twice == [f"transformer_blocks.0.norm1.emb.timestep_embedder.linear_{i}" for i in (1, 2)]
    else:
        assert twice == []
    token = [n for n, q in quantizers.items() if isinstance(q, TokenActQuantizer)]
    if dynamic:  # every layer input and q, k, v; the softmax quantizers stay static
        assert len(token) == fp_layers + 3 * fp_attention
        assert all(n.endswith("prob_quantizer") for n, _ in iter_quantizers(model, "act"))
    else:
        assert token == []


@pytest.mark.parametrize("family", ["dit", "pixart"])
@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "per_token"])
def test_w8a8_output_is_close_to_fp(family, dynamic):
    """Relative L2 error of ε below 5% at W8A8 (min-max ranges; measured 1.3-2.5%)."""
    model, spec, _ = quantize_calibrated(family, weight_bits=8, act_bits=8, act_dynamic_per_token=dynamic)
    batch = call_batch(family, seed=3)
    with torch.no_grad():
        with quant_state(model, weights=False, acts=False):
            fp = spec.forward(model, batch)
        q = spec.forward(model, batch)
    rel = float((q - fp).norm() / fp.norm())
    assert 0 < rel < 0.05, rel


# ---------------------------------------------------------------------------- dynamic per-token
def test_token_quantizer_gives_each_token_its_own_grid():
    q = TokenActQuantizer(8)
    x = torch.randn(2, 5, 16)
    x[0, 0] *= 1000.0  # one huge token: a per-tensor grid would flatten every other token
    y = q(x)
    lo, hi = x.amin(-1, keepdim=True).clamp(max=0), x.amax(-1, keepdim=True).clamp(min=0)
    step = (hi - lo) / 255
    assert ((y - x).abs() <= step / 2 + 1e-6).all()
    small = (y - x)[1].abs().max()
    assert small < 0.05 and small > 0  # per tensor, the step would be ~ 1000·range/255
    conv_in = torch.randn(2, 3, 4, 4)  # 4-D: a token is a position (b, :, h, w)
    out = q(conv_in)
    per_pos = (conv_in.amax(1, keepdim=True).clamp(min=0) - conv_in.amin(1, keepdim=True).clamp(max=0)) / 255
    assert ((out - conv_in).abs() <= per_pos / 2 + 1e-6).all()
    with quant_state(torch.nn.Sequential(q), acts=False):
        assert torch.equal(q(x), x)


def test_token_quantizer_passes_gradients_straight_through():
    x = torch.randn(3, 8, requires_grad=True)
    TokenActQuantizer(4)(x).sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))


def test_per_token_quantizers_have_no_step_size_to_calibrate_or_learn():
    model, spec, _ = quantize_calibrated("pixart", weight_bits=8, act_bits=8, act_dynamic_per_token=True)
    dynamic = list(iter_quantizers(model, "dynamic"))
    static = list(iter_quantizers(model, "act"))
    assert len(dynamic) == 27 + 3 * 4 and all(q.dynamic for _, q in dynamic)
    assert len(static) == 4 and all(type(q) is ActQuantizer for _, q in static)  # softmax
    # LSQ / QuEST / AccuQuant learn what quant_parameters lists: the softmax step sizes only
    scales = quant_parameters(model, "act_scale")
    assert sorted(scales) == sorted(f"{n}.scale" for n, _ in static)
    before = {n: q.scale.clone() for n, q in dynamic}
    with observing_act_ranges(model, "minmax"), torch.no_grad():  # observation ignores them
        spec.forward(model, call_batch("pixart"))
    assert all(torch.equal(q.scale, before[n]) and q._observer is None for n, q in dynamic)
    with pytest.raises(RuntimeError, match="no fixed range"):
        dynamic[0][1].set_range(torch.zeros(1), torch.ones(1))


@pytest.mark.parametrize(
    "extra, key",
    [({"act_per_channel": True}, "act_per_channel"), ({"act_running_stat": True}, "act_running_stat")],
)
def test_per_token_option_refuses_static_range_options(extra, key):
    with pytest.raises(InvalidSetting, match=rf"{key}.*act_dynamic_per_token"):
        QuantConfig(weight_bits=8, act_bits=8, act_dynamic_per_token=True, **extra)


def test_per_token_option_is_left_out_of_cache_keys_when_off():
    from diffquant.quant.config import quant_key

    assert "act_dynamic_per_token" not in quant_key(QuantConfig(weight_bits=8, act_bits=8))
    assert quant_key(QuantConfig(weight_bits=8, act_bits=8, act_dynamic_per_token=True))[
        "act_dynamic_per_token"
    ]


# ---------------------------------------------------------------------------- the real configs
REAL = {
    "dit_xl_2_256": ("dit", 250, 1.5, "huggingface-cli download facebook/DiT-XL-2-256"),
    "pixart_alpha_512": ("pixart", 20, 4.5, "huggingface-cli download PixArt-alpha/PixArt-XL-2-512x512"),
}


@pytest.mark.parametrize("name", list(REAL))
def test_real_config_carries_the_papers_sampler(name, make_cfg):
    family, steps, guidance, _ = REAL[name]
    cfg = make_cfg([f"model={name}"]).model
    assert (cfg.family, cfg.num_inference_steps, cfg.guidance_scale) == (family, steps, guidance)


@pytest.mark.parametrize("name", list(REAL))
def test_missing_weights_fail_before_any_work_naming_the_command(name, make_cfg, tmp_path):
    command = REAL[name][3]
    cfg = make_cfg([f"model={name}", f"model.pretrained={tmp_path / 'absent'}"])
    with pytest.raises(MissingWeightsError, match="model.pretrained=") as err:
        build_model(cfg.model)
    assert command in str(err.value)


def test_run_py_without_weights_names_the_command(tmp_path):
    """`python run.py model=dit_xl_2_256` on a machine without the weights: fails first thing."""
    proc = run_cli(
        ["model=dit_xl_2_256", "logger=none", f"hydra.run.dir={tmp_path / 'run'}"],
        env={"DIFFQUANT_ROOT": str(tmp_path)},
    )
    assert proc.returncode != 0
    assert REAL["dit_xl_2_256"][3] in proc.stderr + proc.stdout
    assert "FP reference" not in proc.stderr + proc.stdout and not (tmp_path / "cache").exists()


# ---------------------------------------------------------------------------- end to end
def tiny_overrides(name: str, root: Path) -> list[str]:
    """Overrides that point ``model=name`` at a tiny random folder, with a small evaluation."""
    from test_real_models import tiny_folder

    folder, extra = tiny_folder(name, root)
    return [
        f"model={name}",
        f"model.pretrained={folder}",
        "model.num_inference_steps=4",
        *extra,
        "evaluator.n_samples=8",
        "evaluator.batch_size=8",
        "evaluator.chunk_size=8",
        "logger=none",
    ]


CALIB = ["method.calib.n_samples=2", "method.calib.batch_size=2", "method.act_init_rows=16"]
RECON = ["method.recon.weight_iters=2", "method.recon.act_iters=2", "method.recon.batch_size=8"]
QUEST = [
    "method.tla_epochs=1",
    "method.cma_epochs=1",
    "method.samples_per_step=4",
    "method.batch_size=4",
    "method.timestep_init_rows=16",
    "method.eval_rows=4",
    "method.guard_samples=2",
]
ACCUQUANT = [
    "method.group_size=2",
    "method.iters_per_group=2",
    "method.n_samples=4",
    "method.batch_size=2",
    "method.guard_samples=2",
    "method.eval_batch_size=4",
]


def ptq_of(method: str, options: list[str]) -> list[str]:
    return [f"method.ptq.{o[len('method.') :]}" for o in options] if method != "ptq" else options


@pytest.mark.parametrize("name", list(REAL))
def test_tiny_folder_runs_end_to_end(name, make_cfg, tmp_path):
    metrics = run(make_cfg([*tiny_overrides(name, tmp_path), "quant=w8a8", "method=ptq_minmax", *CALIB]))
    family = REAL[name][0]
    assert metrics["model"] == name and metrics["method"] == "ptq_minmax"
    assert metrics["n_quant_layers"] == (21 if family == "dit" else 27)
    assert metrics["n_quant_attention"] == (2 if family == "dit" else 4)
    assert metrics["fid_to_fp"] >= 0.0


def test_per_token_result_is_cached_and_reloaded(make_cfg, tmp_path):
    """A per-token model saved to the result cache loads back as the same model (same images)."""
    overrides = [
        *tiny_overrides("pixart_alpha_512", tmp_path),
        "quant=w8a8",
        "quant.act_dynamic_per_token=true",
        "method=ptq_minmax",
        *CALIB,
    ]
    first = run(make_cfg(overrides, name="first"))
    again = run(make_cfg(overrides, name="again"))
    static = run(make_cfg([o for o in overrides if o != "quant.act_dynamic_per_token=true"], name="static"))
    assert first["ptq_minmax_cached"] is False and again["ptq_minmax_cached"] is True
    assert again["fid_to_fp"] == first["fid_to_fp"]
    assert static["ptq_minmax_cached"] is False  # the option is part of the result's key


@pytest.mark.parametrize(
    "name, method, quant",
    [
        ("dit_xl_2_256", "ptq", ["quant=w4a8"]),
        ("pixart_alpha_512", "ptq", ["quant=w4a8", "quant.act_dynamic_per_token=true"]),
        ("dit_xl_2_256", "quest", ["quant=w4a8", "quant.act_dynamic_per_token=true"]),
        ("pixart_alpha_512", "quest", ["quant=w4a8"]),
        ("dit_xl_2_256", "accuquant", ["quant=w4a8", "quant.act_dynamic_per_token=true"]),
    ],
)
def test_methods_run_through_the_roles(name, method, quant, make_cfg, tmp_path):
    extra = {"ptq": [], "quest": QUEST, "accuquant": ACCUQUANT}[method]
    options = [*ptq_of(method, CALIB + RECON), *extra]
    metrics = run(make_cfg([*tiny_overrides(name, tmp_path), *quant, f"method={method}", *options]))
    dit = REAL[name][0] == "dit"
    assert metrics["n_quant_layers"] == (21 if dit else 27)
    if method == "ptq":  # the two blocks are units; the layers outside them are their own
        outside = 3 if dit else 7  # pos_embed.proj, proj_out_1/2 | + adaln_single (3), caption_projection (2)
        assert metrics["recon_units"] == 2 + outside
    if method == "quest":  # TLA: the adaLN modulations; CMA per block: dit q/k/v + 2 MLP
        assert metrics["tla_n_layers"] == (3 if dit else 1)  # linears; pixart q/k/v, cross q, 2 MLP
        assert metrics["cma_n_layers"] == (10 if dit else 12)
    assert metrics["fid_to_fp"] >= 0.0


# ---------------------------------------------------------------------------- full size (slow)
def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


@pytest.mark.slow
@pytest.mark.parametrize("family", ["dit", "pixart"])
def test_full_size_forward_through_the_quantized_wrapper(family):
    """DiT-XL/2 256 (675M; 750M in diffusers' layout, which repeats the time-step and class
    embedders in every block) and PixArt-α 512 (611M) with random weights, W8A8 per-token (only the
    static softmax ranges are observed, on the FP forward), one forward of 2 rows; random T5
    states (2, 120, 4096) stand in for T5."""
    from diffusers import DiTTransformer2DModel, PixArtTransformer2DModel

    torch.manual_seed(0)
    if family == "dit":
        model, spec, size = DiTTransformer2DModel(in_channels=4, out_channels=8, sample_size=32), DIT, 32
        cond = {"class_labels": torch.tensor([207, 1000])}
    else:
        model, spec, size = PixArtTransformer2DModel(sample_size=64, caption_channels=4096), PIXART, 64
        cond = {
            "encoder_hidden_states": torch.randn(2, 120, 4096),
            "encoder_attention_mask": torch.ones(2, 120),
        }
    model.eval().requires_grad_(False)
    n_params = sum(p.numel() for p in model.parameters())
    fp_layers = n_layers(model)
    cfg = QuantConfig(weight_bits=8, act_bits=8, act_dynamic_per_token=True, weight_init="minmax")
    summary = quantize_denoiser(model, spec, cfg)
    assert summary.n_quant_layers == fp_layers and summary.attention == n_attention(model)
    batch = {"hidden_states": torch.randn(2, 4, size, size), "timestep": torch.tensor([999, 500]), **cond}
    with torch.no_grad():
        with observing_act_ranges(model, "minmax"), quant_state(model, weights=False):
            fp = spec.forward(model, batch)  # FP (observed); sets the static softmax ranges
        out = spec.forward(model, batch)
    rel = float((out - fp).norm() / fp.norm())
    report = (
        f"{family}: {n_params / 1e6:.0f}M parameters, {fp_layers} layers, W8A8 per-token relative "
        f"error {rel:.4f}, peak RSS of this process {peak_rss_gib():.2f} GiB"
    )
    print(report)
    assert out.shape == (2, 4, size, size) and torch.isfinite(out).all(), report
    assert n_params > 5e8 and rel < 0.1, report


# ---------------------------------------------------------------------------- the Python API
@pytest.mark.parametrize("family", ["dit", "pixart"])
def test_a_users_transformer_pipeline_is_quantized_in_place(family, tmp_path):
    """``diffquant.quantize(DiTPipeline / PixArtAlphaPipeline)`` quantizes ``pipe.transformer``;
    the user's own pipeline then samples with it (its keyword time step reaches the quantizers)."""
    import diffquant
    from diffquant.quant import is_quant_layer
    from tiny_components import ddpm_linear, tiny_t5, tiny_vae, write_tokenizer

    torch.manual_seed(0)
    transformer, _ = tiny(family)
    if family == "dit":
        from diffusers import DiTPipeline

        pipe = DiTPipeline(transformer=transformer, vae=tiny_vae("kl", 4, 0.5), scheduler=ddpm_linear())
        extra: dict = {"num_classes": 10}
    else:
        from diffusers import PixArtAlphaPipeline

        tokenizer = write_tokenizer(tmp_path / "tok")
        pipe = PixArtAlphaPipeline(
            tokenizer=tokenizer,
            text_encoder=tiny_t5(tokenizer),
            vae=tiny_vae("kl", 4, 0.5),
            transformer=transformer,
            scheduler=ddpm_linear(),
        )
        extra = {"prompts": ["a handwritten seven", "the digit 1"]}
    out = diffquant.quantize(
        pipe,
        quant={"name": "w8a8", "act_dynamic_per_token": True},
        method="ptq_minmax",
        num_inference_steps=2,
        cache_dir=tmp_path / "c",
        output_dir=tmp_path / "o",
        calib={"n_samples": 2, "batch_size": 2},
        **extra,
    )
    assert out is pipe and out.diffquant_result.metrics["n_quant_layers"] == (21 if family == "dit" else 27)
    assert sum(is_quant_layer(m) for m in pipe.transformer.modules()) == (21 if family == "dit" else 27)
    gen = torch.Generator().manual_seed(0)
    if family == "dit":
        images = pipe(class_labels=[1], num_inference_steps=2, generator=gen, output_type="np").images
    else:
        images = pipe(
            "a handwritten seven",
            num_inference_steps=2,
            generator=gen,
            output_type="np",
            use_resolution_binning=False,  # the tiny model's size is none of PixArt's bins
        ).images
    assert images.shape[0] == 1 and float(abs(images).max()) <= 1.0
