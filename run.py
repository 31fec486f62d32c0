"""Entry point: ``python run.py [group=option ...] [key=value ...]`` (``-m`` for sweeps).

Returns the job's primary metric (``fid_to_fp`` for quantized models, ``fid`` for FP) so that
Hydra sweepers can optimise it.
"""

import sys

import hydra
from omegaconf import DictConfig

from diffquant.schema import register_configs

register_configs()


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    from diffquant.app import run

    metrics = run(cfg)
    return metrics.get("fid") if cfg.method.name == "fp" else metrics.get("fid_to_fp")


def accept_appended_experiment(argv: list[str]) -> list[str]:
    """``+experiment=X`` (the form many Hydra projects document) means ``experiment=X`` here, and
    ``+sweep=X`` means ``sweep=X``: the primary config already lists ``experiment: null`` and
    ``sweep: null`` in its defaults, where Hydra would reject the ``+`` with a misleading
    "Multiple values" error."""
    return [a[1:] if a.startswith(("+experiment=", "+sweep=")) else a for a in argv]


def check_keys(argv: list[str]) -> None:
    """Exit with a "did you mean" message when an override names a key that does not exist."""
    from pathlib import Path

    from diffquant.cli import misspelt_key_message

    overrides = [a for a in argv[1:] if "=" in a and not a.startswith("-")]
    message = misspelt_key_message(overrides, Path(__file__).resolve().parent / "conf") if overrides else None
    if message:
        print(message, file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    sys.argv = accept_appended_experiment(sys.argv)
    check_keys(sys.argv)
    main()
