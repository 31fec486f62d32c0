"""Helpers for tests that need a real Slurm cluster (no test functions here).

``ensure_cluster()`` returns the environment additions (``{"SLURM_CONF": ...}``, possibly
empty) under which ``sinfo``/``sbatch``/submitit reach a working cluster:

1. a cluster that already answers ``sinfo`` with the current environment;
2. the single-node cluster of ``slurm/start_local_cluster.sh`` under
   ``$DIFFQUANT_SLURM_DIR`` (default ``/tmp/diffquant-slurm``) when it is already running;
3. otherwise it runs ``slurm/start_local_cluster.sh`` (root, or passwordless sudo, needed:
   it may apt-install Slurm). This happens at most once per test session; the result, or
   the failure, is cached.

If no cluster can be had it raises ``RuntimeError`` with the reason; tests decide whether
that is a skip (developer machine) or a failure (``CI`` set).
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Optional

from filelock import FileLock

REPO_ROOT = Path(__file__).resolve().parents[1]
START_SCRIPT = REPO_ROOT / "slurm" / "start_local_cluster.sh"
STOP_SCRIPT = REPO_ROOT / "slurm" / "stop_local_cluster.sh"
DEFAULT_DIR = "/tmp/diffquant-slurm"
USABLE_STATES = {"idle", "mixed", "allocated", "completing"}

_cached_env: dict[str, str] | None = None
_cached_error: str | None = None


def cluster_dir() -> Path:
    """Folder that holds the local test cluster's config, state and logs."""
    return Path(os.environ.get("DIFFQUANT_SLURM_DIR", DEFAULT_DIR))


def sbatch_available() -> bool:
    """True when the Slurm client commands are on PATH (says nothing about a cluster)."""
    return all(shutil.which(cmd) is not None for cmd in ("sbatch", "sinfo", "squeue"))


def _env_with(extra: dict[str, str]) -> dict[str, str]:
    env = dict(os.environ)
    env.update(extra)
    return env


def cluster_answers(extra: dict[str, str] | None = None) -> bool:
    """True when ``sinfo`` (under os.environ + ``extra``) lists at least one usable node."""
    if shutil.which("sinfo") is None:
        return False
    try:
        out = subprocess.run(
            ["sinfo", "-h", "-o", "%T"],
            env=_env_with(extra or {}),
            capture_output=True,
            text=True,
            timeout=30,
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    if out.returncode != 0:
        return False
    return any(line.strip() in USABLE_STATES for line in out.stdout.splitlines())


def _parse_export(stdout: str) -> dict[str, str]:
    """Environment from the start script's last stdout line (``export SLURM_CONF=...``)."""
    lines = [ln for ln in stdout.strip().splitlines() if ln.strip()]
    if not lines:
        return {}
    last = lines[-1].strip()
    if last.startswith("#"):
        return {}
    tokens = shlex.split(last)
    if not tokens or tokens[0] != "export":
        raise RuntimeError(f"unexpected last line from {START_SCRIPT.name}: {last!r}")
    env: dict[str, str] = {}
    for tok in tokens[1:]:
        key, sep, value = tok.partition("=")
        if sep:
            env[key] = value
    return env


def _local_cluster_alive() -> bool:
    """True when the daemons that start_local_cluster.sh recorded under cluster_dir() run."""
    for name in ("slurmctld", "slurmd"):
        try:
            pid = int((cluster_dir() / f"{name}.pid").read_text().strip())
            if Path(f"/proc/{pid}/comm").read_text().strip() != name:
                return False
        except (OSError, ValueError):
            return False
    return True


def _find_cluster() -> dict[str, str]:
    conf = cluster_dir() / "slurm.conf"
    # 1. Whatever the environment already points at (sinfo against a dead controller takes
    #    ~10 s to give up, so do not ask our own stopped cluster).
    env_conf = os.environ.get("SLURM_CONF")
    points_at_ours = env_conf is not None and Path(env_conf).resolve() == conf.resolve()
    if (not points_at_ours or _local_cluster_alive()) and cluster_answers():
        return {"SLURM_CONF": env_conf} if env_conf else {}
    # 2. Our local cluster, already running (e.g. started by CI before pytest).
    if conf.is_file() and _local_cluster_alive() and cluster_answers({"SLURM_CONF": str(conf)}):
        return {"SLURM_CONF": str(conf)}
    # 3. Start it.
    if not START_SCRIPT.is_file():
        raise RuntimeError(f"no Slurm cluster answers and {START_SCRIPT} is missing")
    if os.geteuid() != 0 and shutil.which("sudo") is None:
        raise RuntimeError("no Slurm cluster answers and starting one needs root (or sudo)")
    t0 = time.monotonic()
    try:
        proc = subprocess.run(
            ["bash", str(START_SCRIPT), str(cluster_dir())],
            capture_output=True,
            text=True,
            timeout=900,
        )
    except subprocess.TimeoutExpired as exc:
        raise RuntimeError(f"{START_SCRIPT.name} timed out after {exc.timeout:.0f}s") from exc
    if proc.returncode != 0:
        tail = "\n".join(proc.stderr.strip().splitlines()[-30:])
        raise RuntimeError(f"{START_SCRIPT.name} failed (exit {proc.returncode}):\n{tail}")
    env = _parse_export(proc.stdout)
    if not cluster_answers(env):
        raise RuntimeError(
            f"{START_SCRIPT.name} succeeded in {time.monotonic() - t0:.0f}s but sinfo "
            f"reports no usable node with {env}"
        )
    return env


def ensure_cluster() -> dict[str, str]:
    """Environment additions for a working Slurm cluster; starts one at most once per session.

    Raises ``RuntimeError`` (cached too) when no cluster can be had.
    """
    global _cached_env, _cached_error
    if _cached_env is not None:
        return dict(_cached_env)
    if _cached_error is not None:
        raise RuntimeError(_cached_error)
    try:
        # one finder at a time across processes (pytest-xdist workers): the second waits for the
        # first's cluster instead of starting another
        lock = Path(tempfile.gettempdir()) / f"diffquant-slurm-start-{os.getuid()}.lock"
        with FileLock(str(lock), timeout=1200):
            env = _find_cluster()
    except RuntimeError as exc:
        _cached_error = str(exc)
        raise
    _cached_env = env
    return dict(env)


def default_partition(extra: dict[str, str] | None = None) -> str:
    """The cluster's default partition (``debug`` on the local test cluster)."""
    try:
        out = subprocess.run(
            ["sinfo", "-h", "-o", "%P"],
            env=_env_with(extra or {}),
            capture_output=True,
            text=True,
            timeout=30,
        ).stdout.split()
    except (OSError, subprocess.TimeoutExpired):
        out = []
    for name in out:
        if name.endswith("*"):
            return name[:-1]
    return out[0] if out else "debug"


def wait_for_file(path: Path, contains: str = "", timeout_s: float = 60.0) -> str:
    """Poll until ``path`` exists (and holds ``contains``); return its text. Raises TimeoutError."""
    deadline = time.monotonic() + timeout_s
    while True:
        if path.is_file():
            text = path.read_text(errors="replace")
            if contains in text:
                return text
        if time.monotonic() > deadline:
            seen = path.read_text(errors="replace") if path.is_file() else "<no file>"
            raise TimeoutError(f"{path} did not contain {contains!r} within {timeout_s:.0f}s: {seen[-2000:]}")
        time.sleep(0.5)


def job_state(job_id: str, extra: dict[str, str] | None = None) -> tuple[str, str]:
    """(state, reason) of a job or array task as ``squeue`` lists it (also ended jobs, for
    ``MinJobAge``); ("", "") when the controller does not know it."""
    try:
        out = subprocess.run(
            ["squeue", "-h", "-t", "all", "-j", job_id, "-o", "%T|%r"],
            env=_env_with(extra or {}),
            capture_output=True,
            text=True,
            timeout=30,
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        return "", ""
    state, _, reason = (out.strip().splitlines() or [""])[0].partition("|")
    return state, reason


def _left_on_node(job_id: str, extra: dict[str, str] | None = None) -> bool:
    """Whether a slurmstepd of ``job_id`` (or of its array task) still runs on this machine, or
    the node is still COMPLETING (the test cluster's single node is this machine)."""
    env = _env_with(extra or {})
    try:
        raw = subprocess.run(
            ["squeue", "-h", "-t", "all", "-j", job_id, "-o", "%A"],
            env=env,
            capture_output=True,
            text=True,
            timeout=30,
        ).stdout.split()
        states = subprocess.run(
            ["sinfo", "-h", "-o", "%T"], env=env, capture_output=True, text=True, timeout=30
        ).stdout
        steps = subprocess.run(
            ["pgrep", "-f", rf"slurmstepd: \[{raw[0] if raw else job_id}\."], capture_output=True
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return steps.returncode == 0 or "completing" in states


def release_requeued(job_id: str, extra: dict[str, str] | None = None, timeout_s: float = 90.0) -> float:
    """Wait until ``job_id`` is back in the queue after a requeue (PENDING, reason BeginTime:
    Slurm holds a requeued batch job until about 2 minutes later) and let it start now. Returns
    the seconds waited; raises TimeoutError."""
    t0 = time.monotonic()
    while True:
        state, reason = job_state(job_id, extra)
        if (state, reason) == ("PENDING", "BeginTime"):
            break
        if time.monotonic() - t0 > timeout_s:
            raise TimeoutError(
                f"job {job_id} was not requeued within {timeout_s:.0f}s (state {state or 'unknown'} {reason})"
            )
        time.sleep(0.5)
    # Slurm's delay protects the node from a relaunch while the last incarnation's job steps are
    # still being torn down (slurmd then refuses it: "Job credential revoked", exit 1). Starting
    # it now is only safe once nothing of the job is left on the node.
    while _left_on_node(job_id, extra):
        if time.monotonic() - t0 > timeout_s:
            raise TimeoutError(
                f"job {job_id}: its last incarnation was still on the node after {timeout_s:.0f}s"
            )
        time.sleep(0.5)
    time.sleep(1.0)
    subprocess.run(
        ["scontrol", "update", f"JobId={job_id}", "StartTime=now"],
        env=_env_with(extra or {}),
        check=True,
        capture_output=True,
        timeout=30,
    )
    return time.monotonic() - t0


def wait_for_glob(
    folder: Path, pattern: str, timeout_s: float = 60.0, alive: Optional[Callable[[], bool]] = None
) -> list[Path]:
    """Poll until ``folder.glob(pattern)`` finds something; ``alive()`` False (the launcher
    exited) or the time-out raise TimeoutError."""
    deadline = time.monotonic() + timeout_s
    while True:
        found = sorted(folder.glob(pattern))
        if found:
            return found
        if time.monotonic() > deadline or (alive is not None and not alive()):
            raise TimeoutError(f"nothing matched {folder}/{pattern} within {timeout_s:.0f}s")
        time.sleep(0.1)


_uninterrupted: dict[tuple[str, ...], dict] = {}


def uninterrupted_metrics(overrides: list[str], folder: Path) -> dict:
    """The metrics of ``run.py overrides`` run here, in this process, on one thread and without
    interruption (what a stopped and resumed job must reproduce); once per session and overrides."""
    key = tuple(overrides)
    if key not in _uninterrupted:
        import torch
        from hydra.core.global_hydra import GlobalHydra

        from conftest import compose_config
        from diffquant.app import run

        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # as the jobs (cpus_per_task=1, OMP_NUM_THREADS=1)
        try:
            _uninterrupted[key] = run(compose_config(list(overrides), folder / "uninterrupted"))
        finally:
            torch.set_num_threads(threads)
            GlobalHydra.instance().clear()
    return _uninterrupted[key]
