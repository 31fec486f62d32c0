"""Shared fixtures: compose the real configs (lightning-hydra-template style) into tmp folders."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import open_dict

from diffquant.schema import register_configs

ROOT = Path(__file__).resolve().parent.parent
CONF = ROOT / "conf"

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
torch.set_num_threads(min(2, os.cpu_count() or 1))
register_configs()


#: the slowest test files, slowest first (`pytest --durations=0` on 2 cores: 185 s down to 39 s
#: per file), SLURM files apart; `make test` hands them out first (`--dist loadfile
#: --no-loadscope-reorder`), so that its two workers finish together instead of one waiting on
#: a long file handed out last. Other files follow in name order.
SLOWEST_FILES = (
    "test_paper_rows.py",
    "test_sweeps.py",
    "test_calib_recon.py",
    "test_slurm_sweep.py",
    "test_resume.py",
    "test_app.py",
    "test_slurm_cluster.py",
    "test_accuquant.py",
    "test_fidelity.py",
    "test_configs.py",
)


def pytest_collection_modifyitems(config, items) -> None:
    """Collection order: :data:`SLOWEST_FILES` first, each file's tests in their order."""
    first = {name: i for i, name in enumerate(SLOWEST_FILES)}
    items.sort(key=lambda item: first.get(item.path.name, len(first)))


def compose_config(overrides: list[str], output_dir: Path, cache_dir: Path | None = None):
    """Compose ``conf/config.yaml`` with ``overrides``; output and cache go to tmp folders."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF)):
        cfg = compose(
            config_name="config",
            return_hydra_config=True,
            overrides=[f"hydra.runtime.output_dir={output_dir}", f"hydra.runtime.cwd={ROOT}", *overrides],
        )
    HydraConfig().set_config(cfg)
    with open_dict(cfg):
        cfg.paths.cache_dir = str(cache_dir or output_dir / "cache")
    return cfg


@pytest.fixture
def make_cfg(tmp_path):
    """``make_cfg(["quant=w8a8", ...], name="a")`` → a composed config writing under tmp_path."""

    def factory(overrides=(), name="job", cache_dir=None):
        return compose_config(list(overrides), tmp_path / name, cache_dir or tmp_path / "cache")

    yield factory
    GlobalHydra.instance().clear()


def run_cli(args: list[str], cwd: Path = ROOT, timeout: int = 600, env: dict | None = None):
    """Run ``python run.py args`` in a subprocess; returns the CompletedProcess."""
    import subprocess
    import sys

    full_env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", **(env or {})}
    return subprocess.run(
        [sys.executable, str(ROOT / "run.py"), *args],
        cwd=cwd,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a whole test module (``pytestmark = pytest.mark.usefixtures(
    "one_thread")``): tiny models are many small ops, which run fastest on one thread and do not
    stall when the cores are shared."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture(scope="module")
def slurm_env() -> dict[str, str]:
    """The environment (``SLURM_CONF``, ...) of a Slurm cluster that answers: an existing one, or
    the single-node one ``slurm/start_local_cluster.sh`` starts. Skips without one, fails in CI."""
    from slurm_cluster import ensure_cluster

    try:
        return ensure_cluster()
    except RuntimeError as exc:
        if os.environ.get("CI"):
            pytest.fail(f"CI is set but no Slurm cluster could be started: {exc}", pytrace=False)
        pytest.skip(f"no Slurm cluster: {exc}")
