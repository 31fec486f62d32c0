"""Real SLURM multiruns through `hydra/launcher=slurm` (submitit job arrays) against a cluster that
answers `sinfo`, or the single-node one of slurm/start_local_cluster.sh (tests/slurm_cluster.py).
Without a cluster these tests are skipped, except under ``CI`` where that is a failure."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT, run_cli
from diffquant.app import run

try:
    from slurm_cluster import default_partition
except ImportError:  # tests/ as a package
    from tests.slurm_cluster import default_partition

pytestmark = pytest.mark.slurm

SMALL = ["model.num_inference_steps=5", "evaluator.n_samples=20", "evaluator.batch_size=20", "logger=none"]


def slurm_args(env: dict[str, str], sweep: Path, cache: Path) -> list[str]:
    """The launcher on the test cluster: its default partition, 1 CPU and 1 GB per job, no GPU."""
    return [
        "-m",
        "hydra/launcher=slurm",
        f"slurm.partition={default_partition(env)}",
        "slurm.gpus_per_node=null",
        "slurm.cpus_per_task=1",
        "slurm.mem_gb=1",
        "slurm.timeout_min=10",
        f"hydra.sweep.dir={sweep}",
        f"paths.cache_dir={cache}",
    ]


def test_slurm_multirun_of_two_jobs(slurm_env, tmp_path):
    sweep = tmp_path / "sweep"
    proc = run_cli(
        [*slurm_args(slurm_env, sweep, tmp_path / "cache"), "seed=0,1", *SMALL],
        env={**slurm_env, "WANDB_MODE": "offline"},
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    jobs = sorted(p.parent for p in sweep.glob("*/metrics.json"))
    assert [p.name for p in jobs] == ["0_ldm_digits_fp32_fp_s0", "1_ldm_digits_fp32_fp_s1"]
    for job in jobs:
        m = json.loads((job / "metrics.json").read_text())
        assert m["n_samples"] == 20 and m["fid"] is not None
    script = next(sweep.glob(".submitit/*/*_submission.sh")).read_text()
    assert "#SBATCH --array=0-1" in script and "#SBATCH --requeue" in script
    assert "export WANDB_MODE=offline" in script


def test_slurm_sweep_with_a_failing_job_exits_nonzero(slurm_env, tmp_path):
    """Job 1 fails validation inside its array task; the launcher reports it and exits non-zero,
    and job 0's results are still complete."""
    sweep = tmp_path / "sweep"
    proc = run_cli(
        [*slurm_args(slurm_env, sweep, tmp_path / "cache"), *SMALL, "evaluator.n_samples=20,-1"],
        env={**slurm_env, "WANDB_MODE": "offline"},
        timeout=600,
    )
    assert proc.returncode != 0
    assert "evaluator.n_samples=-1 must be positive" in proc.stderr + proc.stdout
    done = [p.parent.name for p in sweep.glob("*/metrics.json")]
    assert done == ["0_ldm_digits_fp32_fp_s0"]


@pytest.mark.slow
def test_slurm_requeued_job_resumes_to_the_same_metrics(slurm_env, tmp_path, make_cfg):
    """`scontrol requeue` mid-sampling (SLURM's preemption path: SIGTERM, then SIGKILL): the job
    reruns in the same folder, keeps its finished batches, and reports the uninterrupted metrics."""
    env = {**os.environ, **slurm_env, "WANDB_MODE": "offline"}
    sweep = tmp_path / "sweep"
    args = [
        "model.num_inference_steps=5",
        "evaluator.n_samples=1200",
        "evaluator.batch_size=10",
        "logger=none",
    ]
    launcher = subprocess.Popen(
        [sys.executable, "run.py", *slurm_args(slurm_env, sweep, tmp_path / "cache"), *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    progress = sweep / "0_ldm_digits_fp32_fp_s0" / "progress"
    job_id = None
    try:
        deadline = time.monotonic() + 300
        while len(list(progress.glob("batch_*.pt"))) < 3:
            assert launcher.poll() is None and time.monotonic() < deadline, "no batch finished in time"
            time.sleep(0.2)
        job_id = next(p.name for p in sweep.glob(".submitit/*") if p.name.isdigit())  # the array job
        first = {p.name: p.stat().st_mtime_ns for p in progress.glob("batch_*.pt")}
        subprocess.run(["scontrol", "requeue", job_id], env=env, check=True)
        time.sleep(15)  # SIGTERM, KillWait, then SLURM holds a requeued job until its begin time
        subprocess.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"], env=env, check=False)
        out, _ = launcher.communicate(timeout=600)
    finally:
        if launcher.poll() is None:
            launcher.kill()
        if job_id is not None:
            subprocess.run(["scancel", job_id], env=env, check=False)
    assert launcher.returncode == 0, out[-3000:]
    log = (progress.parent / "run.log").read_text()
    assert log.count("model: ") == 2, "the job was not restarted"
    for name, mtime in first.items():  # resumed, not redone
        assert (progress / name).stat().st_mtime_ns == mtime
    resumed = json.loads((progress.parent / "metrics.json").read_text())
    reference = run(make_cfg(args, name="reference"))
    assert (resumed["n_samples"], resumed["config_hash"]) == (
        reference["n_samples"],
        reference["config_hash"],
    )
    for key in ("fid", "inception_score"):  # the job ran with 1 thread, the reference with 2
        assert resumed[key] == pytest.approx(reference[key], rel=1e-6), key
