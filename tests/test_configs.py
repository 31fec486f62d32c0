"""Every config option composes; schemas reject typos and wrong types; validation names the fix."""

from __future__ import annotations

import pytest
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


def test_hydra_launcher_options_compose(make_cfg):
    for option in options("hydra/launcher"):
        cfg = make_cfg([f"hydra/launcher={option}"])
        assert "_target_" in cfg.hydra.launcher


@pytest.mark.parametrize("override, needle", [
    ("quant.wbits=4", "wbits"),                  # misspelt key, named
    ("quant.weight_bits=eight", "weight_bits"),  # wrong type
    ("quant=w5a5", "Available options"),         # unknown option, options listed
    ("method.iterz=3", "iterz"),
])
def test_bad_overrides_fail_at_compose(override, needle, make_cfg):
    with pytest.raises(ConfigCompositionException) as err:
        make_cfg([override])
    text = str(err.value) + str(err.value.__cause__)
    assert needle in text


@pytest.mark.parametrize("override, needle", [
    ("quant.weight_bits=1", "2..16"),
    ("quant.act_bits=17", "2..16"),
    ("evaluator.n_samples=0", "must be positive"),
    ("evaluator.metrics=[fid,fdi]", "Did you mean 'fid'"),
    ("quant.minmax_act_layers=['time_emb[']", "not a regular expression"),
])
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
    validate(make_cfg(["quant=w4a8", "method=ptq"]))  # a DictConfig-typed quant node validates
    with pytest.raises(ValueError, match="needs a bit-width"):
        validate(make_cfg(["method=ptq"]))
    with pytest.raises(ValueError, match="method=fp evaluates the full-precision model"):
        validate(make_cfg(["quant=w4a8"]))


@pytest.mark.parametrize("form", ["experiment=quest_imagenet", "+experiment=quest_imagenet"])
def test_experiment_is_selected_with_or_without_plus(form):
    out = run_cli([form, "--cfg", "job"], timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "experiment: quest_imagenet" in out.stdout and "name: ldm_imagenet" in out.stdout
