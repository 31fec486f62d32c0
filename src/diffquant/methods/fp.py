"""The full-precision reference: the model as loaded, no quantization."""

from __future__ import annotations

from dataclasses import dataclass

from diffquant.registry import METHODS


@dataclass
class FPConfig:
    """``method=fp``: nothing to set."""

    name: str = "fp"


@METHODS.register("fp", schema=FPConfig)
def apply_fp(model, quant_cfg, method_cfg, ctx):
    """Return the model unchanged (``quant`` must be ``fp32``; checked by ``schema.validate``)."""
    return model
