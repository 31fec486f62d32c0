"""Validation of config dataclasses: each validates itself in ``__post_init__`` by raising
:class:`InvalidSetting` for a field; :func:`diffquant.schema.typed` turns that into a
:class:`ConfigError` naming the field's full path (``method.recon.weight_iters``) and the fix."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


class ConfigError(ValueError):
    """A config value that cannot work, or a key that does not exist; the message names the key
    and the fix."""


class InvalidSetting(ValueError):
    """A field of a config dataclass (``key``, relative to the dataclass) that cannot work."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"{key} {message}")
        self.key, self.message = key, message


def positive(obj: Any, *keys: str, allow_zero: bool = False) -> None:
    """Raise :class:`InvalidSetting` for the first of ``keys`` of ``obj`` that is not positive
    (``allow_zero``: negative); None values are skipped (they mean "all" or "automatic")."""
    for key in keys:
        value = getattr(obj, key)
        if value is not None and (value < 0 or (value == 0 and not allow_zero)):
            raise InvalidSetting(key, f"must be {'>= 0' if allow_zero else 'positive'}")


def one_of(obj: Any, key: str, choices: Sequence[Any]) -> None:
    """Raise :class:`InvalidSetting` unless ``obj.<key>`` is one of ``choices``."""
    if getattr(obj, key) not in choices:
        raise InvalidSetting(key, f"is unknown: use one of {list(choices)}")
