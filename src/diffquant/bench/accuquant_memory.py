"""Peak memory and time of one AccuQuant group calibration, for M = 1, 2, 4, 8 × exact/approx.

    python -m diffquant.bench.accuquant_memory [--group-sizes 1 2 4 8] [--batch-size 64]
                                               [--iters 3] [--out outputs/bench]

Every (mode, M) point runs in a **fresh subprocess** (``--point MODE M``), so that no point
inherits another's allocations. A point builds the model (``model=ldm_digits`` by default; the
same architecture with random weights when the trained weights are absent — memory and time do
not depend on the weight values), quantizes its UNet (``quant=w4a4``; min-max ranges, no PTQ:
the cost of a group calibration does not depend on how the base was calibrated), samples
``batch_size`` FP trajectories, and then measures ``iters`` optimiser steps on the group of the
first M sampler steps (learning activation step sizes):

* **CPU**: the peak resident set size during those steps minus the RSS just before them
  (``VmHWM`` after resetting it through ``/proc/self/clear_refs``; ``MALLOC_MMAP_THRESHOLD_`` is
  fixed at 64 KiB in the child so that freed tensors go back to the OS and RSS follows the live
  memory);
* **CUDA**: ``torch.cuda.max_memory_allocated()`` minus the memory allocated before;
* **time**: wall-clock seconds of the ``iters`` steps (``seconds``) and per step.

The default batch (32 trajectories → 64 UNet rows with guidance) makes one step's graph
(~0.24 GB on ldm_digits W4A4) large against RSS noise (a few MB). The parent also measures, in one
more subprocess, how close the approximate gradient is to the exact one for each M (cosine and
relative error, the ablation of the identity-Jacobian approximation).

Writes ``<out>/accuquant_memory.json`` (a list of ``{mode, group_size, peak_mb, seconds, ...}``),
``<out>/accuquant_grad_agreement.json`` and ``<out>/accuquant_memory.md`` (the tables).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

from diffquant.bench.memory import current_rss_mb, peak_rss_mb, reset_peak_rss

MODES = ("exact", "approx")
ROOT = Path(__file__).resolve().parents[3]


# ---------------------------------------------------------------------------- model set-up
def build_bench_model(model_name: str, quant_name: str, device: str):
    """The model of ``conf/model/<model_name>.yaml`` with a quantized UNet (weights min-max,
    activations min-max on 8 FP trajectories); returns ``(model, weights)`` where ``weights`` is
    ``trained`` or ``random`` (the trained weights are absent: same architecture)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from diffquant.calib.ranges import observing_act_ranges
    from diffquant.models.loading import build_model
    from diffquant.quant import quantize_denoiser
    from diffquant.quant.config import QuantConfig
    from diffquant.schema import register_configs, typed

    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(version_base="1.3", config_dir=str(ROOT / "conf")):
        cfg = compose(
            config_name="config", overrides=[f"model={model_name}", f"quant={quant_name}", "logger=none"]
        )
    try:
        model, weights = build_model(cfg.model, device), "trained"
    except (FileNotFoundError, OSError, ValueError) as err:
        if model_name != "ldm_digits":
            raise
        print(
            f"[bench] trained {model_name} weights not found ({type(err).__name__}); using the "
            "same architecture with random weights",
            file=sys.stderr,
        )
        model, weights = random_ldm_digits(cfg.model, device), "random"
    qcfg = typed({**cfg.quant, "weight_init": "minmax", "act_init": "minmax"}, QuantConfig, "quant")
    quantize_denoiser(model.denoiser, model.spec, qcfg, timesteps=model.timesteps)
    with observing_act_ranges(model.denoiser, "minmax"):
        model.sample_latents(list(range(8)), 99)
    return model, weights


def random_ldm_digits(model_cfg: Any, device: str):
    """ldm_digits' architecture and sampler with random weights (no autoencoder needed)."""
    from torch import nn

    from diffquant.models.base import SamplerSettings
    from diffquant.models.ldm import LatentDiffusion
    from diffquant.zoo.train import (
        LATENT_CHANNELS,
        LATENT_SIZE,
        NUM_CLASSES,
        build_sampling_scheduler,
        build_unet,
    )

    sampler = SamplerSettings.of(model_cfg)
    return LatentDiffusion(
        "ldm_digits_random",
        build_unet(),
        nn.Identity(),
        build_sampling_scheduler(),
        sampler,
        (LATENT_CHANNELS, LATENT_SIZE, LATENT_SIZE),
        1.0,
        device,
        num_classes=NUM_CLASSES,
    )


# ---------------------------------------------------------------------------- one point
def measure_point(mode: str, group_size: int, args: argparse.Namespace) -> dict[str, Any]:
    """Run in a fresh process: peak memory and time of ``args.iters`` group-calibration steps."""
    import torch

    torch.set_num_threads(args.threads)
    from diffquant.methods.accuquant import AccuQuantConfig, LearnedParameters, TrajectoryCalibration
    from diffquant.methods.trajectory import fp_trajectories

    device = (
        "cuda"
        if (args.device == "auto" and torch.cuda.is_available())
        else ("cpu" if args.device == "auto" else args.device)
    )
    model, weights = build_bench_model(args.model, args.quant, device)
    traj = fp_trajectories(model, list(range(args.batch_size)), 20_000, args.batch_size)
    cfg = AccuQuantConfig(
        group_size=group_size,
        grad_mode=mode,
        iters_per_group=args.iters,
        n_samples=args.batch_size,
        batch_size=args.batch_size,
    )
    cal = TrajectoryCalibration(model, cfg)
    learned = LearnedParameters(model.denoiser, cfg)
    generator = torch.Generator().manual_seed(0)
    x_start = traj.states[0]

    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base_rss = current_rss_mb()
        reset_ok = reset_peak_rss()
    t0 = time.perf_counter()
    losses = cal.calibrate_group(learned, traj, x_start, 0, group_size, generator)
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    if cuda:
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
        how = "cuda_max_allocated"
    else:
        peak = peak_rss_mb() - base_rss
        how = "rss_hwm_reset" if reset_ok else "ru_maxrss"
    learned.restore()
    return {
        "mode": mode,
        "group_size": group_size,
        "peak_mb": round(peak, 1),
        "seconds": round(seconds, 3),
        "seconds_per_iter": round(seconds / args.iters, 3),
        "iters": args.iters,
        "batch_size": args.batch_size,
        "unet_rows": 2 * args.batch_size if model.guided else args.batch_size,
        "device": device,
        "memory": how,
        "threads": args.threads,
        "model": args.model,
        "weights": weights,
        "quant": args.quant,
        "loss_first": round(losses[0], 6),
        "loss_last": round(losses[-1], 6),
    }


def measure_agreement(group_sizes: Sequence[int], args: argparse.Namespace) -> list[dict[str, Any]]:
    """Cosine and relative error of the approximate vs the exact gradient (activation step sizes)
    of the group loss of M steps starting at the first, the middle and the last possible step,
    on ``args.agreement_batch`` trajectories."""
    import torch

    torch.set_num_threads(args.threads)
    from diffquant.methods.trajectory import fp_trajectories, gradient_agreement, gradient_of, group_backward
    from diffquant.quant import quant_parameters

    model, weights = build_bench_model(
        args.model, args.quant, "cpu" if args.device == "auto" else args.device
    )
    traj = fp_trajectories(model, list(range(args.agreement_batch)), 20_000)
    params = list(quant_parameters(model.denoiser, "act_scale", max_bits=15).values())
    for p in params:
        p.requires_grad_(True)
    rows = []
    for m in group_sizes:
        last = traj.n_steps - m
        for where, start in (("first", 0), ("middle", last // 2), ("last", last)):
            g = {
                mode: gradient_of(
                    params,
                    lambda mode=mode, start=start, m=m: group_backward(
                        model,
                        mode,
                        traj.states[start],
                        start,
                        m,
                        traj.states[start + m],
                        traj.cond,
                        traj.indices,
                        traj.seed,
                    ),
                )
                for mode in MODES
            }
            rows.append(
                {
                    "group_size": m,
                    "where": where,
                    "start": start,
                    "weights": weights,
                    **{k: round(v, 6) for k, v in gradient_agreement(g["exact"], g["approx"]).items()},
                }
            )
    return rows


# ---------------------------------------------------------------------------- parent
def _child(args: argparse.Namespace, extra: list[str]) -> dict[str, Any] | list:
    env = {
        **os.environ,
        "MALLOC_MMAP_THRESHOLD_": "65536",
        "MALLOC_TRIM_THRESHOLD_": "65536",
        "OMP_NUM_THREADS": str(args.threads),
    }
    cmd = [
        sys.executable,
        "-m",
        "diffquant.bench.accuquant_memory",
        *extra,
        "--batch-size",
        str(args.batch_size),
        "--iters",
        str(args.iters),
        "--threads",
        str(args.threads),
        "--model",
        args.model,
        "--quant",
        args.quant,
        "--device",
        args.device,
        "--agreement-batch",
        str(args.agreement_batch),
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"benchmark point {extra} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def markdown(points: list[dict[str, Any]], agreement: list[dict[str, Any]]) -> str:
    """The memory/time table (rows: M; columns: both modes) and the gradient-agreement table."""
    p0 = points[0]
    unit = "max CUDA memory allocated" if p0["device"].startswith("cuda") else "peak RSS increase"
    by = {(p["mode"], p["group_size"]): p for p in points}
    sizes = sorted({p["group_size"] for p in points})
    lines = [
        f"AccuQuant: one group's calibration ({p0['iters']} optimiser steps, "
        f"{p0['batch_size']} trajectories = {p0['unet_rows']} UNet rows, {p0['model']} "
        f"{p0['quant']}, weights {p0['weights']}, {p0['device']}, {p0['threads']} thread(s)); "
        f"memory = {unit}, one fresh process per point.",
        "",
        "| M | exact peak MB | approx peak MB | exact s | approx s |",
        "|---:|---:|---:|---:|---:|",
    ]
    for m in sizes:
        e, a = by.get(("exact", m)), by.get(("approx", m))
        fmt = lambda p, k: "—" if p is None else f"{p[k]:.1f}" if k == "peak_mb" else f"{p[k]:.2f}"  # noqa: E731
        lines.append(
            f"| {m} | {fmt(e, 'peak_mb')} | {fmt(a, 'peak_mb')} | {fmt(e, 'seconds')} | {fmt(a, 'seconds')} |"
        )
    a1, a_max = by.get(("approx", sizes[0])), by.get(("approx", sizes[-1]))
    if a1 and a_max and a1["peak_mb"] > 0:
        lines += [
            "",
            f"approx peak at M = {sizes[-1]} / at M = {sizes[0]}: {a_max['peak_mb'] / a1['peak_mb']:.3f}",
        ]
    e1, e_max = by.get(("exact", sizes[0])), by.get(("exact", sizes[-1]))
    if e1 and e_max and e1["peak_mb"] > 0:
        lines += [
            f"exact peak at M = {sizes[-1]} / at M = {sizes[0]}: {e_max['peak_mb'] / e1['peak_mb']:.3f}"
        ]
    if agreement:
        wheres = list(dict.fromkeys(r["where"] for r in agreement))
        cell = {(r["group_size"], r["where"]): r for r in agreement}
        lines += [
            "",
            "Approximate vs exact gradient of the group loss (activation step sizes; "
            "cosine / relative error), for the group of M steps starting at the first, "
            "middle and last possible step:",
            "",
            "| M | " + " | ".join(wheres) + " |",
            "|---:|" + "---:|" * len(wheres),
        ]
        for m in sorted({r["group_size"] for r in agreement}):
            lines.append(
                f"| {m} | "
                + " | ".join(
                    f"{cell[m, w]['cosine']:.3f} / {cell[m, w]['rel_error']:.3f} (step {cell[m, w]['start']})"
                    for w in wheres
                )
                + " |"
            )
    return "\n".join(lines) + "\n"


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m diffquant.bench.accuquant_memory", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--group-sizes", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--batch-size", type=int, default=32, help="trajectories per step")
    parser.add_argument("--iters", type=int, default=2, help="optimiser steps measured")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--model", default="ldm_digits")
    parser.add_argument("--quant", default="w4a4")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--agreement-batch", type=int, default=16)
    parser.add_argument("--no-agreement", action="store_true")
    parser.add_argument("--out", type=Path, default=Path("outputs/bench"))
    parser.add_argument("--point", nargs=2, metavar=("MODE", "M"), help=argparse.SUPPRESS)
    parser.add_argument("--agreement", type=int, nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.point:  # child: one measurement, printed as the last stdout line
        print(json.dumps(measure_point(args.point[0], int(args.point[1]), args)))
        return
    if args.agreement:
        print(json.dumps(measure_agreement(args.agreement, args)))
        return

    t0 = time.perf_counter()
    points = []
    for m in args.group_sizes:
        for mode in args.modes:
            p = _child(args, ["--point", mode, str(m)])
            print(f"[bench] {mode:<6} M={m}: peak {p['peak_mb']:8.1f} MB  {p['seconds']:6.2f} s", flush=True)
            points.append(p)
    agreement = [] if args.no_agreement else _child(args, ["--agreement", *map(str, args.group_sizes)])
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "accuquant_memory.json").write_text(json.dumps(points, indent=2) + "\n")
    if agreement:
        (args.out / "accuquant_grad_agreement.json").write_text(json.dumps(agreement, indent=2) + "\n")
    table = markdown(points, agreement)
    (args.out / "accuquant_memory.md").write_text(table)
    print(table)
    print(
        f"[bench] {len(points)} points in {time.perf_counter() - t0:.0f}s on {platform.node()}; "
        f"wrote {args.out}/accuquant_memory.{{json,md}}"
    )


if __name__ == "__main__":
    main()
