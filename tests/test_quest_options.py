"""QuEST's settings that select what the QuEST code runs: the loss form (the paper's Eq. 7 or the
code's weights), CMA's critical roles per family (the ImageNet LDM's class-context family
included), the step sizes CMA leaves alone, and TLA's own rows, batch and learning rate."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import pytest
import torch

from diffquant.calib import CalibSettings, ReconSettings, collect_calibration
from diffquant.context import RunContext
from diffquant.methods.base import MethodResult
from diffquant.methods.ptq import PTQConfig
from diffquant.methods.quest import QuestConfig, resolve_critical_layers, stage_loss_weights
from diffquant.methods.quest_finetune import FPTeacher, load_rows, plan_stages, rows_per_step, train_stage
from diffquant.methods.result_cache import run_method
from diffquant.models.denoiser import UNET
from diffquant.quant import QuantConfig, quantize_denoiser
from diffquant.registry import METHODS
from tiny_models import TinyDiffusion, tiny_unet2d, tiny_unet2d_condition

W4A4 = QuantConfig(name="w4a4", weight_bits=4, act_bits=4)
CALIB = CalibSettings(n_samples=4, step_stride=2, batch_size=4)

pytestmark = pytest.mark.usefixtures("one_thread")


def stage(name, n_layers):
    return SimpleNamespace(name=name, layers={f"l{i}": None for i in range(n_layers)})


# ---------------------------------------------------------------------------- the loss
def test_paper_form_weights_the_global_loss_by_lambda_in_both_stages():
    cfg = QuestConfig()
    assert cfg.loss_form == "paper" and cfg.global_loss_weight == 2.0
    assert stage_loss_weights(cfg, stage("tla", 8)) == (True, 2.0)
    assert stage_loss_weights(cfg, stage("cma", 12)) == (True, 2.0)
    assert stage_loss_weights(dataclasses.replace(cfg, cma_local_loss=False), stage("cma", 12)) == (
        False,
        2.0,
    )


def test_code_form_counts_the_global_loss_once_per_layer():
    """The QuEST code adds L_G inside its loop over hooked layers: K times per row."""
    lsun = QuestConfig(loss_form="code", cma_local_loss=False)
    assert stage_loss_weights(lsun, stage("tla", 8)) == (True, 8.0)  # TLA: local + K L_G
    assert stage_loss_weights(lsun, stage("cma", 12)) == (False, 12.0)  # CMA: K L_G alone
    sd = dataclasses.replace(lsun, cma_local_loss=True)
    assert stage_loss_weights(sd, stage("cma", 32)) == (True, 32.0)  # SD: local + K L_G
    off = dataclasses.replace(lsun, global_loss_weight=0.0)  # the no_global ablation
    assert stage_loss_weights(off, stage("tla", 8)) == (True, 0.0)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, one_thread):
    model = TinyDiffusion(steps=6)
    return model, collect_calibration(model, CALIB, tmp_path_factory.mktemp("cache"))


def quantized(model, stream):
    from diffquant.calib import calibrate_act_ranges

    denoiser = tiny_unet2d(0)
    denoiser.load_state_dict(model.denoiser.state_dict())
    quantize_denoiser(denoiser, UNET, W4A4)
    calibrate_act_ranges(denoiser, stream, method="minmax", n_rows=None, batch_size=16)
    return denoiser.requires_grad_(False)


def test_without_the_local_term_cma_learns_from_the_global_loss_only(tiny):
    model, stream = tiny
    denoiser = quantized(model, stream)
    (cma,) = plan_stages(
        denoiser,
        time_layers=UNET.layers(denoiser, "time_projection"),
        critical_layers=UNET.layers(denoiser, "self_attention_qkv"),
        tla=False,
        cma=True,
        tla_epochs=1,
        cma_epochs=1,
    )
    rows = load_rows(stream, rows_per_step(stream, 4, seed=0))
    assert rows["_step"].tolist() == sorted(rows["_step"].tolist())  # rows keep their steps
    teacher = FPTeacher(denoiser, list(cma.weights.values()))
    report = train_stage(
        denoiser,
        UNET,
        cma,
        rows,
        teacher,
        weight_lr=1e-3,
        act_lr=1e-3,
        global_weight=12.0,
        batch_size=6,
        local=False,
    )
    assert report.local == [0.0] and report.global_[0] > 0
    assert report.total[0] == pytest.approx(12.0 * report.global_[0], rel=1e-6)
    nothing = train_stage(
        denoiser,
        UNET,
        cma,
        rows,
        teacher,
        weight_lr=1e-3,
        act_lr=1e-3,
        global_weight=0.0,
        batch_size=6,
        local=False,
    )
    assert nothing.steps == 0


# ---------------------------------------------------------------------------- what trains
def test_class_context_family_gets_the_imagenet_scripts_critical_layers():
    """``ff.net``, ``to_q`` of both attentions and ``attn1.to_k/v``
    (post_layer_recon_imagenet.py) are the feed_forward, self_attention_qkv and
    cross_attention_q roles; the SD script's ``ff.net`` alone is experiment=quest_sd's choice."""
    denoiser = tiny_unet2d_condition()
    quantize_denoiser(denoiser, UNET, W4A4)
    cfg = QuestConfig()
    model = SimpleNamespace(family="ldm_class_context", denoiser=denoiser, spec=UNET)
    layers = resolve_critical_layers(model, W4A4, cfg, None, None, [], MethodResult(model, W4A4))
    attn = {".".join(n.split(".")[-2:]) for n in layers if ".attn" in n}
    assert attn == {"attn1.to_q", "attn1.to_k", "attn1.to_v", "attn2.to_q"}
    ff = [n for n in layers if ".ff.net." in n]
    assert ff and len(ff) + sum(".attn" in n for n in layers) == len(layers)
    sd_only_ff = dataclasses.replace(cfg, critical_roles_by_family={"sd": ["feed_forward"]})
    sd = SimpleNamespace(family="sd", denoiser=denoiser, spec=UNET)
    ff = resolve_critical_layers(sd, W4A4, sd_only_ff, None, None, [], MethodResult(sd, W4A4))
    assert ff and all(".ff.net." in n for n in ff)


def test_cma_leaves_the_excluded_roles_step_sizes_alone(tiny):
    model, stream = tiny
    denoiser = quantized(model, stream)
    common = dict(
        time_layers=UNET.layers(denoiser, "time_projection"),
        critical_layers=UNET.layers(denoiser, "self_attention_qkv"),
        tla=True,
        cma=True,
        tla_epochs=1,
        cma_epochs=1,
    )
    _, cma = plan_stages(denoiser, **common)
    _, cma_code = plan_stages(
        denoiser, **common, cma_exclude_act_layers=UNET.layers(denoiser, "time_embedding")
    )
    dropped = set(cma.act_scales) - set(cma_code.act_scales)
    assert dropped and all(n.startswith("time_embedding.") for n in dropped)
    assert set(cma_code.act_scales) < set(cma.act_scales)


def test_tla_trains_on_its_own_rows_batch_and_step_size_rate(tmp_path, monkeypatch):
    import diffquant.methods.quest as quest

    calls = []

    def recording(*args, **kwargs):
        calls.append({k: kwargs[k] for k in ("act_lr", "batch_size", "local", "global_weight")})
        return train_stage(*args, **kwargs)

    monkeypatch.setattr(quest, "train_stage", recording)
    model = TinyDiffusion(steps=6)
    ctx = RunContext(run_dir=tmp_path, cache_dir=tmp_path / "cache", device=torch.device("cpu"))
    ptq = PTQConfig(
        calib=CALIB,
        act_init_rows=16,
        act_init_batch_size=8,
        recon=ReconSettings(weight_iters=1, act_iters=1, batch_size=4, capture_batch_size=8),
    )
    cfg = QuestConfig(
        ptq=ptq,
        tla_epochs=1,
        cma_epochs=1,
        samples_per_step=4,
        batch_size=4,
        tla_samples_per_step=2,
        tla_batch_size=2,
        tla_act_lr=1e-5,
        eval_rows=4,
        loss_form="code",
        cma_local_loss=False,
        cma_exclude_act_roles=["time_embedding"],
    )
    m = run_method(METHODS.get("quest")(), model, W4A4, cfg, ctx).metrics
    assert m["tla_train_rows"] == 2 * 3 and m["train_rows"] == 4 * 3
    assert m["tla_steps"] == 3 and m["cma_steps"] == 3  # 6 rows / 2, 12 rows / 4
    assert m["cma_local_loss_last"] == 0.0
    assert m["cma_loss_last"] == pytest.approx(m["cma_n_layers"] * m["cma_global_loss_last"], rel=1e-3)
    assert calls == [
        {"act_lr": 1e-5, "batch_size": 2, "local": True, "global_weight": m["tla_n_layers"]},
        {"act_lr": 1e-4, "batch_size": 4, "local": False, "global_weight": m["cma_n_layers"]},
    ]


def test_rows_beyond_the_ram_budget_are_file_backed_with_the_same_values(tmp_path):
    """QuEST's finetuning rows above ``ram_bytes`` live in files under ``spill_dir`` (paged by the
    OS), with the values of the in-RAM set, in the same order."""
    from diffquant.bench.scale import random_calibration_set
    from diffquant.calib.collect import CalibStream
    from diffquant.methods.quest_finetune import load_rows
    from tiny_models import tiny_unet2d

    stream = CalibStream(random_calibration_set(tmp_path / "calib", tiny_unet2d(), rows=300))
    rows = torch.cat([torch.tensor([3, 7]), torch.arange(20, 299)])  # more than one batch of 256
    in_ram = load_rows(stream, rows)
    spilled = load_rows(stream, rows, tmp_path / "spill", ram_bytes=0)
    assert set(spilled) == set(in_ram)
    for k, v in in_ram.items():
        assert torch.equal(spilled[k], v)
        assert spilled[k].untyped_storage().filename == str(tmp_path / "spill" / f"{k}.bin")
    assert load_rows(stream, rows, tmp_path / "unused").keys() == in_ram.keys()
    assert not (tmp_path / "unused").exists()  # within the budget: RAM, no files
