"""Quantization methods, registered in ``METHODS`` with their config schema.

A method is a :class:`~diffquant.methods.base.Method`: ``calibrate(model, quant, cfg, ctx,
progress) -> MethodResult`` quantizes ``model.denoiser`` in place and returns the model, the
final quant config and its metrics; :func:`~diffquant.methods.result_cache.run_method` caches
the result. The app times it (``calibrate_s``) and evaluates what it returns.
"""

from diffquant.methods import accuquant, fp, ptq, quest  # noqa: F401  (register the methods)
from diffquant.methods.base import Method, MethodResult, Table  # noqa: F401
from diffquant.methods.result_cache import run_method  # noqa: F401
