"""End-to-end FP runs of the embedded ldm_digits through diffquant.app.run and through run.py."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import open_dict
from PIL import Image

from conftest import run_cli
from diffquant.app import METRIC_KEYS, config_hash, run
from diffquant.sample_sheets import load_samples
from diffquant.seeds import derive_seed

SMALL = ["evaluator.n_samples=40", "evaluator.batch_size=20", "logger=none"]


def test_fp_run_writes_metrics_grid_and_config(make_cfg):
    cfg = make_cfg(SMALL)
    metrics = run(cfg)
    out = Path(cfg.paths.output_dir)
    on_disk = json.loads((out / "metrics.json").read_text())
    assert set(METRIC_KEYS) <= set(on_disk)
    assert on_disk == json.loads(json.dumps(metrics))
    assert on_disk["method"] == "fp" and on_disk["weight_bits"] == 32 and on_disk["fid_to_fp"] == 0.0
    assert on_disk["n_samples"] == 40 and on_disk["fid"] > 0 and 1 <= on_disk["inception_score"] <= 10
    assert on_disk["peak_cuda_mb"] is None and on_disk["peak_rss_mb"] > 0
    assert on_disk["model_size_mb"] == pytest.approx(1_849_252 * 4 / 2**20, abs=1e-4)  # ldm_digits' UNet
    assert (out / "samples.png").is_file() and (out / "config.yaml").is_file()
    saved = load_samples(out)  # the same images as the PNG's tiles, for the sweep's sample sheets
    png = np.asarray(Image.open(out / "samples.png"))
    assert saved is not None and saved.shape[0] == 40 and saved.dtype == torch.uint8
    h, w = saved.shape[-2:]
    assert np.array_equal(png[2 : 2 + h, 2 : 2 + w], saved[0, 0].numpy())
    assert np.array_equal(png[2 : 2 + h, 4 + w : 4 + 2 * w], saved[1, 0].numpy())
    assert on_disk["calib_seed"] == 0
    env = on_disk["environment"]
    assert env["torch"] == torch.__version__ and env["threads"] == torch.get_num_threads()
    assert env["cpu_capability"] == torch.backends.cpu.get_cpu_capability() and env["device"] == "cpu"
    assert set(env["cpu_flags"]) == {"avx2", "avx512f", "amx"} and env["cpu_model"] == env["device_name"]
    assert env["diffusers"] and env["transformers"] and env["cuda"] is None


def test_same_seed_same_metrics_other_seed_differs(make_cfg):
    a = run(make_cfg(SMALL, name="a", cache_dir=Path(make_cfg(SMALL, "x").paths.output_dir) / "ca"))
    b = run(make_cfg(SMALL, name="b", cache_dir=Path(make_cfg(SMALL, "y").paths.output_dir) / "cb"))
    c = run(make_cfg([*SMALL, "seed=1"], name="c"))
    for key in ("fid", "inception_score", "config_hash"):
        assert a[key] == b[key]
    assert a["fid"] != c["fid"] and a["config_hash"] != c["config_hash"]


def test_batch_size_does_not_change_samples(make_cfg):
    a = run(make_cfg(SMALL, name="a"))
    b = run(make_cfg([*SMALL, "evaluator.batch_size=40"], name="b"))
    assert a["fid"] == pytest.approx(b["fid"], rel=1e-6)


def test_stopped_run_resumes_without_resampling(make_cfg, monkeypatch):
    cfg = make_cfg(SMALL, name="job")
    first = run(cfg)
    (Path(cfg.paths.output_dir) / "metrics.json").unlink()  # as if killed before recording

    from diffquant.models.base import DiffusionModel

    def no_sampling(*args, **kwargs):
        raise AssertionError("finished batches must not be sampled again")

    monkeypatch.setattr(DiffusionModel, "sample", no_sampling)
    again = run(make_cfg(SMALL, name="job"))
    assert again["fid"] == first["fid"] and again["sample_s"] == first["sample_s"]


def test_wandb_offline_run_lives_in_job_dir(make_cfg):
    cfg = make_cfg(
        ["evaluator.n_samples=20", "evaluator.batch_size=20", "logger=wandb", "logger.mode=offline"]
    )
    run(cfg)
    runs = list((Path(cfg.paths.output_dir) / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and any(runs[0].rglob("*.wandb"))


def test_cli_multirun_two_seeds(tmp_path):
    sweep = tmp_path / "sweep"
    proc = run_cli(
        ["-m", "seed=0,1", *SMALL, f"hydra.sweep.dir={sweep}", f"paths.cache_dir={tmp_path}/cache"]
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    found = sorted(sweep.glob("*/metrics.json"))
    assert len(found) == 2
    seeds = sorted(json.loads(p.read_text())["seed"] for p in found)
    assert seeds == [0, 1]
    assert "[diffquant] ldm_digits fp" in proc.stdout


@pytest.mark.parametrize(
    "args, needle",
    [
        (["quant=w9a9"], "Could not find 'quant/w9a9'"),
        (["evaluator.n_sample=10"], "n_sample"),
        (["evaluator.n_samples=0"], "evaluator.n_samples=0 must be positive"),
        (["model.pretrained=/nonexistent/ldm"], "model.pretrained="),
    ],
)
def test_cli_bad_input_exits_nonzero_naming_the_fix(args, needle, tmp_path):
    proc = run_cli([*args, "logger=none", f"hydra.run.dir={tmp_path}/run"])
    assert proc.returncode != 0
    assert needle in proc.stderr + proc.stdout


def test_quantized_run_through_the_app(make_cfg):
    """A whole quantized job: validate, FP reference, ptq_minmax calibration, evaluation."""
    cfg = make_cfg(
        [
            *SMALL,
            "quant=w8a8",
            "method=ptq_minmax",
            "method.calib.n_samples=8",
            "method.calib.step_stride=5",
            "method.act_init_rows=32",
        ]
    )
    m = run(cfg)
    assert m["method"] == "ptq_minmax" and m["weight_bits"] == 8 and m["act_bits"] == 8
    assert m["n_quant_layers"] > 0 and m["fid_to_fp"] is not None and m["fid_to_fp"] >= 0
    assert m["fp_sample_s"] is not None and m["calibrate_s"] > 0
    fp_mb = 1_849_252 * 4 / 2**20
    assert fp_mb / 4 < m["model_size_mb"] < fp_mb / 3.5  # 8-bit weights, 32-bit norms and scales


def test_calib_seed_is_recorded_and_names_the_job(make_cfg):
    """A ptq_minmax job at calib_seed=1: recorded in metrics.json, in the config hash (which
    calib_seed=0 leaves as it was computed before), and its calibration set drawn with the
    derived seed."""
    args = [
        *SMALL,
        "model.num_inference_steps=5",
        "evaluator.n_samples=20",
        "evaluator.metrics=[fid]",
        "quant=w8a8",
        "method=ptq_minmax",
        "method.calib.n_samples=8",
        "method.act_init_rows=32",
    ]
    zero = make_cfg(args, name="zero")
    before = zero.copy()  # the config as composed before calib_seed existed
    with open_dict(before):
        before.pop("calib_seed")
    assert config_hash(zero) == config_hash(before)
    cfg = make_cfg([*args, "calib_seed=1"], name="one")
    assert config_hash(cfg) != config_hash(zero)
    m = run(cfg)
    assert m["calib_seed"] == 1 and m["config_hash"] == config_hash(cfg)
    keys = [json.loads(p.read_text()) for p in Path(cfg.paths.cache_dir).glob("calib/*/key.json")]
    assert [k["calib"]["seed"] for k in keys] == [derive_seed(10_000, 1)]
