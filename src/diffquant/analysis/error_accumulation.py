"""Error accumulation of a quantized sampler: per-step error vs accumulated error, per step.

For ``N`` samples (the job's seed, indices ``0 .. N-1``) the FP and the quantized chain both start
from the same x_T and use the same conditioning, guidance and per-step noise. At sampler step
``i`` (0 = noisiest), with ``x_i`` the FP state and ``x̃_i`` the quantized one:

* **step error** ``e_i = ‖step_q(x_i) − step_fp(x_i)‖`` — the quantized and FP step outputs on
  the *same* input (the FP state), i.e. what a per-step calibration minimises;
* **accumulated error** ``a_i = ‖x̃_{i+1} − x_{i+1}‖`` — the distance between the two
  trajectories after step ``i``, which includes the errors of all earlier steps.

``‖·‖`` is the L2 norm of one sample's latent difference ``(C, h, w)`` (latent units); the result
holds the mean and standard deviation over samples. (The AccuQuant paper's Fig. "Quantization
errors on CIFAR-10" plots the same two curves.)

Usable for any method: :func:`measure_error_accumulation` takes any quantized
:class:`~diffquant.models.base.DiffusionModel` (the FP chain is the same model with quantization
switched off). In a job it runs with ``analysis.error_accumulation=true`` and writes
``error_accumulation.json`` and ``error_accumulation.png`` into the run folder and logs both to
W&B. To overlay several runs::

    python -m diffquant.analysis.error_accumulation plot RUN_DIR [RUN_DIR ...] --out X.png
"""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
from torch import Tensor

from diffquant.cache import atomic_write_json
from diffquant.methods.trajectory import chain_step, fresh_scheduler, snapshot_scheduler
from diffquant.quant.state import quant_state

log = logging.getLogger(__name__)

JSON_FILE = "error_accumulation.json"
PLOT_FILE = "error_accumulation.png"


@dataclass
class ErrorAccumulation:
    """Per-step curves (one entry per sampler step, noisiest first) and what they were measured on.

    Attributes:
        steps: sampler step index ``i`` (0 = noisiest).
        timesteps: the scheduler's timestep of each step.
        step_error_mean / step_error_std: mean / std over samples of ``e_i`` (latent L2 norm).
        accumulated_error_mean / accumulated_error_std: the same for ``a_i``.
        n_samples / seed: the samples (indices ``0 .. n_samples - 1`` of the job's seed).
        label: how plots name the run (e.g. ``accuquant w4a4``).
        meta: free-form description (model, method, quant).
    """

    steps: list[int]
    timesteps: list[int]
    step_error_mean: list[float]
    step_error_std: list[float]
    accumulated_error_mean: list[float]
    accumulated_error_std: list[float]
    n_samples: int
    seed: int
    label: str = ""
    meta: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> dict[str, float]:
        """Scalars for ``metrics.json``: mean step error and the final accumulated error."""
        return {
            "step_error_mean": sum(self.step_error_mean) / len(self.step_error_mean),
            "accumulated_error_final": self.accumulated_error_mean[-1],
        }

    @classmethod
    def load(cls, path: Path | str) -> ErrorAccumulation:
        path = Path(path)
        if path.is_dir():
            path = path / JSON_FILE
        return cls(**json.loads(path.read_text()))


def _per_sample_norm(diff: Tensor) -> Tensor:
    """``(N, ...)`` → ``(N,)`` L2 norms (float64)."""
    return diff.double().flatten(1).norm(dim=1)


@torch.no_grad()
def measure_error_accumulation(
    model: Any,
    n_samples: int = 64,
    seed: int = 0,
    batch_size: int = 64,
    label: str = "",
    meta: Optional[dict[str, Any]] = None,
) -> ErrorAccumulation:
    """Run the FP and the quantized chain of ``n_samples`` samples side by side (see the module
    doc); 3 UNet calls per step and batch (FP step, quantized step on the FP state, quantized
    step on the quantized state)."""
    model.scheduler.set_timesteps(model.sampler.num_inference_steps)
    n_steps = len(model.timesteps)
    step_err: list[list[Tensor]] = [[] for _ in range(n_steps)]
    acc_err: list[list[Tensor]] = [[] for _ in range(n_steps)]
    denoiser = model.denoiser
    for lo in range(0, n_samples, batch_size):
        idx = list(range(lo, min(n_samples, lo + batch_size)))
        cond = model.conditions(idx, seed).to(model.device)
        x_fp = model.initial_noise(idx, seed)
        x_q = x_fp.clone()
        # each chain advances its own scheduler (multistep samplers keep a history); the
        # quantized step on the FP state starts from the FP chain's scheduler state
        fp_scheduler, q_scheduler = fresh_scheduler(model), fresh_scheduler(model)
        for i in range(n_steps):
            on_fp_scheduler = snapshot_scheduler(fp_scheduler)
            with quant_state(denoiser, weights=False, acts=False):
                next_fp = chain_step(model, fp_scheduler, x_fp, i, cond, idx, seed)
            q_on_fp = chain_step(model, on_fp_scheduler, x_fp, i, cond, idx, seed)
            x_q = chain_step(model, q_scheduler, x_q, i, cond, idx, seed)
            step_err[i].append(_per_sample_norm(q_on_fp - next_fp))
            acc_err[i].append(_per_sample_norm(x_q - next_fp))
            x_fp = next_fp

    def stats(per_step: list[list[Tensor]]) -> tuple[list[float], list[float]]:
        values = [torch.cat(v) for v in per_step]
        std = [float(v.std(unbiased=False)) for v in values]
        return [float(v.mean()) for v in values], std

    s_mean, s_std = stats(step_err)
    a_mean, a_std = stats(acc_err)
    return ErrorAccumulation(
        list(range(n_steps)),
        [int(t) for t in model.timesteps],
        s_mean,
        s_std,
        a_mean,
        a_std,
        n_samples,
        seed,
        label,
        dict(meta or {}),
    )


# ---------------------------------------------------------------------------- plots
def plot_curves(results: Sequence[ErrorAccumulation], out: Path | str, title: str = "") -> Path:
    """Step error (dashed) and accumulated error (solid, with a band of ± one standard error of
    its mean over samples, std/√n) of each run against the sampler step, one colour per run;
    writes a PNG and returns its path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for k, r in enumerate(results):
        c = colors[k % len(colors)]
        x = [s + 1 for s in r.steps]  # steps completed
        sem = [s / max(r.n_samples, 1) ** 0.5 for s in r.accumulated_error_std]
        lo = [m - e for m, e in zip(r.accumulated_error_mean, sem)]
        hi = [m + e for m, e in zip(r.accumulated_error_mean, sem)]
        name = r.label or f"run {k}"
        ax.plot(x, r.accumulated_error_mean, color=c, lw=2, label=f"{name}: accumulated")
        ax.fill_between(x, lo, hi, color=c, alpha=0.15, lw=0)
        ax.plot(x, r.step_error_mean, color=c, lw=1.5, ls="--", label=f"{name}: step")
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.set_xlabel("sampler steps done (noise → image)")
    ax.set_ylabel("latent L2 distance to FP")
    ax.set_title(title or "Quantization error: per step vs accumulated")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    return out


def save(result: ErrorAccumulation, run_dir: Path | str) -> tuple[Path, Path]:
    """Write ``error_accumulation.json`` and ``.png`` into ``run_dir``; returns both paths."""
    run_dir = Path(run_dir)
    atomic_write_json(run_dir / JSON_FILE, asdict(result))
    png = plot_curves([result], run_dir / PLOT_FILE, title=f"Error accumulation: {result.label}")
    return run_dir / JSON_FILE, png


def run_error_accumulation(
    model: Any, analysis_cfg: Any, ctx: Any, label: str = "", meta: Optional[dict[str, Any]] = None
) -> dict[str, float]:
    """The job-level entry point: measure, save into ``ctx.run_dir``, log to the tracker; returns
    the summary scalars prefixed ``erracc_`` for ``metrics.json``."""
    result = measure_error_accumulation(
        model, analysis_cfg.n_samples, ctx.seed, analysis_cfg.batch_size, label, meta
    )
    _, png = save(result, ctx.run_dir)
    rows = [
        [s, t, e, es, a, as_]
        for s, t, e, es, a, as_ in zip(
            result.steps,
            result.timesteps,
            result.step_error_mean,
            result.step_error_std,
            result.accumulated_error_mean,
            result.accumulated_error_std,
        )
    ]
    ctx.tracker.log_table(
        "error_accumulation",
        ["step", "timestep", "step_error", "step_error_std", "accumulated_error", "accumulated_error_std"],
        rows,
    )
    ctx.tracker.log_image("error_accumulation", png, caption=label)
    summary = {f"erracc_{k}": round(v, 6) for k, v in result.summary().items()}
    log.info("error accumulation: %s", summary)
    return summary


# ---------------------------------------------------------------------------- CLI
def _default_label(run_dir: Path, result: ErrorAccumulation) -> str:
    return result.label or run_dir.name


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m diffquant.analysis.error_accumulation", description=__doc__.split("\n\n")[0]
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("plot", help="overlay the curves of several runs")
    p.add_argument("runs", nargs="+", type=Path, help="run folders (or error_accumulation.json files)")
    p.add_argument("--out", type=Path, required=True, help="PNG to write")
    p.add_argument("--labels", nargs="*", default=None, help="one label per run (default: recorded)")
    p.add_argument("--title", default="")
    args = parser.parse_args(argv)
    results = [ErrorAccumulation.load(r) for r in args.runs]
    if args.labels:
        if len(args.labels) != len(results):
            parser.error(f"--labels: {len(args.labels)} labels for {len(results)} runs")
        for r, lab in zip(results, args.labels):
            r.label = lab
    else:
        for run, r in zip(args.runs, results):
            r.label = _default_label(run, r)
    out = plot_curves(results, args.out, args.title)
    for r in results:
        print(
            f"{r.label:<28} final accumulated {r.accumulated_error_mean[-1]:.4f}  "
            f"mean step {sum(r.step_error_mean) / len(r.step_error_mean):.4f}"
        )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
