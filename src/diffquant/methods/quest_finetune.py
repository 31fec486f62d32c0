"""QuEST's selective finetuning engine: which parameters train in each stage, and the loop.

Two stages run in order on a quantized denoiser (weights hard-rounded by PTQ, activations
time-step aware):

* **TLA** (Temporal Layer Alignment) — the layers that project the time embedding into each
  block (the denoiser's ``time_projection`` role: a diffusers ``ResnetBlock2D``'s projection, the
  ``emb_layers.1`` of the QuEST code): their FP latent weights and biases, and the step sizes of
  their input activation quantizers.
* **CMA** (Critical Module Alignment) — the critical layers (attention projections, feed-forward
  layers: roles or name patterns, see :mod:`diffquant.methods.quest`): their latent weights and
  biases; and
  the step sizes of *every* activation quantizer below 16 bits not trained in TLA (all layer
  inputs, attention q/k/v and softmax probabilities), as the QuEST code does, except the inputs
  of the layers in ``cma_exclude_act_layers`` (the QuEST code leaves the time-embedding MLP's
  out: ``"emb" not in n``, ``qdiff/post_layer_recon_*.py`` line 64/65).

Latent weights train through the straight-through estimator with the AdaRound choices frozen:
the quantized weight is ``(clamp(floor(W/Δ) + round_up + z) - z) · Δ`` and ``floor`` passes the
gradient through (weight Δ, z and ``round_up`` stay fixed).

Loss of a stage, per batch of calibration rows (Eq. 4-7 of the paper)::

    L = [Σ_{l in stage layers} mean((Õ_l - O_l)²)]  +  λ · mean((ε̃ - ε)²)

``O_l`` / ``ε`` are the outputs of layer ``l`` / of the whole denoiser in the FP model on the same
inputs (:class:`FPTeacher`: quantization off and the trained parameters' pretrained values
swapped in, so the teacher never drifts); ``Õ_l`` / ``ε̃`` are those of the quantized model, whose
layer inputs are themselves quantized-path values (the paper's ``ž``). The caller chooses λ and
whether the local term is there (:func:`diffquant.methods.quest.stage_loss_weights`: the
paper's λ = 2 with both terms, or the QuEST code's λ = K, the stage's number of layers, with
CMA's local term only in its SD script).

Rows are drawn ``samples_per_step`` per recorded calibration step and shuffled across steps every
epoch (the QuEST code loops over steps one at a time); each row routes to its own time-step group
by its sampler step index (``_step``, :func:`~diffquant.quant.timestep.sampler_step`).
Optimiser: Adam, ``weight_lr`` for weights/biases and ``act_lr`` for step sizes, fresh per stage.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import logging
import re
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from diffquant.calib.collect import STEP_KEY, CalibStream
from diffquant.quant.modules import is_quant_layer
from diffquant.quant.state import keep_step_sizes_positive, quant_parameters, quant_state
from diffquant.quant.timestep import sampler_step

log = logging.getLogger(__name__)

MAX_TRAINED_ACT_BITS = 15  # 16-bit (softmax) quantizers are left alone, as in Q-Diffusion's LSQ


def _matches(name: str, patterns: Sequence[str]) -> bool:
    return any(re.search(p, name) for p in patterns)


# ---------------------------------------------------------------------------- what trains
@dataclass
class Stage:
    """One finetuning stage.

    Attributes:
        name: ``tla`` or ``cma``.
        layers: quantized layers (by qualified name) whose weights train and whose outputs the
            local loss compares.
        weights: their latent weights and (optionally) biases, by qualified parameter name.
        act_scales: activation step sizes ``(G, C)`` trained in this stage, by name.
        epochs: passes over the training rows.
    """

    name: str
    layers: dict[str, nn.Module]
    weights: dict[str, nn.Parameter]
    act_scales: dict[str, nn.Parameter]
    epochs: int

    @property
    def n_params(self) -> int:
        """Trained scalars (weights, biases and step sizes)."""
        return sum(p.numel() for p in (*self.weights.values(), *self.act_scales.values()))

    def parameters(self) -> list[nn.Parameter]:
        return [*self.weights.values(), *self.act_scales.values()]


def layers_matching(denoiser: nn.Module, patterns: Sequence[str]) -> list[str]:
    """Quantized layers whose ``<name>.weight`` matches a pattern of ``patterns`` (regular
    expressions, searched), in module order."""
    return [n for n, m in denoiser.named_modules() if is_quant_layer(m) and _matches(f"{n}.weight", patterns)]


def _quant_layers(
    denoiser: nn.Module, names: Sequence[str], exclude: Sequence[str] = ()
) -> dict[str, nn.Module]:
    """The quantized layers named in ``names`` and not in ``exclude``, in module order."""
    wanted, skip = set(names), set(exclude)
    return {n: m for n, m in denoiser.named_modules() if is_quant_layer(m) and n in wanted and n not in skip}


def _belongs(param_name: str, layers: Sequence[str]) -> bool:
    return any(param_name.startswith(f"{layer}.") for layer in layers)


def _layer_params(layers: dict[str, nn.Module], train_bias: bool) -> dict[str, nn.Parameter]:
    out: dict[str, nn.Parameter] = {}
    for n, m in layers.items():
        out[f"{n}.weight"] = m.weight
        if train_bias and m.bias is not None:
            out[f"{n}.bias"] = m.bias
    return out


def plan_stages(
    denoiser: nn.Module,
    *,
    time_layers: Sequence[str],
    critical_layers: Sequence[str],
    tla: bool,
    cma: bool,
    tla_epochs: int,
    cma_epochs: int,
    train_bias: bool = True,
    cma_exclude_act_layers: Sequence[str] = (),
) -> list[Stage]:
    """The TLA and/or CMA stages (see the module doc) in training order; ``time_layers`` /
    ``critical_layers`` are qualified layer names (CMA never trains a TLA layer), and CMA does
    not train the input step sizes of ``cma_exclude_act_layers``."""
    stages: list[Stage] = []
    all_scales = quant_parameters(denoiser, "act_scale", max_bits=MAX_TRAINED_ACT_BITS)
    tla_scales = {n: p for n, p in all_scales.items() if _belongs(n, time_layers)}
    if tla:
        layers = _quant_layers(denoiser, time_layers)
        stages.append(Stage("tla", layers, _layer_params(layers, train_bias), tla_scales, tla_epochs))
    if cma:
        layers = _quant_layers(denoiser, critical_layers, exclude=time_layers)
        scales = {
            n: p
            for n, p in all_scales.items()
            if n not in tla_scales and not _belongs(n, cma_exclude_act_layers)
        }
        stages.append(Stage("cma", layers, _layer_params(layers, train_bias), scales, cma_epochs))
    return stages


# ---------------------------------------------------------------------------- targets
class FPTeacher:
    """The FP model, from the same module object as the student.

    Inside :meth:`active`, quantization is off and the parameters being finetuned hold their
    pretrained values (pointer swaps, no copies per call), so targets never move while the
    student trains.
    """

    def __init__(self, denoiser: nn.Module, params: Sequence[nn.Parameter]) -> None:
        self.denoiser = denoiser
        unique = {id(p): p for p in params}
        self.pretrained = [(p, p.detach().clone()) for p in unique.values()]

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        current = [p.data for p, _ in self.pretrained]
        try:
            for p, pre in self.pretrained:
                p.data = pre
            with quant_state(self.denoiser, weights=False, acts=False):
                yield
        finally:
            for (p, _), data in zip(self.pretrained, current):
                p.data = data


class OutputTap:
    """Forward hooks that keep the outputs ``(B, ...)`` of some layers during one denoiser call."""

    def __init__(self, layers: dict[str, nn.Module]) -> None:
        self.outputs: dict[str, Tensor] = {}
        self.handles = [m.register_forward_hook(partial(self._keep, n)) for n, m in layers.items()]

    def _keep(self, name: str, module: nn.Module, args: tuple, output: Tensor) -> None:
        self.outputs[name] = output

    def take(self) -> dict[str, Tensor]:
        out, self.outputs = self.outputs, {}
        return out

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


# ---------------------------------------------------------------------------- data
def rows_per_step(stream: CalibStream, per_step: int, seed: int) -> Tensor:
    """Global row indices: up to ``per_step`` random rows of every recorded sampler step."""
    steps = torch.cat([b[STEP_KEY] for b in stream.batches(4096, with_step=True)])
    g = torch.Generator().manual_seed(seed)
    picked = []
    for s in steps.unique().tolist():
        rows = (steps == s).nonzero().flatten()
        picked.append(rows[torch.randperm(len(rows), generator=g)[:per_step]])
    return torch.cat(picked).sort().values


#: rows of a finetuning set larger than this (bytes) live in file-backed tensors (SD v1.4 with
#: guidance at the papers' 256 samples x 50 steps: 7.2 GB), not in RAM
ROWS_IN_RAM_BYTES = 1 << 30


def load_rows(
    stream: CalibStream, rows: Tensor, spill_dir: Optional[Path] = None, ram_bytes: int = ROWS_IN_RAM_BYTES
) -> dict[str, Tensor]:
    """The denoiser keyword arguments of ``rows`` and their sampler steps (``_step``) on the CPU:
    ``{key: (N, ...)}``, in storage order.

    Up to ``ram_bytes`` in all they are concatenated in RAM. A larger set, when ``spill_dir`` is
    given, is written batch by batch into one file per key under ``spill_dir`` and returned as
    tensors mapped onto those files (``torch.from_file``, shared): the same values, paged in and
    out by the OS, so memory no longer grows with the set (the files go when ``spill_dir`` does).
    """
    n = len(rows)
    batches = stream.batches(min(max(n, 1), 256), rows, with_step=True)
    first = next(batches)
    row_bytes = sum(v[0].numel() * v.element_size() for v in first.values())
    if spill_dir is None or row_bytes * n <= ram_bytes:
        parts = [first, *batches]
        return {k: torch.cat([p[k] for p in parts]) for k in first}
    spill_dir.mkdir(parents=True, exist_ok=True)
    out = {
        k: torch.from_file(
            str(spill_dir / f"{k}.bin"), shared=True, size=n * v[0].numel(), dtype=v.dtype
        ).view(n, *v.shape[1:])
        for k, v in first.items()
    }
    start = 0
    for part in itertools.chain([first], batches):
        m = part[STEP_KEY].shape[0]
        for k, v in part.items():
            out[k][start : start + m] = v
        start += m
    if start != n:
        raise RuntimeError(f"the calibration set gave {start} of {n} requested rows")
    return out


def forward_rows(denoiser: nn.Module, spec: Any, batch: dict[str, Tensor]) -> Tensor:
    """``spec.forward`` on calibration rows; a ``_step`` entry (the rows' sampler steps) routes
    the time-step groups (:func:`~diffquant.quant.timestep.sampler_step`)."""
    kwargs = {k: v for k, v in batch.items() if k != STEP_KEY}
    with sampler_step(denoiser, batch.get(STEP_KEY)):
        return spec.forward(denoiser, kwargs)


def _batch(rows: dict[str, Tensor], idx: Tensor, device: torch.device) -> dict[str, Tensor]:
    return {k: v[idx].to(device) for k, v in rows.items()}


# ---------------------------------------------------------------------------- the loop
@dataclass
class StageReport:
    """Mean losses per epoch (total, local sum, global MSE), optimiser steps and seconds."""

    name: str
    n_params: int
    n_layers: int
    total: list[float] = field(default_factory=list)
    local: list[float] = field(default_factory=list)
    global_: list[float] = field(default_factory=list)
    steps: int = 0
    seconds: float = 0.0

    def metrics(self) -> dict[str, Any]:
        first = lambda xs: round(xs[0], 6) if xs else None  # noqa: E731
        last = lambda xs: round(xs[-1], 6) if xs else None  # noqa: E731
        n = self.name
        return {
            f"{n}_n_params": self.n_params,
            f"{n}_n_layers": self.n_layers,
            f"{n}_steps": self.steps,
            f"{n}_s": round(self.seconds, 3),
            f"{n}_loss_first": first(self.total),
            f"{n}_loss_last": last(self.total),
            f"{n}_local_loss_last": last(self.local),
            f"{n}_global_loss_last": last(self.global_),
        }


def stage_loss(
    denoiser: nn.Module,
    spec: Any,
    batch: dict[str, Tensor],
    teacher: FPTeacher,
    tap: OutputTap,
    global_weight: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """``(total, local, global)`` losses of one batch (see the module doc); ``tap`` holds the
    layers of the local term (none: no local term)."""
    with torch.no_grad(), teacher.active():
        target = forward_rows(denoiser, spec, batch)
    layer_targets = tap.take()
    out = forward_rows(denoiser, spec, batch)
    layer_outs = tap.take()
    local = out.new_zeros(())
    for name, y in layer_outs.items():
        local = local + F.mse_loss(y, layer_targets[name])
    glob = F.mse_loss(out, target)
    return local + global_weight * glob, local, glob


def train_stage(
    denoiser: nn.Module,
    spec: Any,
    stage: Stage,
    rows: dict[str, Tensor],
    teacher: FPTeacher,
    *,
    weight_lr: float,
    act_lr: float,
    global_weight: float,
    batch_size: int,
    seed: int = 0,
    device: Optional[torch.device] = None,
    tracker: Any = None,
    progress: Any = None,
    resume: Optional[dict[str, Any]] = None,
    local: bool = True,
) -> StageReport:
    """Finetune ``stage``'s parameters on ``rows`` (denoiser kwargs ``(N, ...)`` on the CPU, with
    ``_step``); every other parameter and buffer of ``denoiser`` stays bit-identical. ``local``:
    the loss has the layer-local term over ``stage.layers`` (else the global term alone).

    ``progress`` (a :class:`~diffquant.methods.progress.Checkpointer` or its
    :meth:`~diffquant.methods.progress.Checkpointer.within`) saves the loop's state after every
    epoch and every ``progress.every`` optimiser steps; ``resume``, such a saved state, continues
    the loop where it was (the trained parameters themselves are the caller's to restore).
    """
    report = StageReport(stage.name, stage.n_params, len(stage.layers))
    groups = [
        {"params": list(stage.weights.values()), "lr": weight_lr},
        {"params": list(stage.act_scales.values()), "lr": act_lr},
    ]
    groups = [g for g in groups if g["params"]]
    if not groups or stage.epochs <= 0:
        log.info("QuEST %s: nothing to train", stage.name)
        return report
    if (not stage.layers or not local) and global_weight == 0:
        log.warning("QuEST %s: no local layers and no global loss: nothing to learn from", stage.name)
        return report
    device = device or next(denoiser.parameters()).device
    n = int(next(iter(rows.values())).shape[0])
    g = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(groups)
    # where the loop is: epoch, this epoch's row order and next position, its loss sums
    epoch, order, start = 0, None, 0
    sums, count = torch.zeros(3, dtype=torch.float64), 0
    seconds_before = 0.0
    if resume is not None:
        optimizer.load_state_dict(resume["optimizer"])
        g.set_state(resume["generator"])
        report = StageReport(**resume["report"])
        epoch, order, start = resume["epoch"], resume["order"], resume["start"]
        sums, count = resume["sums"], resume["count"]
        seconds_before = report.seconds
    tap = OutputTap(stage.layers if local else {})
    params = stage.parameters()
    t0 = time.perf_counter()

    def state() -> dict[str, Any]:
        report.seconds = seconds_before + time.perf_counter() - t0
        return {
            "optimizer": optimizer.state_dict(),
            "generator": g.get_state(),
            "report": dataclasses.asdict(report),
            "epoch": epoch,
            "order": order,
            "start": start,
            "sums": sums.clone(),
            "count": count,
        }

    try:
        for p in params:
            p.requires_grad_(True)
        while epoch < stage.epochs:
            if order is None:
                order = torch.randperm(n, generator=g)
            while start < n:
                idx = order[start : start + batch_size]
                total, local, glob = stage_loss(
                    denoiser, spec, _batch(rows, idx, device), teacher, tap, global_weight
                )
                if not torch.isfinite(total):
                    raise FloatingPointError(
                        f"QuEST {stage.name}: non-finite loss at epoch "
                        f"{epoch}; lower method.weight_lr / method.act_lr"
                    )
                optimizer.zero_grad(set_to_none=True)
                total.backward()
                optimizer.step()
                keep_step_sizes_positive(stage.act_scales.values())
                sums += torch.tensor([total.item(), local.item(), glob.item()], dtype=torch.float64) * len(
                    idx
                )
                count += len(idx)
                report.steps += 1
                start += batch_size
                if progress is not None and start < n and progress.due(report.steps):
                    progress.save(state(), f"{stage.name} epoch {epoch + 1} step {report.steps}")
            means = (sums / max(count, 1)).tolist()
            report.total.append(means[0])
            report.local.append(means[1])
            report.global_.append(means[2])
            log.info(
                "QuEST %s epoch %d/%d: loss %.5g (local %.5g, global %.5g)",
                stage.name,
                epoch + 1,
                stage.epochs,
                *means,
            )
            if tracker is not None:
                tracker.log(
                    {
                        f"quest/{stage.name}_loss": means[0],
                        f"quest/{stage.name}_local_loss": means[1],
                        f"quest/{stage.name}_global_loss": means[2],
                    }
                )
            epoch, order, start = epoch + 1, None, 0
            sums, count = torch.zeros(3, dtype=torch.float64), 0
            if progress is not None:
                progress.save(state(), f"{stage.name} epoch {epoch}/{stage.epochs}")
    finally:
        for p in params:
            p.requires_grad_(False)
            p.grad = None
        tap.remove()
        report.seconds = seconds_before + time.perf_counter() - t0
    return report


@torch.no_grad()
def output_mse(
    denoiser: nn.Module, spec: Any, batches: Sequence[dict[str, Tensor]], teacher: FPTeacher
) -> Optional[float]:
    """Mean squared error of the quantized denoiser's output against the FP teacher's on
    ``batches``; None when there are no batches (nothing was measured)."""
    if not batches:
        return None
    total, count = 0.0, 0
    for batch in batches:
        with teacher.active():
            target = forward_rows(denoiser, spec, batch)
        out = forward_rows(denoiser, spec, batch)
        total += float((out - target).pow(2).sum())
        count += target.numel()
    return total / max(count, 1)
