"""Every config option composes; schemas reject typos and wrong types; validation names the fix."""

from __future__ import annotations

import pytest
import yaml
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from conftest import CONF, run_cli
from diffquant.registry import EVALUATORS, METHODS, MODELS, UnknownNameError
from diffquant.schema import validate


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


@pytest.mark.parametrize("group", ["model", "quant", "method", "evaluator", "logger", "paths"])
def test_every_option_composes(group, make_cfg):
    for option in options(group):
        extra = ["quant=w8a8"] if group == "method" and option != "fp" and "w8a8" in options("quant") else []
        cfg = make_cfg([f"{group}={option}", *extra])
        assert OmegaConf.to_container(cfg[group], resolve=True)


def test_every_experiment_composes(make_cfg):
    for option in options("experiment"):
        cfg = make_cfg([f"experiment={option}"])
        assert cfg.experiment is not None


def test_experiment_files_pin_values_only():
    """Experiments hold no `hydra:` block (the sweep configs own sweeping) and pin their grid."""
    for path in sorted((CONF / "experiment").glob("*.yaml")):
        data = yaml.safe_load(path.read_text())
        assert "hydra" not in data, f"{path.name}: move sweeping into conf/sweep/"
        assert data["grid"]["quant"] and data["grid"]["methods"], path.name
        assert "fp" not in data["grid"]["methods"], f"{path.name}: the sweep config adds the FP row"


def sweep_jobs(cfg) -> list[dict[str, str]]:
    """The jobs the composed sweep config launches ({key: value} each), as the sweeper expands them."""
    from hydra_plugins.diffquant_sweeper.grid_sweeper import expand_grids

    grids = OmegaConf.to_container(cfg.hydra.sweeper.grids, resolve=True)
    jobs = expand_grids(grids, [], outer=list(cfg.hydra.sweeper.outer))
    return [dict(o.split("=", 1) for o in job) for job in jobs]


@pytest.mark.parametrize("experiment", options("experiment"))
def test_every_experiment_composes_with_sweep_paper(experiment, make_cfg):
    """`experiment=X sweep=paper`: a multirun of the FP row once, then grid.quant x grid.methods,
    ending with the table callback."""
    cfg = make_cfg([f"experiment={experiment}", "sweep=paper"])
    assert cfg.hydra.mode.name == "MULTIRUN"
    assert cfg.hydra.sweeper._target_.endswith("GridSweeper")
    assert cfg.hydra.callbacks.table._target_ == "diffquant.tables.TableCallback"
    assert f"_{experiment}_paper" in cfg.hydra.sweep.dir
    grid = yaml.safe_load((CONF / "experiment" / f"{experiment}.yaml").read_text())["grid"]
    jobs = sweep_jobs(cfg)
    assert jobs[0] == {"method": "fp", "quant": "fp32"}  # first, so its features are cached first
    assert [j for j in jobs if j["method"] == "fp"] == [jobs[0]]  # once, not once per bit-width
    quantized = [
        {"quant": q, "method": m, "calib_seed": str(c)}
        for c in grid.get("calib_seeds", [0])  # outermost: all jobs of one calibration seed first
        for q in grid["quant"]
        for m in grid["methods"]
    ]
    assert jobs[1:] == quantized


def test_embedded_sweep_is_the_readme_grid(make_cfg):
    """`sweep=embedded`: the three digits models (sd_digits with the CLIP evaluator), FP rows once,
    the QuEST ablations once each (quest at W4A4 is in two grids), quality and cost tables."""
    cfg = make_cfg(["experiment=embedded_digits", "sweep=embedded"])
    jobs = sweep_jobs(cfg)
    n = len(yaml.safe_load((CONF / "experiment" / "embedded_digits.yaml").read_text())["grid"]["methods"])
    # 3 FP + ldm_digits 6 bit-widths x n methods x 3 calibration seeds + 3 ablations x 3 seeds
    # + sd_digits 6 x n x 1 seed + dit_digits 6 x n x 3 seeds
    assert len(jobs) == 3 + 6 * n * 3 + 9 + 6 * n + 6 * n * 3
    assert len({frozenset(j.items()) for j in jobs}) == len(jobs)
    for model, evaluator in [
        ("ldm_digits", "digits"),
        ("sd_digits", "clip_digits"),
        ("dit_digits", "digits"),
    ]:
        mine = [j for j in jobs if j["model"] == model]
        assert all(j["evaluator"] == evaluator for j in mine)
        assert [j["quant"] for j in mine if j["method"] == "fp"] == ["fp32"]
    assert {j["quant"] for j in jobs} == {"fp32", "w8a8", "w4a8", "w4a6", "w4a4", "w3a8", "w3a6"}
    assert {j.get("calib_seed") for j in jobs if j["model"] == "ldm_digits"} == {None, "0", "1", "2"}
    assert {j.get("calib_seed") for j in jobs if j["model"] == "sd_digits"} == {None, "0"}
    assert {j.get("calib_seed") for j in jobs if j["model"] == "dit_digits"} == {None, "0", "1", "2"}
    dit = [
        (j["quant"], j["method"]) for j in jobs if j["model"] == "dit_digits" and j.get("calib_seed") == "2"
    ]
    assert sorted(dit) == sorted(
        (q, m)
        for q in ("w8a8", "w4a8", "w4a6", "w4a4", "w3a8", "w3a6")
        for m in (
            "ptq_minmax",
            "ptq",
            "quest",
            "accuquant",
            "ptq4dm",
            "ptqd",
            "tfmq",
            "efficientdm",
            "svdquant",
            "vidit_q",
        )
    )
    ablations = [
        j["method"]
        for j in jobs
        if j["model"] == "ldm_digits" and j["quant"] == "w4a4" and j.get("calib_seed") == "0"
    ]
    assert ablations == [
        "ptq_minmax",
        "ptq",
        "quest",
        "accuquant",
        "ptq4dm",
        "ptqd",
        "tfmq",
        "efficientdm",
        "svdquant",
        "vidit_q",
        "quest_tla_only",
        "quest_cma_only",
        "quest_no_global",
    ]
    assert cfg.hydra.callbacks.cost_table.out == "cost"
    assert "clip_score" in cfg.hydra.callbacks.table.metrics


def test_ablation_sweep(make_cfg):
    cfg = make_cfg(["experiment=embedded_digits", "sweep=ablations"])
    assert sweep_jobs(cfg) == [{"method": "fp", "quant": "fp32"}] + [
        {"quant": "w4a4", "method": m, "calib_seed": c}
        for c in ("0", "1", "2")
        for m in ("quest", "quest_tla_only", "quest_cma_only", "quest_no_global")
    ]


def test_grid_values_are_overridable(make_cfg):
    cfg = make_cfg(
        [
            "experiment=quest_imagenet",
            "sweep=paper",
            "grid.quant=[w4a4]",
            "grid.methods=[quest_paper]",
            "hydra.sweeper.grids.fp=null",
        ]
    )
    assert sweep_jobs(cfg) == [{"quant": "w4a4", "method": "quest_paper", "calib_seed": "0"}]
    with pytest.raises(ConfigCompositionException):
        make_cfg(["experiment=quest_imagenet", "grid.quants=[w4a4]"])  # typo: the schema names it


@pytest.mark.parametrize("sweep", options("sweep"))
def test_sweep_configs_compose_with_every_launcher(sweep, make_cfg):
    for launcher in options("hydra/launcher"):
        cfg = make_cfg(["experiment=embedded_digits", f"sweep={sweep}", f"hydra/launcher={launcher}"])
        assert "_target_" in cfg.hydra.launcher and cfg.hydra.sweeper.grids.fp is not None


def test_hydra_launcher_options_compose(make_cfg):
    for option in options("hydra/launcher"):
        cfg = make_cfg([f"hydra/launcher={option}"])
        assert "_target_" in cfg.hydra.launcher


@pytest.mark.parametrize(
    "override, needle",
    [
        ("quant.wbits=4", "wbits"),  # misspelt key, named
        ("quant.weight_bits=eight", "weight_bits"),  # wrong type
        ("quant=w5a5", "Available options"),  # unknown option, options listed
        ("method.iterz=3", "iterz"),
    ],
)
def test_bad_overrides_fail_at_compose(override, needle, make_cfg):
    with pytest.raises(ConfigCompositionException) as err:
        make_cfg([override])
    text = str(err.value) + str(err.value.__cause__)
    assert needle in text


@pytest.mark.parametrize(
    "override, needle",
    [
        ("quant.weight_bits=1", "2..16"),
        ("quant.act_bits=17", "2..16"),
        ("evaluator.n_samples=0", "must be positive"),
        ("evaluator.metrics=[fid,fdi]", "Did you mean 'fid'"),
        ("quant.minmax_act_layers=['time_emb[']", "not a regular expression"),
    ],
)
def test_validate_names_the_fix(override, needle, make_cfg):
    cfg = make_cfg([override])
    with pytest.raises((ValueError, KeyError)) as err:
        validate(cfg)
    assert needle in str(err.value)


def test_registries_list_names_on_unknown():
    with pytest.raises(UnknownNameError) as err:
        METHODS.get("ptqq")
    assert "Registered methods" in str(err.value) and "fp" in str(err.value)
    assert "ldm" in MODELS.names()
    assert {"fid", "fid_to_fp", "inception_score"} <= set(EVALUATORS.names())


def test_quantized_methods_validate_and_need_bits(make_cfg):
    run = validate(make_cfg(["quant=w4a8", "method=ptq"]))  # converted to dataclasses once
    assert type(run.method) is METHODS.schema("ptq") and run.quant.weight_bits == 4
    assert run.method.recon.weight_iters == 200  # the dataclass default is the one default
    with pytest.raises(ValueError, match="needs a bit-width"):
        validate(make_cfg(["method=ptq"]))


def test_fp_ignores_quant_so_it_can_sit_in_any_grid(make_cfg):
    run = validate(make_cfg(["quant=w4a8", "method=fp"]))
    assert run.method.name == "fp"


@pytest.mark.parametrize(
    "overrides, needle",
    [
        (["method=ptq", "method.recon.weight_iters=-1"], "method.recon.weight_iters=-1 must be >= 0"),
        (["method=ptq", "method.calib.n_samples=0"], "method.calib.n_samples=0 must be positive"),
        (["method=ptq", "method.recon.warmup=1.5"], "method.recon.warmup=1.5 is not a fraction"),
        (["method=quest", "method.timestep_init=pct"], "method.timestep_init='pct' is unknown"),
        (["method=quest", "method.tla_roles=[time_proj]"], "has unknown role(s) ['time_proj']"),
        (["method=accuquant", "method.grad_mode=fast"], "method.grad_mode='fast' is unknown"),
        (["method=ptq", "quant.minmax_act_roles=[first,lasst]"], "unknown role(s) ['lasst']"),
    ],
)
def test_method_settings_are_validated_up_front_naming_the_key(overrides, needle, make_cfg):
    with pytest.raises(ValueError) as err:
        validate(make_cfg(["quant=w4a8", *overrides]))
    assert needle in str(err.value)


def test_cli_misspelt_key_names_the_closest_valid_key():
    out = run_cli(
        ["quant=w4a8", "method=ptq", "quant.wieght_bits=4", "method.recon.wieght_iters=3", "logger=none"],
        timeout=120,
    )
    assert out.returncode == 2
    assert "Did you mean quant.weight_bits" in out.stderr
    assert "Did you mean method.recon.weight_iters" in out.stderr
    assert "+quant.wieght_bits" not in out.stderr  # not Hydra's append advice


@pytest.mark.parametrize("form", ["experiment=quest_imagenet", "+experiment=quest_imagenet"])
def test_experiment_is_selected_with_or_without_plus(form):
    out = run_cli([form, "--cfg", "job"], timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "experiment: quest_imagenet" in out.stdout and "name: ldm_imagenet" in out.stdout


def test_sweep_is_selected_with_or_without_plus():
    out = run_cli(["+experiment=quest_imagenet", "+sweep=paper", "--cfg", "hydra"], timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "GridSweeper" in out.stdout and "sweep: paper" in out.stdout
