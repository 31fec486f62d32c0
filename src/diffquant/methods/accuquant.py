"""AccuQuant (Lee, Choi et al., NeurIPS 2025): calibrate so that the quantized sampler stays on
the FP trajectory over several denoising steps, in memory that does not grow with the steps.

The paper's full text was not available when this was written; this is a reconstruction from
its abstract, its official overview figure and a public review. Every choice those sources leave
open is a field of :class:`AccuQuantConfig`:

1. **Base.** Start from the baseline PTQ result (``method.ptq``: the Q-Diffusion recipe, loaded
   from the cache when the same model/quant/PTQ settings were calibrated before).
2. **FP trajectories.** Sample ``n_samples`` FP trajectories (seed ``seed``), keeping every state
   ``x_0 .. x_S`` and every step's model output, from which a multistep sampler's state (PLMS,
   DPM-Solver++) at any step is rebuilt (see :mod:`diffquant.methods.trajectory`).
3. **Grouped trajectory calibration.** Split the ``S`` sampler steps into consecutive groups of
   ``group_size`` = M steps and calibrate them in sampler order (``epochs`` passes). For group
   ``[i0, i0 + M)``: start from ``x_{i0}`` of the FP trajectory (``group_start: fp``; or from
   the quantized model's own trajectory, ``quant``) and that chain's scheduler state, run M
   quantized steps with the same scheduler (its own copy), guidance and noise as the FP chain,
   and minimise ``loss(x̃_{i0+M}, x_{i0+M})``
   (MSE) with Adam on mini-batches of ``batch_size`` trajectories, ``iters_per_group`` steps
   per group: ``order: sequential`` spends them group after group, ``interleaved`` cycles
   through the groups (in sampler order) at every step. What is learned is ``learn``:
   activation step sizes (``act_scale``), optionally weight rounding (``weight_round``: one
   α per weight, started from the PTQ rounding, which a rounding flips by changing sign; see
   *Rounding* below) and biases (``bias``).
4. **Gradient.** ``grad_mode: approx`` (default) uses the identity-Jacobian approximation of the
   overview figure — peak memory of one step whatever M is; ``exact`` back-propagates through
   all M steps (memory O(M)); see :func:`diffquant.methods.trajectory.group_backward`.

**Rounding** (``weight_round``). AdaRound's relaxation cannot refine a finished rounding here:
started at the PTQ choices (α = ±2, h = 0.957 / 0.043) under AdaRound's regulariser (λ = 0.01), the
group loss's per-weight gradient ∂L/∂h (median 3e-7, max 1e-3 on ldm_digits W4A4) never beats the
regulariser's (λ · 4–9), and α cannot travel to 0 within the iterations anyway: measured, no
rounding flipped, and the soft network the step sizes were fitted to is not the hard one kept
(hard trajectory loss 0.00722 vs 0.00702 learning step sizes alone). With a small margin
(α = ±0.5, h = 0.65 / 0.35) the soft network is far from any hard one, and hardening undid the
calibration (reverted). So by default (``round_forward: hard``) the network sees the *hard*
choices (α ≥ 0: round up) and the gradient reaches α straight through h(α): α = ±``round_init``
is an inertia, a rounding flips where the loss pushes it consistently for ``round_init /
round_lr`` Adam steps, and the model trained is the model kept (1243 of 1.84M roundings flipped,
hard trajectory loss 0.00648; FID to the FP samples, mean of evaluation seeds 0-2: 0.0796 with
the soft rounding, 0.0702 now, 0.0712 learning step sizes alone — within the seeds' spread of
the latter, while the calibration objective is 8% lower). ``round_forward: soft``
is AdaRound's relaxation, its regulariser weighted relative to the group loss (``round_reg`` ×
the phase's mean group loss before it), so that λ does not depend on the scale of the latents.
Whatever the mode, every reported loss judges the hard-rounded model
(:meth:`LearnedParameters.hardened`), and so does the guard.

**Guard** (``guard``, :mod:`diffquant.methods.guard`). The calibrated model is kept only if its
final-image error on held-out FP trajectories (``guard_samples`` chains of seed ``guard_seed``,
neither the calibration trajectories nor the evaluation samples) is not above the PTQ base's;
otherwise the PTQ base is put back. It replaces the earlier ``revert_if_worse``, which judged
the update on the calibration trajectories themselves by the group loss it had just lowered.

Parameters are shared by all groups unless the quant config is time-step aware
(``quant.timestep_aware=true``): then every step routes its own activation parameter group
through the denoiser's time-step argument, and a group's iterations only move the parameters of
its steps' groups. With shared parameters, ``sequential`` lets each group undo what earlier
groups learned (on ldm_digits W4A4, learning step sizes, the mean group loss went from PTQ's
0.0102 to 0.0324 although every group's own loss fell; interleaved: 0.0070), so the default is
``interleaved``: one optimiser fits all groups.

Metrics of the result: ``accuquant_s`` (seconds of trajectory calibration, the PTQ base
excluded), ``accuquant_loss_init`` / ``accuquant_loss_final`` (mean over groups of the group loss
on all calibration trajectories, FP starts, before / after the whole calibration),
``accuquant_groups``, ``accuquant_group_losses_init`` and ``accuquant_group_losses`` (per group,
before / after; the calibrated model's, whichever the guard keeps), ``accuquant_guard_loss_base``
/ ``accuquant_guard_loss_final`` / ``accuquant_guard_kept`` (the guard's; absent with
``guard: false``); its files hold ``accuquant_groups.json`` and its tables the per-group table;
the loss curve is logged to the tracker while it runs. The calibrated denoiser and all of these
are cached (:mod:`diffquant.methods.result_cache`; ``accuquant_cached``).

A stopped job resumes where it was saved last (:mod:`diffquant.methods.progress`): after every
group (``sequential``) or epoch (``interleaved``) and every ``progress_every`` optimiser steps;
the FP trajectories are kept in the progress folder once sampled. The result is that of an
uninterrupted job.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
from torch import Tensor, nn

from diffquant.methods.base import Method, MethodResult, Table
from diffquant.methods.guard import CRITERIA as GUARD_CRITERIA
from diffquant.methods.guard import RefinementGuard, spread_indices
from diffquant.methods.progress import Checkpointer, load_file, save_file, tensor_digest
from diffquant.methods.ptq import PTQConfig, load_or_run_ptq
from diffquant.methods.trajectory import (
    GRAD_MODES,
    LOSSES,
    Trajectories,
    check_scheduler,
    fp_trajectories,
    group_backward,
    group_length,
    group_starts,
    loss_fn,
    rollout,
    scheduler_at,
)
from diffquant.models.base import Conditioning
from diffquant.quant.adaround import AdaRound, RoundingSchedule
from diffquant.quant.checkpoint import quantizer_state_dict
from diffquant.quant.config import QuantConfig, quant_key
from diffquant.quant.modules import is_quant_layer
from diffquant.quant.quantizers import WeightQuantizer
from diffquant.quant.state import keep_step_sizes_positive, quant_parameters
from diffquant.registry import METHODS
from diffquant.validation import InvalidSetting, one_of, positive

log = logging.getLogger(__name__)

LEARNABLE = ("act_scale", "weight_round", "bias")
GROUP_STARTS = ("fp", "quant")
ORDERS = ("sequential", "interleaved")
LR_SCHEDULES = ("cosine", "constant")
ROUND_FORWARDS = ("hard", "soft")


@dataclass
class AccuQuantConfig:
    """``method=accuquant``: grouped multi-step trajectory calibration on top of baseline PTQ.

    Attributes:
        name: ``accuquant``.
        ptq: the baseline PTQ settings it starts from (the same values as ``method=ptq``, so the
            cached PTQ result is reused; ``conf/method/accuquant.yaml`` pulls them from
            ``conf/method/ptq.yaml``).
        group_size: M, consecutive sampler steps simulated per group (the last group is shorter
            when M does not divide the step count). 1 = per-step calibration of the step output.
        grad_mode: ``approx`` (identity-Jacobian approximation, memory of one step) or ``exact``
            (back-propagation through the M steps, memory O(M)).
        learn: what is learned, any of ``act_scale`` (activation step sizes Δ below
            ``max_act_bits``), ``weight_round`` (one α per weight from the PTQ rounding: see
            the module doc's *Rounding*), ``bias``.
        act_lr / round_lr / bias_lr: Adam learning rates of each kind.
        lr_schedule: ``cosine`` (to 0 over each optimiser's steps: one group's when
            sequential, all of an epoch's when interleaved) or ``constant``.
        iters_per_group: optimisation steps per group and epoch.
        epochs: passes over all groups (in sampler order each time).
        n_samples: FP trajectories the groups are calibrated on (classes balanced: sample ``i``
            has class ``i % num_classes``; spread over the classes when there are more classes
            than samples: :func:`calibration_indices`).
        batch_size: trajectories per optimisation step (with guidance the UNet sees 2×).
        seed: base seed of those trajectories and of the mini-batches (apart from evaluation
            seeds; re-seeded by the run's ``calib_seed``, :mod:`diffquant.seeds`).
        loss: the distance between the final states (``mse``).
        group_start: where a group's chains start: ``fp`` (the FP trajectory's state, as the
            overview figure shows) or ``quant`` (the quantized model's own state after the
            already-calibrated groups, so that the group also corrects the drift accumulated
            before it; the target stays the FP state).
        order: ``sequential`` (each group's ``iters_per_group`` steps in turn, a fresh optimiser
            per group, as the overview figure's one highlighted group suggests) or
            ``interleaved`` (one optimiser; step ``j`` trains group ``j mod n_groups``, cycling
            through the groups in sampler order: shared parameters fit all groups at once
            instead of drifting toward the last group).
        guard: keep the calibrated model only if its final-image error on held-out FP
            trajectories is not above the PTQ base's, else put the base back
            (:mod:`diffquant.methods.guard`). The paper configs turn it off (the paper describes
            no such step).
        guard_samples / guard_seed: the held-out trajectories (a seed other than ``seed``).
        guard_criterion: ``mse`` (the mean per-image error), ``log_mse`` (the mean of its
            log10) or ``both`` (neither may get worse): :data:`diffquant.methods.guard.CRITERIA`.
        max_act_bits: activation quantizers above this many bits (16-bit softmax) are not learned.
        round_forward: ``hard`` (the network sees the hard choices α ≥ 0, the gradient passes
            straight through h(α)) or ``soft`` (AdaRound: the network sees h(α), hardened at the
            end).
        round_init: |α| the PTQ rounding choices are started from: with ``hard``, the inertia
            a flip must overcome; with ``soft``, h(±0.5) = 0.65 / 0.35, h(±2) = 0.957 / 0.043.
        round_reg / round_warmup / round_beta_start / round_beta_end: ``soft`` only: the
            AdaRound regulariser over all ``weight_round`` iterations (as in PTQ's weight stage),
            its weight ``round_reg`` relative to the phase's mean group loss before it.
        eval_batch_size: trajectories per no-grad forward when measuring group losses.
        progress_every: besides after every group (``sequential``) / epoch (``interleaved``),
            save the calibration's progress every that many optimiser steps (0: at those
            boundaries only), so that a stopped job resumes there
            (:mod:`diffquant.methods.progress`; results do not depend on it).
        save_checkpoint: write the quantized checkpoint to the run folder.
    """

    name: str = "accuquant"
    ptq: PTQConfig = field(default_factory=PTQConfig)
    group_size: int = 4
    grad_mode: str = "approx"
    learn: list[str] = field(default_factory=lambda: ["act_scale"])
    act_lr: float = 3e-3
    round_lr: float = 1e-2
    bias_lr: float = 1e-5
    lr_schedule: str = "cosine"
    iters_per_group: int = 40
    epochs: int = 1
    n_samples: int = 64
    batch_size: int = 16
    seed: int = 20_000
    loss: str = "mse"
    group_start: str = "fp"
    order: str = "interleaved"
    guard: bool = True
    guard_samples: int = 256  # 64 missed the few diverging samples behind FID→FP (see quest.py)
    guard_seed: int = 30_000
    guard_criterion: str = "mse"
    max_act_bits: int = 15
    round_reg: float = 0.01
    round_warmup: float = 0.2
    round_beta_start: float = 20.0
    round_beta_end: float = 2.0
    round_init: float = 0.5
    round_forward: str = "hard"
    eval_batch_size: int = 64
    progress_every: int = 20
    save_checkpoint: bool = False

    def __post_init__(self) -> None:
        validate_config(self)


def validate_config(cfg: AccuQuantConfig) -> None:
    """Raise :class:`~diffquant.validation.InvalidSetting` naming the key and the fix for values
    the schema's types allow (``AccuQuantConfig`` calls it on construction)."""
    positive(cfg, "group_size", "epochs", "n_samples", "batch_size", "eval_batch_size", "guard_samples")
    if cfg.guard and cfg.guard_seed == cfg.seed:
        raise InvalidSetting(
            "guard_seed",
            f"equals seed ({cfg.seed}): the guard's trajectories would be the calibration ones; "
            "choose another seed",
        )
    positive(cfg, "iters_per_group", "progress_every", allow_zero=True)
    one_of(cfg, "grad_mode", GRAD_MODES)
    one_of(cfg, "guard_criterion", GUARD_CRITERIA)
    if not cfg.learn or any(k not in LEARNABLE for k in cfg.learn):
        raise InvalidSetting("learn", f"is unknown: choose from {list(LEARNABLE)}")
    one_of(cfg, "group_start", GROUP_STARTS)
    one_of(cfg, "order", ORDERS)
    one_of(cfg, "lr_schedule", LR_SCHEDULES)
    one_of(cfg, "loss", LOSSES)
    one_of(cfg, "round_forward", ROUND_FORWARDS)
    positive(cfg, "round_init")  # α = 0 would be a choice (α ≥ 0: round up), not a margin
    positive(cfg, "round_lr", allow_zero=True)


# ---------------------------------------------------------------------------- learned tensors
def _round_up_choice(quantizer: WeightQuantizer, weight: Tensor) -> Tensor:
    """The current rounding of ``quantizer`` as a bool mask (weight-shaped): its frozen AdaRound
    choices, or round-to-nearest."""
    if quantizer.round_up is not None:
        return quantizer.round_up.clone()
    w = weight.detach() / quantizer._bshape(quantizer.scale)
    return (w - torch.floor(w)) >= 0.5


def weight_leaves(denoiser: nn.Module) -> list[tuple[WeightQuantizer, Tensor]]:
    """Every leaf weight quantizer of ``denoiser`` with the weight (part) it quantizes."""
    leaves: list[tuple[WeightQuantizer, Tensor]] = []
    for m in denoiser.modules():
        if not is_quant_layer(m) or m.weight_quantizer is None:
            continue
        wq = m.weight_quantizer
        leaves += (
            [(wq, m.weight)]
            if isinstance(wq, WeightQuantizer)
            else [(wq.head, m.weight[:, : wq.split]), (wq.tail, m.weight[:, wq.split :])]
        )
    return leaves


def rounding_choices(denoiser: nn.Module) -> list[Tensor]:
    """The current rounding of every leaf weight quantizer (bool masks, round up where True;
    a ``soft`` one's α ≥ 0)."""
    return [
        leaf.adaround.hard_mask() if leaf.adaround is not None else _round_up_choice(leaf, weight)
        for leaf, weight in weight_leaves(denoiser)
    ]


class HardForwardRounding(AdaRound):
    """AdaRound α whose network sees the hard choice (``α ≥ 0``: round up) while the gradient
    passes through the rectified sigmoid h(α) (straight-through): the model trained is the model
    kept, and a rounding flips when its α changes sign."""

    def rectified(self) -> Tensor:
        h = super().rectified()
        return self.hard_mask().to(h.dtype) + h - h.detach()


def start_soft_rounding(denoiser: nn.Module, margin: float, forward: str = "soft") -> list[AdaRound]:
    """Put every weight quantizer into AdaRound (``soft``) mode, started from its current rounding
    (α = ±``margin``: the hard choice of every weight stays the PTQ's until its α changes sign);
    ``forward="hard"``: the network sees the hard choices (:class:`HardForwardRounding`).
    Returns the roundings."""
    roundings: list[AdaRound] = []
    for leaf, weight in weight_leaves(denoiser):
        mask = _round_up_choice(leaf, weight)
        ada = leaf.start_adaround(weight)
        if forward == "hard":
            leaf.adaround = ada = HardForwardRounding(ada.alpha.detach())
        with torch.no_grad():
            ada.alpha.copy_(torch.where(mask, margin, -margin))
        roundings.append(ada)
    return roundings


@contextlib.contextmanager
def hard_rounding(denoiser: nn.Module) -> Iterator[None]:
    """Within the block, every ``soft`` weight quantizer rounds by its current hard choice
    (``α ≥ 0``: the model :func:`harden_rounding` would keep); soft again afterwards."""
    soft = [leaf for leaf, _ in weight_leaves(denoiser) if leaf.adaround is not None]
    alphas = [leaf.adaround for leaf in soft]
    for leaf, ada in zip(soft, alphas):
        leaf.round_up, leaf.adaround = ada.hard_mask(), None
    try:
        yield
    finally:
        for leaf, ada in zip(soft, alphas):
            leaf.round_up, leaf.adaround = None, ada


def harden_rounding(denoiser: nn.Module) -> None:
    for m in denoiser.modules():
        if is_quant_layer(m) and m.weight_quantizer is not None:
            m.weight_quantizer.harden()


class LearnedParameters:
    """The tensors a trajectory calibration trains, by kind, with their optimiser settings.

    Turns ``requires_grad`` on for them (:meth:`restore` turns it back off) and keeps activation
    step sizes positive after every optimiser step.
    """

    def __init__(self, denoiser: nn.Module, cfg: AccuQuantConfig) -> None:
        self.denoiser = denoiser
        self.roundings = (
            start_soft_rounding(denoiser, cfg.round_init, cfg.round_forward)
            if "weight_round" in cfg.learn
            else []
        )
        self.by_kind: dict[str, list[nn.Parameter]] = {}
        for kind in cfg.learn:
            found = quant_parameters(
                denoiser, kind, max_bits=cfg.max_act_bits if kind == "act_scale" else None
            )
            self.by_kind[kind] = list(found.values())
        self.lrs = {"act_scale": cfg.act_lr, "weight_round": cfg.round_lr, "bias": cfg.bias_lr}
        self._was = {p: p.requires_grad for ps in self.by_kind.values() for p in ps}
        for p in self._was:
            p.requires_grad_(True)

    @property
    def params(self) -> list[nn.Parameter]:
        return [p for ps in self.by_kind.values() for p in ps]

    def counts(self) -> dict[str, int]:
        """Number of learned scalars per kind."""
        return {k: sum(p.numel() for p in ps) for k, ps in self.by_kind.items()}

    def optimizer(self) -> torch.optim.Optimizer:
        groups = [{"params": ps, "lr": self.lrs[k]} for k, ps in self.by_kind.items() if ps]
        return torch.optim.Adam(groups)

    def after_step(self) -> None:
        keep_step_sizes_positive(self.by_kind.get("act_scale", []))

    def snapshot(self) -> list[Tensor]:
        return [p.detach().clone() for p in self.params]

    @torch.no_grad()
    def load(self, values: list[Tensor]) -> None:
        for p, v in zip(self.params, values):
            p.copy_(v)

    def hardened(self) -> contextlib.AbstractContextManager:
        """A block in which learned roundings are hard (:func:`hard_rounding`): the model as it
        would be kept, which every reported loss judges."""
        return hard_rounding(self.denoiser) if self.roundings else contextlib.nullcontext()

    def restore(self) -> None:
        """Harden learned rounding and turn ``requires_grad`` back to what it was."""
        for p, flag in self._was.items():
            p.requires_grad_(flag)
            p.grad = None
        if self.roundings:
            harden_rounding(self.denoiser)


# ---------------------------------------------------------------------------- calibration
@dataclass
class GroupReport:
    """One group's calibration in one epoch: steps ``[start, start + length)``, the group loss on
    all calibration trajectories before and after, the mean training loss of the last 10
    iterations, and seconds."""

    epoch: int
    start: int
    length: int
    loss_before: float
    loss_after: float
    train_loss_tail: float
    seconds: float


@dataclass
class TrajectoryCalibration:
    """Calibrates a quantized ``model`` group by group (see the module doc).

    ``on_iteration(global_iter, group_index, loss)`` is called after every optimiser step.
    """

    model: Any
    cfg: AccuQuantConfig
    on_iteration: Optional[Any] = None
    reports: list[GroupReport] = field(default_factory=list)

    def __post_init__(self) -> None:
        validate_config(self.cfg)
        check_scheduler(self.model)
        self.loss = loss_fn(self.cfg.loss)
        self._iter = 0
        self._reg_scale = 1.0  # the rounding regulariser's weight is relative to this loss

    # -- pieces
    @staticmethod
    def chain_from(traj: Trajectories, x_start: Tensor | Trajectories, start: int) -> Trajectories:
        """The chain a group at ``start`` starts from: ``x_start`` itself when it is one (the FP
        trajectories, or the quantized model's own chain), else the state ``x_start``
        ``(N, C, h, w)`` with the FP trajectories' history before it."""
        if isinstance(x_start, Trajectories):
            return x_start
        return Trajectories(
            torch.cat([traj.states[:start], x_start[None]]),
            traj.cond,
            traj.indices,
            traj.seed,
            traj.outputs[:start],
        )

    def _chunks(self, n: int) -> list[list[int]]:
        size = self.cfg.eval_batch_size
        return [list(range(lo, min(n, lo + size))) for lo in range(0, n, size)]

    @torch.no_grad()
    def group_loss_all(
        self, traj: Trajectories, x_start: Tensor | Trajectories, start: int, length: int
    ) -> float:
        """The group loss over all trajectories (mean of per-chunk losses weighted by rows),
        from ``x_start`` (see :meth:`chain_from`)."""
        chain, total, n = self.chain_from(traj, x_start, start), 0.0, len(traj)
        for rows in self._chunks(n):
            part = traj.rows(rows)
            out = rollout(
                self.model,
                chain.states[start, rows],
                start,
                length,
                part.cond,
                part.indices,
                part.seed,
                scheduler_at(self.model, chain, start, rows),
            )
            total += float(self.loss(out, traj.states[start + length, rows])) * len(rows)
        return total / n

    @torch.no_grad()
    def advance(self, traj: Trajectories, chain: Trajectories, start: int, length: int) -> Trajectories:
        """``chain`` (the quantized model's own, up to ``start``) continued by the current model
        over the group's steps (all trajectories), model outputs included."""
        states, outputs = [], []
        for rows in self._chunks(len(traj)):
            part, xs, outs = traj.rows(rows), [], []
            rollout(
                self.model,
                chain.states[start, rows],
                start,
                length,
                part.cond,
                part.indices,
                part.seed,
                scheduler_at(self.model, chain, start, rows),
                outs,
                xs,
            )
            states.append(torch.stack(xs))
            outputs.append(torch.stack(outs))
        return Trajectories(
            torch.cat([chain.states[: start + 1], torch.cat(states, 1)]),
            traj.cond,
            traj.indices,
            traj.seed,
            torch.cat([chain.outputs[:start], torch.cat(outputs, 1)]),
        )

    def _optimizer_step(
        self,
        opt: torch.optim.Optimizer,
        learned: LearnedParameters,
        traj: Trajectories,
        chain: Trajectories,
        start: int,
        length: int,
        generator: torch.Generator,
        schedule: Optional[RoundingSchedule],
    ) -> float:
        """One optimiser step on a random mini-batch of one group, rolled out from ``chain``'s
        state (and scheduler state) at ``start``; returns its group loss."""
        cfg = self.cfg
        rows = torch.randperm(len(traj), generator=generator)[: cfg.batch_size].sort().values
        part = traj.rows(rows)
        opt.zero_grad(set_to_none=True)
        r = rows.to(chain.states.device)
        value = group_backward(
            self.model,
            cfg.grad_mode,
            chain.states[start, r],
            start,
            length,
            traj.states[start + length, r],
            part.cond,
            part.indices,
            part.seed,
            self.loss,
            scheduler=scheduler_at(self.model, chain, start, rows),
        )
        if not math.isfinite(value):
            raise FloatingPointError(
                f"accuquant: group loss is {value} at steps {start}.."
                f"{start + length - 1}: lower method.act_lr / round_lr"
            )
        if learned.roundings and schedule is not None:
            reg = schedule.loss(self._iter, learned.roundings)
            if reg.requires_grad:
                (reg * self._reg_scale).backward()
        opt.step()
        learned.after_step()
        if self.on_iteration is not None:
            self.on_iteration(self._iter, start, value)
        self._iter += 1
        return value

    def calibrate_group(
        self,
        learned: LearnedParameters,
        traj: Trajectories,
        x_start: Tensor | Trajectories,
        start: int,
        length: int,
        generator: torch.Generator,
        schedule: Optional[RoundingSchedule] = None,
    ) -> list[float]:
        """``iters_per_group`` optimiser steps on one group (a fresh Adam); returns the losses.

        ``x_start``: ``(N, C, h, w)``, the group's start state of every trajectory (with the FP
        history before it), or a chain (see :meth:`chain_from`).
        """
        opt, sched = self._optimizer(learned, self.cfg.iters_per_group)
        losses: list[list[float]] = [[]]
        self._train(
            opt,
            sched,
            learned,
            traj,
            [(start, length)],
            [self.chain_from(traj, x_start, start)],
            losses,
            0,
            generator,
            schedule,
        )
        return losses[0]

    def _optimizer(self, learned: LearnedParameters, total: int):
        """A fresh Adam over the learned tensors and its LR schedule over ``total`` steps."""
        opt = learned.optimizer()
        sched = (
            torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(total, 1))
            if self.cfg.lr_schedule == "cosine"
            else None
        )
        return opt, sched

    def _train(
        self,
        opt: torch.optim.Optimizer,
        sched: Any,
        learned: LearnedParameters,
        traj: Trajectories,
        groups: list[tuple[int, int]],
        chains: list[Trajectories],
        losses: list[list[float]],
        done: int,
        generator: torch.Generator,
        schedule: Optional[RoundingSchedule],
        save: Optional[Any] = None,
    ) -> None:
        """Optimiser steps ``done .. iters_per_group · len(groups) - 1``; step ``j`` trains group
        ``j mod len(groups)`` (from ``chains[k]`` at its start) and appends its loss to
        ``losses``. ``save(j)`` is called after step ``j - 1`` where a mid-phase progress save is
        due."""
        total = self.cfg.iters_per_group * len(groups)
        for j in range(done, total):
            k = j % len(groups)
            (start, length), chain = groups[k], chains[k]
            losses[k].append(
                self._optimizer_step(opt, learned, traj, chain, start, length, generator, schedule)
            )
            if sched is not None:
                sched.step()
            if save is not None and j + 1 < total:
                save(j + 1)

    # -- the whole run
    def phases(self, traj: Trajectories) -> list[tuple[int, list[int]]]:
        """The run as ``(epoch, group indices)`` phases, in order. A phase trains its groups with
        one fresh optimiser: ``sequential`` has one phase per group, ``interleaved`` one per epoch (all groups)."""
        n = len(self._groups(traj))
        if self.cfg.order == "sequential":
            return [(e, [g]) for e in range(self.cfg.epochs) for g in range(n)]
        return [(e, list(range(n))) for e in range(self.cfg.epochs)]

    def run(
        self, traj: Trajectories, progress: Any = None, resume: Optional[dict[str, Any]] = None
    ) -> list[GroupReport]:
        """Calibrate all groups (``epochs`` passes in sampler order); returns the group reports.

        ``progress`` (a :class:`~diffquant.methods.progress.Checkpointer`) saves the run's state
        after every phase (a group when sequential, an epoch when interleaved) and every
        ``progress.every`` optimiser steps; ``resume``, such a saved state, continues the run
        where it was, with the same result as an uninterrupted run.
        """
        cfg = self.cfg
        learned = LearnedParameters(self.model.denoiser, cfg)
        n_groups, phases = len(self._groups(traj)), self.phases(traj)
        log.info(
            "accuquant: %d groups of %d steps, %s gradient, %s, learning %s",
            n_groups,
            cfg.group_size,
            cfg.grad_mode,
            cfg.order,
            learned.counts(),
        )
        schedule = None
        if learned.roundings and cfg.round_forward == "soft":
            total = cfg.epochs * n_groups * cfg.iters_per_group
            schedule = RoundingSchedule(
                total, cfg.round_reg, cfg.round_warmup, cfg.round_beta_start, cfg.round_beta_end
            )
        generator = torch.Generator().manual_seed(cfg.seed)
        run = _RunState(self, learned, generator, traj)
        first, in_phase = run.load(resume) if resume is not None else (0, None)
        try:
            for p in range(first, len(phases)):
                self._phase(p, phases[p], run, schedule, progress, in_phase)
                in_phase = None
        finally:
            learned.restore()
        return self.reports

    def all_group_losses(self, traj: Trajectories) -> list[float]:
        """Every group's loss over all trajectories with the current parameters (FP starts), in
        sampler order — unlike a report's ``loss_after``, measured after *all* groups moved the
        shared parameters."""
        return [self.group_loss_all(traj, traj, s, n) for s, n in self._groups(traj)]

    def _groups(self, traj: Trajectories) -> list[tuple[int, int]]:
        return [
            (s, group_length(s, traj.n_steps, self.cfg.group_size))
            for s in group_starts(traj.n_steps, self.cfg.group_size)
        ]

    def _start_chains(self, traj: Trajectories) -> list[Trajectories]:
        """The chain each group starts from (at its first step): the FP trajectories, or
        (``group_start: quant``) the current quantized model's own chain from x_T."""
        groups = self._groups(traj)
        if self.cfg.group_start == "fp":
            return [traj] * len(groups)
        chain = self._chain_origin(traj)
        for s, n in groups[:-1]:
            chain = self.advance(traj, chain, s, n)
        return [chain] * len(groups)

    @staticmethod
    def _chain_origin(traj: Trajectories) -> Trajectories:
        """A chain at step 0: x_T, no history."""
        return Trajectories(traj.states[:1], traj.cond, traj.indices, traj.seed, traj.outputs[:0])

    def _phase(
        self,
        index: int,
        phase: tuple[int, list[int]],
        run: _RunState,
        schedule: Optional[RoundingSchedule],
        progress: Any,
        resume: Optional[dict[str, Any]],
    ) -> None:
        """One phase (see :meth:`phases`): ``iters_per_group`` optimiser steps per group, then
        report every group's loss on all trajectories before and after."""
        cfg, traj, learned = self.cfg, run.traj, run.learned
        epoch, members = phase
        groups = [self._groups(traj)[g] for g in members]
        sequential = cfg.order == "sequential"
        quant_start = cfg.group_start == "quant"
        if sequential and quant_start and members[0] == 0:
            run.carry = self._chain_origin(traj)  # each epoch's quantized chain starts from x_T
        t0 = time.perf_counter()
        opt, sched = self._optimizer(learned, cfg.iters_per_group * len(groups))
        if resume is None:
            if not quant_start:
                chains = [traj] * len(groups)
            elif sequential:
                chains = [run.carry]
            else:
                with learned.hardened():
                    chains = self._start_chains(traj)
            with learned.hardened():
                before = [self.group_loss_all(traj, c, s, n) for c, (s, n) in zip(chains, groups)]
            losses: list[list[float]] = [[] for _ in groups]
            done = 0
        else:
            chains = [run.chain(resume["chain"])] * len(groups) if quant_start else [traj] * len(groups)
            before, losses, done = (
                resume["before"],
                resume["losses"],
                resume["done"],
            )
            opt.load_state_dict(resume["optimizer"])
            if sched is not None:
                sched.load_state_dict(resume["scheduler"])
            t0 -= resume["seconds"]
        self._reg_scale = sum(before) / len(before)

        def save(j: int) -> None:
            if progress is None or not progress.due(self._iter):
                return
            progress.save(
                run.state(
                    index,
                    {
                        "chain": _chain_state(chains[0]) if quant_start else None,
                        "before": before,
                        "losses": losses,
                        "done": j,
                        "optimizer": opt.state_dict(),
                        "scheduler": sched.state_dict() if sched is not None else None,
                        "seconds": time.perf_counter() - t0,
                    },
                ),
                f"epoch {epoch + 1} groups {members[0]}..{members[-1]} step {j}",
            )

        self._train(opt, sched, learned, traj, groups, chains, losses, done, run.generator, schedule, save)
        with learned.hardened():  # judged as it will be kept: learned roundings hard
            after = [self.group_loss_all(traj, c, s, n) for c, (s, n) in zip(chains, groups)]
        if sequential and quant_start:
            with learned.hardened():
                run.carry = self.advance(traj, chains[0], *groups[0])
        seconds = (time.perf_counter() - t0) / len(groups)
        for (start, length), b, a, ls in zip(groups, before, after, losses):
            self._report(epoch, start, length, b, a, ls, seconds)
        if progress is not None:
            progress.save(
                run.state(index + 1, None), f"epoch {epoch + 1} groups {members[0]}..{members[-1]} done"
            )

    def _report(
        self,
        epoch: int,
        start: int,
        length: int,
        before: float,
        after: float,
        losses: list[float],
        seconds: float,
    ) -> None:
        tail = losses[-10:]
        report = GroupReport(
            epoch,
            start,
            length,
            before,
            after,
            sum(tail) / len(tail) if tail else float("nan"),
            seconds,
        )
        self.reports.append(report)
        log.info(
            "accuquant: epoch %d steps %d..%d loss %.5g -> %.5g (%.1fs)",
            epoch,
            start,
            start + length - 1,
            before,
            after,
            seconds,
        )


@dataclass
class _RunState:
    """What a trajectory calibration carries from phase to phase, and its saved form: the
    learned tensors, the batch generator, the iteration counter, the reports and (sequential
    with ``group_start: quant``) the quantized chain's state where the next group starts."""

    calibration: TrajectoryCalibration
    learned: LearnedParameters
    generator: torch.Generator
    traj: Trajectories
    carry: Optional[Trajectories] = None

    def state(self, phase: int, in_phase: Optional[dict[str, Any]]) -> dict[str, Any]:
        """The run's state at phase ``phase`` (``in_phase``: where the phase is; None = at its
        start)."""
        cal = self.calibration
        return {
            "phase": phase,
            "in_phase": in_phase,
            "learned": [t.cpu() for t in self.learned.snapshot()],
            "generator": self.generator.get_state(),
            "iter": cal._iter,
            "reports": [asdict(r) for r in cal.reports],
            "carry": _chain_state(self.carry) if self.carry is not None else None,
        }

    def load(self, state: dict[str, Any]) -> tuple[int, Optional[dict[str, Any]]]:
        """Restore a :meth:`state`; returns its phase and where in the phase."""
        cal, values = self.calibration, state["learned"]
        if [tuple(v.shape) for v in values] != [tuple(p.shape) for p in self.learned.params]:
            raise ValueError("saved accuquant progress learned other tensors")
        self.learned.load(values)
        self.generator.set_state(state["generator"])
        cal._iter = state["iter"]
        cal.reports = [GroupReport(**r) for r in state["reports"]]
        if state["carry"] is not None:
            self.carry = self.chain(state["carry"])
        return state["phase"], state["in_phase"]

    def chain(self, saved: dict[str, Tensor]) -> Trajectories:
        """A quantized chain from its saved form (:func:`_chain_state`)."""
        device, traj = self.traj.states.device, self.traj
        return Trajectories(
            saved["states"].to(device), traj.cond, traj.indices, traj.seed, saved["outputs"].to(device)
        )


def _chain_state(chain: Trajectories) -> dict[str, Tensor]:
    """What a progress save keeps of a quantized chain: its states and model outputs."""
    return {"states": chain.states.cpu(), "outputs": chain.outputs.cpu()}


# ---------------------------------------------------------------------------- the method's run
TRAJECTORIES_FILE = "fp_trajectories.pt"


calibration_indices = spread_indices  # the calibration trajectories' samples, classes spread


def calibration_trajectories(
    model: Any, cfg: AccuQuantConfig, progress: Optional[Path] = None
) -> Trajectories:
    """The FP trajectories the groups are calibrated on (samples :func:`calibration_indices`):
    sampled, or loaded from ``progress`` where a stopped job of the same settings kept them (they
    are kept there once sampled)."""
    indices = calibration_indices(model, cfg.n_samples)
    key = {
        "n_samples": cfg.n_samples,
        "seed": cfg.seed,
        "batch_size": cfg.eval_batch_size,
        "steps": [float(t) for t in model.timesteps],
        "indices": indices,
        "format": 2,
    }
    saved = load_file(progress, TRAJECTORIES_FILE, key)
    if saved is not None:
        model.scheduler.set_timesteps(model.sampler.num_inference_steps)  # as sampling does
        to = lambda d: None if d is None else {k: v.to(model.device) for k, v in d.items()}  # noqa: E731
        return Trajectories(
            saved["states"].to(model.device),
            Conditioning(to(saved["cond"]), to(saved["uncond"]), saved["labels"]),
            saved["indices"],
            saved["seed"],
            saved["outputs"].to(model.device),
        )
    traj = fp_trajectories(model, indices, cfg.seed, cfg.eval_batch_size)
    cpu = lambda d: None if d is None else {k: v.cpu() for k, v in d.items()}  # noqa: E731
    save_file(
        progress,
        TRAJECTORIES_FILE,
        key,
        {
            "states": traj.states.cpu(),
            "outputs": traj.outputs.cpu(),
            "cond": cpu(traj.cond.cond),
            "uncond": cpu(traj.cond.uncond),
            "labels": traj.cond.labels,
            "indices": traj.indices,
            "seed": traj.seed,
        },
    )
    return traj


def trajectory_calibration(
    model: Any,
    cfg: AccuQuantConfig,
    ctx: Any,
    progress: Optional[Path] = None,
    fingerprint: Optional[dict[str, Any]] = None,
) -> MethodResult:
    """Run the trajectory calibration on an already quantized ``model`` (the PTQ base); returns
    its metrics, per-group table and ``accuquant_groups.json``. ``progress``: a folder where it
    keeps its FP trajectories and saves its progress, resumed from there by a restarted job whose
    ``fingerprint`` (settings and PTQ base) is the same."""
    t0 = time.perf_counter()
    fingerprint = fingerprint or {"method": asdict(cfg)}
    fingerprint = {
        **fingerprint,
        "start": tensor_digest(
            {**quantizer_state_dict(model.denoiser), **quant_parameters(model.denoiser, "bias")}
        ),
    }
    ckpt = Checkpointer(progress, fingerprint, every=cfg.progress_every, what="accuquant calibration")
    traj = calibration_trajectories(model, cfg, progress)

    def on_iteration(it: int, start: int, value: float) -> None:
        if it % 10 == 0:
            ctx.tracker.log({"accuquant/loss": value, "accuquant/group_start": start})

    calibration = TrajectoryCalibration(model, cfg, on_iteration=on_iteration)
    resume = ckpt.load()
    initial = resume["initial"] if resume else calibration.all_group_losses(traj)
    reports = calibration.run(traj, progress=ckpt.within(lambda s: {**s, "initial": initial}), resume=resume)
    if ckpt.written:
        log.info("accuquant: %s", ckpt.summary())
    final = calibration.all_group_losses(traj)
    seconds = time.perf_counter() - t0
    metrics = {
        "accuquant_s": round(seconds, 3),
        "accuquant_loss_init": sum(initial) / len(initial),
        "accuquant_loss_final": sum(final) / len(final),
        "accuquant_groups": len(final),
        "accuquant_group_losses_init": initial,
        "accuquant_group_losses": final,
    }
    table = Table(list(asdict(reports[0])), [list(asdict(r).values()) for r in reports])
    groups_json = (
        json.dumps(
            {
                "config": asdict(cfg),
                "groups": [asdict(r) for r in reports],
                "group_losses_init": initial,
                "group_losses_final": final,
                "seconds": seconds,
            },
            indent=2,
        )
        + "\n"
    )
    return MethodResult(
        model, None, metrics, {"accuquant_groups": table}, {"accuquant_groups.json": groups_json}
    )


@METHODS.register("accuquant", schema=AccuQuantConfig)
class AccuQuant(Method):
    """``method=accuquant``: baseline PTQ (cached), then grouped trajectory calibration."""

    version = 6  # 4: the held-out guard replaces revert_if_worse; 5: judged on decoded images; 6: both held-out measures in the metrics
    not_in_key = (*Method.not_in_key, "progress_every")

    def changed_parameters(self, model: Any) -> dict[str, nn.Parameter]:
        """The biases of the quantized layers (``learn: [bias]`` trains them)."""
        return quant_parameters(model.denoiser, "bias")

    def calibrate(
        self, model: Any, quant: QuantConfig, cfg: AccuQuantConfig, ctx: Any, progress: Path
    ) -> MethodResult:
        check_scheduler(model)
        base = load_or_run_ptq(model, quant, cfg.ptq, ctx)
        settings = {
            "method": {k: v for k, v in asdict(cfg).items() if k not in self.not_in_key},
            "quant": quant_key(quant),
        }
        guard = (
            RefinementGuard(
                model, cfg.guard_samples, cfg.guard_seed, cfg.eval_batch_size, cfg.guard_criterion
            )
            if cfg.guard
            else None
        )
        result = trajectory_calibration(model, cfg, ctx, progress, settings).merge(base)
        if guard is not None:
            result.metrics.update(guard.judge("accuquant").metrics("accuquant"))
        result.quant = base.quant
        result.metrics.pop("ptq_cached", None)  # the base's provenance, not this result's
        return result
