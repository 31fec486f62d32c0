"""One denoiser forward at paper size: FP vs fake-quantized, weights re-quantized per call vs frozen.

    python -m diffquant.bench.forward_cost [--model ldm_bedroom] [--bits 8 8] [--batch 2]
                                           [--repeats 3] [--threads 1] [--device cpu] [--out DIR]
                                           [--flush-denormal]

Builds the full-size UNet of ``--model`` (the CompVis configuration in
:mod:`diffquant.models.compvis_configs`, converted to diffusers; random weights, seed 0: the cost
does not depend on them), quantizes it at ``--bits W A`` (weights per channel, min-max ranges;
activation ranges from one observed forward), then times, ``--repeats`` rounds in one process
(two loops, each against its own FP forward: the unfrozen variants, then the frozen ones inside
one ``frozen_weights`` context, as a sampling run holds it; each round runs every variant of its
loop once, in an order rotated by one per round, after one untimed warm-up round): the FP forward, the fake-quantized forward with every weight re-quantized at the call,
and the same inside :func:`~diffquant.quant.state.frozen_weights` (weights quantized once, the
output checked equal), and, to attribute the cost, the frozen weights alone (activation
quantizers off) and the activation quantizers alone (weights FP; with them on, attention runs as
explicit matmuls in blocks of queries instead of the fused SDPA kernel), and the int8 kernels
(:mod:`diffquant.quant.int8`, x86 CPU) with their largest per-layer difference from fake
quantization. Reports median seconds, the ratios to FP and the peak RSS, and writes
``DIR/forward_cost_<model>_w<W>a<A>.json``. Fake quantization simulates low-bit arithmetic in
FP32: the ratios are the simulation's overhead.
"""

from __future__ import annotations

import argparse
import contextlib
import resource
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Optional

import torch

from diffquant.cache import atomic_write_json


def full_size_unet(model: str) -> torch.nn.Module:
    """The ``UNet2DModel`` of a self-attention CompVis LDM (``ldm_bedroom``, ``ldm_celebahq``,
    ``ldm_church``) at its real size, randomly initialised (seed 0)."""
    from diffusers import UNet2DModel

    from diffquant.models.compvis_configs import IMAGE_SIZES, original_config
    from diffquant.models.compvis_unet import unet2d_config

    config = original_config(model)
    params = config["model"]["params"]["unet_config"]["params"]
    if params.get("use_spatial_transformer"):
        raise ValueError(
            f"--model {model}: a cross-attention UNet; use ldm_bedroom, ldm_celebahq or ldm_church"
        )
    factor = 2 ** (len(config["model"]["params"]["first_stage_config"]["params"]["ddconfig"]["ch_mult"]) - 1)
    torch.manual_seed(0)
    return UNet2DModel(**unet2d_config(params, IMAGE_SIZES[model] // factor)).eval().requires_grad_(False)


def seconds(fn: Callable[[], Any], device: torch.device | str = "cpu") -> float:
    """Wall-clock seconds of one call of ``fn`` (on a GPU, until its kernels finish)."""
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - t0


def int8_layer_error(denoiser: torch.nn.Module, run: Callable[[], Any]) -> float:
    """The largest relative difference ``max|y_int8 − y_fake| / max|y_fake|`` over the int8 layers of
    ``denoiser`` (inside :func:`~diffquant.quant.int8.int8_kernels`), each on the input it gets
    in one call of ``run``: what the kernels change in one layer, before later layers compound it."""
    from diffquant.quant.modules import QUANT_LAYER_TYPES

    worst = [0.0]

    def hook(layer, args, out):
        kernel = layer.int8_kernel
        layer.int8_kernel = None
        fake = layer.forward(args[0])  # not layer(...): that would run this hook again
        layer.int8_kernel = kernel
        worst[0] = max(worst[0], ((out - fake).abs().max() / fake.abs().max().clamp_min(1e-12)).item())

    layers = [m for m in denoiser.modules() if isinstance(m, QUANT_LAYER_TYPES) and m.int8_kernel is not None]
    handles = [m.register_forward_hook(hook) for m in layers]
    try:
        run()
    finally:
        for h in handles:
            h.remove()
    return worst[0]


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(
        prog="python -m diffquant.bench.forward_cost", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--model", default="ldm_bedroom")
    parser.add_argument("--bits", type=int, nargs=2, default=(8, 8), metavar=("W", "A"))
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu", help="cpu or cuda (int8 kernels: CPU only)")
    parser.add_argument("--out", type=Path, default=Path("outputs/bench"))
    parser.add_argument(
        "--flush-denormal", action="store_true", help="torch.set_flush_denormal(True) for the whole run"
    )
    args = parser.parse_args(list(argv) if argv is not None else None)

    from diffquant.calib.ranges import observing_act_ranges
    from diffquant.models.denoiser import UNET
    from diffquant.quant import QuantConfig, frozen_weights, quant_state, quantize_denoiser
    from diffquant.quant.int8 import int8_kernels, int8_platform_error

    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(args.flush_denormal)
    device = torch.device(args.device)
    fp = full_size_unet(args.model).to(device)
    quant = full_size_unet(args.model).to(device)
    n_params = sum(p.numel() for p in fp.parameters())
    w_bits, a_bits = args.bits
    cfg = QuantConfig(name=f"w{w_bits}a{a_bits}", weight_bits=w_bits, act_bits=a_bits, weight_init="minmax")
    quantize_denoiser(quant, UNET, cfg)
    g = torch.Generator().manual_seed(0)
    size = fp.config.sample_size
    x = torch.randn(args.batch, fp.config.in_channels, size, size, generator=g).to(device)
    t = torch.linspace(999, 1, args.batch).long().to(device)
    with torch.no_grad():
        with observing_act_ranges(quant, method="minmax"):
            quant(x, t)
        run_fp = lambda: fp(x, t).sample  # noqa: E731
        run_q = lambda: quant(x, t).sample  # noqa: E731
        per_call = run_q()
        with frozen_weights(quant):
            frozen = run_q()
        if not torch.equal(per_call, frozen):
            raise AssertionError("frozen weights changed the output")
        int8 = int8_platform_error(x.device) is None
        int8_err, layer_err, converted = None, None, 0
        if int8:
            with frozen_weights(quant), int8_kernels(quant) as summary:
                int8_out = run_q()
                layer_err = int8_layer_error(quant, run_q)
            converted = len(summary.converted)
            int8_err = ((int8_out - frozen).norm() / frozen.norm()).item()
        # two loops of rounds, each against its own FP forward: the variants that quantize weights
        # per call or not at all, then (inside one frozen_weights context, as a sampling run
        # holds it) the frozen ones; each round runs every variant of its loop once, in an order
        # rotated by one per round, after one untimed warm-up round
        loops: list[tuple[Callable[[], Any], dict[str, tuple[Callable[[], list], Callable[[], Any]]]]] = [
            (
                contextlib.nullcontext,
                {
                    "fp": (list, run_fp),
                    "per_call": (list, run_q),
                    "acts_only": (lambda: [quant_state(quant, weights=False)], run_q),
                },
            ),
            (
                lambda: frozen_weights(quant),
                {
                    "fp_frozen_loop": (list, run_fp),
                    "frozen": (list, run_q),
                    "weights_only": (lambda: [quant_state(quant, acts=False)], run_q),
                    **({"int8": (lambda: [int8_kernels(quant)], run_q)} if int8 else {}),
                },
            ),
        ]
        times: dict[str, list[float]] = {}
        for outer, variants in loops:
            names = list(variants)
            times.update({name: [] for name in names})
            with outer():
                for r in range(args.repeats + 1):
                    for name in names[r % len(names) :] + names[: r % len(names)]:
                        contexts, call = variants[name]
                        with contextlib.ExitStack() as stack:
                            for c in contexts():
                                stack.enter_context(c)
                            took = seconds(call, device)
                        if r > 0:
                            times[name].append(took)
    fp_s, q_s, a_only_s = times["fp"], times["per_call"], times["acts_only"]
    fp2_s, frozen_s, w_only_s = times["fp_frozen_loop"], times["frozen"], times["weights_only"]
    int8_s = times.get("int8", [])
    fp_m, q_m, a_m = (statistics.median(v) for v in (fp_s, q_s, a_only_s))
    fp2_m, f_m, w_m = (statistics.median(v) for v in (fp2_s, frozen_s, w_only_s))
    i_m = statistics.median(int8_s) if int8_s else None
    result = {
        "model": args.model,
        "parameters_m": round(n_params / 1e6, 1),
        "quant": cfg.name,
        "batch": args.batch,
        "latent": [fp.config.in_channels, size, size],
        "threads": torch.get_num_threads(),
        "flush_denormal": args.flush_denormal,
        "repeats": args.repeats,
        "fp_s": round(fp_m, 3),
        "per_call_weights_s": round(q_m, 3),
        "frozen_weights_s": round(f_m, 3),
        "per_call_ratio": round(q_m / fp_m, 3),
        "fp_in_frozen_loop_s": round(fp2_m, 3),
        "frozen_ratio": round(f_m / fp2_m, 3),
        "frozen_vs_first_loop_fp_ratio": round(f_m / fp_m, 3),
        "frozen_weights_only_ratio": round(w_m / fp2_m, 3),
        "activations_only_ratio": round(a_m / fp_m, 3),
        "int8_s": None if i_m is None else round(i_m, 3),
        "int8_ratio": None if i_m is None else round(i_m / fp2_m, 3),
        "int8_vs_first_loop_fp_ratio": None if i_m is None else round(i_m / fp_m, 3),
        "int8_layers": converted,
        "int8_output_rel_error": int8_err,
        "int8_layer_max_rel_error": layer_err,
        "device": str(device),
        "seconds": {k: [round(v, 3) for v in vs] for k, vs in times.items()},
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }
    suffix = "_flush_denormal" if args.flush_denormal else ""
    atomic_write_json(args.out / f"forward_cost_{args.model}_{cfg.name}{suffix}.json", result)
    print(result, flush=True)
    return result


if __name__ == "__main__":
    main()
