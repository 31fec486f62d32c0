"""Deployment toolkits as methods: NVIDIA ModelOpt (``method=modelopt``) and Hugging Face Quanto
(``method=quanto``), run through this project's calibration data, evaluator, tables and tracker.

Each quantizes ``model.denoiser`` in place with the library's documented API, fed the same
calibration rows as ``ptq_minmax`` (:class:`~diffquant.calib.collect.CalibSettings` defaults:
64 FP trajectories, every second of 20 steps, both guidance branches) as its forward loop:

* **ModelOpt** — ``mtq.quantize(denoiser, preset, forward_loop)`` with a preset of
  ``modelopt.torch.quantization``: by default ``INT8_DEFAULT_CFG`` at ``quant=w8a8`` (INT8
  weights per output channel and INT8 per-tensor activations, symmetric, max calibration) and
  ``W4A8_AWQ_BETA_CFG`` at ``quant=w4a8`` (INT4 weights in blocks of 128 with AWQ-lite, **FP8
  E4M3** per-tensor activations: the library's W4A8); ``method=modelopt_smoothquant`` runs
  ``INT8_SMOOTHQUANT_CFG``.
* **Quanto** — ``quantize(denoiser, weights=qint8|qint4, activations=qint8)``, calibration under
  ``Calibration()``, then ``freeze``: symmetric INT8 per-output-channel weights (``w8a8``) or
  group-wise affine INT4 weights (``w4a8``; on CPU this builds Quanto's C++ extension the first
  time, minutes), INT8 per-tensor activations.

What they quantize differs from this project's methods: only Conv2d / Linear weights and inputs
(presets also leave some layers alone by name, e.g. ModelOpt's ``*proj_out*``), never the
attention matmuls. ``metrics.json`` states it: ``quantized_ops`` (counts of what was quantized)
and ``model_size_mb`` (quantized weights at their bit-width plus one 32-bit scale per weight
group, everything else at its dtype).

Their modules ignore :func:`~diffquant.quant.state.quant_state`, so the error-accumulation
analysis (which needs the FP path of the same denoiser) is not measured for them. Results are not
cached (they take seconds; the libraries' own save formats would be needed), and
the libraries are an optional extra: ``pip install -e '.[toolkits]'``. A missing library, or a
bit-width the library has no configuration for, is refused before any work.
"""

from __future__ import annotations

import copy
import importlib
import importlib.metadata
import importlib.util
import logging
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Optional

import torch
from torch import Tensor, nn

from diffquant.calib.collect import CalibSettings, collect_calibration
from diffquant.calib.ranges import call_rows
from diffquant.methods.base import Method, MethodResult
from diffquant.quant.config import QuantConfig
from diffquant.registry import METHODS
from diffquant.validation import InvalidSetting, positive

log = logging.getLogger(__name__)

INSTALL = "pip install -e '.[toolkits]'"
MIB = 2**20

#: ModelOpt presets this method runs, with the (weight, activation) bits they stand for.
MODELOPT_PRESETS = {
    "INT8_DEFAULT_CFG": (8, 8),
    "INT8_SMOOTHQUANT_CFG": (8, 8),
    "W4A8_AWQ_BETA_CFG": (4, 8),
}
#: The preset of each bit-width when ``preset`` is not set.
MODELOPT_DEFAULT = {(8, 8): "INT8_DEFAULT_CFG", (4, 8): "W4A8_AWQ_BETA_CFG"}
QUANTO_BITS = ((8, 8), (4, 8))


def require(module: str, package: str, method: str) -> None:
    """Raise :class:`InvalidSetting` naming the install command when ``module`` is absent."""
    if importlib.util.find_spec(module.split(".")[0]) is None or importlib.util.find_spec(module) is None:
        raise InvalidSetting(
            "name",
            f"(method={method}) needs {package}, which is not installed: {INSTALL} (or pip install {package}).",
        )


@dataclass
class ToolkitConfig:
    """A toolkit method's settings.

    Attributes:
        name: ``modelopt`` / ``quanto``.
        calib: calibration trajectories (those of ``ptq_minmax``).
        calib_rows: calibration rows fed to the forward loop (None = all), a fixed random subset.
        calib_batch_size: rows per forward.
        calib_seed_rows: seed of the ``calib_rows`` subset.
        ablation: the variant's label in tables (``modelopt[smoothquant]``), None for the default.
    """

    name: str = ""
    ablation: Optional[str] = None
    calib: CalibSettings = field(default_factory=CalibSettings)
    calib_rows: Optional[int] = None
    calib_batch_size: int = 64
    calib_seed_rows: int = 0

    def __post_init__(self) -> None:
        positive(self, "calib_rows", "calib_batch_size")


@dataclass
class ModelOptConfig(ToolkitConfig):
    """``method=modelopt``. ``preset``: a ModelOpt preset name (:data:`MODELOPT_PRESETS`), None =
    the bit-width's default (:data:`MODELOPT_DEFAULT`)."""

    name: str = "modelopt"
    preset: Optional[str] = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.preset is not None and self.preset not in MODELOPT_PRESETS:
            raise InvalidSetting(
                "preset", f"is not one this method runs: use one of {sorted(MODELOPT_PRESETS)}."
            )


@dataclass
class QuantoConfig(ToolkitConfig):
    """``method=quanto``."""

    name: str = "quanto"


def forward_loop(model: Any, stream: Any, cfg: ToolkitConfig):
    """The calibration forward loop ``loop(denoiser)`` (every chosen calibration row once) and the
    number of rows it feeds."""
    rows = stream.subset(cfg.calib_rows, cfg.calib_seed_rows)

    def loop(denoiser: nn.Module) -> None:
        with torch.no_grad():
            for batch in stream.batches(cfg.calib_batch_size, rows, device=model.device, with_step=True):
                call_rows(denoiser, batch)

    return loop, len(rows)


class Inventory:
    """What a library quantized: module counts by kind, and the storage of the quantized weights
    (bits at their width plus one 32-bit scale per weight group)."""

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}
        self.weights: set[int] = set()
        self.bits = 0

    def add(self, kind: str, weight: Optional[Tensor] = None, w_bits: int = 0, n_scales: int = 0) -> None:
        self.counts[kind] = self.counts.get(kind, 0) + 1
        if weight is not None:
            self.weights.add(id(weight))
            self.bits += math.prod(weight.shape) * w_bits + 32 * n_scales

    def ops(self, label: str) -> str:
        """``quantized_ops``: e.g. ``ModelOpt INT8_DEFAULT_CFG: 25 Conv2d weights+inputs, ...``."""
        return (
            f"{label}: "
            + ", ".join(f"{v} {k}" for k, v in sorted(self.counts.items()))
            + "; attention matmuls FP"
        )

    def size_bits(self, denoiser: nn.Module) -> int:
        """The quantized weights plus every other parameter at its dtype's width."""
        rest = sum(
            p.numel() * p.element_size() * 8 for p in denoiser.parameters() if id(p) not in self.weights
        )
        return self.bits + rest


class ToolkitMethod(Method):
    """What the two toolkit methods share: the refusal before work, the loop, the record."""

    cached = False
    switches_to_fp = False  # the libraries' modules ignore quant_state: no error-accumulation curve
    package: ClassVar[str] = ""
    module: ClassVar[str] = ""

    @classmethod
    def check(cls, quant: QuantConfig, cfg: ToolkitConfig) -> None:
        require(cls.module, cls.package, cfg.name)
        cls.check_bits(quant, cfg)

    @classmethod
    def check_bits(cls, quant: QuantConfig, cfg: ToolkitConfig) -> None:
        raise NotImplementedError

    def calibrate(
        self, model: Any, quant: QuantConfig, cfg: ToolkitConfig, ctx: Any, progress: Path
    ) -> MethodResult:
        self.check(quant, cfg)
        stream = collect_calibration(model, cfg.calib, ctx.cache_dir)
        loop, n_rows = forward_loop(model, stream, cfg)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ops, size_bits = self.quantize(model.denoiser, quant, cfg, loop)
        with torch.no_grad():
            out = model.spec.forward(
                model.denoiser, next(stream.batches(8, stream.subset(8, 0), device=model.device))
            )
        if not torch.isfinite(out).all():
            raise FloatingPointError(
                f"{cfg.name}: the quantized denoiser outputs NaN/inf on calibration inputs"
            )
        log.info("%s", ops)
        metrics = {
            "calib_rows": n_rows,
            "quantized_ops": ops,
            "model_size_mb": round(size_bits / 8 / MIB, 4),
            f"{cfg.name}_version": importlib.metadata.version(self.package),
        }
        return MethodResult(model, quant, metrics, {}, {"quant_summary.txt": ops})

    def quantize(self, denoiser: nn.Module, quant: QuantConfig, cfg: Any, loop) -> tuple[str, int]:
        """Quantize ``denoiser`` in place; returns ``(quantized_ops, size in bits)``."""
        raise NotImplementedError


@METHODS.register("modelopt", schema=ModelOptConfig)
class ModelOpt(ToolkitMethod):
    """``method=modelopt``: ``mtq.quantize(denoiser, preset, forward_loop)`` (module doc)."""

    package = "nvidia-modelopt"
    module = "modelopt.torch.quantization"

    @classmethod
    def preset(cls, quant: QuantConfig, cfg: ModelOptConfig) -> str:
        return cfg.preset or MODELOPT_DEFAULT.get((quant.weight_bits, quant.act_bits), "")

    @classmethod
    def check_bits(cls, quant: QuantConfig, cfg: ModelOptConfig) -> None:
        bits = (quant.weight_bits, quant.act_bits)
        name = cls.preset(quant, cfg)
        if not name or MODELOPT_PRESETS[name] != bits:
            runs = ", ".join(f"{k} at w{w}a{a}" for k, (w, a) in MODELOPT_PRESETS.items())
            raise InvalidSetting(
                "preset",
                f"has no ModelOpt preset for quant={quant.name} (this method runs {runs}): use quant=w8a8 or quant=w4a8.",
            )

    def quantize(self, denoiser: nn.Module, quant: QuantConfig, cfg: ModelOptConfig, loop) -> tuple[str, int]:
        mtq = importlib.import_module(self.module)
        name = self.preset(quant, cfg)
        mtq.quantize(denoiser, copy.deepcopy(getattr(mtq, name)), loop)
        inv = Inventory()
        for _, m in denoiser.named_modules():
            wq, iq = getattr(m, "weight_quantizer", None), getattr(m, "input_quantizer", None)
            if wq is None or not hasattr(m, "weight"):
                continue
            w_on, a_on = bool(getattr(wq, "is_enabled", False)), bool(getattr(iq, "is_enabled", False))
            if not (w_on or a_on):
                continue
            what = "weights+inputs" if w_on and a_on else "weights" if w_on else "inputs"
            kind = f"{type(m).__name__.replace('Quant', '')} {what}"
            if not w_on:
                inv.add(kind)
                continue
            # a SequentialQuantizer (W4A8_AWQ_BETA: INT4 blocks, then FP8) stores the first's codes
            first = wq[0] if isinstance(wq, nn.Sequential) else wq
            w_bits = first.num_bits if isinstance(first.num_bits, int) else sum(first.num_bits) + 1
            parts = list(wq) if isinstance(wq, nn.Sequential) else [wq]
            n_scales = sum(1 if getattr(q, "amax", None) is None else q.amax.numel() for q in parts)
            inv.add(kind, m.weight, w_bits, n_scales)
        return inv.ops(f"ModelOpt {name}"), inv.size_bits(denoiser)


@METHODS.register("quanto", schema=QuantoConfig)
class Quanto(ToolkitMethod):
    """``method=quanto``: ``quantize`` / ``Calibration`` / ``freeze`` (module doc)."""

    package = "optimum-quanto"
    module = "optimum.quanto"

    @classmethod
    def check_bits(cls, quant: QuantConfig, cfg: QuantoConfig) -> None:
        if (quant.weight_bits, quant.act_bits) not in QUANTO_BITS:
            raise InvalidSetting(
                "name",
                f"(method=quanto) has no configuration for quant={quant.name}: use quant=w8a8 (qint8 / qint8) or quant=w4a8 (qint4 / qint8).",
            )

    def quantize(self, denoiser: nn.Module, quant: QuantConfig, cfg: QuantoConfig, loop) -> tuple[str, int]:
        oq = importlib.import_module(self.module)
        weights = oq.qint8 if quant.weight_bits == 8 else oq.qint4
        oq.quantize(denoiser, weights=weights, activations=oq.qint8)
        with oq.Calibration():
            loop(denoiser)
        oq.freeze(denoiser)
        inv = Inventory()
        for _, m in denoiser.named_modules():
            if not isinstance(m, oq.QModuleMixin) or m.weight_qtype is None:
                continue
            scale = getattr(m.weight, "_scale", None)
            n_scales = 1 if scale is None else scale.numel()
            inv.add(
                f"{type(m).__name__.removeprefix('Q')} weights+inputs", m.weight, quant.weight_bits, n_scales
            )
        return inv.ops(f"Quanto qint{quant.weight_bits}/qint8"), inv.size_bits(denoiser)
