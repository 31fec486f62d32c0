"""Time-step-aware activation quantizers: which parameter group each UNet call uses.

An :class:`ActQuantizer` with ``n_groups = G > 1`` holds one (Δ, z) set per group of sampler
steps. The sampler's ``S`` steps (0 = noisiest) are split evenly: step ``i`` belongs to group
``i · G // S`` (``G = S`` gives one set per step, as QuEST does).

:func:`attach_timestep_router` installs a forward pre-hook on the denoiser that reads its
time-step argument (where the family's :class:`~diffquant.models.denoiser.DenoiserSpec` says) —
a per-row tensor ``(B,)``, as :meth:`DiffusionModel.denoiser_kwargs` always passes — and sets every time-step-aware quantizer's ``group_index`` to the rows' groups, so a
batch may mix steps (calibration batches do). Time steps not in the schedule map to the
nearest one. Code that calls a UNet sub-module directly (block reconstruction) routes with
:meth:`TimestepRouter.route`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Optional

import torch
from torch import Tensor, nn

from diffquant.quant.quantizers import ActQuantizer

if TYPE_CHECKING:
    from diffquant.models.denoiser import DenoiserSpec

ROUTER_ATTR = "_diffquant_timestep_router"


class TimestepRouter:
    """Maps time steps to group indices. ``schedule``: the sampler's time steps, noisiest first."""

    def __init__(self, schedule: Sequence[int] | Tensor, n_groups: int) -> None:
        self.schedule = torch.as_tensor(schedule, dtype=torch.float64).reshape(-1).cpu()
        self.n_groups = int(n_groups)
        if self.n_groups < 1 or self.n_groups > len(self.schedule):
            raise ValueError(
                f"timestep_groups={n_groups} must be in 1..{len(self.schedule)} (the number of sampler steps)"
            )

    def step_index(self, timestep: Tensor | int | float) -> Tensor:
        """Sampler step index ``(B,)`` of each time step (nearest schedule entry)."""
        t = torch.as_tensor(timestep).detach().reshape(-1).to("cpu", torch.float64)
        return (t[:, None] - self.schedule[None, :]).abs().argmin(dim=1)

    def groups(self, timestep: Tensor | int | float) -> Tensor:
        """Group index ``(B,)`` (LongTensor) of each time step."""
        return self.step_index(timestep) * self.n_groups // len(self.schedule)

    def route(self, module: nn.Module, timestep: Tensor | int | float) -> None:
        """Point every time-step-aware quantizer under ``module`` at the rows' groups."""
        set_group_index(module, self.groups(timestep))

    def state(self) -> dict[str, Any]:
        return {"schedule": self.schedule.tolist(), "n_groups": self.n_groups}


def set_group_index(module: nn.Module, group_index: Optional[Tensor | int]) -> None:
    """Set ``group_index`` (a LongTensor ``(B,)``, an int for all rows, or None) on every
    time-step-aware activation quantizer under ``module``."""
    if isinstance(group_index, int):
        group_index = torch.tensor([group_index])
    for m in module.modules():
        if isinstance(m, ActQuantizer) and m.n_groups > 1:
            m.group_index = None if group_index is None else group_index.to(m.scale.device)


def attach_timestep_router(
    denoiser: nn.Module, spec: DenoiserSpec, schedule: Sequence[int] | Tensor, n_groups: int
) -> TimestepRouter:
    """Install (or replace) the denoiser's router and its forward pre-hook, which reads the time
    step where ``spec`` says the family passes it; returns the router."""
    detach_timestep_router(denoiser)
    router = TimestepRouter(schedule, n_groups)

    def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        router.route(module, spec.timestep(args, kwargs))

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
