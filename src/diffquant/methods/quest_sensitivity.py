"""Activation sensitivity sweep: which layers' input activations break the denoiser at low bits.

QuEST (§3.3.3, Fig. 3) found its "critical" modules by an empirical sweep: lower the bit-width
of one activation type while every other activation stays at 8 bits, and watch generation break.
The paper then picked the layers by hand; here the sweep is automatic and its ranking can choose
CMA's layers (``method.critical_layers=auto``).

Procedure (:func:`activation_sensitivity`):

1. Two acts-only copies of the FP denoiser are quantized with the job's quant config (weights stay in
   full precision, so only activation error is measured; one parameter set for all time steps):
   one with every activation at ``base_bits`` (8), one at ``low_bits`` (the job's ``act_bits``).
   Both get their ranges from the same calibration rows (``quant.act_init``). The job's
   policies carry over: first/last-layer inputs stay at ``first_last_act_bits`` and per-channel
   activation ranges switch on at 4 bits, as in the quantized model that QuEST will train.
2. A *unit* is one quantized layer's input quantizer (``<layer>``; the two halves of a split
   shortcut count as one), or the q/k/v/softmax quantizers of one attention module
   (``<attention>.processor``). For each unit, its low-bit quantizers are swapped into the 8-bit
   copy and the error of the denoiser output is measured on fixed calibration rows:
   ``error = mean((eps_q - eps_fp)^2)``, and ``rel_error = error / mean(eps_fp^2)``.
3. The same for every *type* of unit at once (the paper's granularity): the type is the name
   without its block path and indices (the family's
   :meth:`~diffquant.models.denoiser.DenoiserSpec.layer_type`).

:meth:`SensitivityReport.select` turns the ranking into CMA's layers: those of the ``k`` most
sensitive units that own trainable weights (an attention processor stands for its q/k/v
projections); layers trained by TLA are skipped.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
from torch import Tensor, nn

from diffquant.cache import atomic_write_json, atomic_write_text
from diffquant.calib.collect import CalibStream
from diffquant.calib.ranges import calibrate_act_ranges, minmax_patterns
from diffquant.models.denoiser import DenoiserSpec
from diffquant.quant.attention import is_quant_attention
from diffquant.quant.config import FP_BITS, QuantConfig
from diffquant.quant.modules import is_quant_layer
from diffquant.quant.state import quant_state
from diffquant.quant.swap import quantize_denoiser
from diffquant.quant.typed import as_dataclass
from diffquant.validation import positive

PROCESSOR_SLOTS = ("q_quantizer", "k_quantizer", "v_quantizer", "prob_quantizer")
JSON_FILE, MARKDOWN_FILE = "sensitivity.json", "sensitivity.md"


@dataclass
class SensitivitySettings:
    """How the sweep runs.

    Attributes:
        base_bits: activation bits of every unit that is not being probed (the paper: 8).
        low_bits: bits of the probed unit; None = the job's ``quant.act_bits``.
        calib_rows: calibration rows the activation ranges are set from.
        eval_rows: calibration rows the output error is measured on (fixed, spread over steps).
        batch_size: rows per UNet forward.
        seed: picks the rows.
    """

    base_bits: int = 8
    low_bits: Optional[int] = None
    calib_rows: int = 256
    eval_rows: int = 128
    batch_size: int = 64
    seed: int = 0

    def __post_init__(self) -> None:
        positive(self, "base_bits", "low_bits", "calib_rows", "eval_rows", "batch_size")


@dataclass
class UnitSensitivity:
    """One row of the ranking: ``error`` = MSE of the UNet output (eps units squared) with this
    unit at ``low_bits`` and everything else at ``base_bits``; ``rel_error`` = error / E[eps_fp²];
    ``weights``: the layers whose weights stand for this unit (empty when it has none)."""

    name: str
    type: str
    error: float
    rel_error: float
    weights: list[str] = field(default_factory=list)


@dataclass
class SensitivityReport:
    """The sweep's result: units and types sorted by decreasing error."""

    base_bits: int
    low_bits: int
    base_error: float
    fp_power: float
    units: list[UnitSensitivity]
    types: list[UnitSensitivity]

    def select(self, k: int, exclude: Sequence[str] = ()) -> list[str]:
        """The layers (qualified names) of the ``k`` most sensitive units that have weights
        outside ``exclude`` (layer names)."""
        picked: list[str] = []
        n_units = 0
        for unit in self.units:
            if n_units >= k:
                break
            layers = [w for w in unit.weights if w not in exclude]
            if not layers:
                continue
            picked.extend(w for w in layers if w not in picked)
            n_units += 1
        return picked

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SensitivityReport:
        return cls(
            d["base_bits"],
            d["low_bits"],
            d["base_error"],
            d["fp_power"],
            [UnitSensitivity(**u) for u in d["units"]],
            [UnitSensitivity(**u) for u in d["types"]],
        )

    def to_markdown(self, selected: Sequence[str] = ()) -> str:
        lines = [
            f"# Activation sensitivity: one unit at A{self.low_bits}, the rest at "
            f"A{self.base_bits} (weights FP)",
            "",
            f"Denoiser-output MSE with every activation at A{self.base_bits}: "
            f"{self.base_error:.4g} (E[eps_fp^2] = {self.fp_power:.4g}).",
            "",
        ]
        if selected:
            lines += ["Selected for CMA: " + ", ".join(f"`{p}`" for p in selected), ""]
        lines += [
            "## By type (all units of a type lowered together)",
            "",
            "| rank | type | MSE | rel. MSE |",
            "|---:|---|---:|---:|",
        ]
        lines += [
            f"| {i + 1} | `{u.name}` | {u.error:.4g} | {u.rel_error:.4f} |" for i, u in enumerate(self.types)
        ]
        lines += ["", "## By unit", "", "| rank | unit | type | MSE | rel. MSE |", "|---:|---|---|---:|---:|"]
        lines += [
            f"| {i + 1} | `{u.name}` | {u.type} | {u.error:.4g} | {u.rel_error:.4f} |"
            for i, u in enumerate(self.units)
        ]
        lines.append("")
        return "\n".join(lines)

    def write(self, folder: Path | str, selected: Sequence[str] = ()) -> None:
        """Write ``sensitivity.json`` and ``sensitivity.md`` into ``folder``."""
        folder = Path(folder)
        atomic_write_json(folder / JSON_FILE, {**self.to_dict(), "selected": list(selected)})
        atomic_write_text(folder / MARKDOWN_FILE, self.to_markdown(selected))


# ---------------------------------------------------------------------------- units
@dataclass
class _Unit:
    name: str
    slots: list[tuple[str, str]]  # (owner module name, attribute) of each quantizer slot
    weights: list[str]


def activation_units(denoiser: nn.Module, spec: DenoiserSpec) -> list[_Unit]:
    """Every unit of a quantized denoiser in module order (see the module doc)."""
    qkv = spec.layers(denoiser, "self_attention_qkv", "cross_attention_q", "cross_attention_kv")
    units: list[_Unit] = []
    for name, m in denoiser.named_modules():
        if is_quant_layer(m) and m.input_quantizer is not None:
            units.append(_Unit(name, [(name, "input_quantizer")], [name]))
        elif is_quant_attention(m):
            slots = [(f"{name}.processor", s) for s in PROCESSOR_SLOTS if getattr(m.processor, s) is not None]
            proj = [n for n in qkv if n.startswith(f"{name}.") and is_quant_layer(denoiser.get_submodule(n))]
            if slots:
                units.append(_Unit(f"{name}.processor", slots, proj))
    return units


class _Swap:
    """Put the low-bit quantizers of some units into the base UNet, and back."""

    def __init__(self, base: nn.Module, low: nn.Module) -> None:
        self.base, self.low = base, low

    def apply(self, units: Iterable[_Unit]) -> list[tuple[nn.Module, str, nn.Module]]:
        undo = []
        for unit in units:
            for owner_name, attr in unit.slots:
                owner = self.base.get_submodule(owner_name)
                undo.append((owner, attr, getattr(owner, attr)))
                setattr(owner, attr, getattr(self.low.get_submodule(owner_name), attr))
        return undo

    @staticmethod
    def restore(undo: list[tuple[nn.Module, str, nn.Module]]) -> None:
        for owner, attr, original in reversed(undo):
            setattr(owner, attr, original)


# ---------------------------------------------------------------------------- the sweep
def _acts_only(quant_cfg: QuantConfig, bits: int) -> QuantConfig:
    return dataclasses.replace(
        quant_cfg, weight_bits=FP_BITS, act_bits=bits, timestep_aware=False, timestep_groups=1
    )


@torch.no_grad()
def _output_error(
    denoiser: nn.Module, spec: DenoiserSpec, batches: list[dict[str, Tensor]], targets: list[Tensor]
) -> float:
    total, count = 0.0, 0
    for batch, target in zip(batches, targets):
        out = spec.forward(denoiser, batch)
        total += float((out - target).pow(2).sum())
        count += target.numel()
    return total / max(count, 1)


@torch.no_grad()
def activation_sensitivity(
    fp_denoiser: nn.Module,
    spec: DenoiserSpec,
    quant_cfg: Any,
    stream: CalibStream,
    settings: Any = None,
    device: Optional[torch.device] = None,
) -> SensitivityReport:
    """Run the sweep on copies of the FP ``fp_denoiser`` (left untouched) with calibration rows from
    ``stream``; see the module doc. Cost: two range calibrations and (units + types + 1)
    forwards over ``eval_rows`` rows."""
    s = as_dataclass(settings or {}, SensitivitySettings)
    qcfg = as_dataclass(quant_cfg, QuantConfig)
    low_bits = s.low_bits if s.low_bits is not None else qcfg.act_bits
    if low_bits >= FP_BITS:
        raise ValueError(
            "the sensitivity sweep needs quantized activations (quant.act_bits < 32 "
            "or method.sensitivity.low_bits)"
        )
    device = device or next(fp_denoiser.parameters()).device
    copies = {}
    for label, bits in (("base", s.base_bits), ("low", low_bits)):
        denoiser = copy.deepcopy(fp_denoiser).to(device)
        quantize_denoiser(denoiser, spec, _acts_only(qcfg, bits))
        calibrate_act_ranges(
            denoiser,
            stream,
            method=qcfg.act_init,
            n_rows=s.calib_rows,
            batch_size=s.batch_size,
            p=qcfg.lp_norm,
            n_candidates=qcfg.lp_candidates,
            seed=s.seed,
            device=device,
            minmax_layers=minmax_patterns(denoiser, spec, qcfg),
        )
        copies[label] = denoiser
    base, low = copies["base"], copies["low"]
    batches = list(stream.batches(s.batch_size, stream.subset(s.eval_rows, s.seed + 1), device=device))
    with quant_state(base, acts=False):
        targets = [spec.forward(base, b) for b in batches]
    fp_power = sum(float(t.pow(2).sum()) for t in targets) / max(sum(t.numel() for t in targets), 1)
    base_error = _output_error(base, spec, batches, targets)

    swap = _Swap(base, low)
    units = activation_units(base, spec)

    def measure(name: str, group: list[_Unit]) -> UnitSensitivity:
        undo = swap.apply(group)
        try:
            err = _output_error(base, spec, batches, targets)
        finally:
            swap.restore(undo)
        weights = [w for u in group for w in u.weights]
        return UnitSensitivity(name, spec.layer_type(group[0].name), err, err / max(fp_power, 1e-12), weights)

    unit_rows = [measure(u.name, [u]) for u in units]
    by_type: dict[str, list[_Unit]] = {}
    for u in units:
        by_type.setdefault(spec.layer_type(u.name), []).append(u)
    type_rows = [dataclasses.replace(measure(t, group), name=t, weights=[]) for t, group in by_type.items()]
    key = lambda r: -r.error  # noqa: E731
    return SensitivityReport(
        s.base_bits, low_bits, base_error, fp_power, sorted(unit_rows, key=key), sorted(type_rows, key=key)
    )


def load_report(path: Path | str) -> SensitivityReport:
    data = json.loads(Path(path).read_text())
    data.pop("selected", None)
    return SensitivityReport.from_dict(data)
