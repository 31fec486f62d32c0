"""The full-precision reference: the model as loaded, no quantization."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from diffquant.methods.base import Method, MethodResult
from diffquant.registry import METHODS


@dataclass
class FPConfig:
    """``method=fp``: nothing to set."""

    name: str = "fp"


@METHODS.register("fp", schema=FPConfig)
class FP(Method):
    """Returns the model unchanged; the job's ``quant`` is ignored (the FP row of any grid)."""

    cached = False

    def calibrate(self, model: Any, quant: Any, cfg: FPConfig, ctx: Any, progress: Path) -> MethodResult:
        return MethodResult(model, None)
