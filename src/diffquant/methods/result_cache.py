"""Cached final results of the methods that build on PTQ (``quest``, ``accuquant``).

A QuEST or AccuQuant job spends its time quantizing; sampling and evaluation come after. Without a
cache, a job stopped during sampling (SLURM preemption, a time limit) would redo that work when it
resumes, and so would every later evaluation of the same quantized model (another seed, a
benchmark). :func:`load_or_run_method` keeps the method's final quantized UNet — quantizer state,
time-step router and the finetuned latent weights and biases, as written by
:func:`~diffquant.quant.checkpoint.save_quantized` — and the metrics the method recorded, in a
:class:`~diffquant.cache.CacheEntry` keyed by the FP model (weights, sampler and numerics), the
quant config and the method config. Like the PTQ cache, it is shared by all jobs and computed once
when two jobs ask at the same time.
"""

from __future__ import annotations

import logging
import shutil
from typing import Any, Callable

from diffquant.cache import CacheEntry
from diffquant.calib.collect import model_identity
from diffquant.quant.checkpoint import load_quantized, save_quantized
from diffquant.quant.config import QuantConfig
from diffquant.quant.typed import as_dataclass, as_dict

log = logging.getLogger(__name__)

RESULT_FILE = "quantized_denoiser.pt"
# Bump when a code change alters a method's results, so that older cached results are not reused.
RESULT_VERSION = 1
# Method config keys that do not change the quantized model.
NOT_IN_KEY = ("save_checkpoint", "ablation")


def method_result_key(model: Any, quant_cfg: Any, method_cfg: Any) -> dict[str, Any]:
    """What determines a method's quantized UNet: FP model, quant config, method config."""
    quant = as_dict(as_dataclass(quant_cfg, QuantConfig))
    quant.pop("name", None)
    method = {k: v for k, v in as_dict(method_cfg).items() if k not in NOT_IN_KEY}
    return {"model": model_identity(model), "quant": quant, "method": method,
            "version": RESULT_VERSION}


def load_or_run_method(model: Any, quant_cfg: Any, method_cfg: Any, ctx: Any,
                       run: Callable[[], QuantConfig]) -> Any:
    """Quantize ``model.denoiser`` with ``run()`` unless the cache holds this method's result.

    ``run`` quantizes ``model.denoiser`` in place, records its metrics in ``ctx.extra_metrics`` and
    returns the final :class:`QuantConfig` (e.g. made time-step aware). On a cache hit the UNet is
    rebuilt from the cached checkpoint and ``ctx.extra_metrics`` gets the metrics of the run that
    made it (their times are that run's). ``<name>_cached`` tells which happened. With
    ``method_cfg.save_checkpoint`` the checkpoint is copied to the run folder. Returns ``model``.
    """
    name = method_cfg.name
    entry = CacheEntry(ctx.cache_dir, name, method_result_key(model, quant_cfg, method_cfg))
    with entry.lock():
        cached = entry.done()
        if cached:
            log.info("loading the cached %s result %s", name, entry.path)
            summary, meta = load_quantized(model.denoiser, entry.path / RESULT_FILE)
            ctx.tracker.log_text("quant_summary", summary.format())
            ctx.extra_metrics.update(meta.get("metrics", {}))
        else:
            final_qcfg = run()
            metrics = {k: v for k, v in ctx.extra_metrics.items() if not k.endswith("_cached")}
            with entry.writing() as tmp:
                save_quantized(model.denoiser, tmp / RESULT_FILE, final_qcfg, include_weights=True,
                               meta={"method": name, "metrics": metrics})
    ctx.extra_metrics[f"{name}_cached"] = cached
    if getattr(method_cfg, "save_checkpoint", False):
        shutil.copyfile(entry.path / RESULT_FILE, ctx.run_dir / RESULT_FILE)
    return model
