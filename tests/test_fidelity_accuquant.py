"""The AccuQuant rows of the fidelity ledger hold: `experiments/fidelity_accuquant.yaml`
(experiment → {config key: value}) and the `key=value` pairs of `experiments/FIDELITY_accuquant.md`
are what ``python run.py experiment=<experiment>`` composes, and say the same; the typed config
accepts it."""

from __future__ import annotations

import re

import pytest
import yaml
from omegaconf import OmegaConf

from conftest import ROOT
from diffquant.schema import typed_run_config

LEDGER = ROOT / "experiments" / "FIDELITY_accuquant.md"
EXPECTED = yaml.safe_load((ROOT / "experiments" / "fidelity_accuquant.yaml").read_text())
EXPERIMENTS = ["accuquant_imagenet", "accuquant_sd"]
PAIR = re.compile(r"`([a-z_]+(?:\.[a-z_]+)+)=([^`]*)`")


def ledger_pairs() -> dict[str, dict[str, object]]:
    """``{experiment: {key: value}}`` from the ledger's "ours" column (the fourth), per section
    ``### <experiment> · accuquant_paper``."""
    sections: dict[str, dict[str, object]] = {}
    current = None
    for line in LEDGER.read_text().splitlines():
        heading = re.match(r"### (\w+) · accuquant_paper", line)
        if heading:
            current = sections.setdefault(heading.group(1), {})
            continue
        cells = [c.strip() for c in line.split("|")]
        if current is None or len(cells) < 6 or set(cells[1]) <= {"-"}:
            continue
        for key, value in PAIR.findall(cells[4]):
            assert key not in current or current[key] == yaml.safe_load(value), key
            current[key] = yaml.safe_load(value)
    return sections


def test_ledger_and_yaml_list_the_same_settings():
    pairs = ledger_pairs()
    assert sorted(pairs) == sorted(EXPECTED) == sorted(EXPERIMENTS)
    for experiment in EXPERIMENTS:
        assert pairs[experiment] == EXPECTED[experiment], experiment


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_experiment_composes_the_ledger_values(experiment, make_cfg):
    cfg = make_cfg([f"experiment={experiment}"], name=experiment)
    assert cfg.method.name == "accuquant"
    absent = object()
    resolved = {}
    for key in EXPECTED[experiment]:
        value = OmegaConf.select(cfg, key, default=absent, throw_on_missing=True)
        assert value is not absent, f"{key} is not a key of the composed config"
        resolved[key] = OmegaConf.to_container(value) if OmegaConf.is_config(value) else value
    assert resolved == EXPECTED[experiment]
    run = typed_run_config(cfg)  # every value valid for the method's schema
    assert run.method.group_size == EXPECTED[experiment]["method.group_size"]
    assert run.method.learn == EXPECTED[experiment]["method.learn"]
