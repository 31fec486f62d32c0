"""Jobs through a real Slurm cluster: sbatch, submitit, and the slurm/*.sbatch scripts.

The cluster comes from ``tests/slurm_cluster.ensure_cluster()`` (an existing one, or the
single-node one of ``slurm/start_local_cluster.sh``). Without a cluster these tests are
skipped, except under ``CI`` where that is a failure.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

try:  # tests/ on sys.path (pytest's default rootdir-relative import)
    from slurm_cluster import REPO_ROOT, START_SCRIPT, default_partition, wait_for_file
except ImportError:  # tests/ as a package
    from tests.slurm_cluster import REPO_ROOT, START_SCRIPT, default_partition, wait_for_file

pytestmark = pytest.mark.slurm

JOB_TIMEOUT_S = 60


@pytest.fixture
def cluster(slurm_env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """Puts the cluster's environment (SLURM_CONF) into os.environ for this test."""
    for key, value in slurm_env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("WANDB_MODE", "offline")
    return slurm_env


@pytest.fixture
def partition(cluster: dict[str, str]) -> str:
    return default_partition()


def _sbatch(args: list[str], cwd: Path, env: dict[str, str] | None = None) -> str:
    proc = subprocess.run(
        ["sbatch", "--parsable", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, f"sbatch {args} failed: {proc.stderr}"
    return proc.stdout.strip().split(";")[0]


# Small resources so the jobs fit on a 2-core CI machine, and no GPU (the test cluster has no GRES).
SMALL = ["--cpus-per-task=1", "--mem=500M", "--time=5", "--gres=none"]


def test_sbatch_wrap_runs_python(cluster: dict[str, str], partition: str, tmp_path: Path) -> None:
    out = tmp_path / "wrap.out"
    cmd = (
        f'{sys.executable} -c \'import os; print("answer", 6 * 7, os.environ["SLURM_JOB_ID"])\' && echo DONE'
    )
    job_id = _sbatch(
        [f"--partition={partition}", *SMALL, f"--output={out}", "--job-name=dq-wrap", f"--wrap={cmd}"],
        tmp_path,
    )
    text = wait_for_file(out, "DONE", JOB_TIMEOUT_S)
    assert f"answer 42 {job_id}" in text


def _square(x: int) -> int:
    return x * x


def _fail(msg: str) -> None:
    raise ValueError(msg)


@pytest.fixture
def submitit_executor(cluster: dict[str, str], partition: str, tmp_path: Path):
    submitit = pytest.importorskip("submitit")
    import cloudpickle

    # Test modules are not importable inside the job: ship these functions by value.
    module = sys.modules[__name__]
    cloudpickle.register_pickle_by_value(module)
    executor = submitit.AutoExecutor(folder=tmp_path / "submitit", cluster="slurm")
    executor.update_parameters(
        slurm_partition=partition,
        timeout_min=5,
        cpus_per_task=1,
        mem_gb=1,
        name="dq-submitit",
    )
    try:
        yield executor
    finally:
        cloudpickle.unregister_pickle_by_value(module)


def test_submitit_returns_result(submitit_executor) -> None:
    t0 = time.monotonic()
    job = submitit_executor.submit(_square, 7)
    assert job.result() == 49
    assert time.monotonic() - t0 < JOB_TIMEOUT_S


def test_submitit_failing_job_raises(submitit_executor) -> None:
    submitit = pytest.importorskip("submitit")
    job = submitit_executor.submit(_fail, "boom from slurm job")
    with pytest.raises(submitit.core.utils.FailedJobError, match="boom from slurm job"):
        job.result()


FAKE_RUN_PY = """\
import json, os, sys
args = sys.argv[1:]
run_dir = [a.split("=", 1)[1] for a in args if a.startswith("hydra.run.dir=")][-1]
os.makedirs(run_dir, exist_ok=True)
with open(os.path.join(run_dir, "args.json"), "w") as f:
    json.dump({"args": args, "wandb_mode": os.environ.get("WANDB_MODE"),
               "python": sys.executable, "task": os.environ.get("SLURM_ARRAY_TASK_ID")}, f)
"""


def _script_env(tmp_path: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["DIFFQUANT_VENV"] = sys.prefix  # the venv running the tests (has bin/activate)
    env.pop("WANDB_MODE", None)  # the scripts must default it to offline
    env["DIFFQUANT_SWEEP_ROOT"] = str(tmp_path / "sweeps")
    return env


def test_sweep_array_sbatch(cluster: dict[str, str], partition: str, tmp_path: Path) -> None:
    if not Path(sys.prefix, "bin", "activate").is_file():
        pytest.skip("tests are not running from a virtual environment")
    (tmp_path / "run.py").write_text(FAKE_RUN_PY)
    grid = tmp_path / "grid.txt"
    grid.write_text("# quant x seed\n\nquant=w8a8 seed=0\nquant=w4a8 seed=1 'model.prompt=\"a red cube\"'\n")
    job_id = _sbatch(
        [
            f"--partition={partition}",
            *SMALL,
            "--array=0-1",
            f"--output={tmp_path}/slurm-%A_%a.out",
            str(REPO_ROOT / "slurm" / "sweep_array.sbatch"),
            "grid.txt",
            "+common=1",
        ],
        tmp_path,
        env=_script_env(tmp_path),
    )
    results = []
    for task in (0, 1):
        log = tmp_path / f"slurm-{job_id}_{task}.out"
        deadline = time.monotonic() + JOB_TIMEOUT_S
        found = []
        while not found and time.monotonic() < deadline:
            found = sorted((tmp_path / "sweeps" / "grid").glob(f"{task}_*/args.json"))
            time.sleep(0.5)
        assert found, f"task {task} wrote no args.json; log: {log.read_text() if log.exists() else '<none>'}"
        results.append((found[0].parent, json.loads(found[0].read_text())))
    (dir0, r0), (dir1, r1) = results
    assert r0["args"] == ["+common=1", "quant=w8a8", "seed=0", f"hydra.run.dir={dir0}"]
    assert r1["args"][:4] == ["+common=1", "quant=w4a8", "seed=1", 'model.prompt="a red cube"']
    assert r0["wandb_mode"] == "offline" and r0["task"] == "0" and r1["task"] == "1"
    assert Path(r0["python"]).parent.parent.resolve() == Path(sys.prefix).resolve()
    # Stable folder per line: the same line hashes to the same folder name.
    assert (dir0 / "overrides.txt").read_text().strip() == "quant=w8a8 seed=0"


def test_run_one_sbatch(cluster: dict[str, str], partition: str, tmp_path: Path) -> None:
    if not Path(sys.prefix, "bin", "activate").is_file():
        pytest.skip("tests are not running from a virtual environment")
    (tmp_path / "run.py").write_text(FAKE_RUN_PY)
    job_id = _sbatch(
        [
            f"--partition={partition}",
            *SMALL,
            f"--output={tmp_path}/one-%j.out",
            str(REPO_ROOT / "slurm" / "run_one.sbatch"),
            "quant=w8a8",
            "seed=3",
        ],
        tmp_path,
        env=_script_env(tmp_path),
    )
    args_file = tmp_path / "outputs" / "slurm" / "diffquant" / job_id / "args.json"
    wait_for_file(args_file, "args", JOB_TIMEOUT_S)
    r = json.loads(args_file.read_text())
    assert r["args"] == [f"hydra.run.dir=outputs/slurm/diffquant/{job_id}", "quant=w8a8", "seed=3"]
    assert r["wandb_mode"] == "offline"


def test_start_script_is_idempotent(cluster: dict[str, str]) -> None:
    """A second start finds the running cluster and returns quickly with an eval-able line."""
    t0 = time.monotonic()
    proc = subprocess.run(
        ["bash", str(START_SCRIPT)]
        + ([str(Path(cluster["SLURM_CONF"]).parent)] if "SLURM_CONF" in cluster else []),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    last = proc.stdout.strip().splitlines()[-1]
    assert last.startswith("export SLURM_CONF=") or last.startswith("#")
    assert time.monotonic() - t0 < 30
    assert "installing" not in proc.stderr
