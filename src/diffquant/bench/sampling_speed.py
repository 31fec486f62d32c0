"""Fake-quantized vs FP sampling time, measured in one process.

    python -m diffquant.bench.sampling_speed quant=w4a8 method=ptq [+bench.samples=100 +bench.repeats=3]

Builds the FP model and the quantized one (the method's result comes from the cache when it was
calibrated before), then samples the same ``bench.samples`` images with each, alternating
``bench.repeats`` times, and reports the median seconds of each and their ratio; the quantized
model samples twice per round, with its weights quantized once per sampling run (the default,
``freeze_weights``) and at every denoiser call (``per_call_weights_*``). Writes
``outputs/bench/sampling_speed_<model>_<quant>_<method>.json``. Fake quantization simulates
low-bit arithmetic in FP32, so the ratio measures the simulation's overhead, not a deployment
speed-up.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig, open_dict

from diffquant.app import quantize
from diffquant.cache import atomic_write_json
from diffquant.context import RunContext
from diffquant.models.loading import build_model, resolve_device
from diffquant.schema import register_configs, typed_run_config

CONF = str(Path(__file__).resolve().parents[3] / "conf")
register_configs()


def time_sampling(model, n: int, seed: int) -> float:
    t0 = time.perf_counter()
    model.sample(list(range(n)), seed)
    return time.perf_counter() - t0


@hydra.main(version_base="1.3", config_path=CONF, config_name="config")
def main(cfg: DictConfig) -> dict:
    with open_dict(cfg):
        bench = cfg.get("bench") or {}
        n, repeats = int(bench.get("samples", 100)), int(bench.get("repeats", 3))
        cfg.logger.name, cfg.logger.mode = "none", "disabled"
        cfg.pop("bench", None)
    run = typed_run_config(cfg)
    device = resolve_device(run.device)
    ctx = RunContext(
        run_dir=Path(run.paths.output_dir), cache_dir=Path(run.paths.cache_dir), device=device, seed=run.seed
    )
    fp = build_model(run.model, device)
    quant = quantize(build_model(run.model, device), run.quant, run.method, ctx).model
    time_sampling(quant, min(n, 8), cfg.seed)  # warm-up both paths
    time_sampling(fp, min(n, 8), cfg.seed)
    fp_s, q_s, per_call_s = [], [], []
    for _ in range(repeats):
        fp_s.append(time_sampling(fp, n, cfg.seed))
        q_s.append(time_sampling(quant, n, cfg.seed))
        quant.freeze_weights = False  # weights re-quantized at every denoiser call
        per_call_s.append(time_sampling(quant, n, cfg.seed))
        quant.freeze_weights = True
    result = {
        "model": cfg.model.name,
        "quant": cfg.quant.name,
        "method": cfg.method.name,
        "samples": n,
        "repeats": repeats,
        "threads": torch.get_num_threads(),
        "device": str(device),
        "fp_s": round(statistics.median(fp_s), 3),
        "quant_s": round(statistics.median(q_s), 3),
        "ratio": round(statistics.median(q_s) / statistics.median(fp_s), 3),
        "per_call_weights_s": round(statistics.median(per_call_s), 3),
        "per_call_weights_ratio": round(statistics.median(per_call_s) / statistics.median(fp_s), 3),
    }
    out = (
        Path(cfg.paths.root_dir)
        / "outputs"
        / "bench"
        / f"sampling_speed_{cfg.model.name}_{cfg.quant.name}_{cfg.method.name}.json"
    )
    atomic_write_json(out, result)
    print(result, flush=True)
    return result


if __name__ == "__main__":
    main()
