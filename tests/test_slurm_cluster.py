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
    from slurm_cluster import (
        REPO_ROOT,
        START_SCRIPT,
        default_partition,
        job_state,
        release_requeued,
        uninterrupted_metrics,
        wait_for_file,
        wait_for_glob,
    )
except ImportError:  # tests/ as a package
    from tests.slurm_cluster import (
        REPO_ROOT,
        START_SCRIPT,
        default_partition,
        job_state,
        release_requeued,
        uninterrupted_metrics,
        wait_for_file,
        wait_for_glob,
    )

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


def test_started_node_has_every_cpu_even_from_a_one_thread_shell(cluster: dict[str, str]) -> None:
    """GNU nproc honours OMP_NUM_THREADS: the start script must not read it (a cluster started
    from an `OMP_NUM_THREADS=1` test run once had a 1-CPU node, running one job at a time)."""
    script = (REPO_ROOT / "slurm" / "start_local_cluster.sh").read_text()
    assert 'CPUS="$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc)"' in script
    out = subprocess.run(
        ["bash", "-c", "env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc"],
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        check=True,
    )
    assert int(out.stdout) == len(os.sched_getaffinity(0))
    node = subprocess.run(
        ["scontrol", "show", "node"],
        env={**os.environ, **cluster},
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    ).stdout
    cpus = int(node.split("CPUTot=", 1)[1].split()[0])
    assert cpus >= min(2, len(os.sched_getaffinity(0))), node


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


STOPPING_RUN_PY = """\
import os, sys
run_dir = [a.split("=", 1)[1] for a in sys.argv[1:] if a.startswith("hydra.run.dir=")][-1]
os.makedirs(run_dir, exist_ok=True)
with open(os.path.join(run_dir, "runs.txt"), "a") as f:
    f.write(os.environ.get("SLURM_RESTART_COUNT", "0") + "\\n")
sys.exit(75)  # what run.py does after SIGUSR2
"""


def test_sweep_array_sbatch_requeues_a_task_that_exits_75(
    cluster: dict[str, str], partition: str, tmp_path: Path
) -> None:
    """An array task whose run.py exits 75 is requeued by the script (same task, same folder),
    at most DIFFQUANT_MAX_REQUEUES times; after that the status is passed on."""
    if not Path(sys.prefix, "bin", "activate").is_file():
        pytest.skip("tests are not running from a virtual environment")
    (tmp_path / "run.py").write_text(STOPPING_RUN_PY)
    (tmp_path / "grid.txt").write_text("seed=0\n")
    env = {**_script_env(tmp_path), "DIFFQUANT_MAX_REQUEUES": "1"}
    job_id = _sbatch(
        [
            f"--partition={partition}",
            *SMALL,
            "--array=0",
            f"--output={tmp_path}/slurm-%A_%a.out",
            str(REPO_ROOT / "slurm" / "sweep_array.sbatch"),
            "grid.txt",
        ],
        tmp_path,
        env=env,
    )
    task = f"{job_id}_0"
    try:
        runs = wait_for_glob(tmp_path / "sweeps" / "grid", "0_*/runs.txt", 60)[0]
        release_requeued(task, timeout_s=60)
        deadline = time.monotonic() + 60
        while runs.read_text().split() != ["0", "1"] or job_state(task)[0] not in ("FAILED", ""):
            assert time.monotonic() < deadline, f"{runs.read_text()!r}, state {job_state(task)}"
            time.sleep(0.5)
    finally:
        subprocess.run(["scancel", job_id], check=False)
    log = (tmp_path / f"slurm-{job_id}_0.out").read_text()
    assert "stopped to be resumed (exit 75): requeueing it (restart 1)" in log
    assert "(restart 1) on " in log
    assert "stopped (exit 75) but was restarted 1 times already (DIFFQUANT_MAX_REQUEUES=1)" in log


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


# The real run.py, tiny (8 batches of one sample, 20 steps: long enough to be signalled mid-way).
TINY = [
    "evaluator.n_samples=8",
    "evaluator.batch_size=1",
    "evaluator.chunk_size=1",
    "model.num_inference_steps=100",
    "logger=none",
]  # slow enough per sample for a signal to land mid-run


@pytest.mark.parametrize("how", ["usr2", "requeue"])
def test_run_one_sbatch_stops_gracefully_and_resumes_after_requeue(cluster, partition, tmp_path, how):
    """Plain sbatch (slurm/run_one.sbatch, python under srun):

    * ``usr2``: ``scancel --signal=USR2`` (what ``--signal=USR2@120`` sends before the time
      limit): python stops after the batch in progress with exit 75 and the script requeues
      the job itself;
    * ``requeue``: ``scontrol requeue`` (Slurm's preemption path: SIGTERM, SIGKILL after
      KillWait): python stops after the batch in progress with exit 143; Slurm requeues.

    Either way stopped.json says where, and the requeued job resumes in the same folder to the
    metrics of an uninterrupted run."""
    if not Path(sys.prefix, "bin", "activate").is_file():
        pytest.skip("tests are not running from a virtual environment")
    run_dir = tmp_path / "run"
    env = {
        **_script_env(tmp_path),
        "DIFFQUANT_RUN_DIR": str(run_dir),
        "DIFFQUANT_STOP_GRACE_S": "60",
        "PYTHONPATH": os.pathsep.join([str(REPO_ROOT / "src"), os.environ.get("PYTHONPATH", "")]),
    }
    log = tmp_path / "slurm.out"
    job_id = _sbatch(
        [
            f"--partition={partition}",
            *SMALL,
            "--mem=2G",
            f"--output={log}",
            str(REPO_ROOT / "slurm" / "run_one.sbatch"),
            *TINY,
            f"paths.cache_dir={tmp_path}/cache",
        ],
        REPO_ROOT,
        env=env,
    )
    try:
        wait_for_glob(run_dir, "progress/batch_*.pt", 300)
        if how == "usr2":
            subprocess.run(["scancel", "--signal=USR2", job_id], check=True)
        else:
            subprocess.run(["scontrol", "requeue", job_id], check=True)
        release_requeued(job_id, timeout_s=60)
        stopped = json.loads((run_dir / "stopped.json").read_text())
        saved = {p.name: p.stat().st_mtime_ns for p in (run_dir / "progress").glob("batch_*.pt")}
        wait_for_file(run_dir / "metrics.json", "fid", 300)
    finally:
        subprocess.run(["scancel", job_id], check=False)
    assert (stopped["signal"], stopped["exit_code"]) == (
        ("SIGUSR2", 75) if how == "usr2" else ("SIGTERM", 143)
    )
    assert (stopped["step"], stopped["safe_point"], stopped["handler"]) == ("sample", True, "diffquant")
    assert stopped["where"] == f"sampling: {len(saved)} of 8 batches done" and 1 <= len(saved) < 8
    assert stopped["slurm_job_id"] == job_id and stopped["slurm_restart_count"] == 0
    text = log.read_text()
    if how == "usr2":
        assert "task 0: Exited with exit code 75" in text  # srun reports python's status
        assert f"[run_one] job {job_id} stopped to be resumed (exit 75): requeueing it (restart 1)" in text
    assert f"[run_one] job {job_id} (restart 1)" in text
    assert "resuming after a stop: " + stopped["signal"] in (run_dir / "run.log").read_text()
    assert not (run_dir / "stopped.json").exists()
    for name, mtime in saved.items():  # resumed, not redone
        assert (run_dir / "progress" / name).stat().st_mtime_ns == mtime
    resumed = json.loads((run_dir / "metrics.json").read_text())
    reference = uninterrupted_metrics(TINY, tmp_path)
    assert (resumed["n_samples"], resumed["config_hash"]) == (8, reference["config_hash"])
    for key in ("fid", "inception_score"):
        assert resumed[key] == pytest.approx(reference[key], rel=1e-6), key


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
