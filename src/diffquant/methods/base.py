"""The method contract: what a quantization method is, takes and returns.

In the spirit of ModelOpt's modes (``mtq.quantize(model, config, forward_loop)``: an algorithm
owns its calibration and its save/restore) and torchao's handlers (one config dataclass per
method), a method is a :class:`Method` subclass registered with its config dataclass::

    @METHODS.register("my_method", schema=MyConfig)
    class MyMethod(Method):
        def calibrate(self, model, quant, cfg, ctx, progress):
            summary = quantize_denoiser(model.denoiser, model.spec, quant, model.timesteps)
            ...                                   # calibrate; read roles from model.spec
            return MethodResult(model, quant, metrics={"my_loss": 0.1})

It receives typed configs (``quant``: :class:`~diffquant.quant.config.QuantConfig`, ``cfg``: its own
dataclass), quantizes ``model.denoiser`` in place and **returns** what it produced: the model, the
final quant config (e.g. made time-step aware) and its metrics. It never writes into shared state.

Results are cached by one layer (:func:`diffquant.methods.result_cache.run_method`): the
denoiser's quantizer state, plus the parameters the method declares it changed
(:meth:`Method.changed_parameters`, e.g. finetuned latent weights), plus the result's metrics,
tables and files. A cache hit restores them without calling :meth:`Method.calibrate`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Optional

from torch import nn

from diffquant.quant.config import QuantConfig


@dataclass
class Table:
    """A table for the tracker (W&B): column names and rows of JSON-able cells."""

    columns: list[str]
    rows: list[list[Any]]


@dataclass
class MethodResult:
    """What a method produced.

    Attributes:
        model: the model wrapper, its denoiser quantized in place.
        quant: the quant config the denoiser is quantized with at the end (the job's, or one the
            method derived, e.g. time-step aware); None when nothing was quantized (``fp``).
        metrics: scalars (and small lists) for ``metrics.json``; times in seconds (``*_s``).
        tables: tables for the tracker, by name.
        files: text files for the run folder, by file name (e.g. ``quant_summary.txt``).
    """

    model: Any
    quant: Optional[QuantConfig]
    metrics: dict[str, Any] = field(default_factory=dict)
    tables: dict[str, Table] = field(default_factory=dict)
    files: dict[str, str] = field(default_factory=dict)

    def merge(self, base: MethodResult) -> MethodResult:
        """This result with ``base``'s metrics, tables and files underneath (a method built on
        another's result reports both; its own values win)."""
        self.metrics = {**base.metrics, **self.metrics}
        self.tables = {**base.tables, **self.tables}
        self.files = {**base.files, **self.files}
        return self


class Method:
    """A quantization method; subclasses implement :meth:`calibrate`.

    Class attributes:
        cached: whether :func:`~diffquant.methods.result_cache.run_method` caches the result.
        switches_to_fp: whether the quantized denoiser runs as the FP model inside
            :func:`~diffquant.quant.state.quant_state` (``weights=False, acts=False``), which the
            error-accumulation analysis needs; False for a library's own quantized modules.
        version: bump when a code change alters the method's results, so that cached results of
            older code are not reused.
        not_in_key: config keys that do not change the result (left out of the cache key).
    """

    cached: ClassVar[bool] = True
    switches_to_fp: ClassVar[bool] = True
    version: ClassVar[int] = 1
    not_in_key: ClassVar[tuple[str, ...]] = ("save_checkpoint", "ablation")

    def calibrate(self, model: Any, quant: QuantConfig, cfg: Any, ctx: Any, progress: Path) -> MethodResult:
        """Quantize and calibrate ``model.denoiser`` in place.

        Args:
            model: the FP model wrapper (:class:`~diffquant.models.base.DiffusionModel`).
            quant: the job's bit-width setting.
            cfg: the method's own config dataclass.
            ctx: folders, device and tracker (:class:`~diffquant.context.RunContext`).
            progress: a folder for resumable partial state; it survives a stopped job and is
                removed once the result is stored.
        """
        raise NotImplementedError

    @classmethod
    def check(cls, quant: QuantConfig, cfg: Any) -> None:
        """Refuse, before any work, a bit-width or environment the method cannot run (raise
        :class:`~diffquant.validation.InvalidSetting` naming the key and the fix). Default:
        nothing to check."""

    def restore(self, model: Any, result: MethodResult) -> None:
        """Re-install on ``model`` what :meth:`calibrate` set outside the denoiser's parameters
        and quantizers (e.g. PTQD's sampler correction), from a result loaded from the cache
        (its metrics, tables and files). Default: nothing."""

    def changed_parameters(self, model: Any) -> dict[str, nn.Parameter]:
        """Parameters of ``model.denoiser`` (by qualified name) that :meth:`calibrate` changes
        beyond the quantizer state, saved with the result and restored on a cache hit."""
        return {}
