"""How ``hydra/launcher=slurm`` waits for its tasks. The launcher is hydra-submitit-launcher's
``SlurmLauncher`` (same parameters, same sbatch file, same job code: submitit runs each job,
requeues it on its signal and resumes it); its Hydra plugin class,
``hydra_plugins.diffquant_launcher.launcher.SlurmLauncher`` (Hydra instantiates launchers only
from the ``hydra_plugins`` package), hands :func:`launch` its ``launch``, which changes two things
in the launching process:

1. **Job states where ``sacct`` fails.** submitit learns the state of a job that ended without a
   result file (``scancel``, time limit, node failure, a killed process) only from ``sacct``. On a
   cluster without accounting (``AccountingStorageType=accounting_storage/none``: the
   single-node test cluster, small lab clusters) ``sacct`` exits 1, the state stays ``UNKNOWN``
   and the launcher waits forever. :class:`QueueWatcher` asks ``sacct`` first, exactly as
   submitit does; only when that command fails it asks ``squeue --states=all`` (the controller
   keeps ended jobs for ``MinJobAge``, 300 s by default), and a job the controller no longer
   lists has ended (state ``NOT_IN_QUEUE``). Requeued and suspended jobs count as still queued.
2. **Every task is waited for and reported.** submitit's launcher raises at the first task
   without a result and leaves the others running unobserved. Here each such task becomes a
   failed Hydra job (``Error executing job with overrides: [...]``, then a
   :class:`SlurmTaskError` naming the array task, its state and its log), the others are still
   collected, and the sweep exits non-zero once all tasks ended.

On a cluster where ``sacct`` answers, the states are submitit's own. Why this and not a
time-out: the controller knows whether a task still exists, a time-out only guesses (and would
fail long jobs or wait long for short ones); a subclass keeps all of submitit's job handling.
"""

from __future__ import annotations

import contextlib
import logging
import subprocess
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, JobStatus, filter_overrides
from omegaconf import OmegaConf
from submitit.core.utils import UncompletedJobError
from submitit.slurm.slurm import SlurmInfoWatcher, SlurmJob

from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf

log = logging.getLogger(__name__)

NOT_IN_QUEUE = "NOT_IN_QUEUE"
# States in which a job is still in the queue although submitit's list of unfinished states
# ("READY", "PENDING", "RUNNING", "UNKNOWN", "REQUEUED", "COMPLETING", "PREEMPTED") lacks them.
STILL_QUEUED = frozenset(
    {
        "CONFIGURING",
        "RESIZING",
        "SIGNALING",
        "STAGE_OUT",
        "SUSPENDED",
        "STOPPED",
        "REQUEUE_FED",
        "REQUEUE_HOLD",
        "RESV_DEL_HOLD",
        "SPECIAL_EXIT",
    }
)


class SlurmTaskError(RuntimeError):
    """A task of a SLURM sweep that ended without a result (cancelled, timed out, killed)."""


class QueueWatcher(SlurmInfoWatcher):
    """submitit's ``SlurmInfoWatcher`` (``sacct``), falling back to ``squeue`` where ``sacct``
    fails; see the module doc."""

    _told = False

    def update(self) -> None:
        command = self._make_command()
        if command is None:
            return
        self._num_calls += 1
        try:
            self._output = subprocess.check_output(command, stderr=subprocess.PIPE, timeout=120)
            info = self.read_info(self._output)
        except (OSError, subprocess.SubprocessError) as err:
            info = self.queue_info(err)
        self._info_dict.update(info)
        self._last_status_check = time.time()
        for job_id in self._registered - self._finished:
            if self.is_done(job_id, mode="cache"):
                self._finished.add(job_id)

    def queue_info(self, sacct_error: BaseException) -> dict[str, dict[str, str]]:
        """The states of the unfinished jobs from ``squeue``; {} when that fails too."""
        pending = self._registered - self._finished
        main_ids = sorted({job_id.split("_")[0] for job_id in pending})
        detail = getattr(sacct_error, "stderr", None) or b""
        detail = detail.decode(errors="replace") if isinstance(detail, bytes) else str(detail)
        if not QueueWatcher._told:
            log.info(
                "sacct failed (%s): job states come from squeue",
                detail.strip().splitlines()[-1] if detail.strip() else sacct_error,
            )
            QueueWatcher._told = True
        command = [
            "squeue",
            "--noheader",
            "--states=all",
            "--format=%i|%T|%N",
            f"--jobs={','.join(main_ids)}",
        ]
        try:
            proc = subprocess.run(command, capture_output=True, text=True, timeout=120)
        except (OSError, subprocess.SubprocessError) as err:
            log.warning("squeue failed too (%s): job states unknown for now", err)
            return {}
        if proc.returncode != 0 and "Invalid job id" not in proc.stderr:
            log.warning(
                "squeue failed too (exit %d: %s): job states unknown for now",
                proc.returncode,
                proc.stderr.strip(),
            )
            return {}
        return parse_queue(proc.stdout, pending)

    def is_done(self, job_id: str, mode: str = "standard") -> bool:
        if self.get_state(job_id, mode=mode).upper() in STILL_QUEUED:
            return False
        return super().is_done(job_id, mode="cache")


def parse_queue(squeue_output: str, job_ids: Sequence[str] | set[str]) -> dict[str, dict[str, str]]:
    """``squeue --noheader --states=all --format=%i|%T|%N`` output -> submitit's info dict
    (``{"123_4": {"JobID": ..., "State": ..., "NodeList": ...}}``) for ``job_ids``; those the
    controller did not list have ended: ``NOT_IN_QUEUE``."""
    rows = [line.strip() for line in squeue_output.splitlines() if line.strip()]
    info = SlurmInfoWatcher().read_info("\n".join(["JobID|State|NodeList", *rows]))
    for job_id in job_ids:
        if job_id not in info:
            info[job_id] = {"JobID": job_id, "State": NOT_IN_QUEUE, "NodeList": ""}
    return info


@contextlib.contextmanager
def queue_watcher() -> Iterator[QueueWatcher]:
    """submitit's SLURM jobs watched by a :class:`QueueWatcher` inside the block."""
    before = SlurmJob.watcher
    SlurmJob.watcher = QueueWatcher(delay_s=before._delay_s)
    try:
        yield SlurmJob.watcher
    finally:
        SlurmJob.watcher = before


def launch(
    launcher: Any, job_overrides: Sequence[Sequence[str]], initial_job_idx: int
) -> Sequence[JobReturn]:
    """``BaseSubmititLauncher.launch`` of hydra-submitit-launcher 1.2.0 for ``launcher`` up to its
    ``map_array`` call; then the tasks are watched by :class:`QueueWatcher` and all collected."""
    import submitit

    assert launcher.config is not None
    assert len(job_overrides) > 0
    params = launcher.params
    executor_name = launcher._EXECUTOR
    specific_init_keys = {"max_num_timeout"}
    init_params = {
        "folder": params["submitit_folder"],
        **{f"{executor_name}_{k}": v for k, v in params.items() if k in specific_init_keys},
    }
    executor = submitit.AutoExecutor(cluster=executor_name, **init_params)
    baseparams = set(OmegaConf.structured(BaseQueueConf).keys())
    executor.update_parameters(
        **{
            k if k in baseparams else f"{executor_name}_{k}": v
            for k, v in params.items()
            if k not in specific_init_keys | {"submitit_folder"}
        }
    )

    log.info(f"Submitit '{executor_name}' sweep output dir : {launcher.config.hydra.sweep.dir}")
    sweep_dir = Path(str(launcher.config.hydra.sweep.dir))
    sweep_dir.mkdir(parents=True, exist_ok=True)
    if "mode" in launcher.config.hydra.sweep:
        sweep_dir.chmod(int(str(launcher.config.hydra.sweep.mode), 8))

    job_params: list[Any] = []
    for idx, overrides in enumerate(job_overrides, start=initial_job_idx):
        log.info(f"\t#{idx} : {' '.join(filter_overrides(overrides))}")
        job_params.append(
            (list(overrides), "hydra.sweep.dir", idx, f"job_id_for_{idx}", Singleton.get_state())
        )

    with queue_watcher():
        jobs = executor.map_array(launcher, *zip(*job_params))
        return [collect(job, p[0], p[2]) for job, p in zip(jobs, job_params)]


def collect(job: Any, overrides: list[str], idx: int) -> JobReturn:
    """The job's result; a task that failed outside its Python code, or ended without a result,
    becomes a failed JobReturn whose :class:`SlurmTaskError` names the task."""
    shown = " ".join(filter_overrides(overrides))
    try:
        return job.results()[0]
    except UncompletedJobError as err:  # cancelled, timed out, killed: no result file
        state = job.watcher.get_state(job.job_id, mode="cache")
        if state == NOT_IN_QUEUE:
            state += ": slurmctld no longer lists it (cancelled while pending, or ended long ago)"
        log.error(
            "SLURM task %s (job #%d: %s) ended without a result (state %s)", job.job_id, idx, shown, state
        )
        message = (
            f"SLURM task {job.job_id} (job #{idx}: {shown}) ended without a result "
            f"(state {state}). What it finished is on disk; rerun these overrides to "
            f"resume.\n{err}"
        )
    except Exception as err:  # noqa: BLE001 - the job's own error, as submitit reports it
        log.error("SLURM task %s (job #%d: %s) failed", job.job_id, idx, shown)
        message = f"SLURM task {job.job_id} (job #{idx}: {shown}) failed:\n{err}"
    ret = JobReturn(overrides=list(overrides), status=JobStatus.FAILED)
    ret.return_value = SlurmTaskError(message)
    return ret
