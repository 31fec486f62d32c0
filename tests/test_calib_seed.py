"""``calib_seed``: one knob re-seeds all of calibration (diffquant/seeds.py); 0 leaves every seed
as configured, other values give other calibration sets, other results and other cache entries,
each reproducible."""

from __future__ import annotations

import json

import pytest
import torch
from omegaconf import OmegaConf

from diffquant.api import method_config
from diffquant.calib import CalibSettings, ReconSettings, calib_cache_key, collect_calibration
from diffquant.context import RunContext
from diffquant.methods.accuquant import AccuQuantConfig
from diffquant.methods.ptq import PTQConfig, PTQMinMaxConfig
from diffquant.methods.quest import QuestConfig
from diffquant.methods.result_cache import method_result_key, run_method
from diffquant.quant import QuantConfig
from diffquant.quant.checkpoint import quantizer_state_dict
from diffquant.registry import METHODS
from diffquant.schema import typed_run_config
from diffquant.seeds import CALIB_SEED_STRIDE, derive_seed, seed_fields, with_calib_seed
from diffquant.validation import ConfigError
from tiny_models import TinyDiffusion

pytestmark = pytest.mark.usefixtures("one_thread")

W4A4 = QuantConfig(name="w4a4", weight_bits=4, act_bits=4)
PTQ = PTQConfig(
    calib=CalibSettings(n_samples=6, step_stride=2, batch_size=4, shard_rows=10),
    act_init_rows=16,
    act_init_batch_size=8,
    recon=ReconSettings(weight_iters=4, act_iters=2, batch_size=4, capture_batch_size=8, max_rows=20),
)
PTQ_SEEDS = {"calib.seed", "act_init_seed", "recon.seed", "guard_seed"}
EVERY_SEED = {
    "ptq_minmax": (PTQMinMaxConfig(), {"calib.seed", "act_init_seed"}),
    "ptq": (PTQConfig(), PTQ_SEEDS),
    "quest": (QuestConfig(), {f"ptq.{k}" for k in PTQ_SEEDS} | {"seed", "sensitivity.seed", "guard_seed"}),
    "accuquant": (AccuQuantConfig(), {f"ptq.{k}" for k in PTQ_SEEDS} | {"seed", "guard_seed"}),
}


@pytest.mark.parametrize("name", sorted(EVERY_SEED))
def test_every_base_seed_is_derived_and_calib_seed_0_keeps_them(name):
    cfg, seeds = EVERY_SEED[name]
    base = seed_fields(cfg)
    assert set(base) == seeds
    assert with_calib_seed(cfg, 0) is cfg  # calib_seed=0: the configured seeds, untouched
    derived = seed_fields(with_calib_seed(cfg, 2))
    assert derived == {k: v + 2 * CALIB_SEED_STRIDE for k, v in base.items()}
    assert derived == {k: derive_seed(v, 2) for k, v in base.items()}
    assert seed_fields(cfg) == base  # the base config is not changed in place


def test_the_run_config_derives_the_method_seeds_once(make_cfg):
    cfg = make_cfg(["quant=w4a4", "method=quest", "calib_seed=3"])
    run = typed_run_config(cfg)
    assert run.calib_seed == 3 and cfg.method.ptq.calib.seed == 10_000  # the composed base seed
    assert run.method.ptq.calib.seed == 10_000 + 3 * CALIB_SEED_STRIDE
    assert run.method.seed == run.method.ptq.recon.seed == 3 * CALIB_SEED_STRIDE
    assert typed_run_config(run) is run  # converted once: a typed config is not derived again
    assert seed_fields(run.method) == {k: derive_seed(v, 3) for k, v in seed_fields(QuestConfig()).items()}
    plain_cfg = make_cfg(["quant=w4a4", "method=quest"])
    plain = seed_fields(typed_run_config(plain_cfg).method)
    assert plain == {k: OmegaConf.select(plain_cfg.method, k) for k in plain}  # calib_seed=0: as composed


@pytest.mark.parametrize(
    "override, needle",
    [
        ("calib_seed=-1", "calib_seed=-1 must be an integer in [0, 100000)"),
        ("calib_seed=100000", "calib_seed=100000 must be an integer"),
        ("grid.calib_seeds=[0,-2]", "grid.calib_seeds=[0, -2] must be an integer"),
    ],
)
def test_bad_calib_seeds_name_the_key(override, needle, make_cfg):
    with pytest.raises(ConfigError) as err:
        typed_run_config(make_cfg(["quant=w4a4", "method=ptq", override]))
    assert needle in str(err.value)


def test_the_python_api_derives_the_same_seeds():
    assert method_config("ptq", {}, calib_seed=2) == with_calib_seed(PTQConfig(), 2)
    assert method_config("ptq", {}) == PTQConfig()
    with pytest.raises(ConfigError, match="calib_seed=-1 must be an integer"):
        method_config("ptq", {}, calib_seed=-1)


def _calibrate(tmp_path, name: str, cfg: PTQConfig, cache: str):
    model = TinyDiffusion(steps=6)
    ctx = RunContext(run_dir=tmp_path / name, cache_dir=tmp_path / cache, device=torch.device("cpu"))
    run_method(METHODS.get("ptq")(), model, W4A4, cfg, ctx)
    return model, quantizer_state_dict(model.denoiser)


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_calib_seeds_give_other_calibration_results_and_entries_each_reproducible(tmp_path):
    """PTQ end to end on a tiny model: the configured config (the code path before calib_seed)
    and calib_seed=0 give the same bits and cache keys; calib_seed=1 another calibration set,
    another result and other cache entries, bit-identical when computed again elsewhere."""
    c0, c1 = with_calib_seed(PTQ, 0), with_calib_seed(PTQ, 1)
    model, plain = _calibrate(tmp_path, "plain", PTQ, "cache_plain")
    _, zero = _calibrate(tmp_path, "zero", c0, "cache")
    _, one = _calibrate(tmp_path, "one", c1, "cache")
    _, one_again = _calibrate(tmp_path, "one_again", c1, "cache_again")
    assert _same(zero, plain)
    assert _same(one, one_again)
    assert not _same(one, zero)

    method = METHODS.get("ptq")()
    assert method_result_key(method, model, W4A4, c0) == method_result_key(method, model, W4A4, PTQ)
    assert calib_cache_key(model, c0.calib) == calib_cache_key(model, PTQ.calib)
    assert method_result_key(method, model, W4A4, c1) != method_result_key(method, model, W4A4, c0)
    for kind in ("calib", "ptq"):  # two entries each: calibration seeds never share one
        entries = sorted((tmp_path / "cache" / kind).glob("*/key.json"))
        assert len(entries) == 2, kind
    seeds = {
        json.loads(p.read_text())["calib"]["seed"] for p in (tmp_path / "cache" / "calib").glob("*/key.json")
    }
    assert seeds == {10_000, 10_000 + CALIB_SEED_STRIDE}

    sets = [collect_calibration(TinyDiffusion(steps=6), c.calib, tmp_path / "cache") for c in (c0, c1)]
    first = [next(s.batches(len(s))) for s in sets]
    assert len(sets[0]) == len(sets[1]) and not torch.equal(first[0]["sample"], first[1]["sample"])
