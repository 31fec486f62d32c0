"""Time-step-aware activation quantizers: which parameter group each UNet call uses.

An :class:`ActQuantizer` with ``n_groups = G > 1`` holds one (Δ, z) set per group of sampler
steps. The sampler's ``S`` steps (0 = noisiest) are split evenly: step ``i`` belongs to group
``i · G // S`` (``G = S`` gives one set per step, as QuEST does).

:func:`attach_timestep_router` installs a forward pre-hook on the denoiser that sets every
time-step-aware quantizer's ``group_index`` to the groups of the call's rows, so a batch may mix
steps (calibration batches do). It routes

* **by sampler step index** where diffquant knows it: inside :func:`sampler_step`, which
  :meth:`DiffusionModel.step <diffquant.models.base.DiffusionModel.step>` wraps around each
  denoiser call, and which calibration / finetuning code wraps around calls on calibration rows
  (each row's ``_step``). A time step can occur twice in a schedule (diffusers' PNDM / PLMS:
  ``[981, 961, 961, 941, ...]``), so only the index says which step a call is;
* **by time-step value** otherwise (a user's own diffusers pipeline, which calls the UNet with
  its time step alone): the argument where the family's
  :class:`~diffquant.models.denoiser.DenoiserSpec` says, mapped to the nearest schedule entry
  (the first of equal ones).

Step indices are used only where the router's schedule holds the call's time step at that
index; otherwise (a sampler with another number of steps than the one the model was quantized
for) the call is routed by value, with a warning. Code that calls a UNet sub-module directly
(block reconstruction) routes with :meth:`TimestepRouter.route` / :meth:`route_steps`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Optional

import torch
from torch import Tensor, nn

from diffquant.quant.lowrank import GroupSmooth
from diffquant.quant.quantizers import ActQuantizer

if TYPE_CHECKING:
    from diffquant.models.denoiser import DenoiserSpec

log = logging.getLogger(__name__)

ROUTER_ATTR = "_diffquant_timestep_router"
STEP_ATTR = "_diffquant_sampler_step"


class TimestepRouter:
    """Maps time steps to group indices. ``schedule``: the sampler's time steps, noisiest first."""

    def __init__(self, schedule: Sequence[int] | Tensor, n_groups: int) -> None:
        self.schedule = torch.as_tensor(schedule, dtype=torch.float64).reshape(-1).cpu()
        self.n_groups = int(n_groups)
        if self.n_groups < 1 or self.n_groups > len(self.schedule):
            raise ValueError(
                f"timestep_groups={n_groups} must be in 1..{len(self.schedule)} (the number of sampler steps)"
            )
        self._warned = False

    @property
    def n_steps(self) -> int:
        """``S``, the number of sampler steps of the schedule."""
        return len(self.schedule)

    def step_index(self, timestep: Tensor | int | float) -> Tensor:
        """Sampler step index ``(B,)`` of each time step (nearest schedule entry; the first of
        equal entries, so a repeated time step always maps to its first step)."""
        t = torch.as_tensor(timestep).detach().reshape(-1).to("cpu", torch.float64)
        return (t[:, None] - self.schedule[None, :]).abs().argmin(dim=1)

    def step_groups(self, steps: Tensor | int) -> Tensor:
        """Group index ``(B,)`` of each sampler step index: ``i · G // S``."""
        s = torch.as_tensor(steps).detach().reshape(-1).to("cpu", torch.long)
        if s.numel() and (s.min() < 0 or s.max() >= self.n_steps):
            raise ValueError(f"sampler step index outside 0..{self.n_steps - 1}: {s.tolist()[:8]}")
        return s * self.n_groups // self.n_steps

    def groups(self, timestep: Tensor | int | float, steps: Optional[Tensor | int] = None) -> Tensor:
        """Group index ``(B,)`` (LongTensor) of each row: by ``steps`` (sampler step indices, one
        or one per row) where the schedule holds ``timestep`` at those indices, else by the
        time-step value (see the module doc)."""
        if steps is not None:
            s = torch.as_tensor(steps).detach().reshape(-1).to("cpu", torch.long)
            t = torch.as_tensor(timestep).detach().reshape(-1).to("cpu", torch.float64)
            if s.numel() == 1 and t.numel() > 1:
                s = s.expand(t.numel())
            in_range = s.numel() == t.numel() and bool(((s >= 0) & (s < self.n_steps)).all())
            if in_range and bool((self.schedule[s] == t).all()):
                return self.step_groups(s)
            if not self._warned:
                log.warning(
                    "sampler step indices %s do not match the time steps %s of the "
                    "quantized schedule (%d steps): routing time-step groups by value",
                    s.tolist()[:4],
                    t.tolist()[:4],
                    self.n_steps,
                )
                self._warned = True
        return self.step_index(timestep) * self.n_groups // self.n_steps

    def route(
        self, module: nn.Module, timestep: Tensor | int | float, steps: Optional[Tensor | int] = None
    ) -> None:
        """Point every time-step-aware quantizer under ``module`` at the rows' groups (by
        ``steps`` where given and consistent, else by time-step value: :meth:`groups`)."""
        set_group_index(module, self.groups(timestep, steps))

    def route_steps(self, module: nn.Module, steps: Tensor | int) -> None:
        """Point every time-step-aware quantizer under ``module`` at the groups of sampler step
        indices ``steps`` (no time step needed)."""
        set_group_index(module, self.step_groups(steps))

    def state(self) -> dict[str, Any]:
        return {"schedule": self.schedule.tolist(), "n_groups": self.n_groups}


def set_group_index(module: nn.Module, group_index: Optional[Tensor | int]) -> None:
    """Set ``group_index`` (a LongTensor ``(B,)``, an int for all rows, or None) on every
    time-step-aware activation quantizer and time-step-aware channel balancing
    (:class:`~diffquant.quant.lowrank.GroupSmooth`) under ``module``."""
    if isinstance(group_index, int):
        group_index = torch.tensor([group_index])
    for m in module.modules():
        if isinstance(m, ActQuantizer) and m.n_groups > 1:
            m.group_index = None if group_index is None else group_index.to(m.scale.device)
        elif isinstance(m, GroupSmooth):
            m.group_index = None if group_index is None else group_index.to(m.smooth.device)


def attach_timestep_router(
    denoiser: nn.Module, spec: DenoiserSpec, schedule: Sequence[int] | Tensor, n_groups: int
) -> TimestepRouter:
    """Install (or replace) the denoiser's router and its forward pre-hook, which reads the time
    step where ``spec`` says the family passes it; returns the router."""
    detach_timestep_router(denoiser)
    router = TimestepRouter(schedule, n_groups)

    def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        router.route(module, spec.timestep(args, kwargs), getattr(module, STEP_ATTR, None))

    handle = denoiser.register_forward_pre_hook(hook, with_kwargs=True)
    object.__setattr__(denoiser, ROUTER_ATTR, (router, handle))
    return router


def detach_timestep_router(denoiser: nn.Module) -> None:
    entry = getattr(denoiser, ROUTER_ATTR, None)
    if entry is not None:
        entry[1].remove()
        object.__delattr__(denoiser, ROUTER_ATTR)


def get_router(denoiser: nn.Module) -> Optional[TimestepRouter]:
    """The router attached to ``denoiser`` (None when activations are not time-step aware)."""
    entry = getattr(denoiser, ROUTER_ATTR, None)
    return None if entry is None else entry[0]


def set_timestep(denoiser: nn.Module, timestep: Tensor | int | float) -> None:
    """Select the quantizer groups of ``timestep`` by hand (the hook does it on every call)."""
    router = get_router(denoiser)
    if router is not None:
        router.route(denoiser, timestep)


@contextmanager
def sampler_step(denoiser: nn.Module, steps: Optional[Tensor | int]) -> Iterator[None]:
    """Within the block, calls of ``denoiser`` are sampler step(s) ``steps`` (an int for every
    row, or a LongTensor ``(B,)`` per row; None: unknown): its router picks time-step groups by
    step index instead of time-step value (module doc). Nests; restores the previous value."""
    previous = getattr(denoiser, STEP_ATTR, None)
    if isinstance(steps, Tensor):
        steps = steps.detach().to("cpu", torch.long)
    object.__setattr__(denoiser, STEP_ATTR, steps)
    try:
        yield
    finally:
        object.__setattr__(denoiser, STEP_ATTR, previous)
