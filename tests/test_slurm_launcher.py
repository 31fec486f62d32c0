"""diffquant.launcher without a cluster: how ``hydra/launcher=slurm`` learns task states where
``sacct`` fails (fake ``sacct`` / ``squeue`` on PATH) and reports tasks that ended without a
result. The real cluster runs are in tests/test_slurm_sweep.py."""

from __future__ import annotations

import os
import stat

import pytest
from hydra.core.utils import JobStatus
from submitit.core.utils import UncompletedJobError

from diffquant.launcher import NOT_IN_QUEUE, QueueWatcher, SlurmTaskError, collect, parse_queue

FAKE = """#!/bin/sh
echo "$0 $*" >> "$FAKE_CALLS"
[ -n "$FAKE_{name}_ERR" ] && echo "$FAKE_{name}_ERR" >&2
[ -n "$FAKE_{name}_OUT" ] && printf '%b' "$FAKE_{name}_OUT"
exit "${{FAKE_{name}_RC:-0}}"
"""


@pytest.fixture
def fake_slurm(tmp_path, monkeypatch):
    """``sacct`` and ``squeue`` scripts whose output, stderr and status come from FAKE_* variables;
    they log their command lines to ``calls``. By default sacct fails as without accounting."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in ("sacct", "squeue"):
        path = bin_dir / name
        path.write_text(FAKE.format(name=name.upper()))
        path.chmod(path.stat().st_mode | stat.S_IEXEC)
    calls = tmp_path / "calls"
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_CALLS", str(calls))
    monkeypatch.setenv("FAKE_SACCT_RC", "1")
    monkeypatch.setenv("FAKE_SACCT_ERR", "Slurm accounting storage is disabled")
    return lambda: calls.read_text().splitlines() if calls.exists() else []


def watcher(*job_ids: str) -> QueueWatcher:
    w = QueueWatcher(delay_s=600)
    for job_id in job_ids:
        w.register_job(job_id)
    return w


def test_states_come_from_squeue_where_sacct_fails(fake_slurm, monkeypatch):
    monkeypatch.setenv(
        "FAKE_SQUEUE_OUT", "41_0|RUNNING|vm\\n41_1|CANCELLED|vm\\n41_[2-3%1]|PENDING|\\n41_4|SUSPENDED|vm\\n"
    )
    w = watcher("41_0", "41_1", "41_2", "41_3", "41_4", "41_5", "42")
    w.update()
    calls = fake_slurm()
    assert calls[0].split("/")[-1].startswith("sacct ")
    assert calls[1].endswith("squeue --noheader --states=all --format=%i|%T|%N --jobs=41,42")
    states = {j: w.get_state(j, mode="cache") for j in sorted(w._registered)}
    assert states == {
        "41_0": "RUNNING",
        "41_1": "CANCELLED",
        "41_2": "PENDING",
        "41_3": "PENDING",
        "41_4": "SUSPENDED",
        "41_5": NOT_IN_QUEUE,
        "42": NOT_IN_QUEUE,
    }
    done = {j for j in states if w.is_done(j, mode="cache")}
    assert done == {"41_1", "41_5", "42"}  # suspended and pending tasks are still waited for
    assert w._finished == done


def test_a_job_the_controller_does_not_know_has_ended(fake_slurm, monkeypatch):
    monkeypatch.setenv("FAKE_SQUEUE_RC", "1")
    monkeypatch.setenv("FAKE_SQUEUE_ERR", "slurm_load_jobs error: Invalid job id specified")
    w = watcher("7")
    w.update()
    assert w.get_state("7", mode="cache") == NOT_IN_QUEUE and w.is_done("7", mode="cache")


def test_when_squeue_fails_too_the_state_stays_unknown(fake_slurm, monkeypatch):
    monkeypatch.setenv("FAKE_SQUEUE_RC", "1")
    monkeypatch.setenv("FAKE_SQUEUE_ERR", "slurm_load_jobs error: Unable to contact slurm controller")
    w = watcher("7")
    w.update()
    assert w.get_state("7", mode="cache") == "UNKNOWN" and not w.is_done("7", mode="cache")


def test_a_working_sacct_is_used_as_submitit_uses_it(fake_slurm, monkeypatch):
    monkeypatch.setenv("FAKE_SACCT_RC", "0")
    monkeypatch.setenv("FAKE_SACCT_ERR", "")
    monkeypatch.setenv(
        "FAKE_SACCT_OUT", "JobID|State|NodeList\\n43|CANCELLED by 0|vm\\n43.batch|CANCELLED|vm\\n"
    )
    w = watcher("43")
    w.update()
    assert [c.split("/")[-1].split()[0] for c in fake_slurm()] == ["sacct"]  # squeue not asked
    assert w.get_state("43", mode="cache") == "CANCELLED by 0" and w.is_done("43", mode="cache")


def test_parse_queue_expands_pending_array_ranges():
    info = parse_queue("5_[1-2%2]|PENDING|\n5_0|COMPLETED|vm\n", {"5_0", "5_1", "5_2", "5_3"})
    assert {k: v["State"] for k, v in info.items()} == {
        "5_0": "COMPLETED",
        "5_1": "PENDING",
        "5_2": "PENDING",
        "5_3": NOT_IN_QUEUE,
    }


class FakeJob:
    job_id = "12_1"

    def __init__(self, error: Exception, state: str = "CANCELLED"):
        self.error = error
        self.watcher = type("W", (), {"get_state": lambda _self, job_id, mode: state})()

    def results(self):
        raise self.error


def test_a_task_without_a_result_becomes_a_failed_job_naming_it():
    overrides = ["hydra.sweep.dir=/x", "seed=1", "quant=w4a8"]
    ret = collect(FakeJob(UncompletedJobError("Job 12_1 has not produced any output")), overrides, 1)
    assert ret.status == JobStatus.FAILED and ret.overrides == overrides
    with pytest.raises(SlurmTaskError) as err:
        ret.return_value  # what Hydra's sweeper reads: it then exits non-zero
    assert str(err.value).startswith(
        "SLURM task 12_1 (job #1: seed=1 quant=w4a8) ended without a "
        "result (state CANCELLED). What it finished is on disk"
    )
    assert "has not produced any output" in str(err.value)
    gone = collect(FakeJob(UncompletedJobError("no output"), NOT_IN_QUEUE), overrides, 1)
    with pytest.raises(SlurmTaskError, match="NOT_IN_QUEUE: slurmctld no longer lists it"):
        gone.return_value
    failed = collect(FakeJob(RuntimeError("submitit FailedJobError: boom")), overrides, 1)
    with pytest.raises(
        SlurmTaskError, match=r"SLURM task 12_1 \(job #1: seed=1 quant=w4a8\) failed:\n.*boom"
    ):
        failed.return_value


def test_the_slurm_launcher_option_is_the_plugin(make_cfg):
    from hydra.core.plugins import Plugins

    cfg = make_cfg(["hydra/launcher=slurm"])
    target = cfg.hydra.launcher._target_
    assert target == "hydra_plugins.diffquant_launcher.launcher.SlurmLauncher"
    cls = Plugins.instance().class_name_to_class[target]  # Hydra found it (it instantiates only these)
    # submitit's launcher underneath (by name: Hydra's plugin scan may import its module twice)
    bases = [f"{c.__module__}.{c.__qualname__}" for c in cls.__mro__]
    assert bases[1] == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    assert {k for k in vars(cls) if not k.startswith("_")} == {"launch"}  # the jobs: submitit's
