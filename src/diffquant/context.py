"""What a method or evaluator gets from the app besides its own config: folders, device, logger."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch


class NullTracker:
    """A tracker that drops everything (``logger=none``); the W&B tracker has the same methods."""

    def log(self, metrics: dict[str, Any], step: int | None = None) -> None: ...

    def log_text(self, key: str, text: str) -> None: ...

    def log_image(self, key: str, path: Path, caption: str = "") -> None: ...

    def log_table(self, key: str, columns: list[str], rows: list[list[Any]]) -> None: ...

    def summary(self, metrics: dict[str, Any]) -> None: ...

    def finish(self, exit_code: int = 0) -> None: ...


@dataclass
class RunContext:
    """Shared state of one job.

    Attributes:
        run_dir: the job's output folder (Hydra's ``runtime.output_dir``): metrics, plots, grids.
        cache_dir: the cache shared by all jobs (calibration data, PTQ results, FP references),
            keyed by the settings that produced each entry (see :mod:`diffquant.cache`).
        device: where the denoiser runs.
        seed: the job's seed.
        tracker: W&B run or :class:`NullTracker`.
    """

    run_dir: Path
    cache_dir: Path
    device: torch.device
    seed: int = 0
    tracker: Any = field(default_factory=NullTracker)
