"""``hydra/launcher=slurm``'s launcher class. Hydra instantiates launchers only from the
``hydra_plugins`` package and imports every module here at start-up, so this one stays small
and the work is in :mod:`diffquant.launcher` (imported when a sweep launches)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from hydra_plugins.hydra_submitit_launcher.submitit_launcher import (
    SlurmLauncher as SubmititSlurmLauncher,
)


class SlurmLauncher(SubmititSlurmLauncher):
    """hydra-submitit-launcher's ``SlurmLauncher``: the same parameters and jobs (``__call__``,
    ``checkpoint``), waited for by :func:`diffquant.launcher.launch` (job states from ``squeue``
    where ``sacct`` fails; every task collected and reported)."""

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[Any]:
        from diffquant.launcher import launch

        return launch(self, job_overrides, initial_job_idx)
