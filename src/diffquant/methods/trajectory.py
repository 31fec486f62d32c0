"""Multi-step rollouts of a :class:`~diffquant.models.base.DiffusionModel` and the gradient of a
*group loss* over them (AccuQuant's calibration objective).

Notation: the sampler has ``S`` steps, step ``i`` (0 = noisiest) maps the state ``x_i`` to
``x_{i+1}`` (``x_0`` = the initial noise x_T, ``x_S`` = the final latents). A *group* is ``M``
consecutive steps ``i0 .. i0+M-1``. Both chains start from the same state ``x_{i0}`` (taken from
the FP trajectory) and use the same scheduler, guidance and per-step noise (``DiffusionModel.step``
with the samples' ``indices`` and ``seed``); the FP chain ends in ``x_{i0+M}``, the quantized one
in ``x̃_{i0+M}``, and the group loss is ``L = d(x̃_{i0+M}, x_{i0+M})`` (``d`` = MSE by default).

Two ways to put ``∂L/∂θ`` into the ``.grad`` of the learned quantization parameters θ:

* :func:`group_backward` with ``mode="exact"`` back-propagates through all ``M`` steps (the graphs
  of ``M`` UNet calls are alive at once: memory grows linearly with ``M``).
* ``mode="approx"`` (our reconstruction of AccuQuant's O(1)-memory technique, see
  :mod:`diffquant.methods.accuquant`): roll the quantized chain out without graphs, keeping
  only the ``M`` input states (a few KB each; the last step keeps its graph), take
  ``g = ∂L/∂x̃_{i0+M}``, back-propagate it into the last step, then for each earlier step ``k``
  recompute ``x̃_{i0+k+1} = step(x̃_{i0+k})`` with a graph and back-propagate ``g`` into it
  (``2M − 1`` UNet forwards and ``M`` backwards per iteration, vs ``M`` and ``M`` for exact):

      ∂L/∂θ ≈ Σ_k (∂x̃_{i0+k+1}/∂θ)ᵀ g

  i.e. the Jacobian chain ``∂x̃_{i0+M}/∂x̃_{i0+k+1}`` is replaced by the identity (the dashed
  "Approximation" arrows of the paper's overview figure). Only one step's graph exists at a time,
  so peak memory does not depend on ``M``. For ``M = 1`` it is exact; for ``M > 1`` it is exact
  whenever the sampler's Jacobian ``∂x̃_{k+1}/∂x̃_k`` is the identity.

The scheduler must be stateless between calls (DDIM, DDPM, Euler-like single-step samplers), since
groups start in the middle of the trajectory; multistep solvers that keep a history of model
outputs (DPM-Solver++ multistep, PLMS) are rejected by :func:`check_stateless_scheduler`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from diffquant.models.base import Conditioning
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


def check_stateless_scheduler(scheduler) -> None:
    """Raise for samplers whose ``step`` depends on earlier calls (a rollout may start anywhere)."""
    if hasattr(scheduler, "model_outputs") or hasattr(scheduler, "ets"):
        raise ValueError(
            f"{type(scheduler).__name__} keeps a history of model outputs between steps; "
            "trajectory calibration needs a single-step sampler (e.g. DDIMScheduler): "
            "set model.scheduler=DDIMScheduler"
        )


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


# ---------------------------------------------------------------------------- FP trajectories
@dataclass
class Trajectories:
    """FP sampler trajectories of ``N`` samples.

    Attributes:
        states: ``(S + 1, N, C, h, w)``; ``states[i]`` is the input of sampler step ``i``
            (``states[0]`` = x_T, ``states[S]`` = the final latents).
        cond: the samples' conditioning (``N`` rows).
        indices: the samples' indices (they fix per-step noise when eta > 0).
        seed: the seed the samples were drawn with.
    """

    states: Tensor
    cond: Conditioning
    indices: list[int]
    seed: int

    @property
    def n_steps(self) -> int:
        return self.states.shape[0] - 1

    def __len__(self) -> int:
        return self.states.shape[1]

    def rows(self, rows: Sequence[int] | Tensor) -> Trajectories:
        """The trajectories of a subset of samples."""
        r = torch.as_tensor(rows, dtype=torch.long)
        return Trajectories(
            self.states[:, r.to(self.states.device)],
            select_rows(self.cond, r),
            [self.indices[int(j)] for j in r],
            self.seed,
        )


@torch.no_grad()
def fp_trajectories(model, indices: Sequence[int], seed: int, batch_size: int = 64) -> Trajectories:
    """Sample the FP model's trajectories for samples ``indices`` (quantization off), keeping every
    state: memory ``(S + 1) · N · prod(latent_shape)`` floats (e.g. 21 · 256 · 256 · 4 B = 5.5 MB)."""
    states, conds = [], []
    model.scheduler.set_timesteps(model.sampler.num_inference_steps)
    with quant_state(model.denoiser, weights=False, acts=False):
        for start in range(0, len(indices), batch_size):
            idx = [int(i) for i in indices[start : start + batch_size]]
            cond = model.conditions(idx, seed).to(model.device)
            x = model.initial_noise(idx, seed)
            chain = [x]
            for i in range(len(model.timesteps)):
                x = model.step(x, i, cond, idx, seed)
                chain.append(x)
            states.append(torch.stack(chain))
            conds.append(cond)
    return Trajectories(torch.cat(states, dim=1), cat_conditions(conds), [int(i) for i in indices], seed)


# ---------------------------------------------------------------------------- rollouts
def rollout(
    model, x: Tensor, start: int, n_steps: int, cond: Conditioning, indices: Sequence[int], seed: int
) -> Tensor:
    """``n_steps`` sampler steps from ``x`` at step ``start``; differentiable (the caller decides
    whether a graph is built). ``x``: ``(N, C, h, w)`` → ``(N, C, h, w)``."""
    for k in range(n_steps):
        x = model.step(x, start + k, cond, indices, seed)
    return x


@torch.no_grad()
def rollout_states(
    model, x: Tensor, start: int, n_steps: int, cond: Conditioning, indices: Sequence[int], seed: int
) -> list[Tensor]:
    """The ``n_steps + 1`` states ``[x, step(x), ...]`` of a rollout, without graphs."""
    states = [x]
    for k in range(n_steps):
        states.append(model.step(states[-1], start + k, cond, indices, seed))
    return states


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
) -> float:
    """Accumulate ``loss_scale · ∂L/∂θ`` into the ``.grad`` of every parameter that requires grad,
    for the group loss ``L = loss(x̃_{start+n_steps}, target)`` of the current (quantized) model
    rolled out from ``x_start``; returns ``L`` (a float).

    Args:
        mode: ``exact`` (back-propagate through all steps; memory O(n_steps)) or ``approx``
            (identity-Jacobian approximation; memory of one step).
        x_start: ``(N, C, h, w)``, the group's input state (no graph needed).
        start: the sampler step index of the group's first step.
        n_steps: the group size M.
        target: ``(N, C, h, w)``, the FP chain's state after the group.
        loss_scale: multiplies the gradient (e.g. ``1 / n_micro_batches``).
    """
    if mode not in GRAD_MODES:
        raise ValueError(f"unknown gradient mode {mode!r}; use one of {GRAD_MODES}")
    x_start, target = x_start.detach(), target.detach()
    if mode == "exact":
        value = loss(rollout(model, x_start, start, n_steps, cond, indices, seed), target)
        (value * loss_scale).backward()
        return float(value.detach())

    # states x̃_start .. x̃_{end-1} without graphs; the last step is run with its graph right away
    states = rollout_states(model, x_start, start, n_steps - 1, cond, indices, seed)
    last = model.step(states[-1], start + n_steps - 1, cond, indices, seed)
    x_end = last.detach().requires_grad_(True)
    with torch.enable_grad():
        value = loss(x_end, target)
        (g,) = torch.autograd.grad(value * loss_scale, x_end)
    last.backward(g)
    del last
    for k in range(n_steps - 1):  # recompute each earlier step: one step's graph at a time
        out = model.step(states[k], start + k, cond, indices, seed)
        out.backward(g)
        del out
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
) -> float:
    """The group loss of the current model, without gradients."""
    with torch.no_grad():
        return float(loss(rollout(model, x_start, start, n_steps, cond, indices, seed), target))


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
    "check_stateless_scheduler",
    "fp_trajectories",
    "gradient_agreement",
    "gradient_of",
    "group_backward",
    "group_length",
    "group_loss",
    "group_starts",
    "loss_fn",
    "mse_loss",
    "rollout",
    "rollout_states",
    "select_rows",
]
