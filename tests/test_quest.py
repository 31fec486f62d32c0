"""QuEST: only the selected parameters train, ablation switches change what trains, the
sensitivity sweep finds a fragile layer, and the whole method runs end to end on a tiny model."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from diffusers import UNet2DConditionModel, UNet2DModel

from diffquant.calib import CalibSettings, ReconSettings, calibrate_act_ranges, collect_calibration
from diffquant.calib.ranges import minmax_patterns
from diffquant.context import RunContext
from diffquant.methods.base import MethodResult
from diffquant.methods.ptq import PTQConfig
from diffquant.methods.quest import QuestConfig, make_timestep_aware, resolve_critical_layers
from diffquant.methods.quest_finetune import (
    FPTeacher,
    layers_matching,
    load_rows,
    plan_stages,
    rows_per_step,
    train_stage,
)
from diffquant.methods.quest_sensitivity import SensitivitySettings, activation_sensitivity
from diffquant.methods.result_cache import run_method
from diffquant.models.denoiser import UNET
from diffquant.quant import QuantConfig, iter_quantizers, load_quantized, quantize_denoiser, save_quantized
from diffquant.quant.typed import as_dataclass
from diffquant.registry import METHODS
from tiny_models import TinyDiffusion, tiny_unet2d, tiny_unet2d_condition

W4A4 = QuantConfig(name="w4a4", weight_bits=4, act_bits=4)
CALIB = CalibSettings(n_samples=4, step_stride=2, batch_size=4)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, one_thread):
    """A tiny guided model (6 DDIM steps) and its calibration stream (3 recorded steps)."""
    torch.manual_seed(0)
    model = TinyDiffusion(steps=6)
    stream = collect_calibration(model, CALIB, tmp_path_factory.mktemp("cache"))
    return model, stream


def quantized_copy(model, stream, quant_cfg=W4A4, groups=3):
    """A W4A4 copy of the tiny UNet: hard AdaRound masks (as PTQ leaves them), calibrated
    activation ranges, ``groups`` time-step groups."""
    denoiser = tiny_unet2d(0)
    denoiser.load_state_dict(model.denoiser.state_dict())
    quantize_denoiser(denoiser, UNET, quant_cfg)
    for _, wq in iter_quantizers(denoiser, "weight"):
        wq.start_adaround(torch.randn(wq.weight_shape))
        wq.harden()
    calibrate_act_ranges(denoiser, stream, method="minmax", n_rows=None, batch_size=16)
    if groups > 1:
        make_timestep_aware(denoiser, UNET, model.timesteps, groups)
        calibrate_act_ranges(denoiser, stream, method="minmax", n_rows=None, batch_size=16)
    return denoiser.requires_grad_(False)


def time_layers(denoiser):
    """TLA's layers: the ``time_projection`` role (each resnet's ``time_emb_proj``)."""
    return UNET.layers(denoiser, "time_projection")


def critical_layers(denoiser):
    """The ``ldm`` family's CMA layers: the ``self_attention_qkv`` role."""
    return UNET.layers(denoiser, "self_attention_qkv")


def plan(denoiser, **switches):
    return plan_stages(
        denoiser,
        time_layers=time_layers(denoiser),
        critical_layers=critical_layers(denoiser),
        tla_epochs=1,
        cma_epochs=1,
        **switches,
    )


def snapshot(denoiser):
    return {k: v.detach().clone() for k, v in denoiser.state_dict().items()}


def train_all(denoiser, stages, stream, global_weight=2.0, lr=1e-2):
    teacher = FPTeacher(denoiser, [p for s in stages for p in s.weights.values()])
    rows = load_rows(stream, rows_per_step(stream, 4, seed=0))
    for stage in stages:
        train_stage(
            denoiser,
            UNET,
            stage,
            rows,
            teacher,
            weight_lr=lr,
            act_lr=lr,
            global_weight=global_weight,
            batch_size=6,
        )


def changed_keys(before, denoiser):
    after = denoiser.state_dict()
    return {k for k, v in before.items() if not torch.equal(v, after[k])}


def trained_names(stages):
    return {n for s in stages for n in (*s.weights, *s.act_scales)}


# ---------------------------------------------------------------------------- what trains
def test_only_selected_parameters_change(tiny):
    model, stream = tiny
    denoiser = quantized_copy(model, stream)
    stages = plan(denoiser, tla=True, cma=True)
    selected = trained_names(stages)
    before = snapshot(denoiser)
    train_all(denoiser, stages, stream)
    changed = changed_keys(before, denoiser)
    assert changed, "finetuning changed nothing"
    assert changed <= selected, f"unselected tensors changed: {sorted(changed - selected)[:5]}"
    # latent weights of both stages and step sizes of both stages moved
    assert any("time_emb_proj.weight" in k for k in changed)
    assert any(k.endswith("to_q.weight") for k in changed)
    assert any("time_emb_proj.input_quantizer.scale" in k for k in changed)
    assert any("processor.q_quantizer.scale" in k for k in changed)
    # nothing is left trainable, and no gradient is kept
    assert not any(p.requires_grad or p.grad is not None for p in denoiser.parameters())


def test_stage_parameter_sets(tiny):
    model, stream = tiny
    denoiser = quantized_copy(model, stream)
    tla, cma = plan(denoiser, tla=True, cma=True)
    assert tla.weights and all("time_emb_proj" in n for n in tla.weights)
    assert set(tla.act_scales) == {
        n for n, _ in denoiser.named_parameters() if "time_emb_proj.input_quantizer" in n
    }
    assert cma.weights and all(n.rsplit(".", 2)[-2] in ("to_q", "to_k", "to_v") for n in cma.weights)
    assert not set(tla.act_scales) & set(cma.act_scales)
    # CMA: every other step size below 16 bits (layer inputs, q/k/v, softmax)
    all_scales = {n for n, _ in denoiser.named_parameters() if n.endswith(".scale")}
    assert set(cma.act_scales) == all_scales - set(tla.act_scales)


@pytest.mark.parametrize(
    "option, stages_expected",
    [
        ("quest", ["tla", "cma"]),
        ("quest_tla_only", ["tla"]),
        ("quest_cma_only", ["cma"]),
        ("quest_no_global", ["tla", "cma"]),
    ],
)
def test_ablation_configs_select_stages(option, stages_expected, make_cfg, tiny):
    model, stream = tiny
    cfg = as_dataclass(make_cfg([f"method={option}", "quant=w4a4"]).method, QuestConfig)
    assert cfg.global_loss_weight == (0.0 if option == "quest_no_global" else 2.0)
    denoiser = quantized_copy(model, stream)
    stages = plan_stages(
        denoiser,
        time_layers=UNET.layers(denoiser, *cfg.tla_roles),
        critical_layers=UNET.layers(denoiser, *cfg.critical_roles_by_family["ldm"]),
        tla=cfg.tla,
        cma=cfg.cma,
        tla_epochs=1,
        cma_epochs=1,
    )
    assert [s.name for s in stages] == stages_expected


def test_ablations_change_which_parameters_train(tiny):
    model, stream = tiny
    changed = {}
    for label, tla, cma, lam in (
        ("full", True, True, 2.0),
        ("tla_only", True, False, 2.0),
        ("cma_only", False, True, 2.0),
        ("no_global", True, True, 0.0),
    ):
        denoiser = quantized_copy(model, stream)
        stages = plan(denoiser, tla=tla, cma=cma)
        before = snapshot(denoiser)
        train_all(denoiser, stages, stream, global_weight=lam)
        changed[label] = changed_keys(before, denoiser)
    is_tla = lambda k: "time_emb_proj" in k  # noqa: E731
    assert changed["tla_only"] and all(is_tla(k) for k in changed["tla_only"])
    assert changed["cma_only"] and not any(is_tla(k) for k in changed["cma_only"])
    assert changed["full"] == changed["tla_only"] | changed["cma_only"]
    # without L_G, step sizes that feed no trained layer get no gradient: the output conv's
    # input (after every critical layer) only moves with the global loss
    out_scale = "conv_out.input_quantizer.scale"
    assert out_scale in changed["full"] and out_scale not in changed["no_global"]


# ---------------------------------------------------------------------------- time steps
def test_timestep_split_round_trips_through_checkpoint(tiny, tmp_path):
    model, stream = tiny
    denoiser = quantized_copy(model, stream, groups=3)
    assert all(q.n_groups == 3 for _, q in iter_quantizers(denoiser, "act"))
    path = save_quantized(
        denoiser, tmp_path / "q.pt", dataclasses.replace(W4A4, timestep_aware=True, timestep_groups=3)
    )
    fresh = tiny_unet2d(0)
    fresh.load_state_dict(model.denoiser.state_dict())
    load_quantized(fresh, UNET, path)
    batch = next(stream.batches(6))
    with torch.no_grad():
        assert torch.equal(UNET.forward(denoiser, batch), UNET.forward(fresh, batch))


# ---------------------------------------------------------------------------- sensitivity
def test_sweep_ranks_fragile_layer_first(tiny):
    model, stream = tiny
    fp = tiny_unet2d(0)
    fp.load_state_dict(model.denoiser.state_dict())
    fragile = "down_blocks.0.resnets.0.conv2"
    with torch.no_grad():
        # one input channel of conv2 becomes a large constant that the conv ignores: a per-tensor
        # 4-bit grid then has no levels left for the channels that matter
        fp.down_blocks[0].resnets[0].norm2.bias[0] = 60.0
        conv = fp.down_blocks[0].resnets[0].conv2
        conv.weight[:, 0] = 0.0
        conv.weight[:, 1:] *= 8.0
    cfg = dataclasses.replace(W4A4, act_per_channel=False, act_init="minmax")
    report = activation_sensitivity(fp, UNET, cfg, stream, SensitivitySettings(calib_rows=24, eval_rows=12))
    assert report.units[0].name == fragile
    assert report.units[0].error > 2 * report.units[1].error
    assert report.select(1) == [fragile]
    assert report.select(1, exclude=[fragile]) == report.select(2)[1:]
    assert report.types[0].name == "resnets.conv2"
    # the FP UNet itself was not touched
    assert not any(True for _ in iter_quantizers(fp))


# ---------------------------------------------------------------------------- roles
#: What QuEST and range init named by regular expression before layers were read from roles:
#: TLA's layers, CMA's critical layers by family (searched in ``<layer>.weight``) and the
#: activation quantizers whose initial range is always min-max.
OLD_TIME = [r"time_emb_proj\."]
OLD_CRITICAL = {
    "ldm": [r"attentions\.\d+\.to_[qkv]\."],
    "sd": [r"ff\.net\.", r"attn1\.to_[qkv]\.", r"attn2\.to_q\."],
    "default": [r"\.to_[qkv]\."],
}
OLD_MINMAX = [r"time_embedding\.", r"time_emb_proj"]
ZOO = Path(__file__).resolve().parent.parent / "src" / "diffquant" / "zoo" / "weights"


def zoo_architecture(name, cls):
    """The denoiser architecture of an embedded model (random weights: roles are structural)."""
    torch.manual_seed(0)
    return cls.from_config(cls.load_config(ZOO / name / "unet")).eval()


DENOISERS = {  # name: (model family, builder)
    "tiny_unet2d": ("ldm", tiny_unet2d),
    "tiny_unet2d_condition": ("sd", tiny_unet2d_condition),
    "ldm_digits": ("ldm", lambda: zoo_architecture("ldm_digits", UNet2DModel)),
    "sd_digits": ("sd", lambda: zoo_architecture("sd_digits", UNet2DConditionModel)),
}


@pytest.mark.parametrize("name", list(DENOISERS))
def test_roles_resolve_to_the_layers_the_old_patterns_named(name):
    family, build = DENOISERS[name]
    denoiser = build()
    assert type(denoiser) is (UNet2DModel if family == "ldm" else UNet2DConditionModel)
    quantize_denoiser(denoiser, UNET, W4A4)
    cfg = QuestConfig()

    # TLA: tla_roles (time_projection) = the layers `time_emb_proj\.` named
    tla = UNET.layers(denoiser, *cfg.tla_roles)
    assert tla and tla == layers_matching(denoiser, OLD_TIME)
    # CMA by family: the family's roles = the layers its old patterns named (and the fallback
    # for other families: every attention's q, k, v)
    for fam in (family, "default"):
        assert UNET.layers(denoiser, *cfg.critical_roles_by_family[fam]) == layers_matching(
            denoiser, OLD_CRITICAL[fam]
        ), fam
    old_critical = layers_matching(denoiser, OLD_CRITICAL[family])
    assert old_critical
    # ... and what the method resolves for this family (TLA's layers excluded), exactly
    model = SimpleNamespace(family=family, denoiser=denoiser, spec=UNET)
    resolved = resolve_critical_layers(model, W4A4, cfg, None, None, tla, MethodResult(model, W4A4))
    assert resolved == [n for n in old_critical if n not in layers_matching(denoiser, OLD_TIME)]
    if family == "sd":  # the three roles are all present
        assert {n.rsplit(".", 2)[-2] for n in resolved} >= {"attn1", "attn2", "net"}

    # min-max initial ranges: quant.minmax_act_roles (default) force the same activation
    # quantizers as the old default quant.minmax_act_layers regexes
    qcfg = QuantConfig()
    assert qcfg.minmax_act_roles == ["time_embedding", "time_projection"]
    assert qcfg.minmax_act_layers == []
    acts = [n for n, _ in iter_quantizers(denoiser, "act")]

    def forced(patterns):
        return {n for n in acts if any(re.search(p, n) for p in patterns)}

    old = forced(OLD_MINMAX)
    assert old and forced(minmax_patterns(denoiser, UNET, qcfg)) == old
    assert any(n.startswith("time_embedding.") for n in old)
    assert any(".time_emb_proj." in n for n in old)


# ---------------------------------------------------------------------------- end to end
def test_quest_end_to_end(tmp_path):
    model = TinyDiffusion(steps=6)
    ctx = RunContext(run_dir=tmp_path, cache_dir=tmp_path / "cache", device=torch.device("cpu"))
    ptq = PTQConfig(
        calib=CALIB,
        act_init_rows=16,
        act_init_batch_size=8,
        recon=ReconSettings(weight_iters=2, act_iters=1, batch_size=4, capture_batch_size=8),
    )
    cfg = QuestConfig(
        ptq=ptq,
        critical_layers="auto",
        critical_top_k=2,
        tla_epochs=1,
        cma_epochs=1,
        samples_per_step=4,
        batch_size=6,
        eval_rows=8,
        timestep_init_rows=None,
        sensitivity=SensitivitySettings(calib_rows=16, eval_rows=8),
    )
    result = run_method(METHODS.get("quest")(), model, W4A4, cfg, ctx)
    m = result.metrics
    assert result.model is model
    assert m["timestep_groups"] == 3 and m["n_trainable_params"] > 0
    assert result.quant == dataclasses.replace(W4A4, timestep_aware=True, timestep_groups=3)
    assert m["tla_steps"] == 2 and m["cma_steps"] == 2 and m["finetune_s"] > 0
    assert all(q.n_groups == 3 for _, q in iter_quantizers(model.denoiser, "act"))
    ranking = json.loads(result.files["sensitivity.json"])
    assert ranking["selected"] == m["critical_layers"] and len(ranking["units"]) > 10
    assert result.files["sensitivity.md"].startswith("# Activation sensitivity")
    assert len(result.tables["quest_sensitivity"].rows) == len(ranking["units"])
    with torch.no_grad():
        x = model.sample_latents([0, 1], seed=0)
    assert torch.isfinite(x).all()

    # the finetuned UNet and its metrics are cached: a resumed job or a re-evaluation loads them
    again = TinyDiffusion(steps=6)
    ctx2 = RunContext(run_dir=tmp_path / "again", cache_dir=tmp_path / "cache", device=torch.device("cpu"))
    cached = run_method(METHODS.get("quest")(), again, W4A4, cfg, ctx2)
    assert m["quest_cached"] is False and cached.metrics["quest_cached"] is True
    assert {k: v for k, v in cached.metrics.items() if not k.endswith("_cached")} == {
        k: v for k, v in m.items() if not k.endswith("_cached")
    }
    assert cached.quant == result.quant and cached.files == result.files
    assert cached.tables == result.tables
    with torch.no_grad():
        assert torch.equal(again.sample_latents([0, 1], seed=0), x)
