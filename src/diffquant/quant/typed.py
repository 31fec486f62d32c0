"""Configs arrive as OmegaConf ``DictConfig`` (from Hydra) or as dataclasses (from Python and
tests); these helpers give one typed view of either."""

from __future__ import annotations

import dataclasses
from typing import Any, TypeVar

from omegaconf import DictConfig, OmegaConf

T = TypeVar("T")


def as_dataclass(cfg: Any, cls: type[T]) -> T:
    """``cfg`` (a ``cls`` instance, a DictConfig or a dict, possibly nested) as a ``cls`` instance;
    keys ``cls`` lacks are an error, missing keys take ``cls``'s defaults."""
    if isinstance(cfg, cls):
        return cfg
    if dataclasses.is_dataclass(cfg):
        cfg = dataclasses.asdict(cfg)
    merged = OmegaConf.merge(OmegaConf.structured(cls), cfg)
    return OmegaConf.to_object(merged)


def key_dict(cfg: Any) -> Any:
    """:func:`as_dict` for cache keys: a dataclass field equal to its class's
    ``KEY_NEUTRAL_DEFAULTS`` entry is left out (at any depth), so adding an option with a neutral
    default invalidates no cached result. A field named in the class's ``KEY_CODE_VERSIONS``
    (``{field: n}``) that is in the key brings ``<field>_code_version: n``: bumping ``n`` when the
    code behind a switch changes its results invalidates the results made with it, and only
    those."""
    if dataclasses.is_dataclass(cfg) and not isinstance(cfg, type):
        neutral = getattr(type(cfg), "KEY_NEUTRAL_DEFAULTS", {})
        out = {
            f.name: key_dict(getattr(cfg, f.name))
            for f in dataclasses.fields(cfg)
            if not (f.name in neutral and getattr(cfg, f.name) == neutral[f.name])
        }
        for name, version in getattr(type(cfg), "KEY_CODE_VERSIONS", {}).items():
            if name in out:
                out[f"{name}_code_version"] = version
        return out
    if isinstance(cfg, dict):
        return {k: key_dict(v) for k, v in cfg.items()}
    if isinstance(cfg, (list, tuple)):
        return [key_dict(v) for v in cfg]
    return cfg


def as_dict(cfg: Any) -> dict[str, Any]:
    """A plain, JSON-able dict of a dataclass / DictConfig / dict config (for cache keys, logs)."""
    if dataclasses.is_dataclass(cfg):
        return dataclasses.asdict(cfg)
    if isinstance(cfg, DictConfig):
        return OmegaConf.to_container(cfg, resolve=True)
    return dict(cfg)
