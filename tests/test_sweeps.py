"""Sweeps on one machine: a basic and a submitit-local multirun, the table built from a sweep, a
killed job that resumes to the same metrics, a cache entry two processes compute once, sharded
evaluation merged into the unsharded metrics, and W&B grouping by sweep."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from conftest import ROOT, run_cli
from diffquant.app import run
from diffquant.shards import merge_sweep, shard_indices
from diffquant.tables import fmt_num

FAST = ["model.num_inference_steps=5"]  # tests check plumbing, not image quality
SMALL = [*FAST, "evaluator.n_samples=20", "evaluator.batch_size=20", "logger=none"]


def metrics_of(path: Path) -> dict:
    return json.loads((path / "metrics.json").read_text())


def test_paper_sweep_runs_fp_once_then_the_grid_then_writes_the_table(tmp_path):
    """One command, `experiment=embedded_digits sweep=paper` with the grid cut to W8A8 x
    ptq_minmax: the FP row (once, first), the grid's job, then the table callback's table."""
    sweep = tmp_path / "sweep"
    proc = run_cli(
        [
            "experiment=embedded_digits",
            "sweep=paper",
            "grid.quant=[w8a8]",
            "grid.methods=[ptq_minmax]",
            "grid.calib_seeds=[0]",
            *SMALL,
            "analysis.error_accumulation=false",
            f"hydra.sweep.dir={sweep}",
            f"paths.cache_dir={tmp_path}/cache",
        ]
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(p.parent.name for p in sweep.glob("*/metrics.json")) == [
        "0_ldm_digits_fp32_fp_s0",
        "1_ldm_digits_w8a8_ptq_minmax_s0",
    ]
    fp, q = (metrics_of(sweep / n) for n in ("0_ldm_digits_fp32_fp_s0", "1_ldm_digits_w8a8_ptq_minmax_s0"))
    assert q["fp_sample_s"] == fp["sample_s"]  # the FP reference is the FP job's cached features
    md = (sweep / "table.md").read_text()
    assert f"| ldm_digits | fp | W32A32 | 1 | 20 | {fmt_num(fp['fid'], 'fid')} |" in md
    assert f"| ldm_digits | ptq_minmax | W8A8 | 1 | 20 | {fmt_num(q['fid'], 'fid')} |" in md
    assert f"[diffquant] table -> {sweep / 'table.md'}" in proc.stdout
    for name in ("table.tex", "table.csv"):
        assert (sweep / name).stat().st_size > 0


@pytest.mark.slurm
def test_paper_sweep_on_slurm_writes_the_table(slurm_env, tmp_path):
    """The same one command through `hydra/launcher=slurm`: the grid is one job array, and the
    table callback runs in the launching process once the array has finished."""
    from slurm_cluster import default_partition

    sweep = tmp_path / "sweep"
    proc = run_cli(
        [
            "experiment=embedded_digits",
            "sweep=paper",
            "grid.quant=[w8a8]",
            "grid.methods=[ptq_minmax]",
            "grid.calib_seeds=[0]",
            *SMALL,
            "analysis.error_accumulation=false",
            "hydra/launcher=slurm",
            f"slurm.partition={default_partition(slurm_env)}",
            "slurm.gpus_per_node=null",
            "slurm.cpus_per_task=1",
            "slurm.mem_gb=1",
            "slurm.timeout_min=10",
            f"hydra.sweep.dir={sweep}",
            f"paths.cache_dir={tmp_path}/cache",
        ],
        env={**slurm_env, "WANDB_MODE": "offline"},
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "#SBATCH --array=0-1" in next(sweep.glob(".submitit/*/*_submission.sh")).read_text()
    md = (sweep / "table.md").read_text()
    assert (
        "| ldm_digits | fp | W32A32 | 1 | 20 |" in md and "| ldm_digits | ptq_minmax | W8A8 | 1 | 20 |" in md
    )


def test_local_multirun_of_two_shards_is_merged_and_tabled(tmp_path):
    """`sweep=paper` with only its FP row (empty method list), the 20 samples split over two jobs:
    the sweep's callbacks merge the shards, then table the merged result."""
    sweep = tmp_path / "sweep"
    proc = run_cli(
        [
            "experiment=embedded_digits",
            "sweep=paper",
            "grid.methods=[]",
            *SMALL,
            "evaluator.batch_size=5",
            "evaluator.num_shards=2",
            "evaluator.shard_index=0,1",
            f"hydra.sweep.dir={sweep}",
            f"paths.cache_dir={tmp_path}/cache",
        ]
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    shards = sorted(p.parent for p in sweep.glob("*/shard.pt"))
    assert [p.name for p in shards] == ["0_ldm_digits_fp32_fp_s0", "1_ldm_digits_fp32_fp_s0"]
    assert [metrics_of(p)["n_samples"] for p in shards] == [10, 10]
    assert "[diffquant] merged shards ->" in proc.stdout
    merged = metrics_of(next(sweep.glob("merged/*")))
    assert merged["n_samples"] == 20 and merged["experiment"] == "embedded_digits" and merged["fid"] > 0
    row = f"| ldm_digits | fp | W32A32 | 1 | 20 | {fmt_num(merged['fid'], 'fid')} |"
    assert row in (sweep / "table.md").read_text()

    out = subprocess.run(
        [sys.executable, "-m", "diffquant.tables", str(sweep), "--out", str(tmp_path / "t")],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert out.returncode == 0, out.stderr
    assert row in out.stdout
    for name in ("table.md", "table.tex", "table.csv"):
        assert (tmp_path / "t" / name).stat().st_size > 0


def test_grid_sweeper_expands_a_union_of_grids():
    """The grids sweeper: each grid's product with the command line's sweeps, in order, duplicates
    once; null grids skipped, empty lists give no job; a key both swept by a grid and set on the
    command line is an error naming the fix."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    from hydra_plugins.diffquant_sweeper.grid_sweeper import expand_grids

    parse = OverridesParser.create().parse_overrides
    grids = {
        "fp": {"method": "fp", "quant": "fp32"},
        "q": {"quant": ["w8a8", "w4a4"], "method": ["ptq", "quest"]},
        "abl": {"quant": "w4a4", "method": ["quest", "quest_tla_only"]},
        "off": None,
        "empty": {"method": []},
    }
    jobs = expand_grids(grids, parse(["experiment=x", "seed=0,1"]))
    assert [" ".join(j[2:]) for j in jobs if j[1] == "seed=0"] == [
        "method=fp quant=fp32",
        "quant=w8a8 method=ptq",
        "quant=w8a8 method=quest",
        "quant=w4a4 method=ptq",
        "quant=w4a4 method=quest",
        "quant=w4a4 method=quest_tla_only",
    ]
    assert len(jobs) == 12 and all(j[0] == "experiment=x" for j in jobs)
    assert expand_grids({}, parse(["a=1,2"])) == [["a=1"], ["a=2"]]  # no grids: the basic sweeper
    jobs = expand_grids({"g": {"x": "range(0,2)", "s": ["a b", "c"]}}, [])  # sweep strings; quoting
    assert [[o.split("=")[0] for o in j] for j in jobs] == [["x", "s"]] * 4
    assert [[o.value() for o in parse(j)] for j in jobs] == [[0, "a b"], [0, "c"], [1, "a b"], [1, "c"]]
    with pytest.raises(HydraException, match=r"`quant=w4a4` sets 'quant'.*grid\.quant=\[w4a4\]"):
        expand_grids(grids, parse(["quant=w4a4"]))


def test_outer_keys_order_the_union_stably():
    """`outer` keys sort the jobs by their values, in first-seen order, keeping the order within
    a value; a job without the key sorts with the first value."""
    from hydra_plugins.diffquant_sweeper.grid_sweeper import expand_grids

    grids = {"fp": {"method": "fp"}, "q": {"method": ["ptq", "quest"], "calib_seed": [2, 0]}}
    jobs = expand_grids(grids, [], outer=["calib_seed"])
    assert [" ".join(j) for j in jobs] == [
        "method=fp",
        "method=ptq calib_seed=2",
        "method=quest calib_seed=2",
        "method=ptq calib_seed=0",
        "method=quest calib_seed=0",
    ]
    assert expand_grids(grids, [])[1:3] == [["method=ptq", "calib_seed=2"], ["method=ptq", "calib_seed=0"]]


def _jobs(cfg) -> list[dict[str, str]]:
    from omegaconf import OmegaConf

    from hydra_plugins.diffquant_sweeper.grid_sweeper import expand_grids

    grids = OmegaConf.to_container(cfg.hydra.sweeper.grids, resolve=True)
    return [
        dict(o.split("=", 1) for o in job) for job in expand_grids(grids, [], outer=cfg.hydra.sweeper.outer)
    ]


@pytest.mark.parametrize("sweep, n_fp", [("paper", 1), ("embedded", 3)])
def test_a_sweep_over_calibration_seeds_doubles_the_quantized_jobs(sweep, n_fp, make_cfg):
    """`grid.calib_seeds=[0,1]`: every quantized `ldm_digits` job twice, once per calibration seed
    (the FP rows once; `sweep=embedded`'s `sd_digits` and `dit_digits` jobs follow
    `grid.sd_calib_seeds` and `grid.dit_calib_seeds`, here `[0]`: the `n_fixed` jobs); the
    calib_seed=0 jobs first, with the numbers and folder names of a sweep without calibration seeds (`10_ldm_digits_w4a4_ptq_s0`), then the calib_seed=1 jobs in the same
    order, their folders named `..._s0_c1`; each job composes with its calib_seed."""
    base = [
        "experiment=embedded_digits",
        f"sweep={sweep}",
        "grid.quant=[w8a8,w4a8,w4a4]",
        "grid.sd_calib_seeds=[0]",
        "grid.dit_calib_seeds=[0]",
    ]
    # 3 bit-widths x the n methods of grid.methods; embedded: + 3 ablations, sd_digits and
    # dit_digits 3n each (the n_fixed jobs of one calibration seed)
    n = len(make_cfg(base, name="count").grid.methods)
    n_quantized, n_fixed = (3 * n, 0) if sweep == "paper" else (9 * n + 3, 6 * n)
    one = _jobs(make_cfg([*base, "grid.calib_seeds=[0]"], name="one"))
    two = _jobs(make_cfg([*base, "grid.calib_seeds=[0,1]"], name="two"))
    assert len(one) == n_fp + n_quantized and len(two) == n_fp + 2 * n_quantized - n_fixed
    assert two[: len(one)] == one  # calib_seed=0: the jobs (and numbers) of one seed
    assert sum(j["method"] == "fp" for j in two) == n_fp and all(
        "calib_seed" not in j for j in two if j["method"] == "fp"
    )
    quantized = [j for j in one if j["method"] != "fp"]
    assert all(j["calib_seed"] == "0" for j in quantized)
    doubled = [j for j in quantized if j.get("model") not in ("sd_digits", "dit_digits")]
    assert two[len(one) :] == [{**j, "calib_seed": "1"} for j in doubled]

    def folder(num: int) -> str:
        overrides = [*base, *(f"{k}={v}" for k, v in two[num].items()), f"hydra.job.num={num}"]
        cfg = make_cfg(overrides, name=f"job{num}")
        assert cfg.calib_seed == int(two[num].get("calib_seed", 0))
        return cfg.hydra.sweep.subdir

    # the ldm_digits W4A4 ptq job: after the FP row and the W8A8 / W4A8 rows of every method
    k = 1 + 2 * len(make_cfg(base, name="methods").grid.methods) + 1
    assert two[k]["quant"] == "w4a4" and two[k]["method"] == "ptq"
    assert folder(k) == f"{k}_ldm_digits_w4a4_ptq_s0"
    assert folder(len(one) + k - 1) == f"{len(one) + k - 1}_ldm_digits_w4a4_ptq_s0_c1"
    assert two[len(one) + k - 1] == {**two[k], "calib_seed": "1"}


def test_makefile_sweep_targets_are_one_run_py_call_each():
    """`make sweep` / `make sweep-embedded` are one run.py command with a sweep config, and what
    they run composes into the grid sweep."""
    if shutil.which("make") is None:
        pytest.skip("no make")

    def recipe(*args: str) -> list[str]:
        out = subprocess.run(
            ["make", "-n", "-s", "-o", ".venv/.installed", *args, "PY=python"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert out.returncode == 0, out.stderr
        return [line.split() for line in out.stdout.splitlines() if line.strip()]

    for args, expected in [
        (
            ["sweep", "EXPERIMENT=quest_imagenet", "LAUNCHER=slurm", "ARGS=slurm.partition=gpu"],
            ["experiment=quest_imagenet", "sweep=paper", "hydra/launcher=slurm", "slurm.partition=gpu"],
        ),
        (
            ["sweep", "EXPERIMENT=embedded_digits", "SWEEP_CONFIG=ablations", "SWEEP=out/a"],
            [
                "experiment=embedded_digits",
                "sweep=ablations",
                "hydra/launcher=basic",
                "hydra.sweep.dir=out/a",
            ],
        ),
        (
            ["sweep-embedded", "LAUNCHER=local"],
            ["experiment=embedded_digits", "sweep=embedded", "hydra/launcher=local"],
        ),
    ]:
        lines = recipe(*args)
        assert len(lines) == 1 and lines[0][:2] == ["python", "run.py"], lines
        assert lines[0][2:] == expected
        sweep_cfg = next(a for a in expected if a.startswith("sweep="))
        assert (ROOT / "conf" / "sweep" / f"{sweep_cfg.split('=')[1]}.yaml").is_file()


def test_submitit_local_multirun_groups_wandb_runs(tmp_path):
    """hydra/launcher=local pickles each job into its own process (the SLURM launcher's path); each
    job is one offline W&B run, grouped by the sweep folder, typed and tagged."""
    sweep = tmp_path / "2026-01-02" / "03-04-05"
    proc = run_cli(
        [
            "-m",
            "hydra/launcher=local",
            "seed=0,1",
            *FAST,
            "evaluator.n_samples=20",
            "evaluator.batch_size=20",
            "logger=wandb",
            "logger.mode=offline",
            "logger.job_type=null",
            "logger.log_images=false",
            f"hydra.sweep.dir={sweep}",
            f"paths.cache_dir={tmp_path}/cache",
        ]
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    jobs = sorted(p.parent for p in sweep.glob("*/metrics.json"))
    assert len(jobs) == 2 and sorted(metrics_of(p)["seed"] for p in jobs) == [0, 1]
    assert list((sweep / ".submitit").glob("*/*_result.pkl")), "jobs did not run through submitit"
    for job in jobs:
        runs = list((job / "wandb").glob("offline-run-*/run-*.wandb"))
        assert len(runs) == 1, f"{job}: expected one W&B run"
        record = runs[0].read_bytes()  # protobuf: the strings appear verbatim
        for needle in (b"2026-01-02_03-04-05", b"evaluate", b"ldm_digits", b"fp32"):
            assert needle in record, f"{needle!r} not in {runs[0]}"


def test_wandb_group_job_type_and_tags(make_cfg, monkeypatch):
    """The tracker's W&B arguments: group = sweep folder (or logger.group), job_type, tags."""
    import wandb
    from hydra.core.hydra_config import HydraConfig

    from diffquant.tracking import group_name, make_tracker

    seen = {}
    monkeypatch.setattr(wandb, "init", lambda **kw: seen.update(kw) or object())
    cfg = make_cfg(["logger=wandb", "hydra.mode=MULTIRUN", "hydra.sweep.dir=/x/sweeps/2026-05-06/07-08-09"])
    HydraConfig().set_config(cfg)
    make_tracker(cfg.logger, {}, Path("/tmp"), "job", ["ldm_digits", "w4a8", "ptq"], job_type="quantize")
    assert seen["group"] == "2026-05-06_07-08-09" and seen["job_type"] == "quantize"
    assert seen["tags"] == ["ldm_digits", "w4a8", "ptq"] and seen["reinit"] == "finish_previous"
    cfg = make_cfg(["logger=wandb", "logger.group=mine", "logger.job_type=evaluate", "hydra.mode=MULTIRUN"])
    HydraConfig().set_config(cfg)
    make_tracker(cfg.logger, {}, Path("/tmp"), "job", [], job_type="quantize")
    assert seen["group"] == "mine" and seen["job_type"] == "evaluate"
    assert (
        group_name("outputs/multiruns/2026-11-21_05-10-00_embedded_digits")
        == "2026-11-21_05-10-00_embedded_digits"
    )


def test_killed_job_resumes_to_the_same_metrics(tmp_path, make_cfg):
    """SIGKILL mid-sampling (no cleanup runs), rerun in the same folder: finished batches are kept,
    the rest sampled, and metrics.json equals an uninterrupted run's."""
    args = [
        *FAST,
        "evaluator.n_samples=40",
        "evaluator.batch_size=5",
        "evaluator.chunk_size=5",  # one model call per saved batch, so a kill lands mid-run
        "logger=none",
        f"paths.cache_dir={tmp_path}/cache",
    ]
    run_dir = tmp_path / "job"
    env = {**os.environ, "WANDB_MODE": "offline"}
    cmd = [sys.executable, str(ROOT / "run.py"), *args, f"hydra.run.dir={run_dir}"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    progress = run_dir / "progress"
    deadline = time.monotonic() + 240
    while len(list(progress.glob("batch_*.pt"))) < 2:
        assert proc.poll() is None, "the job ended before it could be killed"
        assert time.monotonic() < deadline, "no sample batch finished in time"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert not (run_dir / "metrics.json").exists(), "killed too late: the job had finished"
    kept = {p.name: p.stat().st_mtime_ns for p in progress.glob("batch_*.pt")}
    assert 2 <= len(kept) < 8

    again = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    for name, mtime in kept.items():  # resumed, not redone
        assert (progress / name).stat().st_mtime_ns == mtime
    assert len(list(progress.glob("batch_*.pt"))) == 8

    reference = run(make_cfg(args, name="uninterrupted"))
    resumed = metrics_of(run_dir)
    assert (resumed["n_samples"], resumed["config_hash"]) == (
        reference["n_samples"],
        reference["config_hash"],
    )
    for key in ("fid", "inception_score"):  # equal up to thread-count rounding (subprocess vs here)
        assert resumed[key] == pytest.approx(reference[key], rel=1e-6), key


CACHE_USER = textwrap.dedent("""
    import os, sys, time
    from pathlib import Path
    from diffquant.cache import CacheEntry

    root, marker, go = map(Path, sys.argv[1:4])
    while not go.exists():
        time.sleep(0.01)
    entry = CacheEntry(root, "calib", {"model": "ldm_digits", "steps": 20})
    with entry.lock():
        if not entry.done():
            with open(marker, "a") as f:
                f.write(f"{os.getpid()}\\n")
            time.sleep(1.0)  # long enough for the other process to ask meanwhile
            with entry.writing() as tmp:
                (tmp / "data.txt").write_text(str(os.getpid()))
    print((entry.path / "data.txt").read_text())
""")


def test_two_concurrent_jobs_compute_a_cache_entry_once(tmp_path):
    script = tmp_path / "use_cache.py"
    script.write_text(CACHE_USER)
    marker, go = tmp_path / "computed.txt", tmp_path / "go"
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), str(tmp_path / "cache"), str(marker), str(go)],
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    time.sleep(0.5)
    go.touch()
    outs = [p.communicate(timeout=60)[0].strip() for p in procs]
    assert [p.returncode for p in procs] == [0, 0]
    computed = marker.read_text().split()
    assert len(computed) == 1, f"computed {len(computed)} times"
    assert outs == [computed[0], computed[0]]  # both read the one result
    assert not list((tmp_path / "cache" / "calib").glob(".*")), "a temporary folder was left behind"


def test_shard_indices_tile_the_samples():
    slices = [shard_indices(10, 3, k) for k in range(3)]
    assert [list(s) for s in slices] == [[0, 1, 2, 3], [4, 5, 6], [7, 8, 9]]
    assert shard_indices(10) == range(10)
    for bad, needle in [
        ((10, 3, None), "range(0,3)"),
        ((10, 3, 3), "0..2"),
        ((10, 0, None), ">= 1"),
        ((10, 1, 2), "num_shards > 1"),
        ((2, 3, 0), "exceeds"),
    ]:
        with pytest.raises(
            ValueError, match=needle.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")
        ):
            shard_indices(*bad)


def test_sharded_evaluation_merges_to_the_unsharded_metrics(make_cfg, tmp_path):
    base = [*FAST, "evaluator.n_samples=20", "evaluator.batch_size=5", "logger=none"]
    whole = run(make_cfg(base, name="whole"))
    sweep = tmp_path / "sweep"
    for k in range(2):
        part = run(
            make_cfg([*base, "evaluator.num_shards=2", f"evaluator.shard_index={k}"], name=f"sweep/{k}_shard")
        )
        assert (
            part["fid"] is None and part["n_samples"] == 10 and (sweep / f"{k}_shard" / "shard.pt").is_file()
        )
    merged_dirs = merge_sweep(sweep)
    assert len(merged_dirs) == 1
    merged = metrics_of(merged_dirs[0])
    assert merged["n_samples"] == 20 and merged["num_shards"] == 2 and merged["shard_index"] is None
    assert merged["config_hash"] == whole["config_hash"]
    # the same features; only the order of torchmetrics' float64 sums differs (per batch vs per shard)
    assert merged["fid"] == pytest.approx(whole["fid"], rel=1e-6)
    assert merged["inception_score"] == pytest.approx(whole["inception_score"], rel=1e-6)
    assert merged["fid_to_fp"] == 0.0
