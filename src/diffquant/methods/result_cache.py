"""The one cache layer of every method's result.

A job spends its time quantizing; sampling and evaluation come after. :func:`run_method` keeps a
method's final quantized denoiser — quantizer state, time-step router and the parameters the
method declares it changed (:meth:`~diffquant.methods.base.Method.changed_parameters`), as
written by :func:`~diffquant.quant.checkpoint.save_quantized` — and the result's metrics, tables
and files, in a :class:`~diffquant.cache.CacheEntry` keyed by the FP model (weights, sampler and
numerics), the quant config, the method config (with the seeds the run's ``calib_seed`` derives,
:mod:`diffquant.seeds`) and the method's version. A stopped job resumes
from the entry's partial folder (the method's ``progress``); a later job with the same settings
(another seed, a benchmark, QuEST asking for its PTQ base) loads the result instead. Two jobs
asking at once compute it once.
"""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import asdict
from typing import Any

from diffquant.cache import CacheEntry
from diffquant.calib.collect import model_identity
from diffquant.methods.base import Method, MethodResult, Table
from diffquant.quant.checkpoint import load_quantized, save_quantized
from diffquant.quant.config import QuantConfig, quant_key
from diffquant.quant.typed import as_dataclass, as_dict, key_dict

log = logging.getLogger(__name__)

RESULT_FILE = "quantized_denoiser.pt"


#: bump when shared quantization code changes every method's results (a method's own changes bump
#: its ``version``). 2: attention probabilities observed in query blocks (ranges of attentions
#: whose scores span several blocks moved; single-block attention, as in the embedded models,
#: is unchanged)
SHARED_CODE_VERSION = 2


def method_result_key(method: Method, model: Any, quant: Any, cfg: Any) -> dict[str, Any]:
    """What determines a method's result: FP model, quant config, method config, the method's
    version and :data:`SHARED_CODE_VERSION`."""
    quant_d = quant_key(quant)
    quant_d.pop("name", None)
    method_d = {k: v for k, v in key_dict(cfg).items() if k not in method.not_in_key}
    return {
        "model": model_identity(model),
        "quant": quant_d,
        "method": method_d,
        "version": method.version,
        "shared_code": SHARED_CODE_VERSION,
    }


def run_method(method: Method, model: Any, quant: Any, cfg: Any, ctx: Any) -> MethodResult:
    """``method``'s result on ``model`` (``cfg.name`` is the method's registered name): from the cache when these settings were calibrated
    before, else by :meth:`Method.calibrate` (then stored). Adds ``<name>_cached`` (whether it
    was loaded) and ``<name>_calib_s`` (seconds the calibration took when it was made) to the
    metrics. With ``cfg.save_checkpoint`` the checkpoint is copied into the run folder."""
    if not method.cached:
        return method.calibrate(model, quant, cfg, ctx, ctx.run_dir / "progress_method")
    name = cfg.name
    entry = CacheEntry(ctx.cache_dir, name, method_result_key(method, model, quant, cfg))
    with entry.lock():
        cached = entry.done()
        if cached:
            log.info("loading the cached %s result %s", name, entry.path)
            _, meta = load_quantized(model.denoiser, model.spec, entry.path / RESULT_FILE)
            result = MethodResult(
                model,
                as_dataclass(meta["quant"], QuantConfig),
                dict(meta["metrics"]),
                {k: Table(**t) for k, t in meta["tables"].items()},
                dict(meta["files"]),
            )
            method.restore(model, result)
        else:
            t0 = time.perf_counter()
            result = method.calibrate(model, quant, cfg, ctx, entry.partial_dir())
            result.metrics[f"{name}_calib_s"] = round(time.perf_counter() - t0, 3)
            meta = {
                "method": name,
                "quant": as_dict(result.quant),
                "metrics": result.metrics,
                "tables": {k: asdict(t) for k, t in result.tables.items()},
                "files": result.files,
            }
            params = method.changed_parameters(model)
            with entry.writing() as tmp:
                save_quantized(model.denoiser, tmp / RESULT_FILE, result.quant, meta=meta, params=params)
            entry.clear_partial()
    result.metrics[f"{name}_cached"] = cached
    if getattr(cfg, "save_checkpoint", False):
        shutil.copyfile(entry.path / RESULT_FILE, ctx.run_dir / RESULT_FILE)
    return result
