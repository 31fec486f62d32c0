"""Quantization methods, registered in ``METHODS`` with their config schema (one module each;
:class:`~diffquant.registry.Registry` imports every module of this package).

A method is a :class:`~diffquant.methods.base.Method`: ``calibrate(model, quant, cfg, ctx,
progress) -> MethodResult`` quantizes ``model.denoiser`` in place and returns the model, the
final quant config and its metrics; :func:`~diffquant.methods.result_cache.run_method` caches
the result. The app times it (``calibrate_s``) and evaluates what it returns.
"""
