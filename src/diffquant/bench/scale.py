"""Cost at paper size: the forward (FP / fake-quant / frozen / int8) and the block reconstruction.

    python -m diffquant.bench.scale [--model ldm_bedroom] [--device cpu] [--threads 2]
                                    [--unit-batch 32] [--rows 32] [--iters 6] [--out DIR]
                                    [--baseline REV]

On the full-size UNet of ``--model`` with random weights (``bench.forward_cost.full_size_unet``):

1. **forward**: :mod:`diffquant.bench.forward_cost` at W8A8 (FP vs fake quantization with the
   weights quantized per call / frozen, int8 kernels on x86 CPUs), batch 2.
2. **units**: at W4A8 (weights min-max, activation ranges from one observed forward),
   :class:`~diffquant.calib.reconstruct.Reconstructor` reconstructs two units of the paper's
   ``ptq`` recipe on ``--rows`` random calibration rows (a calibration set written in the
   project's on-disk format): a ResBlock (``up_blocks.0.resnets.0``, 1792→896 channels at 8×8)
   and an attention block (``up_blocks.0.attentions.0``), ``--iters`` AdaRound then ``--iters``
   LSQ iterations at ``--unit-batch`` rows each, the denoiser's parameters frozen as
   :func:`~diffquant.calib.reconstruct.reconstruct` freezes them. Per iteration: the median wall time between
   optimizer steps (the first of each stage left out), next to the same unit's FP forward +
   backward at that batch, the floors: with gradients to its weights (``fp_train_step_s``, what
   any training step of the unit costs) and to its inputs only (``fp_input_grad_step_s``, what an
   LSQ iteration must compute), and the forward's GFLOP; the capture time; the peak RSS above
   the start (CPU) or peak CUDA memory. With ``--baseline``, ``lsq_floor_ratio`` is the current
   floor against the baseline's LSQ iteration: the lowest LSQ ratio without fewer multiply-adds.
3. **projection**: the paper's calibration (48 units, 20k AdaRound + 5k LSQ iterations,
   5,120 rows): each unit's iteration cost is the measured one of its kind (attention from the
   attention unit, the rest from the ResBlock) scaled by the unit's share of the FP forward; its
   capture is the measured per-row capture scaled by the forward prefix it needs.

Writes ``DIR/scale_<model>_<device>.json`` and prints it. Wall times: compare them as ratios
within one run.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

from diffquant.bench import forward_cost
from diffquant.bench.memory import current_rss_mb, peak_rss_mb, reset_peak_rss
from diffquant.cache import atomic_torch_save, atomic_write_json

UNITS = {"resnet": "up_blocks.0.resnets.0", "attention": "up_blocks.0.attentions.0"}
PAPER = {"rows": 5120, "weight_iters": 20000, "act_iters": 5000}
#: what an FP step's gradients can go to (:func:`fp_train_step_s`, :func:`step_gflop`)
GRAD_TARGETS = ("weights", "layer_weights", "inputs")


def random_calibration_set(folder: Path, unet: torch.nn.Module, rows: int, seed: int = 0) -> Path:
    """``rows`` random rows (N(0, 1) latents, time steps spread over 1..999) as a calibration set
    :class:`~diffquant.calib.collect.CalibStream` reads: one shard and its index."""
    from diffquant.calib.collect import INDEX_FILE, STEP_KEY

    g = torch.Generator().manual_seed(seed)
    size, ch = unet.config.sample_size, unet.config.in_channels
    data = {
        "sample": torch.randn(rows, ch, size, size, generator=g),
        "timestep": torch.linspace(999, 1, rows).long(),
        STEP_KEY: torch.arange(rows),
    }
    folder.mkdir(parents=True, exist_ok=True)
    atomic_torch_save(data, folder / "shard_00000.pt")
    index = {
        "rows": rows,
        "shards": [{"file": "shard_00000.pt", "rows": rows}],
        "keys": list(data),
        "steps": list(range(rows)),
        "step_sampling": "stride",
        "guided": False,
        "layout": {"n_samples": rows, "batch_size": rows},
    }
    (folder / INDEX_FILE).write_text(json.dumps(index))
    return folder


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def unit_forward_shares(unet: torch.nn.Module, units: list[Any], x: torch.Tensor, t: torch.Tensor) -> dict:
    """Per unit: its FP forward seconds and the seconds of the forward up to its end (hooks on
    one FP forward of ``(x, t)``), as fractions of the whole forward."""
    device = x.device
    marks: dict[str, list[float]] = {}

    def pre(name):
        def hook(*_):
            sync(device)
            marks[name] = [time.perf_counter()]

        return hook

    def post(name):
        def hook(*_):
            sync(device)
            marks[name].append(time.perf_counter())

        return hook

    handles = [u.module.register_forward_pre_hook(pre(u.name)) for u in units]
    handles += [u.module.register_forward_hook(post(u.name)) for u in units]
    try:
        with torch.no_grad():
            sync(device)
            t0 = time.perf_counter()
            unet(x, t)
            sync(device)
            total = time.perf_counter() - t0
    finally:
        for h in handles:
            h.remove()
    return {
        u.name: {
            "share": (marks[u.name][1] - marks[u.name][0]) / total,
            "prefix": (marks[u.name][1] - t0) / total,
        }
        for u in units
    }


def measure_unit(rec: Any, index: int, unit: Any, iters: int, device: torch.device) -> dict[str, Any]:
    """Reconstruct ``unit`` with ``rec`` (``iters`` AdaRound + ``iters`` LSQ iterations): seconds
    per iteration of each stage (median between optimizer steps, the first step left out: it
    holds any compilation), the capture seconds the reconstruction reports, peak memory above
    the start."""
    steps: list[tuple[str, float]] = []
    # the weight stage's optimizer comes first, then the LSQ stage's (held, so that a freed one's
    # id cannot come back as the next one's)
    optimizers: list[Any] = []

    def on_step(opt, *_):
        sync(device)
        if not any(o is opt for o in optimizers):
            optimizers.append(opt)
        kind = ("adaround", "lsq")[min(next(i for i, o in enumerate(optimizers) if o is opt), 1)]
        steps.append((kind, time.perf_counter()))

    handle = register_optimizer_step_post_hook(on_step)
    base = current_rss_mb()
    reset_peak_rss()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    sync(device)
    try:
        report = rec._reconstruct_unit(index, unit)
    finally:
        handle.remove()
    out: dict[str, Any] = {"unit": unit.name, "kind": unit.kind}
    for kind in ("adaround", "lsq"):
        times = [t for k, t in steps if k == kind]
        gaps = [b - a for a, b in zip(times, times[1:])]
        out[f"{kind}_s_per_iter"] = round(statistics.median(gaps), 4) if gaps else None
    out["capture_s"] = round(report.capture_s, 3)
    out["peak_mb_above_start"] = round(
        torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else peak_rss_mb() - base, 1
    )
    return out


def fp_train_step_s(
    module: torch.nn.Module,
    batch: dict[str, torch.Tensor],
    spec: Any,
    device,
    repeats: int = 3,
    autocast: Optional[str] = None,
    grads_to: str = "weights",
) -> float:
    """Median seconds of the unit's FP forward + backward (MSE to zero) on one captured batch.
    ``grads_to="weights"``: gradients to its weights, the floor any training iteration of the
    unit pays. ``grads_to="inputs"``: gradients to its floating-point inputs only, weights
    frozen: the convolutions' forward and input gradient, the least an LSQ iteration (gradients
    to step sizes at the layers' inputs) must compute. ``grads_to="layer_weights"``: gradients
    to the convolutions' and linear layers' weights only (AdaRound's). With ``autocast`` (``bf16``) the forward
    runs under bfloat16 autocast, as the stages' does."""
    from diffquant.quant import quant_state
    from diffquant.quant.state import trainable

    precision = (
        torch.autocast(torch.device(device).type, dtype=torch.bfloat16)
        if autocast
        else contextlib.nullcontext()
    )
    batch, targets, params = _grad_targets(module, batch, grads_to)
    times = []
    with trainable(params), quant_state(module, weights=False, acts=False):
        for _ in range(repeats + 1):
            sync(device)
            t0 = time.perf_counter()
            with precision:
                out = spec.call(module, batch, "fp_")
            torch.autograd.grad(out.float().square().mean(), targets, allow_unused=True)
            sync(device)
            times.append(time.perf_counter() - t0)
    return statistics.median(times[1:])


def _grad_targets(
    module: torch.nn.Module, batch: dict[str, torch.Tensor], grads_to: str
) -> tuple[dict[str, torch.Tensor], list[torch.Tensor], list[torch.nn.Parameter]]:
    """``(batch, targets, params)`` of an FP step with gradients to ``grads_to``: ``inputs``
    (the batch's floating-point tensors, detached copies that require gradients; no parameter),
    ``weights`` (all the module's parameters) or ``layer_weights`` (the weights of its
    convolutions and linear layers only, what AdaRound's rounding variables need: no gradient
    for normalisations' affine parameters or biases). The caller makes ``params`` trainable
    (:func:`~diffquant.quant.state.trainable`)."""
    if grads_to not in GRAD_TARGETS:
        raise ValueError(f"grads_to={grads_to!r}: expected one of {GRAD_TARGETS}")
    if grads_to == "inputs":
        batch = {k: v.detach().requires_grad_(True) if v.is_floating_point() else v for k, v in batch.items()}
        return batch, [v for v in batch.values() if v.requires_grad], []
    if grads_to == "layer_weights":
        params = [m.weight for m in module.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    else:
        params = list(module.parameters())
    return batch, params, params


def step_gflop(
    module: torch.nn.Module, batch: dict[str, torch.Tensor], spec: Any, grads_to: str = "weights"
) -> dict[str, float]:
    """GFLOP autograd computes in :func:`fp_train_step_s`'s step (``torch.utils.flop_counter``;
    a multiply-add counts 2): ``forward`` and ``backward``, the latter with gradients to
    ``grads_to`` only, so a layer whose input needs no gradient (the unit's first convolution
    when only weights do) computes no input gradient."""
    from torch.utils.flop_counter import FlopCounterMode

    from diffquant.quant import quant_state
    from diffquant.quant.state import trainable

    batch, targets, params = _grad_targets(module, batch, grads_to)
    with trainable(params), quant_state(module, weights=False, acts=False):
        with FlopCounterMode(display=False) as forward:
            out = spec.call(module, batch, "fp_")
        loss = out.float().square().mean()
        with FlopCounterMode(display=False) as backward:
            torch.autograd.grad(loss, targets, allow_unused=True)
    return {"forward": forward.get_total_flops() / 1e9, "backward": backward.get_total_flops() / 1e9}


def forward_gflop(module: torch.nn.Module, batch: dict[str, torch.Tensor], spec: Any) -> float:
    """GFLOP of one FP forward of the unit on ``batch`` (multiply-adds counted as 2, convolutions,
    matrix products and attention; ``torch.utils.flop_counter``). Its input gradient costs the
    same again, its weight gradient the same again."""
    from torch.utils.flop_counter import FlopCounterMode

    from diffquant.quant import quant_state

    with torch.no_grad(), quant_state(module, weights=False, acts=False):
        with FlopCounterMode(display=False) as counter:
            spec.call(module, batch, "fp_")
    return counter.get_total_flops() / 1e9


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(
        prog="python -m diffquant.bench.scale", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--model", default="ldm_bedroom")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--unit-batch", type=int, default=32)
    parser.add_argument("--rows", type=int, default=32)
    parser.add_argument("--iters", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("outputs/bench"))
    parser.add_argument("--skip-forward", action="store_true", help="only the units and the projection")
    parser.add_argument("--autocast", choices=["bf16"], help="the stages' recon.autocast (default FP32)")
    parser.add_argument(
        "--attention-unit",
        default=UNITS["attention"],
        help="the attention unit measured (e.g. up_blocks.2.attentions.0, at 32x32 on Bedroom)",
    )
    parser.add_argument(
        "--recompute-above-gb",
        type=float,
        help="quant.attention.CHECKPOINT_PROBS_BYTES in GB: attention calls whose probabilities "
        "exceed it recompute each query block in the backward (default: the module's, 1)",
    )
    parser.add_argument(
        "--compile",
        action="store_true",
        help="recon.compile: AdaRound's per-weight work compiled (default eager)",
    )
    parser.add_argument(
        "--baseline",
        metavar="REV",
        help="also reconstruct the two units with the code of git revision REV (its src, with this "
        "bench's files) in a child process, alternating with the current code, and report the ratios",
    )
    args = parser.parse_args(list(argv) if argv is not None else None)
    if args.baseline:
        return compare_with_baseline(args)

    from diffquant.calib.ranges import observing_act_ranges
    from diffquant.calib.reconstruct import ReconSettings, Reconstructor
    from diffquant.models.denoiser import UNET
    from diffquant.quant import attention, quant_state

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    units = {**UNITS, "attention": args.attention_unit}
    if args.recompute_above_gb is not None:
        attention.CHECKPOINT_PROBS_BYTES = int(args.recompute_above_gb * 2**30)
    result: dict[str, Any] = {"model": args.model, "device": str(device), "threads": args.threads}
    if not args.skip_forward:
        result["forward"] = forward_cost.main(
            [
                "--model", args.model, "--bits", "8", "8", "--batch", "2", "--repeats", str(args.repeats),
                "--threads", str(args.threads), "--device", args.device, "--out", str(args.out),
            ]
        )  # fmt: skip

    # 2. units: the ptq recipe's two stages on a ResBlock and an attention block (W4A8)
    unet, fp_units, example, _ = w4a8_unet_and_units(args.model, device)
    x, t = example["sample"], example["timestep"]
    with quant_state(unet, weights=False, acts=False):
        shares = unit_forward_shares(unet, fp_units, x, t)
    with torch.no_grad(), observing_act_ranges(unet, method="minmax"):
        unet(x, t)
    switches = _switches(args)  # only those set: a --baseline revision may predate them
    settings = ReconSettings(
        weight_iters=args.iters,
        act_iters=args.iters,
        batch_size=args.unit_batch,
        capture_batch_size=min(8, args.rows),
        **switches,
    )
    with tempfile.TemporaryDirectory(prefix="diffquant_scale_") as tmp:
        from diffquant.calib.collect import CalibStream

        stream = CalibStream(random_calibration_set(Path(tmp) / "calib", unet, args.rows))
        rec = Reconstructor(unet, UNET, stream, settings)
        # as reconstruct() runs the units: every parameter frozen, each stage making trainable
        # only what it trains (AdaRound's alpha, LSQ's step sizes)
        unet.requires_grad_(False)
        by_name = {u.name: (i, u) for i, u in enumerate(fp_units)}
        measured = {}
        for kind, name in units.items():
            index, unit = by_name[name]
            measured[kind] = measure_unit(rec, index, unit, args.iters, device)
            store_batch = next(stream.batches(args.unit_batch, device=device))
            measured[kind].update(_unit_floor(unet, unit, store_batch, device, args.autocast))
            m = measured[kind]
            for stage in ("adaround", "lsq"):
                if m[f"{stage}_s_per_iter"] is not None:
                    m[f"{stage}_vs_fp_train_step"] = round(m[f"{stage}_s_per_iter"] / m["fp_train_step_s"], 3)
            if m["lsq_s_per_iter"] is not None:
                m["lsq_vs_fp_input_grad_step"] = round(m["lsq_s_per_iter"] / m["fp_input_grad_step_s"], 3)
            # forward + input gradient: twice the forward's multiply-adds
            m["fp_input_grad_step_gflop_per_s"] = round(2 * m["forward_gflop"] / m["fp_input_grad_step_s"], 1)
    result["units"] = measured
    result["unit_settings"] = {
        "rows": args.rows,
        "batch": args.unit_batch,
        "iters_per_stage": args.iters,
        "quant": "w4a8",
        "autocast": args.autocast,
        "compile": args.compile,
        # a --baseline revision may predate the recomputation
        "recompute_probs_above_bytes": getattr(attention, "CHECKPOINT_PROBS_BYTES", None),
    }

    # 3. projection to the paper's calibration
    base = {k: shares[units[k]] for k in units}
    hours = {"adaround": 0.0, "lsq": 0.0, "capture": 0.0}
    capture_per_row = measured["resnet"]["capture_s"] / args.rows
    for unit in fp_units:
        kind = "attention" if unit.kind == "attention" else "resnet"
        scale = shares[unit.name]["share"] / base[kind]["share"]
        hours["adaround"] += measured[kind]["adaround_s_per_iter"] * scale * PAPER["weight_iters"] / 3600
        lsq = measured[kind]["lsq_s_per_iter"] or measured["resnet"]["lsq_s_per_iter"]
        hours["lsq"] += lsq * scale * PAPER["act_iters"] / 3600
        prefix = shares[unit.name]["prefix"] / base["resnet"]["prefix"]
        hours["capture"] += capture_per_row * prefix * PAPER["rows"] / 3600
    result["projection_hours"] = {k: round(v, 1) for k, v in hours.items()}
    result["projection_hours"]["total"] = round(sum(hours.values()), 1)
    result["projection_setting"] = {**PAPER, "units": len(fp_units), "batch": args.unit_batch}
    atomic_write_json(args.out / _result_name(args, "scale"), result)
    print(json.dumps(result, indent=2), flush=True)
    return result


def _switches(args: argparse.Namespace) -> dict[str, Any]:
    """The ReconSettings speed switches the command line sets (none at their defaults)."""
    return {
        **({"autocast": args.autocast} if args.autocast else {}),
        **({"compile": True} if args.compile else {}),
    }


def _result_name(args: argparse.Namespace, prefix: str) -> str:
    """``<prefix>_<model>_<device>[_<switch>...].json``."""
    tags = "".join(f"_{v}" if isinstance(v, str) else f"_{k}" for k, v in _switches(args).items())
    return f"{prefix}_{args.model}_{torch.device(args.device).type}{tags}.json"


def _child(src: Path, args: argparse.Namespace, out: Path, switches: bool) -> dict[str, Any]:
    """The units and projection (no forward) in a child process importing ``src``, with the
    speed switches of ``args`` when ``switches``."""
    env = {**os.environ, "PYTHONPATH": str(src)}
    cmd = [
        sys.executable, "-m", "diffquant.bench.scale", "--skip-forward", "--model", args.model,
        "--device", args.device, "--threads", str(args.threads), "--unit-batch", str(args.unit_batch),
        "--rows", str(args.rows), "--iters", str(args.iters), "--out", str(out),
    ]  # fmt: skip
    child_args = argparse.Namespace(**{**vars(args), "autocast": None, "compile": False})
    if switches:
        cmd += [
            *(["--autocast", args.autocast] if args.autocast else []),
            *(["--compile"] if args.compile else []),
        ]
        child_args = args
    subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL)
    return json.loads((out / _result_name(child_args, "scale")).read_text())


def compare_with_baseline(args: argparse.Namespace) -> dict[str, Any]:
    """Per-iteration reconstruction cost of the current code (with the speed switches of
    ``args``) against revision ``args.baseline`` (as it was: no switch): child processes
    alternate (baseline, current, baseline, current); medians and ratios."""
    root = Path(__file__).resolve().parents[3]
    here = Path(__file__).resolve().parent
    runs: dict[str, list[dict[str, Any]]] = {"baseline": [], "current": []}
    with tempfile.TemporaryDirectory(prefix="diffquant_baseline_") as tmp:
        tree = Path(tmp) / "tree"
        tree.mkdir()
        archive = subprocess.run(
            ["git", "-C", str(root), "archive", args.baseline, "src"], check=True, capture_output=True
        ).stdout
        subprocess.run(["tar", "-x", "-C", str(tree)], input=archive, check=True)
        for name in ("scale.py", "memory.py", "forward_cost.py"):  # this bench, on the old code
            shutil.copy(here / name, tree / "src" / "diffquant" / "bench" / name)
        for _ in range(args.repeats):
            runs["baseline"].append(_child(tree / "src", args, Path(tmp) / "baseline", switches=False))
            runs["current"].append(_child(root / "src", args, Path(tmp) / "current", switches=True))
    result: dict[str, Any] = {"baseline": args.baseline, "repeats": args.repeats, "units": {}}
    for kind in UNITS:
        row: dict[str, Any] = {}
        for stage in ("adaround", "lsq"):
            key = f"{stage}_s_per_iter"
            old_s = [r["units"][kind][key] for r in runs["baseline"] if r["units"][kind][key] is not None]
            new_s = [r["units"][kind][key] for r in runs["current"] if r["units"][kind][key] is not None]
            if old_s and new_s:
                ratio = statistics.median(new_s) / statistics.median(old_s)
                row.update(
                    {
                        f"{stage}_baseline_s": old_s,
                        f"{stage}_current_s": new_s,
                        f"{stage}_ratio": round(ratio, 3),
                    }
                )
        for key in ("fp_train_step_s", "fp_input_grad_step_s"):
            row[key] = {side: [r["units"][kind][key] for r in runs[side]] for side in runs}
        old_lsq = [r["units"][kind]["lsq_s_per_iter"] for r in runs["baseline"]]
        if None not in old_lsq:
            # the lowest LSQ ratio this precision allows without fewer multiply-adds: the current
            # FP forward + input gradient against the baseline's LSQ iteration
            row["lsq_floor_ratio"] = round(
                statistics.median(row["fp_input_grad_step_s"]["current"]) / statistics.median(old_lsq), 3
            )
        result["units"][kind] = row
    result["settings"] = runs["current"][0]["unit_settings"]
    result["runs"] = runs
    atomic_write_json(args.out / _result_name(args, "scale_vs_baseline"), result)
    print(json.dumps(result, indent=2), flush=True)
    return result


def w4a8_unet_and_units(
    model: str, device: torch.device
) -> tuple[torch.nn.Module, list[Any], dict[str, torch.Tensor], torch.Generator]:
    """The benches' model: the full-size UNet of ``model`` (random weights,
    :func:`~diffquant.bench.forward_cost.full_size_unet`) on ``device`` with W4A8 wrappers
    (weights min-max, quantizers not yet calibrated); its reconstruction units, found on
    ``example`` (2 random latents at time steps 999 and 1); and the generator (seed 1) that drew
    them, for further draws."""
    from diffquant.calib.reconstruct import find_units
    from diffquant.models.denoiser import UNET
    from diffquant.quant import QuantConfig, quantize_denoiser

    unet = forward_cost.full_size_unet(model).to(device)
    g = torch.Generator().manual_seed(1)
    size = unet.config.sample_size
    x = torch.randn(2, unet.config.in_channels, size, size, generator=g).to(device)
    example = {"sample": x, "timestep": torch.tensor([999, 1]).to(device)}
    quantize_denoiser(unet, UNET, QuantConfig(name="w4a8", weight_bits=4, act_bits=8, weight_init="minmax"))
    return unet, find_units(unet, UNET, example), example, g


def unit_call(
    unet: torch.nn.Module, unit: Any, batch: dict[str, torch.Tensor], device
) -> tuple[Any, dict[str, torch.Tensor]]:
    """``(spec, rows)``: the unit's call in the FP denoiser run on ``batch`` (``sample``,
    ``timestep``), as a :class:`~diffquant.calib.reconstruct.CallSpec` and its ``fp_`` rows on
    ``device`` (contiguous)."""
    from diffquant.calib.reconstruct import CallSpec, StopForward
    from diffquant.quant import quant_state

    grabbed: dict[str, Any] = {}

    def pre_hook(mod, args, kwargs):
        grabbed["args"], grabbed["kwargs"] = args, kwargs
        raise StopForward

    handle = unit.module.register_forward_pre_hook(pre_hook, with_kwargs=True)
    try:
        with torch.no_grad(), quant_state(unet, weights=False, acts=False):
            unet(batch["sample"], batch["timestep"])
    except StopForward:
        pass
    finally:
        handle.remove()
    n = batch["sample"].shape[0]
    spec = CallSpec(grabbed["args"], grabbed["kwargs"], n)
    rows = spec.rows(grabbed["args"], grabbed["kwargs"], "fp_")
    # contiguous: the captured input can be channels-last, and GroupNorm's backward on a
    # channels-last input crashes the process on PyTorch 2.13's CPU kernels
    return spec, {k: v.to(device).contiguous() for k, v in rows.items()}


def _unit_floor(
    unet: torch.nn.Module, unit: Any, batch: dict[str, torch.Tensor], device, autocast: Optional[str] = None
) -> dict[str, float]:
    """The unit's FP forward + backward at the unit batch, on the inputs it gets in the denoiser
    (under ``autocast`` as the stages run): seconds with gradients to the weights
    (``fp_train_step_s``) and to the inputs only (``fp_input_grad_step_s``, the LSQ stage's
    floor), and the forward's GFLOP (``forward_gflop``)."""
    spec, batch = unit_call(unet, unit, batch, device)
    return {
        "fp_train_step_s": round(fp_train_step_s(unit.module, batch, spec, device, autocast=autocast), 4),
        "fp_input_grad_step_s": round(
            fp_train_step_s(unit.module, batch, spec, device, autocast=autocast, grads_to="inputs"), 4
        ),
        "forward_gflop": round(forward_gflop(unit.module, batch, spec), 2),
    }


if __name__ == "__main__":
    main()
