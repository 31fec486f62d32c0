"""Peak memory of the activation-range initialisation at paper size: ``method=ptq_paper``'s one
observing forward of all its initial rows at once.

    python -m diffquant.bench.act_init_memory [--model ldm_bedroom] [--rows 64] [--method lp]
                                              [--quest] [--whole-attention] [--threads 2] [--out DIR]

Builds the full-size UNet of ``--model`` with random weights
(:func:`~diffquant.bench.forward_cost.full_size_unet`), quantizes it at W4A8 (Q-Diffusion's
activations per tensor, weights per channel with min-max ranges), and runs one forward of
``--rows`` random rows at the noisiest time step with every activation quantizer observing by
``--method`` and quantizing at once (``ptq_paper``'s initialisation on the weight-quantized
network: ``act_init_stage=after_weights``, ``act_init_batch_size=64``). ``--quest``: QuEST's
initialisation instead (:func:`~diffquant.methods.quest_init.watching_group_ranges`, the QuEST
code's: on the quantized network, each quantizer's range from its first call, min-max as its
Bedroom and ImageNet scripts or ``--method percentile``), one step's ``--rows`` (64 there). The attention
probabilities are observed in query blocks (:class:`~diffquant.quant.attention.QuantAttnProcessor`);
``--whole-attention`` forms every attention's probabilities for all queries at once instead, as
the observation (and QuEST's) did before. Reports the peak RSS above the model's (the kernel's high-water mark,
reset before the forward), the seconds, and the largest attention's probabilities per row, and
writes ``DIR/act_init_memory_<model>_<rows>rows[_quest_<method>][_whole].json``.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

import torch

from diffquant.cache import atomic_write_json


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="ldm_bedroom")
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument(
        "--method", choices=["lp", "minmax", "percentile"], help="default: lp; minmax with --quest"
    )
    parser.add_argument("--quest", action="store_true", help="QuEST's range initialisation")
    parser.add_argument("--whole-attention", action="store_true", help="all queries at once (the old way)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("outputs/bench"))
    args = parser.parse_args(list(argv) if argv is not None else None)
    args.method = args.method or ("minmax" if args.quest else "lp")
    if args.method == "percentile" and not args.quest:
        parser.error("--method percentile is QuEST's search: add --quest")

    import diffquant.quant.attention as attention
    from diffquant.bench.forward_cost import full_size_unet
    from diffquant.bench.memory import current_rss_mb, peak_rss_mb, reset_peak_rss
    from diffquant.calib.ranges import observing_act_ranges
    from diffquant.methods.quest_init import StepInit, watching_group_ranges
    from diffquant.models.denoiser import UNET
    from diffquant.quant import QuantConfig, quant_state, quantize_denoiser

    torch.set_num_threads(args.threads)
    if args.whole_attention:
        attention.ATTENTION_BLOCK_ELEMENTS = 1 << 62
    unet = full_size_unet(args.model)
    cfg = QuantConfig(name="w4a8", weight_bits=4, act_bits=8, weight_init="minmax", act_per_channel=False)
    quantize_denoiser(unet, UNET, cfg)
    size = unet.config.sample_size
    x = torch.randn(
        args.rows, unet.config.in_channels, size, size, generator=torch.Generator().manual_seed(0)
    )
    t = torch.full((args.rows,), 999)
    probs_mb: list[float] = []

    def record(proc, args_, kwargs):  # the scores one row of an attention call forms, in MB
        hidden = args_[1] if len(args_) > 1 else kwargs["hidden_states"]
        tokens = hidden.shape[-1] * hidden.shape[-2] if hidden.dim() == 4 else hidden.shape[1]
        probs_mb.append(args_[0].heads * tokens * tokens * 4 / 2**20)

    procs = [m for m in unet.modules() if isinstance(m, attention.QuantAttnProcessor)]
    handles = [p.register_forward_pre_hook(record, with_kwargs=True) for p in procs]
    base_mb = current_rss_mb()
    reset = reset_peak_rss()
    start = time.perf_counter()
    if args.quest:
        init = watching_group_ranges(unet, StepInit(method=args.method, network="quantized"))
    else:
        init = observing_act_ranges(unet, args.method, quantize=True)
    with torch.no_grad(), quant_state(unet, weights=True, acts=True), init:
        unet(x, t)
    seconds = time.perf_counter() - start
    peak_mb = peak_rss_mb() if reset else None
    for h in handles:
        h.remove()
    result = {
        "model": args.model,
        "rows": args.rows,
        "method": args.method,
        "init": "quest" if args.quest else "observer",
        "attention": "whole" if args.whole_attention else "query_blocks",
        "threads": args.threads,
        "model_rss_mb": round(base_mb, 1),
        "peak_rss_mb": None if peak_mb is None else round(peak_mb, 1),
        "peak_above_model_mb": None if peak_mb is None else round(peak_mb - base_mb, 1),
        "seconds": round(seconds, 1),
        "largest_attention_probs_mb_per_row": round(max(probs_mb), 1),
        "largest_attention_probs_mb_all_rows": round(max(probs_mb) * args.rows, 1),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    suffix = (f"_quest_{args.method}" if args.quest else "") + ("_whole" if args.whole_attention else "")
    atomic_write_json(args.out / f"act_init_memory_{args.model}_{args.rows}rows{suffix}.json", result)
    print(result)
    return result


if __name__ == "__main__":
    main()
