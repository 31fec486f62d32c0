"""The lowest reconstruction iteration this machine allows: the FLOPs a unit's iteration must
compute, at the best rate this machine was measured to compute them.

    python -m diffquant.bench.roofline [--model ldm_bedroom] [--device cpu] [--threads 2]
                                       [--unit-batch 32] [--against SCALE_VS_BASELINE.json ...|DIR]
                                       [--out DIR]

On the full-size UNet of ``--model`` with random weights, the units of
:data:`diffquant.bench.scale.UNITS` at ``--unit-batch`` rows (their inputs in the denoiser for
random latents):

1. **peaks** (:func:`peak_gflop_per_s`): per precision (FP32, bf16, int8 with int32
   accumulation), the fastest of ``--repeats`` runs of a square matrix product
   (``--matmul-size``) and of the ResBlock's largest convolution (int8: a product of its im2col
   shape); the larger is the precision's peak.
2. **work** (:func:`~diffquant.bench.scale.step_gflop`, ``torch.utils.flop_counter`` as autograd
   runs the unit's FP step): the LSQ stage's (gradients to the inputs: every layer's input
   gradient, no weight gradient) and the AdaRound stage's (gradients to the convolutions' and
   linear layers' weights: their weight gradients and the input gradients that reach them).
3. **bounds** (:func:`iteration_bounds`): seconds per iteration if every FLOP ran at the peak of
   the stage's precision (``s_at_fp32_peak``, ``s_at_bf16_peak``), and for LSQ, whose forward
   multiplies quantized weights by quantized activations, ``s_at_int8_forward_peak``: the
   forward at the int8 peak, the backward (gradients are not quantized) at the bf16 peak. No
   quantizer, normalisation or activation cost is counted. With ``--against`` (a
   ``scale_vs_baseline_*.json`` files of :mod:`diffquant.bench.scale`, their seconds pooled, or
   the folder holding the bf16 + compiled one): each bound over the median baseline iteration,
   next to the measured ratio of the medians (:func:`ratio_bounds`).

Writes ``DIR/roofline_<model>_<device>.json`` and prints it. Peaks vary with the machine's
load: compare bounds with a ``--against`` file measured on the same machine, and rerun.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from diffquant.cache import atomic_write_json

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "int8": torch.int8}


@dataclass(frozen=True)
class ConvShape:
    """A convolution as run: ``weight_shape`` (C_out, C_in, kh, kw), ``input_shape`` (rows, C_in,
    H, W), ``stride`` and ``padding`` (pairs), ``output_hw`` (H_out, W_out). Its forward as a
    matrix product of ``gemm_m`` × ``gemm_k`` by ``gemm_k`` × ``gemm_n`` (groups of 1)."""

    weight_shape: tuple[int, ...]
    input_shape: tuple[int, ...]
    stride: tuple[int, ...]
    padding: tuple[int, ...]
    output_hw: tuple[int, ...]

    @property
    def gemm_m(self) -> int:
        return self.input_shape[0] * self.output_hw[0] * self.output_hw[1]

    @property
    def gemm_k(self) -> int:
        return self.weight_shape[1] * self.weight_shape[2] * self.weight_shape[3]

    @property
    def gemm_n(self) -> int:
        return self.weight_shape[0]

    @property
    def gflop(self) -> float:
        return 2 * self.gemm_m * self.gemm_k * self.gemm_n / 1e9


def _best_seconds(fn: Callable[[], Any], device: torch.device, repeats: int) -> float:
    """Fastest of ``repeats`` timed calls of ``fn``, after one warm-up call."""
    from diffquant.bench.scale import sync

    fn()
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return min(times)


def peak_gflop_per_s(
    precision: str,
    device: torch.device,
    conv: Optional[ConvShape] = None,
    n: int = 4096,
    repeats: int = 5,
) -> dict[str, float]:
    """GFLOP/s (a multiply-add counts 2; int8: GOP/s) of the fastest of ``repeats`` runs of each
    candidate kernel in ``precision`` (``fp32``, ``bf16``, ``int8``: ``torch._int_mm``, int32
    accumulation): ``matmul``, an ``n``×``n`` by ``n``×``n`` product, and with ``conv``,
    ``conv``: that convolution (float precisions), or int8's product of its im2col shape
    (``rows·H_out·W_out`` × ``C_in·k²`` by ``C_in·k²`` × ``C_out``; the im2col not counted).
    ``peak`` is the largest: the best this machine was measured to do in that precision."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r}: expected one of {sorted(PRECISIONS)}")
    g = torch.Generator().manual_seed(0)

    def operands(*shapes: tuple[int, ...]) -> list[torch.Tensor]:
        if precision == "int8":
            return [torch.randint(-128, 128, s, generator=g, dtype=torch.int8).to(device) for s in shapes]
        return [torch.randn(*s, generator=g).to(device, PRECISIONS[precision]) for s in shapes]

    product = torch._int_mm if precision == "int8" else torch.matmul
    a, b = operands((n, n), (n, n))
    out = {"matmul": 2 * n**3 / _best_seconds(lambda: product(a, b), device, repeats) / 1e9}
    del a, b
    if conv is not None:
        if precision == "int8":
            a, b = operands((conv.gemm_m, conv.gemm_k), (conv.gemm_k, conv.gemm_n))
            seconds = _best_seconds(lambda: torch._int_mm(a, b), device, repeats)
        else:
            x, w = operands(conv.input_shape, conv.weight_shape)
            seconds = _best_seconds(
                lambda: torch.nn.functional.conv2d(x, w, stride=conv.stride, padding=conv.padding),
                device,
                repeats,
            )
        out["conv"] = conv.gflop / seconds
    out["peak"] = max(out.values())
    return out


def largest_convolution(module: torch.nn.Module, call: Callable[[], Any]) -> Optional[ConvShape]:
    """The :class:`ConvShape` with the most FLOPs among ``module``'s ``nn.Conv2d`` (groups of 1)
    as ``call()`` runs them; None without one."""
    seen: list[ConvShape] = []

    def hook(mod: torch.nn.Conv2d, args: tuple, out: torch.Tensor) -> None:
        if mod.groups == 1:
            seen.append(
                ConvShape(
                    tuple(mod.weight.shape), tuple(args[0].shape), tuple(mod.stride), tuple(mod.padding),
                    tuple(out.shape[-2:]),
                )
            )  # fmt: skip

    handles = [m.register_forward_hook(hook) for m in module.modules() if isinstance(m, torch.nn.Conv2d)]
    try:
        with torch.no_grad():
            call()
    finally:
        for h in handles:
            h.remove()
    return max(seen, key=lambda c: c.gflop, default=None)


def iteration_bounds(
    work: dict[str, dict[str, float]], peaks: dict[str, float]
) -> dict[str, dict[str, float]]:
    """Seconds per iteration with every FLOP at the peak: ``work`` is ``{stage: {"forward": GFLOP,
    "backward": GFLOP}}`` (stages ``lsq``, ``adaround``), ``peaks`` GFLOP/s per precision. LSQ
    also gets ``s_at_int8_forward_peak`` (forward at the int8 peak, backward at bf16's)."""
    out: dict[str, dict[str, float]] = {}
    for stage, w in work.items():
        total = w["forward"] + w["backward"]
        out[stage] = {f"s_at_{p}_peak": total / peaks[p] for p in ("fp32", "bf16")}
        if stage == "lsq":
            out[stage]["s_at_int8_forward_peak"] = (
                w["forward"] / peaks["int8"] + w["backward"] / peaks["bf16"]
            )
    return out


def pooled_comparison(results: Sequence[dict[str, Any]]) -> dict[str, dict[str, list[float]]]:
    """The ``scale_vs_baseline`` results' per-iteration seconds pooled: ``{unit kind:
    {"<stage>_baseline_s": [...], "<stage>_current_s": [...]}}`` over all files, in order."""
    pooled: dict[str, dict[str, list[float]]] = {}
    for result in results:
        for kind, row in result.get("units", {}).items():
            into = pooled.setdefault(kind, {})
            for key, values in row.items():
                if key.endswith(("_baseline_s", "_current_s")) and isinstance(values, list):
                    into.setdefault(key, []).extend(values)
    return pooled


def ratio_bounds(bounds: dict[str, dict[str, float]], compared: dict[str, list[float]]) -> dict[str, float]:
    """Each bound of :func:`iteration_bounds` over the median baseline iteration of a unit's
    pooled seconds (:func:`pooled_comparison`), and ``<stage>_ratio_measured``: the median
    current iteration over the same median."""
    out: dict[str, float] = {}
    for stage, by_bound in bounds.items():
        baseline = compared.get(f"{stage}_baseline_s")
        if not baseline:
            continue
        median = statistics.median(baseline)
        for name, seconds in by_bound.items():
            out[f"{stage}_ratio_{name.removeprefix('s_')}"] = round(seconds / median, 3)
        current = compared.get(f"{stage}_current_s")
        if current:
            out[f"{stage}_ratio_measured"] = round(statistics.median(current) / median, 3)
    return out


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(
        prog="python -m diffquant.bench.roofline", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--model", default="ldm_bedroom")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--unit-batch", type=int, default=32)
    parser.add_argument("--matmul-size", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--against",
        type=Path,
        nargs="+",
        help="scale_vs_baseline_*.json files of diffquant.bench.scale (same machine; their "
        "seconds are pooled), or a folder: its scale_vs_baseline_<model>_<device>_bf16_compile.json",
    )
    parser.add_argument("--out", type=Path, default=Path("outputs/bench"))
    args = parser.parse_args(list(argv) if argv is not None else None)
    device = torch.device(args.device)
    files = [
        f / f"scale_vs_baseline_{args.model}_{device.type}_bf16_compile.json" if f.is_dir() else f
        for f in args.against or []
    ]
    for f in files:
        if not f.is_file():
            parser.error(
                f"--against {f}: no such file; run `make bench-scale` (its bf16 + compiled "
                "baseline comparison writes it) or name a scale_vs_baseline_*.json"
            )
    results = [json.loads(f.read_text()) for f in files]
    compared = pooled_comparison(results) if results else None

    from diffquant.bench.scale import UNITS, step_gflop, unit_call, w4a8_unet_and_units
    from diffquant.quant import quant_state

    torch.set_num_threads(args.threads)
    result: dict[str, Any] = {"model": args.model, "device": str(device), "threads": args.threads}
    # 1. the units' calls: the scale bench's units (W4A8 wrappers, quantizers off), on random latents
    unet, units_found, _, g = w4a8_unet_and_units(args.model, device)
    by_name = {u.name: u for u in units_found}
    size = unet.config.sample_size
    batch = {
        "sample": torch.randn(args.unit_batch, unet.config.in_channels, size, size, generator=g).to(device),
        "timestep": torch.randint(0, 1000, (args.unit_batch,), generator=g).to(device),
    }
    calls = {
        kind: (by_name[name], *unit_call(unet, by_name[name], batch, device)) for kind, name in UNITS.items()
    }

    # 2. peaks: square products and the ResBlock's largest convolution
    unit, spec, rows = calls["resnet"]
    with quant_state(unit.module, weights=False, acts=False):
        conv = largest_convolution(unit.module, lambda: spec.call(unit.module, rows, "fp_"))
    measured = {p: peak_gflop_per_s(p, device, conv, args.matmul_size, args.repeats) for p in PRECISIONS}
    peaks = {p: m["peak"] for p, m in measured.items()}
    result["peak_gflop_per_s"] = {p: {k: round(v, 1) for k, v in m.items()} for p, m in measured.items()}
    result["peak_kernels"] = {"matmul_size": args.matmul_size, "conv": None if conv is None else asdict(conv)}

    # 3. work and bounds
    units: dict[str, Any] = {}
    for kind, (unit, spec, rows) in calls.items():
        work = {
            "lsq": step_gflop(unit.module, rows, spec, grads_to="inputs"),
            "adaround": step_gflop(unit.module, rows, spec, grads_to="layer_weights"),
        }
        bounds = iteration_bounds(work, peaks)
        row: dict[str, Any] = {"unit": unit.name, "batch": args.unit_batch}
        for stage in work:
            row[stage] = {
                **{f"{k}_gflop": round(v, 2) for k, v in work[stage].items()},
                **{k: round(v, 4) for k, v in bounds[stage].items()},
            }
        if compared is not None and kind in compared:
            row["vs_baseline"] = ratio_bounds(bounds, compared[kind])
        units[kind] = row
    result["units"] = units
    if results:
        result["against"] = {
            "files": [str(f) for f in files],
            "baselines": sorted({r.get("baseline") for r in results}),
        }
    name = f"roofline_{args.model}_{device.type}.json"
    atomic_write_json(args.out / name, result)
    print(json.dumps(result, indent=2), flush=True)
    return result


if __name__ == "__main__":
    main()
