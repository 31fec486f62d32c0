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
so no more than one unit's data (and at most ``memory_mb`` of it in RAM) is ever held; a unit's
shards are deleted when the unit ends (and those a killed run left, when the next one starts),
so the disk used does not grow with the number of units. ``disk_budget_gb`` bounds one unit's
shards: a unit whose rows would exceed it is reconstructed on a seeded subset of the rows that
fits, with a warning (:class:`ReconSettings`). Each stage reads only the stored entries it uses
(the weight stage the quantized network's inputs, the activation stage the FP network's).

Progress goes to ``progress_dir``, atomically (temporary file, then rename): the whole quantizer
state once before the first unit (``state_base.pt``), then after each finished unit that unit's
quantizers only (``unit_<n>.pt``: a unit changes nothing outside itself), each written once, and
the index ``progress.json`` with each file's SHA-256; a stopped calibration resumes after the
last finished unit and gives the same result as an uninterrupted one (every unit's optimisation
is seeded by its index). A file that does not match its digest or does not load is redone with
a warning: an unusable unit file resumes before that unit, an unusable base starts over.

The optimisation loops read nothing back to the host per iteration: the losses stay on the
device and are read every :data:`LOSS_READ_EVERY` iterations and at the end of a stage, when a
non-finite loss raises (naming the unit, the stage and the learning rate to lower).

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

import contextlib
import functools
import json
import logging
import math
import pickle
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Optional

import torch
from torch import Tensor, nn

from diffquant.cache import atomic_torch_save, atomic_write_json, file_digest
from diffquant.calib.collect import STEP_KEY, CalibStream
from diffquant.memory import release_freed_memory, reusing_freed_memory
from diffquant.quant.adaround import AdaRound, RoundingSchedule
from diffquant.quant.checkpoint import load_quant_state, quantizer_state_dict
from diffquant.quant.modules import is_quant_layer
from diffquant.quant.quantizers import ActQuantizer
from diffquant.quant.state import (
    activation_drop,
    frozen_weights,
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
#: a unit's capture folder (its :class:`RowStore` shards) in ``progress_dir``, deleted with the unit
SPILL_PREFIX = "recon_"


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
        disk_budget_gb: the most disk (GB, 2**30 bytes) a unit's captured rows may take; None = no
            bound. A unit's rows go to disk only when they exceed ``memory_mb`` (then all of
            them do), so when all calibration rows of a unit would take more than both, only the
            first ``N = floor(max(disk_budget_gb, memory_mb) / bytes_per_row)`` rows of a seeded
            permutation (seed ``seed``; kept in stream order) are captured and trained on for
            that unit, and a warning names this setting and ``N``. The subsets of different units
            are prefixes of the same permutation (nested). ``bytes_per_row`` is measured on the
            unit's first capture batch (FP inputs, quantized inputs, FP output, time step, step),
            which is captured again when the unit is capped. 0 = nothing on disk.
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
        autocast: ``bf16`` runs the unit's forward (and so its backward) in every stage under
            ``torch.autocast`` with bfloat16 (the convolutions and matmuls in bf16, the loss in
            FP32); None = FP32 throughout (the papers' setting). A speed switch: the values
            change (``make bench-scale ARGS='--autocast bf16'`` measures it).
        compile: the AdaRound stages' per-weight work, the soft rounding and the rounding
            regulariser (forward and backward), as one ``torch.compile``'d kernel each way
            (:mod:`~diffquant.quant.adaround`: the same expressions, the power as exp-log, the
            backward recomputing the forward; under ``autocast`` the soft-rounded weight is
            written in bf16), and α's Adam update as its fused kernel.
            Compiled once per process and tensor rank (10–20 s each on 2 CPU cores; needs a C++
            compiler on CPU, Triton on CUDA). A speed switch for long runs: the values agree
            with the eager kernels to float rounding (``make bench-scale`` measures it).
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
    disk_budget_gb: Optional[float] = None
    seed: int = 0
    joint: bool = False
    keep_prob: Optional[float] = None
    input_keep_prob: Optional[float] = None
    autocast: Optional[str] = None
    compile: bool = False

    #: left out of cache keys at these values (:func:`~diffquant.quant.typed.key_dict`)
    KEY_NEUTRAL_DEFAULTS: ClassVar[dict[str, Any]] = {
        "joint": False,
        "keep_prob": None,
        "input_keep_prob": None,
        "disk_budget_gb": None,
        "autocast": None,
        "compile": False,
    }
    #: results of ``compile=true`` are recomputed once when its kernels change: 2: the regulariser in
    #: the soft rounding's kernel, backward recomputing the forward, exp-log power, fused Adam
    KEY_CODE_VERSIONS: ClassVar[dict[str, int]] = {"compile": 2}

    def __post_init__(self) -> None:
        positive(self, "weight_iters", "act_iters", allow_zero=True)
        if self.disk_budget_gb is not None and not self.disk_budget_gb >= 0:  # NaN too
            raise InvalidSetting(
                "disk_budget_gb",
                "is not a disk size: use GB >= 0, or null for no bound",
            )
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
        one_of(self, "autocast", (None, "bf16"))


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

    def keys(self, prefix: str) -> list[str]:
        """The stored row keys a call with ``prefix`` reads, in the order :meth:`rows` stores them."""
        slots = [*self.arg_slots, *self.kw_slots.values()]
        return [prefix + key for kind, key in slots if kind == "row"]

    def call(self, module: nn.Module, batch: dict[str, Tensor], prefix: str) -> Tensor:
        args = [batch[prefix + key] if kind == "row" else key for kind, key in self.arg_slots]
        kwargs = {
            k: batch[prefix + key] if kind == "row" else key for k, (kind, key) in self.kw_slots.items()
        }
        out = module(*args, **kwargs)
        return out[0] if isinstance(out, (tuple, list)) else out


# ---------------------------------------------------------------------------- row storage
class RowStore:
    """Rows of named tensors (CPU; each ``(N, ...)``, one row per calibration row), in memory up to
    ``budget_bytes`` and in disk shards (``spill_dir/rows_<k>.pt``) beyond: once the rows exceed
    the budget, all of them go to disk."""

    def __init__(self, spill_dir: Path, budget_bytes: int) -> None:
        self.spill_dir = spill_dir
        self.budget = budget_bytes
        self.buffer: list[dict[str, Tensor]] = []
        self.buffer_bytes = 0
        self.shards: list[tuple[Path, int]] = []
        self.memory: Optional[dict[str, Tensor]] = None
        self.n_rows = 0
        self.bytes = 0  # of the tensors appended (shard files add a few kB each)

    def append(self, rows: dict[str, Tensor]) -> None:
        self.buffer.append(rows)
        added = sum(v.numel() * v.element_size() for v in rows.values())
        self.buffer_bytes += added
        self.bytes += added
        self.n_rows += next(iter(rows.values())).shape[0]
        if self.buffer_bytes > self.budget:
            self._spill()

    def _spill(self) -> None:
        data = {k: torch.cat([b[k] for b in self.buffer]) for k in self.buffer[0]}
        path = self.spill_dir / f"rows_{len(self.shards):05d}.pt"
        torch.save(data, path)
        self.shards.append((path, next(iter(data.values())).shape[0]))
        self.buffer, self.buffer_bytes = [], 0

    def discard(self) -> None:
        """Drop every row: the shard files are deleted."""
        for path, _ in self.shards:
            path.unlink(missing_ok=True)
        self.buffer, self.buffer_bytes, self.shards, self.memory = [], 0, [], None
        self.n_rows = self.bytes = 0

    def finish(self) -> None:
        if not self.buffer:
            return
        if self.shards:
            self._spill()
        else:
            self.memory = {k: torch.cat([b[k] for b in self.buffer]) for k in self.buffer[0]}
            self.buffer = []

    def sample(
        self,
        n_iters: int,
        batch_size: int,
        generator: torch.Generator,
        keys: Optional[Sequence[str]] = None,
    ) -> Iterator[dict[str, Tensor]]:
        """``n_iters`` random batches (without replacement within a batch) of the entries
        ``keys`` (None: all; each ``(batch_size, ...)``, in the store's key order). On disk:
        shards are visited in random order and each gives about ``rows / batch_size`` batches;
        a shard is memory-mapped, so only the rows of the entries asked for are read. The
        batches drawn depend on ``generator`` only, not on ``keys``."""
        wanted = None if keys is None else set(keys)
        done = 0
        while done < n_iters:
            if self.memory is not None:
                sources = [(None, self.n_rows)]
            else:
                perm = torch.randperm(len(self.shards), generator=generator).tolist()
                sources = [self.shards[i] for i in perm]
            for path, n in sources:
                data = self.memory if path is None else torch.load(path, weights_only=True, mmap=True)
                if wanted is not None:
                    missing = wanted - set(data)
                    if missing:
                        raise KeyError(f"rows without {sorted(missing)}: they were not captured")
                    data = {key: v for key, v in data.items() if key in wanted}
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


def _check_finite(loss: Tensor, unit: str, stage: str, iteration: Optional[int] = None) -> None:
    """Raise :class:`FloatingPointError` naming ``unit``, ``stage`` and the learning rate to lower
    if the scalar ``loss`` is NaN/inf (reads it: a host sync on an accelerator)."""
    if not torch.isfinite(loss):
        knob = "method.recon.weight_lr" if stage == "weight" else "method.recon.act_lr"
        at = "" if iteration is None else f" at iteration {iteration}"
        raise FloatingPointError(
            f"block reconstruction of {unit} diverged in the {stage} stage{at} (loss {loss.item()}): "
            f"lower {knob} (or check the calibration data for NaN/inf)"
        )


#: iterations between two reads of a stage's losses (finiteness check, reported tail): the only
#: host syncs of the optimisation loop, so a divergence is reported up to this many iterations late
LOSS_READ_EVERY = 50


class _LossLog:
    """A stage's per-iteration losses kept on their device and read every
    :data:`LOSS_READ_EVERY` iterations and at :meth:`finish`: then the first non-finite
    optimised loss raises :func:`_check_finite`'s error, and the reconstruction terms of the
    tail iterations go to a :class:`_Tail` (the same floats as reading each one at once)."""

    def __init__(self, iters: int, unit: str, stage: str) -> None:
        self.tail = _Tail(iters)
        self.unit, self.stage = unit, stage
        self.pending: list[tuple[int, Tensor, Tensor]] = []

    def add(self, it: int, rec: Tensor, loss: Tensor) -> None:
        """Iteration ``it``'s reconstruction term ``rec`` (reported) and optimised ``loss``
        (checked), both 0-d."""
        self.pending.append((it, rec.detach(), loss.detach()))
        if len(self.pending) >= LOSS_READ_EVERY:
            self._read()

    def _read(self) -> None:
        if not self.pending:
            return
        its = [it for it, _, _ in self.pending]
        # float64 holds every float32/16 value exactly: one transfer, the same Python floats
        recs = torch.stack([r for _, r, _ in self.pending]).to(torch.float64)
        losses = torch.stack([x for _, _, x in self.pending]).to(torch.float64)
        recs, losses = torch.stack([recs, losses]).cpu()
        self.pending = []
        bad = (~torch.isfinite(losses)).nonzero()
        if bad.numel():
            first = int(bad[0, 0])
            _check_finite(losses[first], self.unit, self.stage, its[first])
        for it, value in zip(its, recs.tolist()):
            self.tail.add(it, value)

    def finish(self) -> float:
        """Read what is pending; the mean of the tail's reconstruction terms."""
        self._read()
        return self.tail.mean()


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
        self._digests: dict[str, str] = {}  # SHA-256 of each progress file written or verified

    # -- progress
    def _read_state(
        self, file: str, digests: dict[str, str], prefix: str = ""
    ) -> Optional[dict[str, Tensor]]:
        """The state saved in ``progress_dir/file`` if it is intact: its SHA-256 equals the one
        the index recorded (indexes written before digests were recorded: it loads), it loads
        and every key starts with ``prefix``; else None, with a warning naming the file."""
        assert self.progress_dir is not None
        path = self.progress_dir / file
        try:
            if file in digests and file_digest(path) != digests[file]:
                raise ValueError("its SHA-256 is not the one the index recorded (a partial or corrupt write)")
            state = torch.load(path, map_location=self.device, weights_only=True)
            if not isinstance(state, dict) or not all(k.startswith(prefix) for k in state):
                raise ValueError(f"it does not hold the quantizer state of {prefix[:-1] or 'the denoiser'}")
        except (OSError, RuntimeError, EOFError, ValueError, pickle.UnpicklingError) as e:
            log.warning("reconstruction progress %s is unusable (%s): it is redone", path, e)
            return None
        return state

    def _load_progress(self, unit_names: list[str], report: ReconReport) -> int:
        """Put back the saved state (the base, then each finished unit's quantizers); returns the
        number of finished units put back (0: nothing saved, or progress of other units).

        Every file is verified before it is used (:meth:`_read_state`): an unusable base means
        starting over; an unusable unit file means resuming before that unit (its unit and
        every later one are redone, which gives the same result: each unit's optimisation
        depends only on the units before it and on its index)."""
        self._digests = {}
        if self.progress_dir is None or not (self.progress_dir / PROGRESS_FILE).exists():
            return 0
        try:
            prog = json.loads((self.progress_dir / PROGRESS_FILE).read_text())
        except (OSError, ValueError) as e:
            log.warning("ignoring reconstruction progress in %s: unreadable index (%s)", self.progress_dir, e)
            return 0
        if prog.get("units") != unit_names or "base" not in prog:
            log.warning("ignoring reconstruction progress in %s: other units", self.progress_dir)
            return 0
        digests: dict[str, str] = prog.get("digests", {})
        base = self._read_state(prog["base"], digests)
        if base is None:
            return 0
        load_quant_state(self.denoiser, base)
        self._digests[prog["base"]] = digests.get(prog["base"], "")
        modules = dict(self.denoiser.named_modules())
        done = 0
        for unit_name, file in zip(unit_names, prog["unit_states"][: int(prog["done"])]):
            # into the unit's module only: loading a partial state into the whole denoiser would
            # reset the rounding of every quantizer it does not name
            prefix = f"{unit_name}."
            state = self._read_state(file, digests, prefix)
            if state is None:
                break
            load_quant_state(modules[unit_name], {k[len(prefix) :]: v for k, v in state.items()})
            self._digests[file] = digests.get(file, "")
            done += 1
        report.units = [UnitReport(**u) for u in prog["reports"][:done]]
        log.info(
            "resuming block reconstruction after unit %d/%d (%s)",
            done,
            len(unit_names),
            unit_names[done - 1] if done else "-",
        )
        return done

    def _save_progress(
        self, unit_names: list[str], done: int, report: ReconReport, unit: Optional[Unit] = None
    ) -> None:
        """Save ``done == 0``: the whole quantizer state (the base every unit starts from); after
        unit ``done``: only that unit's quantizers (a unit changes nothing outside itself), so
        each finished unit is written once and the bytes written over a run are the base (no
        rounding choices yet) plus the units' states, about one final state whatever the number
        of units. Each file is written to a temporary name and renamed; the index
        ``progress.json`` (with each file's SHA-256, checked on resume) is written the same way
        after the state file it names."""
        if self.progress_dir is None:
            return
        self.progress_dir.mkdir(parents=True, exist_ok=True)
        if unit is None:
            name, state = "state_base.pt", quantizer_state_dict(self.denoiser)
            self._digests = {}
        else:
            prefix = f"{unit.name}."
            name = unit_state_file(done)
            state = {prefix + k: v for k, v in quantizer_state_dict(unit.module).items()}
        atomic_torch_save(state, self.progress_dir / name)
        self._digests[name] = file_digest(self.progress_dir / name)
        files = ["state_base.pt", *(unit_state_file(n) for n in range(1, done + 1))]
        atomic_write_json(
            self.progress_dir / PROGRESS_FILE,
            {
                "units": unit_names,
                "done": done,
                "base": "state_base.pt",
                "unit_states": files[1:],
                "digests": {f: self._digests[f] for f in files if self._digests.get(f)},
                "reports": [asdict(u) for u in report.units],
            },
        )

    def _remove_stale_captures(self) -> None:
        """Delete capture folders (``recon_*``) a killed run left in ``progress_dir``: a unit's
        captured rows are deleted when the unit ends, but not when the process is killed."""
        if self.progress_dir is None:
            return
        for folder in self.progress_dir.glob(f"{SPILL_PREFIX}*"):
            if folder.is_dir():
                log.info("removing the captures a stopped run left: %s", folder)
                shutil.rmtree(folder, ignore_errors=True)

    # -- main loop
    def run(self) -> ReconReport:
        example = next(self.stream.batches(1, self.rows[:1], device=self.device))
        units = find_units(self.denoiser, self.spec, example)
        names = [u.name for u in units]
        report = ReconReport()
        self._remove_stale_captures()
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
            release_freed_memory()  # the unit's captures and graphs: not kept resident for the next
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
        spill = Path(tempfile.mkdtemp(prefix=SPILL_PREFIX, dir=self.progress_dir))
        try:
            t0 = time.perf_counter()
            store, spec = self._capture(
                unit,
                with_weight_inputs=do_w and (not s.joint or s.input_keep_prob is not None),
                spill_dir=spill,
                quantized_acts=s.joint,
            )
            rep.capture_s = round(time.perf_counter() - t0, 3)
            with self._stage_memory():
                if do_w and s.joint:
                    gen = _seeded(s.seed * 7919 + index)
                    rep.weight_loss = self._joint_stage(unit, w_layers, act_qs, store, spec, gen)
                elif do_w:
                    gen = _seeded(s.seed * 7919 + index)
                    rep.weight_loss = self._weight_stage(unit, w_layers, store, spec, gen)
                if do_a:
                    gen = _seeded(s.seed * 7919 + index + 1_000_003)
                    rep.act_loss = self._act_stage(unit, act_qs, store, spec, gen)
        finally:
            shutil.rmtree(spill, ignore_errors=True)
        return rep

    def _stage_memory(self) -> contextlib.AbstractContextManager:
        """The stages' allocator setting: on CPU, freed blocks kept for the next iteration
        (:func:`~diffquant.memory.reusing_freed_memory`: no page faults for the tensors every
        iteration allocates again; values unchanged)."""
        return reusing_freed_memory() if self.device.type == "cpu" else contextlib.nullcontext()

    # -- capture
    @torch.no_grad()
    def _capture(
        self, unit: Unit, with_weight_inputs: bool, spill_dir: Path, quantized_acts: bool = False
    ) -> tuple[RowStore, CallSpec]:
        """Rows of the unit's FP inputs ``fp_*``, its FP output ``y``, time step ``t`` and sampler
        step, and with ``with_weight_inputs`` its inputs in the quantized network ``w_*``
        (weights quantized; activations too with ``quantized_acts``): of every calibration row,
        or with ``disk_budget_gb`` of as many as fit (:class:`ReconSettings`)."""
        capture = functools.partial(
            self._capture_rows,
            unit,
            with_weight_inputs=with_weight_inputs,
            spill_dir=spill_dir,
            quantized_acts=quantized_acts,
        )
        store, spec, n_fit = capture(self.rows, check_budget=self.s.disk_budget_gb is not None)
        if n_fit is None:
            return store, spec
        store, spec, _ = capture(self.budget_rows(n_fit), check_budget=False)
        return store, spec

    def budget_rows(self, n: int) -> Tensor:
        """The calibration rows a unit capped by ``disk_budget_gb`` uses: the first ``n`` of a
        permutation of :attr:`rows` seeded by ``seed``, in stream order (global row indices)."""
        g = torch.Generator().manual_seed(self.s.seed)
        pick = torch.randperm(len(self.rows), generator=g)[:n].sort().values
        return self.rows[pick]

    def _rows_that_fit(self, unit: Unit, rows: dict[str, Tensor], n_total: int) -> Optional[int]:
        """``N`` (:class:`ReconSettings` ``disk_budget_gb``) from one captured batch ``rows``, or
        None when all ``n_total`` rows fit."""
        n = next(iter(rows.values())).shape[0]
        row_bytes = sum(v.numel() * v.element_size() for v in rows.values()) / n
        budget_gb = float(self.s.disk_budget_gb)  # type: ignore[arg-type]
        limit = max(budget_gb * 2**30, self.s.memory_mb * 2**20)
        if n_total * row_bytes <= limit:
            return None
        n_fit = int(limit // row_bytes)
        if n_fit < 1:
            raise InvalidSetting(
                "disk_budget_gb",
                f"({budget_gb} GB, memory_mb={self.s.memory_mb}) holds no row of unit {unit.name} "
                f"({row_bytes / 2**20:.2f} MB a row): raise method.recon.disk_budget_gb",
            )
        log.warning(
            "unit %s: its %d calibration rows would take %.2f GB (%.2f MB a row), over "
            "method.recon.disk_budget_gb=%s: reconstructing it on %d rows (a subset seeded by "
            "method.recon.seed)",
            unit.name,
            n_total,
            n_total * row_bytes / 2**30,
            row_bytes / 2**20,
            budget_gb,
            n_fit,
        )
        return n_fit

    def _capture_rows(
        self,
        unit: Unit,
        calib_rows: Tensor,
        *,
        with_weight_inputs: bool,
        spill_dir: Path,
        quantized_acts: bool,
        check_budget: bool,
    ) -> tuple[RowStore, CallSpec, Optional[int]]:
        """:meth:`_capture` of the calibration rows ``calib_rows`` (global indices). With
        ``check_budget``, after the first batch: when all would not fit in ``disk_budget_gb``,
        stops, deletes what it captured and returns the number of rows that fit as the third
        item (else None)."""
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
                self.s.capture_batch_size, calib_rows, device=self.device, with_step=True
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
                if check_budget:
                    check_budget = False
                    n_fit = self._rows_that_fit(unit, rows, len(calib_rows))
                    if n_fit is not None:
                        store.discard()
                        assert spec is not None
                        return store, spec, n_fit
        finally:
            h_pre.remove()
            h_post.remove()
        store.finish()
        assert spec is not None, f"unit {unit.name} was never called"
        return store, spec, None

    # -- stages
    def _weight_stage(
        self, unit: Unit, layers: list[nn.Module], store: RowStore, spec: CallSpec, gen: torch.Generator
    ) -> float:
        s = self.s
        roundings = self._start_roundings(layers)
        opt = self._rounding_optimizer(roundings)
        schedule = RoundingSchedule(s.weight_iters, s.round_reg, s.warmup, s.beta_start, s.beta_end)
        losses = _LossLog(s.weight_iters, unit.name, "weight")
        keys = [*spec.keys("w_"), "y"]  # the quantized network's inputs and the FP output only
        with quant_state(unit.module, weights=True, acts=False):
            for it, batch in enumerate(store.sample(s.weight_iters, s.batch_size, gen, keys)):
                check_stop(where=f"block reconstruction: {unit.name}, weight iteration {it}")
                batch = {k: v.to(self.device) for k, v in batch.items()}
                schedule.announce(it, roundings)
                with self._autocast():
                    out = spec.call(unit.module, batch, "w_")
                rec = lp_loss(out, batch["y"], s.weight_p, s.loss_axis)
                loss = rec + schedule.loss(it, roundings).to(rec.device)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                losses.add(it, rec, loss)
        tail = losses.finish()
        for layer in layers:
            layer.weight_quantizer.harden()
        return tail

    def _act_stage(
        self, unit: Unit, act_qs: list[ActQuantizer], store: RowStore, spec: CallSpec, gen: torch.Generator
    ) -> float:
        s = self.s
        params = [q.scale for q in act_qs]
        opt = torch.optim.Adam(params, lr=s.act_lr)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=s.act_iters, eta_min=0.0)
        losses = _LossLog(s.act_iters, unit.name, "act")
        keys = self._stage_keys(spec, "fp_", with_weight_inputs=False)
        # the weights' rounding is final here: each is quantized once for the stage, not per iteration
        with (
            trainable(params),
            quant_state(unit.module, weights=True, acts=True),
            frozen_weights(unit.module),
        ):
            for it, batch in enumerate(store.sample(s.act_iters, s.batch_size, gen, keys)):
                check_stop(where=f"block reconstruction: {unit.name}, act iteration {it}")
                batch = self._to_device(batch)
                if self.router is not None:
                    self.router.route(unit.module, batch["t"], batch["step"])
                with self._autocast():
                    out = spec.call(unit.module, batch, "fp_")
                loss = lp_loss(out, batch["y"], s.act_p, s.loss_axis)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                keep_step_sizes_positive(params)
                losses.add(it, loss, loss)
        return losses.finish()

    def _start_roundings(self, layers: list[nn.Module]) -> list[AdaRound]:
        """Start AdaRound on every weight quantizer of ``layers`` (two per split layer): the α
        the stage trains, compiled kernels with ``compile``."""
        roundings: list[AdaRound] = []
        for layer in layers:
            r = layer.weight_quantizer.start_adaround(layer.weight)
            roundings.extend(r if isinstance(r, list) else [r])
        for r in roundings:
            r.compiled = self.s.compile
        return roundings

    def _rounding_optimizer(self, roundings: list[AdaRound]) -> torch.optim.Adam:
        """Adam (lr ``weight_lr``) on the roundings' α; with ``compile`` its fused kernel (one
        pass over the weights per step instead of about ten; the same update to float
        rounding)."""
        fused = True if self.s.compile else None
        return torch.optim.Adam([r.alpha for r in roundings], lr=self.s.weight_lr, fused=fused)

    def _autocast(self) -> contextlib.AbstractContextManager:
        """The unit forward's precision in the stages (``autocast``; the loss stays FP32)."""
        if self.s.autocast is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16)

    def _stage_keys(self, spec: CallSpec, prefix: str, with_weight_inputs: bool) -> list[str]:
        """The stored entries a stage calling the unit with ``prefix`` inputs reads: those inputs,
        the target ``y``, ``t`` and ``step`` when a time-step router routes the rows, and with
        ``with_weight_inputs`` the quantized network's inputs ``w_*`` (the joint stage's mixing)."""
        keys = [*spec.keys(prefix), "y"]
        if self.router is not None:
            keys += ["t", "step"]
        if with_weight_inputs:
            keys += spec.keys("w_")
        return keys

    def _to_device(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """The batch's tensors on the model's device, but ``t`` and ``step``: they only route
        time-step groups, which the router computes on the CPU (no device-to-host copy)."""
        return {k: v if k in ("t", "step") else v.to(self.device) for k, v in batch.items()}

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
        roundings = self._start_roundings(layers)
        scales = [q.scale for q in act_qs]
        opts = [self._rounding_optimizer(roundings)] if roundings else []
        scheds = []
        if scales:
            opts.append(torch.optim.Adam(scales, lr=s.act_lr))
            scheds.append(
                torch.optim.lr_scheduler.CosineAnnealingLR(opts[-1], T_max=s.weight_iters, eta_min=0.0)
            )
        schedule = RoundingSchedule(s.weight_iters, s.round_reg, s.warmup, s.beta_start, s.beta_end)
        losses = _LossLog(s.weight_iters, unit.name, "weight")
        keys = self._stage_keys(spec, "fp_", with_weight_inputs=s.input_keep_prob is not None)
        with (
            trainable(scales),
            quant_state(unit.module, weights=True, acts=True),
            activation_drop(unit.module, s.keep_prob),
        ):
            for it, batch in enumerate(store.sample(s.weight_iters, s.batch_size, gen, keys)):
                check_stop(where=f"block reconstruction: {unit.name}, joint iteration {it}")
                batch = self._to_device(batch)
                if s.input_keep_prob is not None:
                    batch = mix_inputs(batch, s.input_keep_prob)
                if self.router is not None:
                    self.router.route(unit.module, batch["t"], batch["step"])
                schedule.announce(it, roundings)
                with self._autocast():
                    out = spec.call(unit.module, batch, "fp_")
                rec = lp_loss(out, batch["y"], s.weight_p, s.loss_axis)
                loss = rec + schedule.loss(it, roundings).to(rec.device) if roundings else rec
                for opt in opts:
                    opt.zero_grad(set_to_none=True)
                loss.backward()
                for opt in opts:
                    opt.step()
                for sched in scheds:
                    sched.step()
                keep_step_sizes_positive(scales)
                losses.add(it, rec, loss)
        tail = losses.finish()
        for layer in layers:
            layer.weight_quantizer.harden()
        return tail


def _seeded(seed: int) -> torch.Generator:
    """Seed the global generator (dropout masks, QDrop's input mixing) with ``seed`` and return a
    generator seeded the same (the stage's row sampling)."""
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


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
