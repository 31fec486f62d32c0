"""Name → builder registries, one per kind of part (models, methods, evaluators, backbones).

A part registers itself with a decorator::

    @METHODS.register("ptq", schema=PTQConfig)
    class PTQ(Method): ...

and the app builds it from the config's ``name`` field with ``METHODS.get(name)``. Every module
of the registry's package is imported on first use, so a new part is one new module. An unknown name
fails with the list of registered names and the closest match, so a typo names its own fix.
"""

from __future__ import annotations

import difflib
import importlib
import pkgutil
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

T = TypeVar("T", bound=Callable)


class UnknownNameError(KeyError):
    """Raised for a name that no part registered."""

    def __str__(self) -> str:  # KeyError quotes its message; show it plainly
        return str(self.args[0])


class Registry(Generic[T]):
    """A named mapping from strings to builders, filled by :meth:`register`.

    ``modules`` lists the modules whose import registers the built-in parts; they are imported the
    first time the registry is read, so that importing :mod:`diffquant.registry` stays cheap.
    """

    def __init__(self, kind: str, modules: tuple[str, ...] = ()) -> None:
        self.kind = kind
        self._modules = modules
        self._loaded = False
        self._entries: dict[str, T] = {}
        self._schemas: dict[str, type] = {}

    def register(self, name: str, schema: type | None = None) -> Callable[[T], T]:
        """Register a builder under ``name``; ``schema`` is the dataclass of its config group
        option (methods: stored in Hydra's ConfigStore as ``method/<name>_schema``)."""

        def decorator(builder: T) -> T:
            if name in self._entries and self._entries[name] is not builder:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._entries[name] = builder
            if schema is not None:
                self._schemas[name] = schema
            return builder

        return decorator

    def unregister(self, name: str) -> None:
        """Remove ``name`` (tests that register parts of their own clean up with it)."""
        self._entries.pop(name, None)
        self._schemas.pop(name, None)

    def schema(self, name: str) -> type | None:
        """The config dataclass registered with ``name`` (None if it registered none)."""
        self.get(name)
        return self._schemas.get(name)

    def _load(self) -> None:
        """Import the built-in parts: each listed module and, for a package, every module in it
        (so a new method or model is one new module, no list to edit)."""
        if not self._loaded:
            self._loaded = True
            for module in self._modules:
                package = importlib.import_module(module)
                for info in pkgutil.iter_modules(getattr(package, "__path__", [])):
                    importlib.import_module(f"{module}.{info.name}")

    def get(self, name: str) -> T:
        self._load()
        if name not in self._entries:
            names = self.names()
            close = difflib.get_close_matches(name, names, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise UnknownNameError(
                f"Unknown {self.kind} {name!r}.{hint} Registered {self.kind}s: {', '.join(names)}."
            )
        return self._entries[name]

    def names(self) -> list[str]:
        self._load()
        return sorted(self._entries)

    def __contains__(self, name: str) -> bool:
        self._load()
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())


MODELS: Registry = Registry("model", ("diffquant.models",))
METHODS: Registry = Registry("method", ("diffquant.methods",))
EVALUATORS: Registry = Registry("evaluator", ("diffquant.eval",))
BACKBONES: Registry = Registry("feature backbone", ("diffquant.eval.backbones",))
