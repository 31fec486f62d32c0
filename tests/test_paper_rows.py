"""Every method row of every experiment's grid runs through the application (what ``python run.py
experiment=<name> method=<row>`` runs) at tiny scale: tiny random components of the real classes
(the embedded models for ``embedded_digits``), 4 sampler steps, iterations and samples cut by
overrides. The Q-Diffusion baseline rows, with the papers' full sampler steps, are run by
``tests/test_fidelity.py``; the methods' behaviour on these models by ``tests/test_fidelity_quest.py``
and ``tests/test_trajectory_multistep.py``.
"""

from __future__ import annotations

import math

import pytest
import yaml

from conftest import CONF
from diffquant.schema import typed_run_config
from test_fidelity import sampler_calls

pytestmark = pytest.mark.usefixtures("one_thread")

BASELINES = ("ptq_paper", "ptq_paper_sd", "ptq")


def experiments() -> list[str]:
    return sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))


def grid_methods(experiment: str) -> list[str]:
    return yaml.safe_load((CONF / "experiment" / f"{experiment}.yaml").read_text())["grid"]["methods"]


ROWS = [(e, m) for e in experiments() for m in grid_methods(e) if m not in BASELINES]

#: what every run is cut to: 4 evaluation samples, 2 calibration trajectories, 1-2 iterations
TINY = [
    "logger=none",
    "evaluator=digits",
    "evaluator.reference=digits_heldout",
    "evaluator.n_samples=4",
    "evaluator.batch_size=4",
    "evaluator.grid_size=0",
    "model.num_inference_steps=4",
]
PTQ = [  # a PTQ config's keys (prefixed with its place: `method.` or `method.ptq.`)
    "calib.n_samples=2",
    "calib.batch_size=2",
    "calib.n_steps=null",
    "act_init_rows=4",
    "act_init_batch_size=4",
    "act_running_batch_size=4",
    "recon.weight_iters=2",
    "recon.act_iters=2",
    "recon.batch_size=4",
    "recon.capture_batch_size=64",
]
SVDQUANT = [  # the statistics' and the search's rows, and the (alpha, beta) grid
    "method.calib.n_samples=2",
    "method.calib.batch_size=2",
    "method.act_init_rows=4",
    "method.act_init_batch_size=4",
    "method.search_rows=4",
    "method.search_batch_size=4",
    "method.num_grids=4",
]
BY_METHOD = {
    "ptq_minmax": ["method.calib.n_samples=2", "method.calib.batch_size=2"],
    "svdquant": SVDQUANT,
    "vidit_q": SVDQUANT,
    "ptq4dm": [f"method.{o}" for o in PTQ],
    "ptqd": [*(f"method.ptq.{o}" for o in PTQ), "method.n_samples=2", "method.batch_size=2"],
    "efficientdm": [
        "method.base.calib.n_samples=2",
        "method.base.calib.batch_size=2",
        "method.base.act_init_rows=4",
        "method.base.act_init_batch_size=4",
        "method.epochs=1",
        "method.batch_size=1",
        "method.rank=2",
    ],
    "tfmq": [
        "method.calib.n_samples=2",
        "method.calib.batch_size=2",
        "method.calib.n_steps=null",
        "method.act_calib.n_samples=2",
        "method.act_calib.batch_size=2",
        "method.recon.weight_iters=2",
        "method.recon.batch_size=4",
        "method.recon.capture_batch_size=64",
        "method.tiar_iters=2",
        "method.fsc_init_rows=2",
        "method.fsc_batch_size=2",
    ],
    "quest": [
        "method.tla_epochs=1",
        "method.cma_epochs=1",
        "method.samples_per_step=2",
        "method.tla_samples_per_step=1",
        "method.timestep_init_running_batch_size=2",
        "method.eval_rows=2",
        "method.guard_samples=2",
    ],
    "accuquant": [
        "method.n_samples=2",
        "method.batch_size=2",
        "method.eval_batch_size=2",
        "method.iters_per_group=2",
        "method.guard_samples=2",
    ],
}


def _model_overrides(experiment: str, make_cfg, tmp_path) -> list[str]:
    from test_real_models import tiny_folder

    model = make_cfg([f"experiment={experiment}"], name="probe").model.name
    if model.endswith("digits"):
        return []
    folder, extra = tiny_folder(model, tmp_path)
    return [f"model.pretrained={folder}", *extra]


@pytest.mark.parametrize("experiment,method", ROWS, ids=[f"{e}-{m}" for e, m in ROWS])
def test_every_method_row_runs_through_the_app(experiment, method, make_cfg, tmp_path):
    from diffquant.app import run

    name = make_cfg([f"experiment={experiment}", f"method={method}"], name="name").method.name
    cut = [*TINY, *BY_METHOD.get(name, [])]
    if name in ("quest", "accuquant"):
        cut += [f"method.ptq.{o}" for o in PTQ]
    if name == "quest":  # the per-step init's rows: the SD script's shared set, else per step
        shared = make_cfg([f"experiment={experiment}", f"method={method}"], name="scope")
        rows_key = (
            "timestep_init_rows"
            if shared.method.timestep_init_scope == "shared"
            else "timestep_init_rows_per_step"
        )
        cut.append(f"method.{rows_key}=2")
    cfg = make_cfg(
        [
            f"experiment={experiment}",
            f"method={method}",
            *_model_overrides(experiment, make_cfg, tmp_path),
            *cut,
        ]
    )
    metrics = run(cfg)
    assert metrics["method"] == name and metrics["n_samples"] == 4
    assert math.isfinite(metrics["fid_to_fp"]) and metrics["fid_to_fp"] > 0
    typed = typed_run_config(cfg)
    calls = sampler_calls(typed.model)  # PNDM: 5 denoiser calls for 4 steps
    if name == "quest":  # one time-step group per recorded calibration step
        assert metrics["timestep_groups"] == len(typed.method.ptq.calib.recorded_steps(calls))
        assert metrics["tla_steps"] > 0 and metrics["cma_steps"] > 0
    if name == "accuquant":
        assert metrics["accuquant_groups"] == math.ceil(calls / typed.method.group_size)
    if name == "tfmq":  # one activation set per sampler call; the temporal block reconstructed
        assert metrics["tfmq_act_sets"] == calls and metrics["tfmq_tiar_layers"] > 0
    if name == "ptqd":  # the correction was measured and installed
        assert math.isfinite(metrics["ptqd_k_mean"]) and metrics["ptqd_samples"] == 2
    if name == "efficientdm":  # LoRA merged; one step-size set per sampler call
        assert metrics["efficientdm_lora_layers"] > 0 and metrics["efficientdm_talsq_sets"] == calls
    if name == "ptq4dm":  # NDTC: one row per trajectory (two with guidance)
        assert metrics["calib_rows"] == 2 * (2 if typed.model.guidance_scale != 1.0 else 1)
