"""The QuEST paper experiments run what the QuEST code runs (the ledger: experiments/FIDELITY.md,
whose values tests/test_fidelity.py checks): each experiment's default method is its QuEST row, on
the table's Q-Diffusion row as its PTQ base; the per-step running statistics resolve on exactly where
the reference passes ``--running_stat``; and each one's QuEST row runs end to end on tiny
random-weight models of the real classes."""

from __future__ import annotations

import pytest
import torch
from omegaconf import open_dict

from conftest import CONF
from diffquant.context import RunContext
from diffquant.methods.quest import step_init
from diffquant.methods.result_cache import run_method
from diffquant.models.loading import build_model
from diffquant.quant import iter_quantizers
from diffquant.registry import METHODS
from diffquant.schema import typed_run_config
from test_real_models import tiny_folder

#: method.timestep_init_running_stat resolved per bit-width of each table: on where the README
#: command passes --running_stat (Bedroom, ImageNet, SD), except at W4A4 (README.md:37); never
#: for Church (no --running_stat)
RUNNING = {
    "quest_lsun_bedroom": {"w8a8": True, "w4a8": True, "w4a4": False},
    "quest_lsun_church": {"w8a8": False, "w4a8": False, "w4a4": False},
    "quest_imagenet": {"w8a8": True, "w4a8": True, "w4a4": False},
    "quest_sd": {"w8a8": True, "w4a8": True, "w4a4": False},
}
EXPERIMENTS = sorted(RUNNING)
#: each table's QuEST row and Q-Diffusion row (grid.methods)
ROWS = {
    "quest_lsun_bedroom": ("quest_paper", "ptq_paper"),
    "quest_lsun_church": ("quest_paper_church", "ptq_paper"),
    "quest_imagenet": ("quest_paper_imagenet", "ptq_paper"),
    "quest_sd": ("quest_paper_sd", "ptq_paper_sd"),
}

pytestmark = pytest.mark.usefixtures("one_thread")


def test_every_quest_experiment_is_covered():
    found = sorted(p.stem for p in (CONF / "experiment").glob("quest_*.yaml"))
    assert found == EXPERIMENTS == sorted(ROWS)


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_default_method_is_the_quest_row_on_the_tables_ptq_row(experiment, make_cfg):
    """``experiment=<name>`` composes the table's QuEST row, a valid typed config, whose PTQ base
    has the settings of the table's Q-Diffusion row (its ``quant_overrides`` are not applied to a
    base: ``load_or_run_ptq``)."""
    quest_row, ptq_row = ROWS[experiment]
    cfg = make_cfg([f"experiment={experiment}"], name="default")
    methods = list(cfg.grid.methods)  # the Q-Diffusion row first, the paper's own row last,
    assert methods[0] == ptq_row and methods[-1] == quest_row  # the table's other rows between
    run = typed_run_config(cfg)  # the values are valid settings
    assert run.method.name == "quest" and run.method.loss_form == "code"
    base = typed_run_config(make_cfg([f"experiment={experiment}", f"method={ptq_row}"], name="ptq"))
    assert run.method.ptq == base.method


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_running_statistics_follow_the_bit_width(experiment, make_cfg):
    for quant, expected in RUNNING[experiment].items():
        run = typed_run_config(
            make_cfg([f"experiment={experiment}", f"quant={quant}"], name=f"{experiment}_{quant}")
        )
        assert step_init(run.method, run.quant).running is expected, (experiment, quant)


# ---------------------------------------------------------------------------- end to end
MODELS = {
    "quest_lsun_bedroom": "ldm_bedroom",
    "quest_lsun_church": "ldm_church",
    "quest_imagenet": "ldm_imagenet",
    "quest_sd": "sd_v1_4",
}
SMALL = [
    "quant=w4a8",
    "model.num_inference_steps=4",
    "method.ptq.calib.n_samples=2",
    "method.ptq.calib.batch_size=2",
    "method.ptq.calib.step_stride=1",
    "method.ptq.act_init_rows=8",
    "method.ptq.act_init_batch_size=8",
    "method.ptq.recon.weight_iters=1",
    "method.ptq.recon.act_iters=1",
    "method.ptq.recon.batch_size=4",
    "method.ptq.recon.capture_batch_size=8",
    "method.tla_epochs=1",
    "method.cma_epochs=1",
    "method.samples_per_step=2",
    "method.tla_samples_per_step=1",
    "method.timestep_init_running_batch_size=2",
    "method.eval_rows=2",
]


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_quest_row_runs_on_tiny_models_of_the_real_classes(experiment, make_cfg, tmp_path):
    """The experiment's QuEST settings (its per-step init on the quantized network with running
    statistics at W4A8, the code's loss form, its critical layers) on tiny random-weight
    components; LSUN / ImageNet set every group from its own step, SD (whose PNDM schedule
    repeats a time step) one shared set."""
    folder, extra = tiny_folder(MODELS[experiment], tmp_path)
    rows = (
        "method.timestep_init_rows=2" if experiment == "quest_sd" else "method.timestep_init_rows_per_step=2"
    )
    cfg = make_cfg([f"experiment={experiment}", f"model.pretrained={folder}", *extra, *SMALL, rows])
    with open_dict(cfg):  # the paper's 20 / 25 calibration steps need more than 4 sampler steps
        cfg.method.ptq.calib.n_steps = None
    run = typed_run_config(cfg)
    model = build_model(cfg.model)
    ctx = RunContext(run_dir=tmp_path / "run", cache_dir=tmp_path / "cache", device=torch.device("cpu"))
    result = run_method(METHODS.get("quest")(), model, run.quant, run.method, ctx)
    m = result.metrics
    steps = len(model.timesteps)
    assert m["timestep_groups"] == steps and result.quant.timestep_aware
    assert m["tla_steps"] > 0 and m["cma_steps"] > 0 and m["critical_layers"]
    if experiment != "quest_sd":
        assert m["cma_local_loss_last"] == 0.0  # LSUN / ImageNet: CMA's global term alone
        # every group was set from its own step: no two neighbouring groups are equal
        q = model.denoiser.conv_in.input_quantizer
        assert all(not torch.equal(q.scale[g], q.scale[g + 1]) for g in range(steps - 1))
    else:
        assert all(".ff.net." in n for n in m["critical_layers"])
        assert [int(t) for t in model.timesteps].count(int(model.timesteps[1])) == 2  # PNDM
    for _, q in iter_quantizers(model.denoiser, "act"):
        assert torch.isfinite(q.scale).all()
    with torch.no_grad():
        images, _ = model.sample([0], seed=0)
    assert torch.isfinite(images).all()
