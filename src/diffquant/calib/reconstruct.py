"""BRECQ block reconstruction (the Q-Diffusion recipe) on a quantized denoiser.

Units, in the order the denoiser executes them: every block the family's
:class:`~diffquant.models.denoiser.DenoiserSpec` reconstructs as one (for diffusers UNets and
transformers: residual blocks, transformer blocks and attention blocks) not inside another unit;
every other quantized Conv2d/Linear on its own (a UNet's input and output convolutions,
time-embedding linears, down/up-sampler convolutions, transformer input/output projections).

For each unit, calibration rows are streamed through the denoiser and two captures are taken by
hooks (the forward stops at the unit, so only the prefix runs):

* the FP network (quantization off): the unit's inputs ``x_fp`` and its output ``y`` (target);
* the weight-quantized network (already reconstructed units hard-rounded, activations FP): the
  unit's inputs ``x_w`` (Q-Diffusion's ``asym=True``).

Then

1. **weight stage** — AdaRound: Adam(lr ``weight_lr``) on α for ``weight_iters`` iterations,
   loss ``‖unit(x_w) - y‖_p^p`` (p = ``weight_p``, summed over ``loss_axis``, mean over the rest) +
   the rounding regulariser (weight ``round_reg``, β ``beta_start → beta_end`` after ``warmup``);
   activations off; the choices are frozen at the end;
2. **activation stage** — LSQ: Adam(lr ``act_lr``, cosine to 0) on the step sizes of the unit's
   activation quantizers below 16 bits for ``act_iters`` iterations, loss ``‖unit(x_fp) - y‖_p^p``
   (p = ``act_p``) with hard-rounded weights and quantized activations.

Captured rows live in a :class:`RowStore`: in memory up to ``memory_mb``, in disk shards beyond,
so no more than one unit's data (and at most ``memory_mb`` of it) is ever held. Progress goes to
``progress_dir``, atomically: the whole quantizer state once before the first unit
(``state_base.pt``), then after each finished unit that unit's quantizers only
(``unit_<n>.pt``: a unit changes nothing outside itself), and the index ``progress.json``; a
stopped calibration resumes after the last finished unit and gives the same result as an
uninterrupted one (every unit's optimisation is seeded by its index).

The two stages of a unit depend on no other unit's activation quantizers (the weight stage runs
with activations off, the activation stage on FP inputs), so running every unit's weight stage
first (``act_iters=0``) and then every unit's activation stage (``weight_iters=0``), as
Q-Diffusion does, gives the same result as the unit-by-unit order; ``method=ptq`` does that when
activation ranges are initialised after weight reconstruction (``act_init_stage=after_weights``).

Loss axis (``loss_axis``): BRECQ's and Q-Diffusion's ``lp_loss`` sums ``|pred - tgt|^p`` over
dim 1 and averages the rest (``qdiff/quant_layer.py`` line 31). For 4-D outputs ``(B, C, H, W)``
that is the channel axis; for the token outputs ``(B, L, C)`` of transformer blocks it is the
token axis. ``dim1`` reproduces that; ``channels`` sums over the channel axis of every output (dim
1 of 4-D tensors, the last one of token tensors). The two differ by the constant factor ``L / C``
on a token output, which matters only against the AdaRound regulariser's weight (and Adam's ε):
with ``dim1`` a 64×64-token transformer block's reconstruction term is 4096 / 320 ≈ 13× heavier
relative to the rounding term than with ``channels``.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Optional

import torch
from torch import Tensor, nn

from diffquant.cache import atomic_torch_save, atomic_write_json
from diffquant.calib.collect import STEP_KEY, CalibStream
from diffquant.quant.adaround import AdaRound, RoundingSchedule
from diffquant.quant.checkpoint import load_quant_state, quantizer_state_dict
from diffquant.quant.modules import is_quant_layer
from diffquant.quant.quantizers import ActQuantizer
from diffquant.quant.state import (
    activation_drop,
    iter_quantizers,
    keep_step_sizes_positive,
    quant_state,
    trainable,
)
from diffquant.quant.timestep import get_router, sampler_step
from diffquant.quant.typed import as_dataclass
from diffquant.stopping import check_stop
from diffquant.validation import InvalidSetting, one_of, positive

log = logging.getLogger(__name__)

PROGRESS_FILE = "progress.json"


SOFTMAX_FP_BITS = 16  # activation quantizers at >= 16 bits are not trained (Q-Diffusion)
LOSS_AXES = ("channels", "dim1")


def unit_state_file(n: int) -> str:
    """The progress file of the ``n``-th finished unit's quantizers (1-based)."""
    return f"unit_{n:04d}.pt"


@dataclass
class ReconSettings:
    """Block-reconstruction hyper-parameters. The defaults are sized for the embedded models on
    2 CPU cores (a few minutes); the paper's (20k / 5k iterations, lr 1e-3 / 4e-4, batch 32) are
    in ``conf/method/ptq_paper.yaml``. With 1% of the paper's iterations, AdaRound needs 10x its
    learning rate to converge.

    Attributes:
        weight_iters / act_iters: iterations of the AdaRound / LSQ stage per unit (0 skips).
        batch_size: rows per iteration.
        weight_lr / act_lr: Adam learning rates of α / of activation step sizes.
        weight_p / act_p: the L_p norm of the reconstruction loss in each stage.
        warmup: fraction of weight iterations without the rounding regulariser.
        beta_start / beta_end: the regulariser's β annealing.
        round_reg: regulariser weight λ.
        capture_batch_size: rows per denoiser forward when capturing a unit's inputs.
        max_rows: calibration rows used (a fixed random subset; None = all).
        loss_axis: the axis the L_p error is summed over before the mean: ``channels`` (dim 1 of
            4-D outputs, the last dim of token outputs) or ``dim1`` (dim 1 of every output, the
            reference code's; see the module doc).
        memory_mb: a unit's captured rows stay in RAM up to this size, beyond it in disk shards.
        seed: base seed (each unit's optimisation is seeded by it and the unit's index; the
            ``max_rows`` subset by it; re-seeded by the run's ``calib_seed``).
        joint: QDrop's ``order=together`` (PTQ4DM): one stage per unit that learns the AdaRound
            α (lr ``weight_lr``) and the activation step sizes (lr ``act_lr``, cosine to 0)
            together for ``weight_iters`` iterations, with activations quantized, loss
            ``‖unit(x) - y‖_p^p`` (p = ``weight_p``) + the rounding regulariser; ``act_iters``
            is not used. Needs initialised activation ranges.
        keep_prob: QDrop's activation dropping in the joint stage: each activation element of
            the unit is quantized with this probability and FP otherwise
            (:func:`~diffquant.quant.state.activation_drop`); None = always quantized.
        input_keep_prob: the joint stage's unit input ``x``: each element is taken from the
            quantized network's input (weights and activations quantized) with this probability
            and from the FP network's otherwise (QDrop's ``input_prob``); None = the FP input.
    """

    weight_iters: int = 200
    act_iters: int = 100
    batch_size: int = 32
    weight_lr: float = 1e-2
    act_lr: float = 2e-3
    weight_p: float = 2.0
    act_p: float = 2.4
    warmup: float = 0.2
    beta_start: float = 20.0
    beta_end: float = 2.0
    round_reg: float = 0.01
    capture_batch_size: int = 128
    max_rows: Optional[int] = None
    loss_axis: str = "channels"
    memory_mb: int = 2048
    seed: int = 0
    joint: bool = False
    keep_prob: Optional[float] = None
    input_keep_prob: Optional[float] = None

    #: left out of cache keys at these values (:func:`~diffquant.quant.typed.key_dict`)
    KEY_NEUTRAL_DEFAULTS: ClassVar[dict[str, Any]] = {
        "joint": False,
        "keep_prob": None,
        "input_keep_prob": None,
    }

    def __post_init__(self) -> None:
        positive(self, "weight_iters", "act_iters", allow_zero=True)
        for key in ("keep_prob", "input_keep_prob"):
            value = getattr(self, key)
            if value is not None and not 0.0 < value <= 1.0:
                raise InvalidSetting(key, f"={value} is not a probability in (0, 1]: use e.g. 0.5, or null")
            if value is not None and not self.joint:
                raise InvalidSetting(key, "applies to the joint stage only: set joint=true, or null it")
        positive(
            self,
            "batch_size",
            "weight_lr",
            "act_lr",
            "weight_p",
            "act_p",
            "capture_batch_size",
            "max_rows",
            "memory_mb",
        )
        if not 0.0 <= self.warmup < 1.0:
            raise InvalidSetting("warmup", "is not a fraction of the weight iterations: use [0, 1)")
        one_of(self, "loss_axis", LOSS_AXES)


# ---------------------------------------------------------------------------- units
@dataclass
class Unit:
    """One reconstruction unit: ``kind`` is ``resnet``, ``transformer``, ``attention`` or ``layer``."""

    name: str
    module: nn.Module
    kind: str


class StopForward(Exception):
    """Raised by capture hooks to skip the rest of the denoiser."""


def find_units(denoiser: nn.Module, spec: Any, example: dict[str, Tensor]) -> list[Unit]:
    """The reconstruction units of ``denoiser`` (blocks as ``spec.unit_kind`` says) in execution
    order (traced on ``example`` kwargs)."""
    candidates: list[Unit] = []
    inside: set[str] = set()
    for name, m in denoiser.named_modules():
        if any(name.startswith(p + ".") for p in inside):
            continue
        kind = spec.unit_kind(m)
        if kind is not None and any(is_quant_layer(c) for c in m.modules()):
            candidates.append(Unit(name, m, kind))
            inside.add(name)
        elif is_quant_layer(m):
            candidates.append(Unit(name, m, "layer"))
    order: dict[str, int] = {}
    handles = []
    for u in candidates:

        def hook(mod, args, name=u.name):
            if name in order:
                raise RuntimeError(
                    f"reconstruction unit {name} runs twice in one denoiser call; "
                    "block reconstruction needs each unit to run once"
                )
            order[name] = len(order)

        handles.append(u.module.register_forward_pre_hook(hook))
    try:
        with torch.no_grad(), quant_state(denoiser, weights=False, acts=False):
            denoiser(**example)
    finally:
        for h in handles:
            h.remove()
    skipped = [u.name for u in candidates if u.name not in order]
    if skipped:
        log.warning("quantized modules never called by the denoiser (not reconstructed): %s", skipped)
    return sorted((u for u in candidates if u.name in order), key=lambda u: order[u.name])


# ---------------------------------------------------------------------------- captured calls
class CallSpec:
    """How to rebuild a unit's call from stored rows: which positional/keyword arguments are
    per-row tensors (stored) and which are constants (kept here)."""

    def __init__(self, args: tuple, kwargs: dict, batch: int) -> None:
        self.arg_slots: list[tuple[str, Any]] = []
        self.kw_slots: dict[str, tuple[str, Any]] = {}
        for i, a in enumerate(args):
            self.arg_slots.append(self._slot(f"a{i}", a, batch))
        for k, v in kwargs.items():
            self.kw_slots[k] = self._slot(f"k_{k}", v, batch)

    @staticmethod
    def _slot(key: str, value: Any, batch: int) -> tuple[str, Any]:
        if isinstance(value, Tensor) and value.dim() > 0 and value.shape[0] == batch:
            return ("row", key)
        return ("const", value)

    def rows(self, args: tuple, kwargs: dict, prefix: str) -> dict[str, Tensor]:
        out = {}
        for (kind, key), a in zip(self.arg_slots, args):
            if kind == "row":
                out[prefix + key] = a.detach().cpu()
        for k, (kind, key) in self.kw_slots.items():
            if kind == "row":
                out[prefix + key] = kwargs[k].detach().cpu()
        return out

    def call(self, module: nn.Module, batch: dict[str, Tensor], prefix: str) -> Tensor:
        args = [batch[prefix + key] if kind == "row" else key for kind, key in self.arg_slots]
        kwargs = {
            k: batch[prefix + key] if kind == "row" else key for k, (kind, key) in self.kw_slots.items()
        }
        out = module(*args, **kwargs)
        return out[0] if isinstance(out, (tuple, list)) else out


# ---------------------------------------------------------------------------- row storage
class RowStore:
    """Rows of named tensors (CPU), in memory up to ``budget_bytes`` and in disk shards beyond."""

    def __init__(self, spill_dir: Path, budget_bytes: int) -> None:
        self.spill_dir = spill_dir
        self.budget = budget_bytes
        self.buffer: list[dict[str, Tensor]] = []
        self.buffer_bytes = 0
        self.shards: list[tuple[Path, int]] = []
        self.memory: Optional[dict[str, Tensor]] = None
        self.n_rows = 0

    def append(self, rows: dict[str, Tensor]) -> None:
        self.buffer.append(rows)
        self.buffer_bytes += sum(v.numel() * v.element_size() for v in rows.values())
        self.n_rows += next(iter(rows.values())).shape[0]
        if self.buffer_bytes > self.budget:
            self._spill()

    def _spill(self) -> None:
        data = {k: torch.cat([b[k] for b in self.buffer]) for k in self.buffer[0]}
        path = self.spill_dir / f"rows_{len(self.shards):05d}.pt"
        torch.save(data, path)
        self.shards.append((path, next(iter(data.values())).shape[0]))
        self.buffer, self.buffer_bytes = [], 0

    def finish(self) -> None:
        if not self.buffer:
            return
        if self.shards:
            self._spill()
        else:
            self.memory = {k: torch.cat([b[k] for b in self.buffer]) for k in self.buffer[0]}
            self.buffer = []

    def sample(
        self, n_iters: int, batch_size: int, generator: torch.Generator
    ) -> Iterator[dict[str, Tensor]]:
        """``n_iters`` random batches (without replacement within a batch). On disk: shards are
        visited in random order and each gives about ``rows / batch_size`` batches."""
        done = 0
        while done < n_iters:
            if self.memory is not None:
                sources = [(None, self.n_rows)]
            else:
                perm = torch.randperm(len(self.shards), generator=generator).tolist()
                sources = [self.shards[i] for i in perm]
            for path, n in sources:
                data = self.memory if path is None else torch.load(path, weights_only=True)
                k = n_iters - done if path is None else max(1, n // batch_size)
                for _ in range(min(k, n_iters - done)):
                    idx = torch.randperm(n, generator=generator)[:batch_size]
                    yield {key: v[idx] for key, v in data.items()}
                    done += 1
                if done >= n_iters:
                    return


# ---------------------------------------------------------------------------- losses
def lp_loss(pred: Tensor, target: Tensor, p: float, axis: str = "channels") -> Tensor:
    """``|pred - target|^p`` summed over one axis and averaged over the rest: ``channels`` (dim 1
    of 4-D tensors, the last dim of token tensors) or ``dim1`` (dim 1 whatever the layout, as
    BRECQ's / Q-Diffusion's ``lp_loss``)."""
    err = (pred - target).abs().pow(p)
    if axis == "dim1":
        return err.sum(dim=1).mean()
    if axis != "channels":
        raise ValueError(f"unknown loss axis {axis!r}; use one of {LOSS_AXES}")
    ch = 1 if err.dim() == 4 else err.dim() - 1
    return err.sum(dim=ch).mean()


def _check_finite(loss: Tensor, unit: str, stage: str) -> None:
    if not torch.isfinite(loss):
        knob = "method.recon.weight_lr" if stage == "weight" else "method.recon.act_lr"
        raise FloatingPointError(
            f"block reconstruction of {unit} diverged in the {stage} stage (loss {loss.item()}): "
            f"lower {knob} (or check the calibration data for NaN/inf)"
        )


# ---------------------------------------------------------------------------- engine
@dataclass
class UnitReport:
    name: str
    kind: str
    weight_loss: Optional[float] = None
    act_loss: Optional[float] = None
    capture_s: float = 0.0
    seconds: float = 0.0


@dataclass
class ReconReport:
    units: list[UnitReport] = field(default_factory=list)
    resumed_from: int = 0

    def metrics(self) -> dict[str, float]:
        w = [u.weight_loss for u in self.units if u.weight_loss is not None]
        a = [u.act_loss for u in self.units if u.act_loss is not None]
        out: dict[str, float] = {"recon_units": len(self.units)}
        if w:
            out["recon_weight_loss_mean"] = float(sum(w) / len(w))
        if a:
            out["recon_act_loss_mean"] = float(sum(a) / len(a))
        return out


class Reconstructor:
    """Runs block reconstruction over a quantized denoiser; see the module doc.

    ``on_unit_done(index, report)`` is called after each unit is finished and saved (tests use it
    to interrupt a run). ``skip_weight_layers``: qualified names of layers whose weights are
    already reconstructed (TFMQ-DM's temporal block, :mod:`diffquant.calib.temporal`): no unit
    trains their rounding again; they run weight-quantized as they are.
    """

    def __init__(
        self,
        denoiser: nn.Module,
        spec: Any,
        stream: CalibStream,
        settings: Any,
        *,
        progress_dir: Optional[Path] = None,
        on_unit_done: Optional[Callable[[int, UnitReport], None]] = None,
        skip_weight_layers: Sequence[str] = (),
    ) -> None:
        self.denoiser = denoiser
        self.skip_weight_layers = set(skip_weight_layers)
        self.spec = spec
        self.stream = stream
        self.s: ReconSettings = as_dataclass(settings, ReconSettings)
        self.progress_dir = Path(progress_dir) if progress_dir is not None else None
        if self.progress_dir is not None:
            self.progress_dir.mkdir(parents=True, exist_ok=True)
        self.on_unit_done = on_unit_done
        self.device = next(denoiser.parameters()).device
        self.router = get_router(denoiser)
        self.rows = stream.subset(self.s.max_rows, self.s.seed)

    # -- progress
    def _load_progress(self, unit_names: list[str], report: ReconReport) -> int:
        """Put back the saved state (the base, then each finished unit's quantizers); returns the
        number of finished units (0: nothing saved, or progress of other units)."""
        if self.progress_dir is None or not (self.progress_dir / PROGRESS_FILE).exists():
            return 0
        prog = json.loads((self.progress_dir / PROGRESS_FILE).read_text())
        if prog.get("units") != unit_names or "base" not in prog:
            log.warning("ignoring reconstruction progress in %s: other units", self.progress_dir)
            return 0
        load = functools.partial(torch.load, map_location=self.device, weights_only=True)
        load_quant_state(self.denoiser, load(self.progress_dir / prog["base"]))
        modules = dict(self.denoiser.named_modules())
        for unit_name, file in zip(unit_names, prog["unit_states"]):
            # into the unit's module only: loading a partial state into the whole denoiser would
            # reset the rounding of every quantizer it does not name
            prefix = f"{unit_name}."
            state = {k[len(prefix) :]: v for k, v in load(self.progress_dir / file).items()}
            load_quant_state(modules[unit_name], state)
        report.units = [UnitReport(**u) for u in prog["reports"]]
        log.info(
            "resuming block reconstruction after unit %d/%d (%s)",
            prog["done"],
            len(unit_names),
            unit_names[prog["done"] - 1] if prog["done"] else "-",
        )
        return int(prog["done"])

    def _save_progress(
        self, unit_names: list[str], done: int, report: ReconReport, unit: Optional[Unit] = None
    ) -> None:
        """Save ``done == 0``: the whole quantizer state (the base every unit starts from); after
        unit ``done``: only that unit's quantizers (a unit changes nothing outside itself), so
        each finished unit is written once and the disk written stays about twice one state,
        whatever the number of units. The index is written after the state file it names."""
        if self.progress_dir is None:
            return
        self.progress_dir.mkdir(parents=True, exist_ok=True)
        if unit is None:
            name, state = "state_base.pt", quantizer_state_dict(self.denoiser)
        else:
            prefix = f"{unit.name}."
            name = unit_state_file(done)
            state = {prefix + k: v for k, v in quantizer_state_dict(unit.module).items()}
        atomic_torch_save(state, self.progress_dir / name)
        atomic_write_json(
            self.progress_dir / PROGRESS_FILE,
            {
                "units": unit_names,
                "done": done,
                "base": "state_base.pt",
                "unit_states": [unit_state_file(n) for n in range(1, done + 1)],
                "reports": [asdict(u) for u in report.units],
            },
        )

    # -- main loop
    def run(self) -> ReconReport:
        example = next(self.stream.batches(1, self.rows[:1], device=self.device))
        units = find_units(self.denoiser, self.spec, example)
        names = [u.name for u in units]
        report = ReconReport()
        start = self._load_progress(names, report)
        report.resumed_from = start
        if start == 0:
            self._save_progress(names, 0, report)
        for i in range(start, len(units)):
            check_stop(where=f"block reconstruction: {i} of {len(units)} units done")
            unit = units[i]
            t0 = time.perf_counter()
            unit_report = self._reconstruct_unit(i, unit)
            unit_report.seconds = round(time.perf_counter() - t0, 3)
            report.units.append(unit_report)
            log.info(
                "[%d/%d] %-40s %-11s w_loss=%s a_loss=%s (%.1fs, capture %.1fs)",
                i + 1,
                len(units),
                unit.name,
                unit.kind,
                _fmt(unit_report.weight_loss),
                _fmt(unit_report.act_loss),
                unit_report.seconds,
                unit_report.capture_s,
            )
            self._save_progress(names, i + 1, report, unit)
            if self.on_unit_done is not None:
                self.on_unit_done(i, unit_report)
        return report

    def _reconstruct_unit(self, index: int, unit: Unit) -> UnitReport:
        s = self.s
        rep = UnitReport(unit.name, unit.kind)
        w_layers = [
            m
            for n, m in unit.module.named_modules()
            if is_quant_layer(m)
            and m.weight_quantizer is not None
            and (f"{unit.name}.{n}" if n else unit.name) not in self.skip_weight_layers
        ]
        act_qs = [q for _, q in iter_quantizers(unit.module, "act") if q.bits < SOFTMAX_FP_BITS]
        do_w, do_a = bool(w_layers) and s.weight_iters > 0, bool(act_qs) and s.act_iters > 0
        if s.joint:
            do_w, do_a = (bool(w_layers) or bool(act_qs)) and s.weight_iters > 0, False
        if not (do_w or do_a):
            return rep
        spill = Path(tempfile.mkdtemp(prefix="recon_", dir=self.progress_dir))
        try:
            t0 = time.perf_counter()
            store, spec = self._capture(
                unit,
                with_weight_inputs=do_w and (not s.joint or s.input_keep_prob is not None),
                spill_dir=spill,
                quantized_acts=s.joint,
            )
            rep.capture_s = round(time.perf_counter() - t0, 3)
            if do_w and s.joint:
                torch.manual_seed(s.seed * 7919 + index)
                gen = torch.Generator().manual_seed(s.seed * 7919 + index)
                rep.weight_loss = self._joint_stage(unit, w_layers, act_qs, store, spec, gen)
            elif do_w:
                torch.manual_seed(s.seed * 7919 + index)
                gen = torch.Generator().manual_seed(s.seed * 7919 + index)
                rep.weight_loss = self._weight_stage(unit, w_layers, store, spec, gen)
            if do_a:
                torch.manual_seed(s.seed * 7919 + index + 1_000_003)
                gen = torch.Generator().manual_seed(s.seed * 7919 + index + 1_000_003)
                rep.act_loss = self._act_stage(unit, act_qs, store, spec, gen)
        finally:
            shutil.rmtree(spill, ignore_errors=True)
        return rep

    # -- capture
    @torch.no_grad()
    def _capture(
        self, unit: Unit, with_weight_inputs: bool, spill_dir: Path, quantized_acts: bool = False
    ) -> tuple[RowStore, CallSpec]:
        """Rows of the unit's FP inputs ``fp_*``, its FP output ``y``, time step ``t`` and sampler
        step, and with ``with_weight_inputs`` its inputs in the quantized network ``w_*``
        (weights quantized; activations too with ``quantized_acts``)."""
        store = RowStore(spill_dir, self.s.memory_mb * 2**20)
        spec: Optional[CallSpec] = None
        grabbed: dict[str, Any] = {}

        def pre_hook(mod, args, kwargs):
            grabbed["args"], grabbed["kwargs"] = args, kwargs
            if grabbed["stop_before"]:
                raise StopForward

        def post_hook(mod, args, kwargs, output):
            grabbed["out"] = output[0] if isinstance(output, (tuple, list)) else output
            raise StopForward

        h_pre = unit.module.register_forward_pre_hook(pre_hook, with_kwargs=True)
        h_post = unit.module.register_forward_hook(post_hook, with_kwargs=True)
        try:
            for batch in self.stream.batches(
                self.s.capture_batch_size, self.rows, device=self.device, with_step=True
            ):
                step = batch.pop(STEP_KEY).cpu()
                n = self.spec.batch_size(batch)
                grabbed["stop_before"] = False
                with quant_state(self.denoiser, weights=False, acts=False), sampler_step(self.denoiser, step):
                    _run_until_stop(self.denoiser, batch)
                if spec is None:
                    spec = CallSpec(grabbed["args"], grabbed["kwargs"], n)
                rows = spec.rows(grabbed["args"], grabbed["kwargs"], "fp_")
                rows["y"] = grabbed["out"].detach().cpu()
                rows["t"] = batch[self.spec.timestep_arg].detach().cpu()
                rows["step"] = step  # the sampler step index: routes time-step groups (PNDM repeats a t)
                if with_weight_inputs:
                    grabbed["stop_before"] = True
                    with (
                        quant_state(self.denoiser, weights=True, acts=quantized_acts),
                        sampler_step(self.denoiser, step),
                    ):
                        _run_until_stop(self.denoiser, batch)
                    rows.update(spec.rows(grabbed["args"], grabbed["kwargs"], "w_"))
                store.append(rows)
        finally:
            h_pre.remove()
            h_post.remove()
        store.finish()
        assert spec is not None, f"unit {unit.name} was never called"
        return store, spec

    # -- stages
    def _weight_stage(
        self, unit: Unit, layers: list[nn.Module], store: RowStore, spec: CallSpec, gen: torch.Generator
    ) -> float:
        s = self.s
        roundings: list[AdaRound] = []
        for layer in layers:
            r = layer.weight_quantizer.start_adaround(layer.weight)
            roundings.extend(r if isinstance(r, list) else [r])
        opt = torch.optim.Adam([r.alpha for r in roundings], lr=s.weight_lr)
        schedule = RoundingSchedule(s.weight_iters, s.round_reg, s.warmup, s.beta_start, s.beta_end)
        tail = _Tail(s.weight_iters)
        with quant_state(unit.module, weights=True, acts=False):
            for it, batch in enumerate(store.sample(s.weight_iters, s.batch_size, gen)):
                check_stop(where=f"block reconstruction: {unit.name}, weight iteration {it}")
                batch = {k: v.to(self.device) for k, v in batch.items()}
                out = spec.call(unit.module, batch, "w_")
                rec = lp_loss(out, batch["y"], s.weight_p, s.loss_axis)
                loss = rec + schedule.loss(it, roundings).to(rec.device)
                _check_finite(loss, unit.name, "weight")
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                tail.add(it, rec.item())
        for layer in layers:
            layer.weight_quantizer.harden()
        return tail.mean()

    def _act_stage(
        self, unit: Unit, act_qs: list[ActQuantizer], store: RowStore, spec: CallSpec, gen: torch.Generator
    ) -> float:
        s = self.s
        params = [q.scale for q in act_qs]
        opt = torch.optim.Adam(params, lr=s.act_lr)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=s.act_iters, eta_min=0.0)
        tail = _Tail(s.act_iters)
        with trainable(params), quant_state(unit.module, weights=True, acts=True):
            for it, batch in enumerate(store.sample(s.act_iters, s.batch_size, gen)):
                check_stop(where=f"block reconstruction: {unit.name}, act iteration {it}")
                batch = {k: v.to(self.device) for k, v in batch.items()}
                if self.router is not None:
                    self.router.route(unit.module, batch["t"], batch["step"])
                out = spec.call(unit.module, batch, "fp_")
                loss = lp_loss(out, batch["y"], s.act_p, s.loss_axis)
                _check_finite(loss, unit.name, "act")
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                keep_step_sizes_positive(params)
                tail.add(it, loss.item())
        return tail.mean()

    def _joint_stage(
        self,
        unit: Unit,
        layers: list[nn.Module],
        act_qs: list[ActQuantizer],
        store: RowStore,
        spec: CallSpec,
        gen: torch.Generator,
    ) -> float:
        """QDrop's ``order=together`` (see :class:`ReconSettings`): AdaRound α and activation
        step sizes in one optimisation, activations dropped with ``keep_prob``, the unit's input
        mixed element-wise between the quantized and the FP network's with ``input_keep_prob``."""
        s = self.s
        uninitialised = [q for q in act_qs if not bool(q.initialized)]
        if uninitialised:
            raise RuntimeError(
                f"joint reconstruction of {unit.name}: activation ranges are not initialised "
                "(initialise them before reconstruction: act_init_stage=before_recon)"
            )
        roundings: list[AdaRound] = []
        for layer in layers:
            r = layer.weight_quantizer.start_adaround(layer.weight)
            roundings.extend(r if isinstance(r, list) else [r])
        scales = [q.scale for q in act_qs]
        opts = [torch.optim.Adam([r.alpha for r in roundings], lr=s.weight_lr)] if roundings else []
        scheds = []
        if scales:
            opts.append(torch.optim.Adam(scales, lr=s.act_lr))
            scheds.append(
                torch.optim.lr_scheduler.CosineAnnealingLR(opts[-1], T_max=s.weight_iters, eta_min=0.0)
            )
        schedule = RoundingSchedule(s.weight_iters, s.round_reg, s.warmup, s.beta_start, s.beta_end)
        tail = _Tail(s.weight_iters)
        with (
            trainable(scales),
            quant_state(unit.module, weights=True, acts=True),
            activation_drop(unit.module, s.keep_prob),
        ):
            for it, batch in enumerate(store.sample(s.weight_iters, s.batch_size, gen)):
                check_stop(where=f"block reconstruction: {unit.name}, joint iteration {it}")
                batch = {k: v.to(self.device) for k, v in batch.items()}
                if s.input_keep_prob is not None:
                    batch = mix_inputs(batch, s.input_keep_prob)
                if self.router is not None:
                    self.router.route(unit.module, batch["t"], batch["step"])
                out = spec.call(unit.module, batch, "fp_")
                rec = lp_loss(out, batch["y"], s.weight_p, s.loss_axis)
                loss = rec + schedule.loss(it, roundings).to(rec.device) if roundings else rec
                _check_finite(loss, unit.name, "weight")
                for opt in opts:
                    opt.zero_grad(set_to_none=True)
                loss.backward()
                for opt in opts:
                    opt.step()
                for sched in scheds:
                    sched.step()
                keep_step_sizes_positive(scales)
                tail.add(it, rec.item())
        for layer in layers:
            layer.weight_quantizer.harden()
        return tail.mean()


def mix_inputs(batch: dict[str, Tensor], keep_prob: float) -> dict[str, Tensor]:
    """QDrop's input mixing: each floating-point input ``fp_<k>`` element replaced by the
    quantized network's ``w_<k>`` with probability ``keep_prob`` (a fresh mask from the global
    generator); other entries unchanged."""
    out = dict(batch)
    for key, fp in batch.items():
        q = batch.get("w_" + key[3:]) if key.startswith("fp_") else None
        if q is not None and fp.is_floating_point():
            out[key] = torch.where(torch.rand_like(fp) < keep_prob, q, fp)
    return out


class _Tail:
    """Mean of the loss over the last 10% of iterations (the reported final loss)."""

    def __init__(self, iters: int) -> None:
        self.start = iters - max(1, math.ceil(iters / 10))
        self.values: list[float] = []

    def add(self, it: int, value: float) -> None:
        if it >= self.start:
            self.values.append(value)

    def mean(self) -> float:
        return float(sum(self.values) / max(len(self.values), 1))


def _run_until_stop(denoiser: nn.Module, batch: dict[str, Tensor]) -> None:
    try:
        denoiser(**batch)
    except StopForward:
        return
    raise RuntimeError("capture hook did not fire: the unit is not on the denoiser's forward path")


def _fmt(x: Optional[float]) -> str:
    return "-" if x is None else f"{x:.4g}"


def reconstruct(
    denoiser: nn.Module,
    spec: Any,
    stream: CalibStream,
    settings: Any,
    *,
    progress_dir: Optional[Path] = None,
    on_unit_done: Optional[Callable[[int, UnitReport], None]] = None,
    skip_weight_layers: Sequence[str] = (),
) -> ReconReport:
    """Block-reconstruct the quantized ``denoiser`` (weights by AdaRound, then activation step sizes
    by LSQ, unit by unit); resumable through ``progress_dir``. See the module doc. Only what a
    stage trains requires a gradient while it runs (every other parameter is frozen, and its flag
    restored afterwards)."""
    flags = [(p, p.requires_grad) for p in denoiser.parameters()]
    denoiser.requires_grad_(False)
    try:
        return Reconstructor(
            denoiser,
            spec,
            stream,
            settings,
            progress_dir=progress_dir,
            on_unit_done=on_unit_done,
            skip_weight_layers=skip_weight_layers,
        ).run()
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
