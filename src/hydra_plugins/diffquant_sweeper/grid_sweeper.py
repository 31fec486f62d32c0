"""``hydra/sweeper=grids``: Hydra's basic sweeper over a *union* of grids.

Hydra 1.3's basic sweeper launches one cartesian product (``hydra.sweeper.params`` × the
command line's sweeps). A paper table is not one product: its FP row has no bit-width, so
``method=fp,ptq,quest × quant=w8a8,w4a8,w4a4`` would evaluate the FP model three times. This
sweeper is the basic sweeper plus ``grids``, a named mapping of parameter sets; each set is
expanded like ``params`` and the jobs are the grids' products one after the other::

    hydra:
      sweeper:
        grids:
          fp:        {method: fp, quant: fp32}                        # 1 job
          quantized: {quant: "${grid.quant}", method: "${grid.methods}"}  # bits x methods

A grid value is one value, a list (swept) or a Hydra sweep string (``a,b``, ``range(0,3)``), so
the values can be interpolated from the job config, where an experiment pins them (``grid.quant:
[w8a8, w4a8, w4a4]``). Every job also gets the command line's overrides and
``hydra.sweeper.params``, swept as usual (``seed=0,1`` doubles every grid). Rules:

* a grid set to ``null`` is skipped (``hydra.sweeper.grids.fp=null``); an empty list gives no job;
* jobs with the same overrides are launched once (the first occurrence keeps its place), so grids
  may overlap (the full method listed with its ablations);
* a key that a grid sets may not also be given on the command line or in ``params`` (which value
  would win is a guess); the error names the key: change the grid's values instead
  (``grid.quant=[w4a4]``);
* ``outer`` keys (``hydra.sweeper.outer: [calib_seed]``) order the union: the jobs are sorted,
  stably, by their value of each such key, in the order its values first appear (a job without
  the key sorts with the first value). With ``outer: [calib_seed]`` the jobs of the first
  calibration seed keep the numbers a sweep without calibration seeds gives them (the folder
  names ``10_ldm_digits_w4a4_ptq_s0`` stay), and each further seed's jobs follow.

Without ``grids`` it is exactly the basic sweeper. The launcher (basic, submitit local or SLURM)
receives the jobs as one batch (or ``max_batch_size`` chunks), as from the basic sweeper.
"""

# No `from __future__ import annotations`: Hydra executes plugin modules before registering them
# in sys.modules, where dataclasses would look string annotations up.
import itertools
import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Optional

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.config_store import ConfigStore
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override
from hydra.errors import HydraException
from omegaconf import DictConfig, ListConfig, OmegaConf

log = logging.getLogger(__name__)


@dataclass
class GridSweeperConf:
    _target_: str = "hydra_plugins.diffquant_sweeper.grid_sweeper.GridSweeper"
    max_batch_size: Optional[int] = None
    params: Optional[dict[str, str]] = None
    grids: Optional[dict[str, Any]] = field(default_factory=dict)
    outer: list[str] = field(default_factory=list)


ConfigStore.instance().store(group="hydra/sweeper", name="grids", node=GridSweeperConf, provider="diffquant")

_PLAIN = re.compile(r"^[\w.\-/:+@]+$")


def value_string(value: Any) -> str:
    """One grid value as it is written in an override (``w4a8``, ``3``, ``null``, ``'a b'``)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return str(value)
    text = str(value)
    if _PLAIN.match(text):
        return text
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def grid_overrides(grid: Mapping[str, Any]) -> Optional[list[str]]:
    """``{key: value or list}`` → override strings (``key=a,b`` for lists); None when a list is
    empty (the grid has no job)."""
    out = []
    for key, value in grid.items():
        if isinstance(value, (list, tuple)):
            if not value:
                return None
            out.append(f"{key}={','.join(value_string(v) for v in value)}")
        elif isinstance(value, str):
            out.append(f"{key}={value}")  # may be a sweep string: a,b / range(0,3) / choice(...)
        else:
            out.append(f"{key}={value_string(value)}")
    return out


def _axes(overrides: Sequence[Override]) -> dict[str, list[str]]:
    """The basic sweeper's expansion: key → the ``key=value`` strings it takes (later wins)."""
    axes: dict[str, list[str]] = {}
    for o in overrides:
        key = o.get_key_element()
        if o.is_sweep_override():
            if not o.is_discrete_sweep():
                raise HydraException(
                    f"the grids sweeper does not support sweep type "
                    f"{o.value_type.name if o.value_type else '?'} ({key})"
                )
            axes[key] = [f"{key}={v}" for v in o.sweep_string_iterator()]
        else:
            axes[key] = [f"{key}={o.get_value_element_as_str()}"]
    return axes


def _value(job: Sequence[str], key: str) -> Optional[str]:
    """The value a job's override list gives ``key`` (None: not set)."""
    for override in job:
        name, _, value = override.partition("=")
        if name == key:
            return value
    return None


def order_outer(jobs: list[list[str]], outer: Sequence[str]) -> list[list[str]]:
    """``jobs`` stably sorted by their values of the ``outer`` keys, each in the order its values
    first appear; a job without the key sorts with the first value."""
    ranks: dict[str, dict[str, int]] = {}
    for key in outer:
        values = [v for v in (_value(job, key) for job in jobs) if v is not None]
        ranks[key] = {v: i for i, v in enumerate(dict.fromkeys(values))}
    return sorted(jobs, key=lambda job: tuple(ranks[k].get(_value(job, k), 0) for k in outer))


def expand_grids(
    grids: Optional[Mapping[str, Any]],
    common: Sequence[Override],
    parser: Optional[OverridesParser] = None,
    outer: Sequence[str] = (),
) -> list[list[str]]:
    """Every job's override list: for each grid in order, its product with ``common`` (the
    command line's and ``params``' overrides, already parsed); duplicates dropped; then ordered
    by the ``outer`` keys (:func:`order_outer`).

    ``grids`` empty or None: the basic sweeper's product of ``common``.
    """
    parser = parser or OverridesParser.create()
    common_axes = _axes(common)
    if isinstance(grids, (DictConfig, ListConfig)):
        grids = OmegaConf.to_container(grids, resolve=True)
    if not grids:
        return order_outer([list(job) for job in itertools.product(*common_axes.values())], outer)
    common_keys = {o.key_or_group: o.input_line or o.get_key_element() for o in common}
    jobs: list[list[str]] = []
    seen: set[frozenset[str]] = set()
    for name, grid in grids.items():
        if grid is None:
            log.info("grid %r is null: skipped", name)
            continue
        if not isinstance(grid, Mapping):
            raise HydraException(f"hydra.sweeper.grids.{name} must map keys to values, got {grid!r}")
        strings = grid_overrides(grid)
        if strings is None:
            log.warning("grid %r has an empty list of values: it adds no job", name)
            continue
        parsed = parser.parse_overrides(strings)
        for o in parsed:
            if o.key_or_group in common_keys:
                raise HydraException(
                    f"`{common_keys[o.key_or_group]}` sets {o.key_or_group!r}, which grid {name!r} of "
                    f"the sweep config sweeps ({o.input_line}). Change the grid's values instead "
                    f"(e.g. grid.quant=[w4a4], grid.methods=[ptq] or grid.calib_seeds=[0,1]), or "
                    f"skip the grid with hydra.sweeper.grids.{name}=null."
                )
        axes = {**common_axes, **_axes(parsed)}
        for job in itertools.product(*axes.values()):
            key = frozenset(job)
            if key not in seen:
                seen.add(key)
                jobs.append(list(job))
    return order_outer(jobs, outer)


class GridSweeper(BasicSweeper):
    """The basic sweeper, launching the union of ``grids`` (see the module docstring)."""

    def __init__(
        self,
        max_batch_size: Optional[int] = None,
        params: Optional[dict[str, str]] = None,
        grids: Optional[dict[str, Any]] = None,
        outer: Optional[Sequence[str]] = None,
    ) -> None:
        super().__init__(max_batch_size=max_batch_size, params=params)
        if isinstance(grids, (DictConfig, ListConfig)):
            grids = OmegaConf.to_container(grids, resolve=True)
        self.grids = grids or {}
        self.outer = list(outer or [])

    # BasicSweeper.sweep calls self.split_arguments(parsed params + command line, max_batch_size)
    def split_arguments(
        self,
        overrides: list[Override],  # type: ignore[override]
        max_batch_size: Optional[int],
    ) -> list[list[list[str]]]:
        loader = self.hydra_context.config_loader if self.hydra_context is not None else None
        jobs = expand_grids(self.grids, overrides, OverridesParser.create(config_loader=loader), self.outer)
        if not jobs:
            raise HydraException("the sweep has no job: every grid is null or empty")
        log.info(
            "sweep: %d jobs from grids %s",
            len(jobs),
            ", ".join(k for k, v in self.grids.items() if v is not None) or "(none)",
        )
        if max_batch_size is None or max_batch_size == -1:
            return [jobs]
        return [jobs[i : i + max_batch_size] for i in range(0, len(jobs), max_batch_size)]
