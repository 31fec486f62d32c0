"""Quantization methods, registered in ``METHODS`` with their config schema.

A method is ``apply(model, quant_cfg, method_cfg, ctx) -> model``: it may replace or modify
``model.denoiser`` in place; the app times it (``calibrate_s``) and evaluates what it returns.
"""

import importlib

for _module in ("fp", "ptq", "quest", "accuquant"):
    try:
        importlib.import_module(f"diffquant.methods.{_module}")
    except ModuleNotFoundError as err:  # a method not written yet; any other import error is a bug
        if err.name != f"diffquant.methods.{_module}":
            raise
