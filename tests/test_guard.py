"""The refinement guard (:mod:`diffquant.methods.guard`): a method that refines a base keeps the
better of the base and its final model, judged on held-out trajectories; the paper configs run
without it."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
import torch

from conftest import CONF
from diffquant.calib import CalibSettings, ReconSettings, observing_act_ranges
from diffquant.context import RunContext
from diffquant.methods import accuquant as aq
from diffquant.methods import quest as quest_mod
from diffquant.methods.base import MethodResult
from diffquant.methods.guard import (
    CRITERIA,
    MEASURES,
    RefinementGuard,
    final_image_error,
    final_image_errors,
    heldout_trajectories,
    improves,
    snapshot_state,
)
from diffquant.methods.ptq import PTQConfig
from diffquant.methods.quest import QuestConfig
from diffquant.methods.result_cache import run_method
from diffquant.quant import QuantConfig, quantize_denoiser
from diffquant.quant.state import quant_parameters
from diffquant.registry import METHODS
from diffquant.validation import InvalidSetting
from tiny_models import TinyDiffusion

pytestmark = pytest.mark.usefixtures("one_thread")

W4A8 = QuantConfig(name="w4a8", weight_bits=4, act_bits=8)
GUARD = {"guard_samples": 8, "guard_seed": 30_000}


def minmax_ptq(model, quant_cfg, ptq_cfg=None, ctx=None) -> MethodResult:
    """A PTQ base in miniature: min-max activation ranges from a few FP samples."""
    quantize_denoiser(model.denoiser, model.spec, quant_cfg, timesteps=model.timesteps)
    with observing_act_ranges(model.denoiser, "minmax"):
        model.sample_latents(list(range(8)), 123)
    return MethodResult(model, quant_cfg, {})


def scale_act_steps(model, factor: float) -> None:
    scale_act_steps_of(model.denoiser, factor)


def same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def guarded_run(name: str, cfg, tmp_path: Path, monkeypatch):
    """``run_method`` of ``name`` on a tiny model whose PTQ base is :func:`minmax_ptq`."""
    monkeypatch.setattr(aq, "load_or_run_ptq", minmax_ptq)
    monkeypatch.setattr(quest_mod, "load_or_run_ptq", minmax_ptq)
    model = TinyDiffusion(steps=4)
    ctx = RunContext(run_dir=tmp_path / "run", cache_dir=tmp_path / "cache", device=torch.device("cpu"))
    return model, run_method(METHODS.get(name)(), model, W4A8, cfg, ctx)


def heldout_error(model, batch_size: int) -> float:
    traj = heldout_trajectories(model, GUARD["guard_samples"], GUARD["guard_seed"], batch_size)
    return final_image_error(model, traj, batch_size)


# ---------------------------------------------------------------------------- the decision
def test_guard_puts_the_base_back_when_the_final_model_is_worse():
    torch.manual_seed(0)
    model = TinyDiffusion(steps=4)
    minmax_ptq(model, W4A8)
    base = snapshot_state(model.denoiser)
    guard = RefinementGuard(model, samples=8, seed=30_000, batch_size=4)
    scale_act_steps(model, 40.0)  # a "refinement" that wrecks the activation ranges
    verdict = guard.judge("m")
    assert verdict.kept == "base" and verdict.final["mse"] > verdict.base["mse"]
    assert same_state(snapshot_state(model.denoiser), base)
    assert heldout_error(model, 4) == verdict.base["mse"]


def test_guard_keeps_the_final_model_when_it_is_better():
    torch.manual_seed(0)
    model = TinyDiffusion(steps=4)
    minmax_ptq(model, W4A8)
    scale_act_steps(model, 40.0)  # a poor base ...
    guard = RefinementGuard(model, samples=8, seed=30_000, batch_size=4)
    scale_act_steps(model, 1 / 40.0)  # ... that the "refinement" repairs
    final = snapshot_state(model.denoiser)
    verdict = guard.judge("m")
    assert verdict.kept == "final" and all(verdict.final[k] < verdict.base[k] for k in MEASURES)
    assert same_state(snapshot_state(model.denoiser), final)
    assert verdict.metrics("m") == {
        "m_guard_mse_base": verdict.base["mse"],
        "m_guard_mse_final": verdict.final["mse"],
        "m_guard_log_mse_base": verdict.base["log_mse"],
        "m_guard_log_mse_final": verdict.final["log_mse"],
        "m_guard_criterion": "mse",
        "m_guard_kept": "final",
    }


@pytest.mark.parametrize(
    "final, kept_by",
    [
        ({"mse": 1.0, "log_mse": -3.0}, {"mse", "log_mse", "both"}),  # the base itself: a tie
        ({"mse": 0.5, "log_mse": -3.5}, {"mse", "log_mse", "both"}),  # better by both
        ({"mse": 0.5, "log_mse": -2.5}, {"mse"}),  # mean better, typical image worse
        ({"mse": 1.5, "log_mse": -3.5}, {"log_mse"}),  # typical image better, mean worse
        ({"mse": 1.5, "log_mse": -2.5}, set()),  # worse by both
    ],
)
def test_each_criterion_keeps_the_final_model_only_where_its_measures_do_not_get_worse(final, kept_by):
    base = {"mse": 1.0, "log_mse": -3.0}
    assert {c for c in CRITERIA if improves(final, base, c)} == kept_by
    with pytest.raises(ValueError, match="both"):
        improves(final, base, "psnr")


def test_the_guard_decides_as_improves_says_for_every_criterion():
    """For each criterion, the guard keeps the final model (step sizes halved) or puts the base
    back exactly as :func:`improves` says of the two models' held-out errors."""
    torch.manual_seed(0)
    model = TinyDiffusion(steps=4)
    minmax_ptq(model, W4A8)
    for criterion in CRITERIA:
        base_state = snapshot_state(model.denoiser)
        guard = RefinementGuard(model, samples=8, seed=30_000, batch_size=4, criterion=criterion)
        scale_act_steps(model, 0.5)
        final_state = snapshot_state(model.denoiser)
        verdict = guard.judge("m")
        expect = "final" if improves(verdict.final, verdict.base, criterion) else "base"
        assert verdict.kept == expect and verdict.criterion == criterion
        assert same_state(snapshot_state(model.denoiser), final_state if expect == "final" else base_state)
        model.denoiser.load_state_dict(base_state)
    with pytest.raises(ValueError, match="criterion"):
        RefinementGuard(model, samples=8, seed=30_000, batch_size=4, criterion="mean")


# ---------------------------------------------------------------------------- in the methods
def accuquant_cfg(**kw) -> aq.AccuQuantConfig:
    return aq.AccuQuantConfig(
        **{"group_size": 2, "iters_per_group": 4, "n_samples": 8, "batch_size": 4, **GUARD, **kw}
    )


def test_accuquant_with_a_destructive_learning_rate_ends_at_its_base(tmp_path, monkeypatch):
    model, result = guarded_run("accuquant", accuquant_cfg(act_lr=10.0), tmp_path, monkeypatch)
    m = result.metrics
    assert m["accuquant_guard_kept"] == "base"
    assert all(math.isfinite(m[f"accuquant_guard_{k}"]) for k in ("mse_base", "mse_final", "log_mse_base"))
    assert m["accuquant_guard_mse_final"] > m["accuquant_guard_mse_base"]
    base = TinyDiffusion(steps=4)
    minmax_ptq(base, W4A8)
    assert same_state(snapshot_state(model.denoiser), snapshot_state(base.denoiser))


def test_accuquant_without_the_guard_keeps_what_it_calibrated(tmp_path, monkeypatch):
    model, result = guarded_run("accuquant", accuquant_cfg(act_lr=10.0, guard=False), tmp_path, monkeypatch)
    assert not any("guard" in k for k in result.metrics)
    base = TinyDiffusion(steps=4)
    minmax_ptq(base, W4A8)
    assert not same_state(snapshot_state(model.denoiser), snapshot_state(base.denoiser))


def quest_cfg(**kw) -> QuestConfig:
    ptq = PTQConfig(
        calib=CalibSettings(n_samples=4, step_stride=2, batch_size=4),
        act_init_rows=16,
        act_init_batch_size=8,
        recon=ReconSettings(weight_iters=2, act_iters=1, batch_size=4, capture_batch_size=8),
    )
    return QuestConfig(
        **{
            "ptq": ptq,
            "critical_layers": ["attentions.*to_q"],
            "tla_epochs": 1,
            "cma_epochs": 1,
            "samples_per_step": 4,
            "batch_size": 4,
            "eval_rows": 4,
            **GUARD,
            "guard_batch_size": 8,
            **kw,
        }
    )


def test_quest_with_a_destructive_learning_rate_ends_at_its_base(tmp_path, monkeypatch):
    cfg = quest_cfg(timestep_init="ptq", weight_lr=10.0, act_lr=10.0)
    model, result = guarded_run("quest", cfg, tmp_path, monkeypatch)
    m = result.metrics
    assert m["quest_guard_kept"] == "base"
    assert math.isfinite(m["quest_guard_mse_base"]) and math.isfinite(m["quest_guard_mse_final"])
    assert m["quest_guard_mse_final"] > m["quest_guard_mse_base"]
    assert heldout_error(model, 8) == m["quest_guard_mse_base"]


def test_quest_starts_from_ptq_ranges_where_the_per_step_init_is_worse(tmp_path, monkeypatch):
    """``init_guard``: a per-step init that wrecks the ranges is undone before the finetuning,
    which then starts from PTQ's ranges (the same denoiser outputs as the PTQ base)."""
    monkeypatch.setattr(
        quest_mod, "init_timestep_ranges", lambda denoiser, *a, **k: scale_act_steps_of(denoiser)
    )
    cfg = quest_cfg(timestep_init="minmax", tla=False, cma=False)
    _, result = guarded_run("quest", cfg, tmp_path, monkeypatch)
    m = result.metrics
    assert m["quest_init_guard_kept"] == "base"
    assert m["quest_init_guard_mse_final"] > m["quest_init_guard_mse_base"]
    assert m["quest_eps_mse_init"] == pytest.approx(m["quest_eps_mse_ptq"], rel=1e-6)
    assert m["quest_guard_kept"] == "final"  # nothing trained: the final model is the base


def scale_act_steps_of(denoiser, factor: float = 40.0) -> None:
    with torch.no_grad():
        for p in quant_parameters(denoiser, "act_scale").values():
            p.mul_(factor)


# ---------------------------------------------------------------------------- configs
PAPER = sorted(p.stem for m in ("quest", "accuquant") for p in CONF.glob(f"method/{m}_paper*.yaml"))


@pytest.mark.parametrize("method", PAPER)
def test_paper_configs_run_without_the_guard(method, make_cfg):
    """The reference code keeps whatever its calibration ends with: the paper rows do too."""
    assert len(PAPER) >= 6
    cfg = make_cfg([f"method={method}"]).method
    assert cfg.guard is False and cfg.get("init_guard", False) is False


@pytest.mark.parametrize("schema", [QuestConfig, aq.AccuQuantConfig])
def test_the_guard_is_on_by_default(schema):
    assert schema().guard is True and schema().guard_criterion == "mse"


@pytest.mark.parametrize("method", ["ptq_paper", "ptq_paper_sd", *PAPER])
def test_paper_configs_keep_the_lsq_stage_as_it_ends(method, make_cfg):
    """Q-Diffusion's code keeps its LSQ stage; so do the paper PTQ rows and the paper methods'
    PTQ bases."""
    cfg = make_cfg([f"method={method}"]).method
    assert (cfg.ptq if "ptq" in cfg else cfg).lsq_guard is False


# ---------------------------------------------------------------------------- PTQ's LSQ stage
def ptq_cfg(**kw) -> PTQConfig:
    recon = ReconSettings(
        weight_iters=2, act_iters=kw.pop("act_iters", 3), batch_size=4, capture_batch_size=8
    )
    return PTQConfig(
        calib=CalibSettings(n_samples=4, step_stride=2, batch_size=4),
        act_init_rows=16,
        act_init_batch_size=8,
        recon=dataclasses.replace(recon, act_lr=kw.pop("act_lr", recon.act_lr)),
        **{**GUARD, "guard_batch_size": 8, **kw},
    )


def ptq_run(cfg: PTQConfig, tmp_path: Path):
    torch.manual_seed(0)
    model = TinyDiffusion(steps=4)
    ctx = RunContext(run_dir=tmp_path / "run", cache_dir=tmp_path / "cache", device=torch.device("cpu"))
    return model, run_method(METHODS.get("ptq")(), model, W4A8, cfg, ctx)


def test_ptq_lsq_guard_undoes_a_destructive_lsq_stage(tmp_path):
    """An LSQ stage that wrecks the ranges (learning rate 50) is undone: the model ends as
    AdaRound with the initial ranges (the run with no LSQ iterations), and both losses are
    reported."""
    model, result = ptq_run(ptq_cfg(lsq_guard=True, act_lr=50.0), tmp_path / "g")
    m = result.metrics
    assert m["ptq_lsq_guard_kept"] == "base"
    assert m["ptq_lsq_guard_mse_final"] > m["ptq_lsq_guard_mse_base"]
    no_lsq, _ = ptq_run(ptq_cfg(act_iters=0, lsq_guard=False), tmp_path / "n")
    assert same_state(snapshot_state(model.denoiser), snapshot_state(no_lsq.denoiser))
    unguarded, plain = ptq_run(ptq_cfg(act_lr=50.0, lsq_guard=False), tmp_path / "u")
    assert not any("guard" in k for k in plain.metrics)
    assert not same_state(snapshot_state(unguarded.denoiser), snapshot_state(no_lsq.denoiser))


def test_ptq_lsq_guard_keeps_a_better_lsq_stage_as_the_unit_by_unit_order_makes_it(tmp_path, monkeypatch):
    """Where LSQ helps (initial ranges made 3x too wide, which LSQ narrows), the guarded run
    (two passes) keeps it and ends where the unguarded unit-by-unit run does, bit for bit."""
    from diffquant.methods import ptq as ptq_mod

    init = ptq_mod.init_act_ranges

    def too_wide(model, *args, **kwargs):
        init(model, *args, **kwargs)
        scale_act_steps_of(model.denoiser, 3.0)

    monkeypatch.setattr(ptq_mod, "init_act_ranges", too_wide)
    cfg = dict(act_iters=10, act_lr=1e-2)
    model, result = ptq_run(ptq_cfg(lsq_guard=True, **cfg), tmp_path / "g")
    m = result.metrics
    assert m["ptq_lsq_guard_kept"] == "final" and m["ptq_lsq_guard_criterion"] == "mse"
    assert all(m[f"ptq_lsq_guard_{k}_final"] < m[f"ptq_lsq_guard_{k}_base"] for k in MEASURES)
    plain, _ = ptq_run(ptq_cfg(lsq_guard=False, **cfg), tmp_path / "p")
    assert same_state(snapshot_state(model.denoiser), snapshot_state(plain.denoiser))


def test_ptq_lsq_guard_needs_its_own_trajectories():
    with pytest.raises(InvalidSetting, match="guard_seed"):
        PTQConfig(lsq_guard=True, guard_seed=PTQConfig().calib.seed)
    # off by default: the grid with lsq_guard and criterion both lost QuEST's W4A4 gain (README)
    assert PTQConfig().lsq_guard is False and PTQConfig().guard_criterion == "mse"


def test_log_mse_criterion_is_the_mean_log10_of_the_per_image_mse():
    """``log_mse`` averages log10 of each image's MSE (a diverging sample weighs less than in the
    mean MSE); ``mse`` is the mean of the per-image MSEs."""
    torch.manual_seed(0)
    model = TinyDiffusion(steps=4)
    minmax_ptq(model, W4A8)
    traj = heldout_trajectories(model, 6, 30_000, 4)
    from diffquant.methods.trajectory import rollout

    with torch.no_grad():
        x = rollout(model, traj.states[0], 0, traj.n_steps, traj.cond, traj.indices, traj.seed)
        per_image = (model.decode(x) - model.decode(traj.states[-1])).pow(2).flatten(1).mean(1)
    assert final_image_error(model, traj, 4, "mse") == pytest.approx(float(per_image.mean()), rel=1e-5)
    assert final_image_error(model, traj, 4, "log_mse") == pytest.approx(
        float(per_image.log10().mean()), rel=1e-5
    )
    assert final_image_errors(model, traj, 3) == pytest.approx(final_image_errors(model, traj, 4), rel=1e-6)
    with pytest.raises(ValueError, match="log_mse"):
        final_image_error(model, traj, 4, "psnr")
    with pytest.raises(InvalidSetting, match="guard_criterion"):
        PTQConfig(guard_criterion="psnr")
    with pytest.raises(InvalidSetting, match="guard_criterion"):
        QuestConfig(guard_criterion="mean")
