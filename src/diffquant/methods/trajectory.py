"""Multi-step rollouts of a :class:`~diffquant.models.base.DiffusionModel` and the gradient of a
*group loss* over them (AccuQuant's calibration objective).

Notation: the sampler has ``S`` steps (``S = len(model.timesteps)``: 51 for PNDM/PLMS with
``skip_prk_steps`` at 50 inference steps, whose second time step repeats), step ``i``
(0 = noisiest) maps the state ``x_i`` to ``x_{i+1}`` (``x_0`` = the initial noise x_T, ``x_S`` =
the final latents) with ``timesteps[i]``. A *group* is ``M`` consecutive steps ``i0 .. i0+M-1``.
Both chains start from the same state ``x_{i0}`` (taken from the FP trajectory) and use the same
scheduler, guidance and per-step noise (``DiffusionModel.step`` with the samples' ``indices`` and
``seed``); the FP chain ends in ``x_{i0+M}``, the quantized one in ``x̃_{i0+M}``, and the group
loss is ``L = d(x̃_{i0+M}, x_{i0+M})`` (``d`` = MSE by default).

**Schedulers with state.** Multistep samplers keep state between steps: PNDM/PLMS its ``ets``
(the last model outputs), ``counter`` and ``cur_sample``; DPM-Solver++ multistep its
``model_outputs``, ``lower_order_nums`` and ``_step_index``; UniPC, Euler, ... likewise. Every
chain therefore carries *its own* scheduler (a copy of the model's, :func:`fresh_scheduler`),
advanced only by that chain's steps (:func:`chain_step`); the model's own scheduler is never
stepped here. A trajectory records, besides its states, the model output the scheduler received
at every step (``Trajectories.outputs``), and a chain's scheduler at step ``i0`` is rebuilt by
replaying the scheduler alone (no denoiser call) over the chain's recorded states and outputs of
steps ``0 .. i0-1`` (:func:`scheduler_at`): a group that starts from the FP state at ``i0`` starts
from the FP chain's scheduler state at ``i0`` too (the FP model outputs as history), and the
quantized rollout advances its own copy. For samplers without state (DDIM) the replay changes
nothing. A rollout of the FP model from the FP chain's state reproduces the FP states exactly.

Two ways to put ``∂L/∂θ`` into the ``.grad`` of the learned quantization parameters θ:

* :func:`group_backward` with ``mode="exact"`` back-propagates through all ``M`` steps (the graphs
  of ``M`` denoiser calls are alive at once: memory grows linearly with ``M``), history terms of
  multistep updates included.
* ``mode="approx"`` (our reconstruction of AccuQuant's O(1)-memory technique, see
  :mod:`diffquant.methods.accuquant`): the Jacobians of the state-to-state maps
  ``∂x̃_{k+1}/∂x̃_k`` are replaced by the identity (the dashed "Approximation" arrows of the
  paper's overview figure). Write step ``k`` as ``x̃_{k+1} = Φ_k(x̃_k, ε̃_k, ε̃_{k-1}, ...)``: the
  scheduler's update of the state and of the model outputs ``ε̃_j = ε_θ(x̃_j)`` of this and (for
  a multistep sampler) earlier steps. The approximation keeps ``∂Φ_{k'}/∂ε̃_k`` exactly —
  for a multistep update the output of step ``k`` enters the steps ``k' ≥ k`` of the group that
  read it from the history (PLMS: 55/24, -59/24, 37/24, -9/24 of it over four steps) — and drops
  every path through a state: ``∂x̃_{i0+M}/∂x̃_{k'+1} ≈ I`` and ``∂ε̃_k/∂x̃_k ≈ 0`` (the
  denoiser's input Jacobian):

      ∂L/∂θ ≈ Σ_k (∂ε̃_k/∂θ)ᵀ w_k,   w_k = Σ_{k' ≥ k in the group} (∂Φ_{k'}/∂ε̃_k)ᵀ g,
      g = ∂L/∂x̃_{i0+M}.

  History from before the group (the FP chain's outputs) is a constant. The ``w_k`` come from
  one differentiable pass of the *scheduler alone* over the group's recorded (detached) states
  with the model outputs as leaves; then each step's denoiser call is recomputed with its graph
  and back-propagated with ``w_k``, one step's graph at a time: ``2M − 1`` denoiser forwards and
  ``M`` backwards per iteration (vs ``M`` and ``M`` for exact), peak memory of one step whatever
  ``M`` is (plus the scheduler's small graph over ``M`` latents). Dropping the history terms
  instead (only ``∂Φ_k/∂ε̃_k``) would weight PLMS's current output by 55/24 where its total
  weight in the update is 1; keeping them makes the approximation exact whenever the denoiser's
  output does not depend on its input and the scheduler's state Jacobian is the identity, for
  any number of history terms. For ``M = 1`` it is exact; for a single-step sampler (DDIM) it is
  the per-step recomputation of the overview figure. One oddity: PLMS's second step restarts
  from ``x_0`` (the first is a predictor), so for a group holding both the approximation still
  sends ``g`` through the predicted ``x_1``.

Schedulers that draw their own noise inside ``step`` (DDPM, the SDE variants of DPM-Solver)
would give the FP and the quantized chains different noise; :func:`check_scheduler` rejects them.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import Tensor

from diffquant.models.base import Conditioning, step_noise_kwargs, step_params
from diffquant.quant.state import quant_state

GRAD_MODES = ("exact", "approx")
LossFn = Callable[[Tensor, Tensor], Tensor]


def mse_loss(x_quant: Tensor, x_fp: Tensor) -> Tensor:
    """Mean squared error over all elements (a scalar), the default group loss."""
    return (x_quant - x_fp).pow(2).mean()


LOSSES: dict[str, LossFn] = {"mse": mse_loss}


def loss_fn(name: str) -> LossFn:
    if name not in LOSSES:
        raise ValueError(f"unknown group loss {name!r}; use one of {sorted(LOSSES)}")
    return LOSSES[name]


# ---------------------------------------------------------------------------- a chain's scheduler
def fresh_scheduler(model) -> Any:
    """A copy of ``model.scheduler`` at the start of sampling (``set_timesteps``, no history),
    to be advanced by one chain's steps only."""
    scheduler = copy.copy(model.scheduler)  # set_timesteps rebinds every piece of sampler state
    scheduler.set_timesteps(model.sampler.num_inference_steps)
    return scheduler


def snapshot_scheduler(scheduler) -> Any:
    """An independent copy of a chain's scheduler in its current state (history included)."""
    return copy.deepcopy(scheduler)


class _Recording:
    """``scheduler`` as ``DiffusionModel.step`` sees it, appending the model output every
    ``step`` receives to ``outputs``."""

    def __init__(self, scheduler, outputs: Optional[list[Tensor]]) -> None:
        self._scheduler, self._outputs = scheduler, outputs

    def __getattr__(self, name: str) -> Any:
        return getattr(self._scheduler, name)

    def step(self, model_output: Tensor, *args, **kwargs):
        if self._outputs is not None:
            self._outputs.append(model_output)
        return self._scheduler.step(model_output, *args, **kwargs)


@contextlib.contextmanager
def _using(model, scheduler) -> Iterator[None]:
    """``model.step`` / ``model.eps`` use ``scheduler`` within the block."""
    own = model.scheduler
    model.scheduler = scheduler
    try:
        yield
    finally:
        model.scheduler = own


def chain_step(
    model,
    scheduler,
    x: Tensor,
    i: int,
    cond: Conditioning,
    indices: Optional[Sequence[int]],
    seed: int,
    outputs: Optional[list[Tensor]] = None,
) -> Tensor:
    """``model.step`` from step ``i`` of a chain whose scheduler is ``scheduler`` (advanced in
    place); the model output the scheduler received is appended to ``outputs``."""
    with _using(model, _Recording(scheduler, outputs)):
        return model.step(x, i, cond, indices, seed)


def _scheduler_kwargs(
    model, scheduler, x: Tensor, i: int, indices: Optional[Sequence[int]], seed: int
) -> dict[str, Any]:
    """The extra arguments ``DiffusionModel.step`` passes to ``scheduler.step`` (eta and the
    samples' own per-step noise)."""
    return step_noise_kwargs(step_params(scheduler), model.sampler.eta, x, i, indices, seed)


def scheduler_update(
    model, scheduler, output: Tensor, x: Tensor, i: int, indices: Optional[Sequence[int]], seed: int
) -> Tensor:
    """The scheduler's part of step ``i`` alone: ``x_{i+1}`` from the model output ``output``
    (no denoiser call); advances ``scheduler`` as :func:`chain_step` would."""
    t = scheduler.timesteps[i]
    scheduler.scale_model_input(x, t)  # as model.eps does first (some samplers note the call)
    return scheduler.step(
        output, t, x, **_scheduler_kwargs(model, scheduler, x, i, indices, seed)
    ).prev_sample


def _probe_step(model, scheduler) -> Tensor:
    x = torch.randn(1, *model.latent_shape, generator=torch.Generator().manual_seed(0))
    x = x.to(model.device)
    return scheduler_update(model, scheduler, 0.1 * x, x, 0, [0], 0)


def check_scheduler(model) -> None:
    """Raise for a sampler whose ``step`` draws its own noise (then the quantized chain cannot
    see the FP chain's noise): the same step from the same state must give the same result."""
    a, b = _probe_step(model, fresh_scheduler(model)), _probe_step(model, fresh_scheduler(model))
    if not torch.equal(a, b):
        raise ValueError(
            f"{type(model.scheduler).__name__}.step draws its own noise, so the "
            "quantized chain cannot follow the FP chain's noise: trajectory "
            "calibration needs a deterministic sampler (DDIM with any eta, PNDM, "
            "DPM-Solver++ multistep, ...)"
        )


def _same(a: Any, b: Any) -> bool:
    if torch.is_tensor(a) or torch.is_tensor(b):
        return torch.is_tensor(a) and torch.is_tensor(b) and a.shape == b.shape and bool(torch.equal(a, b))
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    try:
        return bool(a == b)
    except Exception:  # noqa: BLE001 - incomparable values: treat as changed
        return False


def keeps_state(model) -> bool:
    """Whether the model's sampler keeps state between steps (a step changes its scheduler)."""
    scheduler = fresh_scheduler(model)
    before = {k: (v.clone() if torch.is_tensor(v) else copy.copy(v)) for k, v in vars(scheduler).items()}
    _probe_step(model, scheduler)
    after = vars(scheduler)
    return set(before) != set(after) or any(not _same(before[k], after[k]) for k in before)


# ---------------------------------------------------------------------------- conditioning rows
def select_rows(cond: Conditioning, rows: Sequence[int] | Tensor) -> Conditioning:
    """The conditioning of a subset of a batch's samples (rows of every condition tensor)."""
    rows_t = torch.as_tensor(rows, dtype=torch.long)
    pick = lambda d: None if d is None else {k: v[rows_t.to(v.device)] for k, v in d.items()}  # noqa: E731
    return Conditioning(pick(cond.cond), pick(cond.uncond), [cond.labels[int(r)] for r in rows_t])


def cat_conditions(parts: Sequence[Conditioning]) -> Conditioning:
    """Concatenate the conditioning of several batches (same keys)."""
    first = parts[0]
    cat = lambda key: (
        None
        if getattr(first, key) is None
        else {  # noqa: E731
            k: torch.cat([getattr(p, key)[k] for p in parts]) for k in getattr(first, key)
        }
    )
    return Conditioning(cat("cond"), cat("uncond"), [lab for p in parts for lab in p.labels])


# ---------------------------------------------------------------------------- trajectories
@dataclass
class Trajectories:
    """Sampler chains of ``N`` samples: the FP trajectories, or the quantized model's own chain
    up to some step.

    Attributes:
        states: ``(K + 1, N, C, h, w)``; ``states[i]`` is the input of sampler step ``i``
            (``states[0]`` = x_T; for a whole trajectory ``K = S`` and ``states[S]`` = the final
            latents).
        cond: the samples' conditioning (``N`` rows).
        indices: the samples' indices (they fix per-step noise when eta > 0).
        seed: the seed the samples were drawn with.
        outputs: ``(K, N, C, h, w)``; ``outputs[i]`` is the model output the scheduler received at
            step ``i`` (the guided ε), from which :func:`scheduler_at` rebuilds the chain's
            scheduler state at any step.
    """

    states: Tensor
    cond: Conditioning
    indices: list[int]
    seed: int
    outputs: Tensor

    @property
    def n_steps(self) -> int:
        return self.states.shape[0] - 1

    def __len__(self) -> int:
        return self.states.shape[1]

    def rows(self, rows: Sequence[int] | Tensor) -> Trajectories:
        """The trajectories of a subset of samples."""
        r = torch.as_tensor(rows, dtype=torch.long).to(self.states.device)
        return Trajectories(
            self.states[:, r],
            select_rows(self.cond, r),
            [self.indices[int(j)] for j in r],
            self.seed,
            self.outputs[:, r],
        )


@torch.no_grad()
def fp_trajectories(model, indices: Sequence[int], seed: int, batch_size: int = 64) -> Trajectories:
    """Sample the FP model's trajectories for samples ``indices`` (quantization off), keeping every
    state and every model output: memory ``(2S + 1) · N · prod(latent_shape)`` floats (e.g.
    41 · 256 · 256 · 4 B = 10.7 MB)."""
    states, outputs, conds = [], [], []
    model.scheduler.set_timesteps(model.sampler.num_inference_steps)  # model.timesteps, as sampling
    with quant_state(model.denoiser, weights=False, acts=False):
        for start in range(0, len(indices), batch_size):
            idx = [int(i) for i in indices[start : start + batch_size]]
            cond = model.conditions(idx, seed).to(model.device)
            x = model.initial_noise(idx, seed)
            scheduler, chain, outs = fresh_scheduler(model), [x], []
            for i in range(len(scheduler.timesteps)):
                x = chain_step(model, scheduler, x, i, cond, idx, seed, outs)
                chain.append(x)
            states.append(torch.stack(chain))
            outputs.append(torch.stack(outs))
            conds.append(cond)
    return Trajectories(
        torch.cat(states, dim=1),
        cat_conditions(conds),
        [int(i) for i in indices],
        seed,
        torch.cat(outputs, dim=1),
    )


@torch.no_grad()
def scheduler_at(
    model, chain: Trajectories, start: int, rows: Optional[Sequence[int] | Tensor] = None
) -> Any:
    """The scheduler of ``chain`` (samples ``rows``, default all) as it was before step
    ``start``: a fresh copy replayed over the chain's recorded states and model outputs of steps
    ``0 .. start-1`` (scheduler arithmetic only)."""
    if start > chain.outputs.shape[0]:
        raise ValueError(
            f"the chain has {chain.outputs.shape[0]} recorded steps: no scheduler state at step {start}"
        )
    scheduler = fresh_scheduler(model)
    if start == 0:
        return scheduler
    if rows is None:
        r, indices = slice(None), chain.indices
    else:
        r = torch.as_tensor(rows, dtype=torch.long).to(chain.states.device)
        indices = [chain.indices[int(j)] for j in r]
    for j in range(start):
        scheduler_update(model, scheduler, chain.outputs[j][r], chain.states[j][r], j, indices, chain.seed)
    return scheduler


def _start_scheduler(model, scheduler, start: int) -> Any:
    """The scheduler a chain starting at ``start`` advances: a copy of ``scheduler`` (its state
    at ``start``), or for None a fresh one where that is the right state."""
    if scheduler is not None:
        return snapshot_scheduler(scheduler)
    if start > 0 and keeps_state(model):
        raise ValueError(
            f"{type(model.scheduler).__name__} keeps state between steps: a chain "
            f"starting at step {start} needs its scheduler there (scheduler_at)"
        )
    return fresh_scheduler(model)


# ---------------------------------------------------------------------------- rollouts
def rollout(
    model,
    x: Tensor,
    start: int,
    n_steps: int,
    cond: Conditioning,
    indices: Sequence[int],
    seed: int,
    scheduler: Any = None,
    outputs: Optional[list[Tensor]] = None,
    states: Optional[list[Tensor]] = None,
) -> Tensor:
    """``n_steps`` sampler steps from ``x`` at step ``start``; differentiable (the caller decides
    whether a graph is built). ``x``: ``(N, C, h, w)`` → ``(N, C, h, w)``.

    ``scheduler``: the chain's scheduler at ``start`` (:func:`scheduler_at`; copied, not
    advanced); None for a fresh one (right at ``start = 0`` or for a sampler without state).
    ``outputs`` / ``states``: lists the model outputs and the states after every step are
    appended to."""
    scheduler = _start_scheduler(model, scheduler, start)
    for k in range(n_steps):
        x = chain_step(model, scheduler, x, start + k, cond, indices, seed, outputs)
        if states is not None:
            states.append(x)
    return x


def group_backward(
    model,
    mode: str,
    x_start: Tensor,
    start: int,
    n_steps: int,
    target: Tensor,
    cond: Conditioning,
    indices: Sequence[int],
    seed: int,
    loss: LossFn = mse_loss,
    loss_scale: float = 1.0,
    scheduler: Any = None,
) -> float:
    """Accumulate ``loss_scale · ∂L/∂θ`` into the ``.grad`` of every parameter that requires grad,
    for the group loss ``L = loss(x̃_{start+n_steps}, target)`` of the current (quantized) model
    rolled out from ``x_start``; returns ``L`` (a float).

    Args:
        mode: ``exact`` (back-propagate through all steps; memory O(n_steps)) or ``approx``
            (identity state Jacobians, see the module doc; memory of one step).
        x_start: ``(N, C, h, w)``, the group's input state (no graph needed).
        start: the sampler step index of the group's first step.
        n_steps: the group size M.
        target: ``(N, C, h, w)``, the FP chain's state after the group.
        loss_scale: multiplies the gradient (e.g. ``1 / n_micro_batches``).
        scheduler: the chain's scheduler at ``start`` (:func:`scheduler_at`: the FP chain's
            history for a multistep sampler); not advanced. None: a fresh one (see
            :func:`rollout`).
    """
    if mode not in GRAD_MODES:
        raise ValueError(f"unknown gradient mode {mode!r}; use one of {GRAD_MODES}")
    x_start, target = x_start.detach(), target.detach()
    if mode == "exact":
        out = rollout(model, x_start, start, n_steps, cond, indices, seed, scheduler)
        value = loss(out, target)
        (value * loss_scale).backward()
        return float(value.detach())

    begin = _start_scheduler(model, scheduler, start)
    running = snapshot_scheduler(begin)
    xs, outs, befores = [x_start], [], []
    with torch.no_grad():  # states x̃_start .. x̃_{end-1} and the outputs, without graphs
        for k in range(n_steps - 1):
            befores.append(snapshot_scheduler(running))
            xs.append(chain_step(model, running, xs[-1], start + k, cond, indices, seed, outs))
    # the last step's denoiser call with its graph, kept until its weight w is known
    last = n_steps - 1
    with _using(model, snapshot_scheduler(running)):
        eps_last = model.eps(xs[last], running.timesteps[start + last], cond)
    outs.append(eps_last.detach())
    with torch.no_grad():
        x_end = scheduler_update(model, running, outs[last], xs[last], start + last, indices, seed)
    x_end = x_end.detach().requires_grad_(True)
    with torch.enable_grad():
        value = loss(x_end, target)
        (g,) = torch.autograd.grad(value * loss_scale, x_end)
        # w_k: the scheduler alone over the recorded states (detached: identity Jacobians) with
        # the model outputs as leaves, g into every step's result
        leaves = [o.detach().requires_grad_(True) for o in outs]
        ys = [
            scheduler_update(model, begin, leaves[k], xs[k], start + k, indices, seed) for k in range(n_steps)
        ]
        ws = torch.autograd.grad(ys, leaves, grad_outputs=[g] * n_steps, allow_unused=True)
    del ys, leaves
    ws = [torch.zeros_like(o) if w is None else w for w, o in zip(ws, outs)]
    eps_last.backward(ws[last])
    del eps_last
    for k in range(last):  # recompute each earlier step's denoiser call: one graph at a time
        with _using(model, befores[k]):
            eps = model.eps(xs[k], befores[k].timesteps[start + k], cond)
        eps.backward(ws[k])
        del eps
    return float(value.detach())


def group_loss(
    model,
    x_start: Tensor,
    start: int,
    n_steps: int,
    target: Tensor,
    cond: Conditioning,
    indices: Sequence[int],
    seed: int,
    loss: LossFn = mse_loss,
    scheduler: Any = None,
) -> float:
    """The group loss of the current model, without gradients."""
    with torch.no_grad():
        return float(loss(rollout(model, x_start, start, n_steps, cond, indices, seed, scheduler), target))


def gradient_of(params: Sequence[torch.nn.Parameter], fn: Callable[[], object]) -> Tensor:
    """Run ``fn`` (which accumulates gradients) on zeroed ``.grad`` and return the gradients of
    ``params`` flattened into one vector (``.grad`` is zeroed again afterwards)."""
    for p in params:
        p.grad = None
    fn()
    flat = (
        torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params])
        .detach()
        .clone()
    )
    for p in params:
        p.grad = None
    return flat


def gradient_agreement(exact: Tensor, approx: Tensor) -> dict[str, float]:
    """How close the approximate gradient is to the exact one: cosine similarity and relative L2
    error ``‖approx − exact‖ / ‖exact‖``."""
    denom = exact.norm().clamp_min(1e-30)
    cos = torch.nn.functional.cosine_similarity(exact.double(), approx.double(), dim=0)
    return {"cosine": float(cos), "rel_error": float((approx - exact).norm() / denom)}


def group_starts(n_steps: int, group_size: int) -> list[int]:
    """First step of each group of ``group_size`` consecutive steps, in sampler order; the last
    group is shorter when ``group_size`` does not divide ``n_steps``."""
    if group_size < 1:
        raise ValueError(f"group_size={group_size} must be >= 1")
    return list(range(0, n_steps, group_size))


def group_length(start: int, n_steps: int, group_size: int) -> int:
    return min(group_size, n_steps - start)


__all__ = [
    "GRAD_MODES",
    "LOSSES",
    "Trajectories",
    "chain_step",
    "check_scheduler",
    "fp_trajectories",
    "fresh_scheduler",
    "gradient_agreement",
    "gradient_of",
    "group_backward",
    "group_length",
    "group_loss",
    "group_starts",
    "keeps_state",
    "loss_fn",
    "mse_loss",
    "rollout",
    "scheduler_at",
    "scheduler_update",
    "select_rows",
    "snapshot_scheduler",
]
