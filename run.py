"""Entry point: ``python run.py [group=option ...] [key=value ...]`` (``-m`` for sweeps).

Returns the job's primary metric (``fid_to_fp`` for quantized models, ``fid`` for FP) so that
Hydra sweepers can optimise it.
"""

import hydra
from omegaconf import DictConfig

from diffquant.schema import register_configs

register_configs()


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    from diffquant.app import run

    metrics = run(cfg)
    return metrics.get("fid") if cfg.method.name == "fp" else metrics.get("fid_to_fp")


if __name__ == "__main__":
    main()
