"""Recording a job: ``metrics.json`` (atomic), sample grids, and the Weights & Biases run.

W&B is a sink only: tests and the table builder read ``metrics.json``. Offline W&B runs live in
the job folder (``<run_dir>/wandb``) and can be synced later with ``wandb sync``.
"""

from __future__ import annotations

import netrc
import os
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from diffquant.context import NullTracker
from diffquant.eval.fp_images import to_uint8


def save_grid(images: torch.Tensor, path: Path, nrow: int | None = None) -> Path:
    """Tile images ``(N, C, H, W)`` in [0, 1] into one PNG (grayscale or RGB) with 2-px gaps."""
    n, c, h, w = images.shape
    nrow = nrow or int(np.ceil(np.sqrt(n)))
    ncol = int(np.ceil(n / nrow))
    pad = 2
    grid = np.ones(((h + pad) * ncol + pad, (w + pad) * nrow + pad, c), dtype=np.uint8) * 255
    arr = to_uint8(images).permute(0, 2, 3, 1).cpu().numpy()
    for k in range(n):
        r, q = divmod(k, nrow)
        y, x = pad + r * (h + pad), pad + q * (w + pad)
        grid[y : y + h, x : x + w] = arr[k]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid[..., 0] if c == 1 else grid).save(path)
    return path


def wandb_logged_in() -> bool:
    """True when an API key is configured (environment or ~/.netrc)."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError):
        return False


def group_name(sweep_dir: Path | str) -> str:
    """The W&B group of a sweep: its folder's name, with the date folder in front when the name is
    only a time (``outputs/multiruns/2026-11-21/05-10-00`` → ``2026-11-21_05-10-00``)."""
    path = Path(sweep_dir)
    if re.fullmatch(r"\d{2}-\d{2}-\d{2}", path.name) and path.parent.name:
        return f"{path.parent.name}_{path.name}"
    return path.name


def sweep_group() -> str | None:
    """:func:`group_name` of the running Hydra multirun's sweep folder (None outside a multirun),
    identical for every job of the sweep, whichever launcher runs them."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        hydra_cfg = HydraConfig.get()
        if hydra_cfg.mode != RunMode.MULTIRUN or not hydra_cfg.sweep.dir:
            return None
        return group_name(hydra_cfg.sweep.dir)
    except (ValueError, ImportError, AttributeError):
        return None


class WandbTracker:
    """One W&B run per job (``reinit="finish_previous"`` so sequential sweep jobs never share one).

    Runs of one sweep share a group (``logger.group``, else the sweep folder: :func:`sweep_group`);
    ``job_type`` is ``logger.job_type``, else the caller's (``quantize``, or ``evaluate`` for FP
    jobs and shard merges). ``mode: auto`` follows ``$WANDB_MODE`` when set (the SLURM launcher
    sets it to offline on compute nodes), else online when logged in, else offline.
    """

    def __init__(
        self,
        logger_cfg: Any,
        config: dict[str, Any],
        run_dir: Path,
        name: str,
        tags: list[str],
        job_type: str | None = None,
        group: str | None = None,
    ) -> None:
        import wandb

        mode = logger_cfg.mode
        if mode == "auto":
            mode = os.environ.get("WANDB_MODE") or ("online" if wandb_logged_in() else "offline")
        self.wandb = wandb
        self.group = logger_cfg.group or group or sweep_group()
        self.job_type = logger_cfg.job_type or job_type
        self.run = wandb.init(
            project=logger_cfg.project,
            entity=logger_cfg.entity,
            mode=mode,
            group=self.group,
            job_type=self.job_type,
            name=name,
            tags=tags,
            config=config,
            dir=str(run_dir),
            reinit="finish_previous",
            settings=wandb.Settings(console="off", silent=True),
        )
        self.mode = mode

    def log(self, metrics: dict[str, Any], step: int | None = None) -> None:
        self.run.log(metrics, step=step)

    def log_text(self, key: str, text: str) -> None:
        self.run.log({key: self.wandb.Html(f"<pre>{text}</pre>")})

    def log_image(self, key: str, path: Path, caption: str = "") -> None:
        self.run.log({key: self.wandb.Image(str(path), caption=caption)})

    def log_table(self, key: str, columns: list[str], rows: list[list[Any]]) -> None:
        self.run.log({key: self.wandb.Table(columns=columns, data=rows)})

    def summary(self, metrics: dict[str, Any]) -> None:
        for k, v in metrics.items():
            self.run.summary[k] = v

    def finish(self, exit_code: int = 0) -> None:
        self.run.finish(exit_code=exit_code)


def make_tracker(
    logger_cfg: Any,
    config: dict[str, Any],
    run_dir: Path,
    name: str,
    tags: list[str],
    job_type: str | None = None,
    group: str | None = None,
):
    """W&B when ``logger.name == 'wandb'`` and mode is not disabled, else a no-op tracker.
    ``job_type`` / ``group`` are defaults that ``logger.job_type`` / ``logger.group`` override."""
    if logger_cfg.name == "none" or logger_cfg.mode == "disabled":
        return NullTracker()
    if logger_cfg.name != "wandb":
        raise ValueError(f"logger={logger_cfg.name!r}: use logger=wandb or logger=none.")
    return WandbTracker(logger_cfg, config, run_dir, name, tags, job_type=job_type, group=group)
