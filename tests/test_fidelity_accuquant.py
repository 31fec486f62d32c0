"""The AccuQuant paper experiments compose what the ledger says (experiments/FIDELITY.md, whose
values tests/test_fidelity.py checks): each experiment's default method is its AccuQuant row, a
valid typed config, on the table's Q-Diffusion row as its PTQ base."""

from __future__ import annotations

import pytest

from diffquant.schema import typed_run_config

#: each table's AccuQuant row and Q-Diffusion row (grid.methods)
ROWS = {
    "accuquant_imagenet": ("accuquant_paper", "ptq_paper"),
    "accuquant_sd": ("accuquant_paper_sd", "ptq_paper_sd"),
}


@pytest.mark.parametrize("experiment", sorted(ROWS))
def test_default_method_is_the_accuquant_row_on_the_tables_ptq_row(experiment, make_cfg):
    accuquant_row, ptq_row = ROWS[experiment]
    cfg = make_cfg([f"experiment={experiment}"], name=experiment)
    methods = list(cfg.grid.methods)  # the Q-Diffusion row first, the paper's own row last,
    assert methods[0] == ptq_row and methods[-1] == accuquant_row  # the table's other rows between
    assert cfg.method.name == "accuquant"
    run = typed_run_config(cfg)  # every value valid for the method's schema
    assert run.method.group_size == 2
    assert run.method.learn == ["act_scale", "weight_round"]
    # the base: the Q-Diffusion row's settings (its quant_overrides are not applied to a base)
    base = typed_run_config(make_cfg([f"experiment={experiment}", f"method={ptq_row}"], name="ptq"))
    assert run.method.ptq == base.method
