"""Calibration seeds: one knob, ``calib_seed``, re-seeds every random choice of calibration.

A method's config holds **base seeds** — every integer field named ``seed`` or ending in
``_seed``, at any depth: ``calib.seed`` (which calibration trajectories, their noise and
classes), ``act_init_seed`` (the random rows initial activation ranges are set from, and the L_p
search's element sampling), ``recon.seed`` (the reconstruction row subset and AdaRound / LSQ
batch sampling), QuEST's ``seed`` (training, probe and range-init rows, shuffling) and
``sensitivity.seed``, AccuQuant's ``seed`` (its FP trajectories and mini-batches). Every other
random choice of calibration is derived from one of these (``seed + 1``, ``seed * 7919 + unit``,
...), so re-seeding them re-seeds all of calibration, and nothing else: evaluation samples are
drawn from the job's ``seed``.

The rule, in this one function (:func:`derive_seed`), applied once when the config is typed
(:func:`with_calib_seed`, called by :func:`diffquant.schema.typed_run_config` and the Python
API)::

    derived seed = base seed + calib_seed * CALIB_SEED_STRIDE      (stride 104 729, a prime)

``calib_seed = 0`` leaves every seed as configured, so its results, cache keys and the published
tables are those of before the knob existed. The stride is a prime larger than every offset the
methods add to a seed (at most 7919), so no two calibration seeds share a random stream of one
component. Methods read the derived seeds from their typed config; the cache keys hold them, so
two calibration seeds never share a cached calibration set or result. ``calib_seed`` is bounded
(:data:`MAX_CALIB_SEED`) so that every seed derived from it, times the per-sample multipliers of
:func:`diffquant.models.base.sample_seed`, stays within torch's 64-bit seeds.
"""

from __future__ import annotations

import dataclasses
from typing import Any, TypeVar

from diffquant.validation import InvalidSetting

CALIB_SEED_STRIDE = 104_729
MAX_CALIB_SEED = 100_000

T = TypeVar("T")


def derive_seed(base: int, calib_seed: int) -> int:
    """The seed a component seeded ``base`` uses under calibration seed ``calib_seed`` (module
    doc): ``base`` itself at ``calib_seed = 0``."""
    return int(base) + int(calib_seed) * CALIB_SEED_STRIDE


def check_calib_seed(value: Any, key: str = "calib_seed") -> None:
    """Raise :class:`InvalidSetting` for ``key`` unless ``value`` is an integer in
    ``[0, MAX_CALIB_SEED)``."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < MAX_CALIB_SEED:
        raise InvalidSetting(
            key,
            f"must be an integer in [0, {MAX_CALIB_SEED}): 0 calibrates with the methods' own "
            "seeds, 1, 2, ... re-seed all of calibration",
        )


def is_seed_field(name: str) -> bool:
    """Whether a config field named ``name`` is a base seed of calibration."""
    return name == "seed" or name.endswith("_seed")


def seed_fields(cfg: Any, prefix: str = "") -> dict[str, int]:
    """Every base seed of the config dataclass ``cfg`` by dotted path (``calib.seed``, ...)."""
    out: dict[str, int] = {}
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            out.update(seed_fields(value, f"{prefix}{f.name}."))
        elif is_seed_field(f.name) and isinstance(value, int) and not isinstance(value, bool):
            out[prefix + f.name] = value
    return out


def with_calib_seed(cfg: T, calib_seed: int) -> T:
    """``cfg`` (a method's config dataclass) with every base seed replaced by its derived seed
    under ``calib_seed`` (:func:`derive_seed`); ``cfg`` itself at ``calib_seed = 0``."""
    if calib_seed == 0:
        return cfg
    changes: dict[str, Any] = {}
    for f in dataclasses.fields(cfg):  # type: ignore[arg-type]
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            changes[f.name] = with_calib_seed(value, calib_seed)
        elif is_seed_field(f.name) and isinstance(value, int) and not isinstance(value, bool):
            changes[f.name] = derive_seed(value, calib_seed)
    return dataclasses.replace(cfg, **changes)  # type: ignore[type-var]
